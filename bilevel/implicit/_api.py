r"""The public entry points: ``custom_root``, ``custom_fixed_point`` and ``implicit_grad``.

All three build on one [`ImplicitFunction`][bilevel.ImplicitFunction], so eager
autograd, ``torch.func`` transforms and ``torch.compile`` share one implicit rule
(``._rules``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._transforms import any_wrapped
from ..linear import LinearSolver, SolveInfo
from ..optimality import OptimalityFn, fixed_point
from ..tree import Tree, tree_flatten, tree_leaves, tree_map, tree_unflatten
from ._function import ImplicitFunction
from ._rules import diff_indices, substitute
from .diagnostics import OnFailure

__all__ = ["custom_fixed_point", "custom_root", "implicit_grad"]


def _eager_grad(
    objective: Callable[..., tuple[torch.Tensor, torch.Tensor]], diff_args: Sequence[Tree]
) -> tuple[list[Tree], Any]:
    """``torch.func.grad(objective, has_aux=True)`` for untransformed inputs, via autograd."""
    probes = [tree_map(lambda t: t.detach().requires_grad_(True), a) for a in diff_args]
    with torch.enable_grad():
        value, payload = objective(*probes)
        flat = torch.autograd.grad(value, tree_leaves(probes), allow_unused=True)
    grads, pos = [], 0
    for probe in probes:
        leaves, spec = tree_flatten(probe)
        parts = flat[pos : pos + len(leaves)]
        pos += len(leaves)
        pairs = zip(leaves, parts, strict=True)
        filled = [torch.zeros_like(t) if g is None else g for t, g in pairs]
        grads.append(tree_unflatten(filled, spec))
    return grads, tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, payload)


def custom_root(
    optimality_fn: OptimalityFn,
    *,
    solver: LinearSolver | None = None,
    has_aux: bool = False,
    argnums: int | Sequence[int] | None = None,
    symmetric: bool | None = None,
    on_failure: OnFailure = "warn",
    callback: Callable[[SolveInfo], None] | None = None,
    root_tol: float | None = None,
) -> Callable[[Callable[..., Any]], ImplicitFunction]:
    r"""Decorate ``inner_solver(x0, *args) -> x*`` so that ``x*`` is differentiable in ``args``.

    ``x*`` must satisfy ``optimality_fn(x*, *args) = 0``. The inner solver is a black box —
    a GD loop calling ``torch.autograd.grad``, a ``torch.optim`` loop, ``scipy.optimize``, a
    closed form — run with gradients enabled but on detached inputs, so none of its
    iterations is recorded and memory does not grow with their number. Derivatives come from
    the implicit function theorem (module docstring), for ``.backward()``,
    ``torch.autograd.grad``, ``torch.autograd.forward_ad`` and ``torch.func.grad / vjp /
    jvp / vmap``. Under ``vmap`` the inner solver must itself be vmappable and the linear
    solver must be in fixed-K mode (``tol=0``).

    Args:
        optimality_fn: ``F(x, *args) -> tree like x``, e.g. ``bl.stationarity(loss)``.
        solver: linear solver (default: ``CG(tol=1e-6, maxiter=100)`` when ``F`` is symmetric,
            ``GMRES(tol=1e-6, maxiter=100)`` otherwise).
        has_aux: the inner solver returns ``(x, aux)``; ``aux`` is passed through undifferentiated.
        argnums: which ``args`` (0-based, after ``x0``) receive gradients; default every float
            tree. ``x0`` never receives one.
        symmetric: override ``F``'s own ``symmetric`` mark (``∂F/∂x = (∂F/∂x)ᵀ``).
        on_failure: what a failed linear solve, a non-finite inner solution or a missed root
            does: ``"warn"`` ([`ConvergenceWarning`][bilevel.ConvergenceWarning]),
            ``"raise"`` ([`ConvergenceError`][bilevel.ConvergenceError]) or ``"ignore"``.
            Adaptive solves fail when they stop short of ``tol``; fixed-K solves when they
            diverge, break down or meet NaN/Inf (running out of the budget is not a
            failure). A NaN/Inf cotangent is reported too, and gives NaN gradients.
        callback: called with each backward/forward solve's [`SolveInfo`][bilevel.SolveInfo].
        root_tol: when set, the forward pass evaluates ``‖F(x*, args)‖`` once after the inner
            solve and applies ``on_failure`` if it exceeds ``root_tol`` (an inner solver that
            stalled, or returned a point that is not a root). The inner solution is always
            checked for NaN/Inf (outside ``vmap``).

    Returns:
        A decorator producing an [`ImplicitFunction`][bilevel.ImplicitFunction].
    """
    if not callable(optimality_fn):
        raise TypeError(
            "custom_root(optimality_fn): optimality_fn must be callable F(x, *args) -> tree "
            f"like x, got {type(optimality_fn).__name__}"
        )

    def decorator(inner_solver: Callable[..., Any]) -> ImplicitFunction:
        return ImplicitFunction(
            inner_solver,
            optimality_fn,
            solver=solver,
            symmetric=symmetric,
            has_aux=has_aux,
            argnums=argnums,
            on_failure=on_failure,
            callback=callback,
            root_tol=root_tol,
        )

    return decorator


def custom_fixed_point(
    mapping: Callable[..., Tree],
    *,
    solver: LinearSolver | None = None,
    has_aux: bool = False,
    argnums: int | Sequence[int] | None = None,
    on_failure: OnFailure = "warn",
    callback: Callable[[SolveInfo], None] | None = None,
    root_tol: float | None = None,
) -> Callable[[Callable[..., Any]], ImplicitFunction]:
    r"""Like [`custom_root`][bilevel.custom_root] for a fixed point ``x* = T(x*, *args)``.

    The optimality function is ``F = T(x, *args) − x`` ([`fixed_point`][bilevel.fixed_point]); the
    linear systems involve ``I − ∂T/∂x``, invertible when ``T`` is a contraction in ``x``.
    ``∂F/∂x`` is not symmetric, so the default linear solver is GMRES.

    Args:
        mapping: ``T(x, *args) -> tree like x`` whose fixed point the inner solver returns
            (e.g. one step of the inner iteration), differentiable in ``x`` and in the
            differentiated ``args``.
        solver: linear solver (default: ``GMRES(tol=1e-6, maxiter=100)``).
        has_aux: the inner solver returns ``(x, aux)``; ``aux`` is passed through undifferentiated.
        argnums: which ``args`` (0-based, after ``x0``) receive gradients; default every float
            tree. ``x0`` never receives one.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"``: the failure policy of
            [`custom_root`][bilevel.custom_root].
        callback: called with each backward/forward solve's [`SolveInfo`][bilevel.SolveInfo].
        root_tol: when set, apply ``on_failure`` if ``‖T(x*, args) − x*‖ > root_tol`` after
            the inner solve, as in [`custom_root`][bilevel.custom_root].

    Returns:
        A decorator producing an [`ImplicitFunction`][bilevel.ImplicitFunction].
    """
    return custom_root(
        fixed_point(mapping),
        solver=solver,
        has_aux=has_aux,
        argnums=argnums,
        on_failure=on_failure,
        callback=callback,
        root_tol=root_tol,
    )


def implicit_grad(
    inner_solver: Callable[..., Any],
    outer_loss: Callable[..., torch.Tensor],
    optimality_fn: OptimalityFn | None = None,
    solver: LinearSolver | None = None,
    *,
    argnums: int | Sequence[int] | None = None,
    has_aux: bool = False,
) -> Callable[..., tuple[Any, tuple[Tree | None, ...]]]:
    r"""Value and gradient of ``outer_loss(x*(args), *args)`` with respect to ``args``.

    ``grads`` holds, per argument, the total derivative: the direct term
    ``∂outer/∂args`` plus the implicit term ``(∂x*/∂args)ᵀ ∇ₓ outer``. Arguments that are
    not floating-point trees (or not in ``argnums``) get ``None``; ``x0`` gets nothing.
    Built on ``torch.func.grad``, so the returned function composes with ``torch.func.vmap``
    (fixed-K solver required there).

    Args:
        inner_solver: ``inner_solver(x0, *args) -> x*``; either already decorated with
            [`custom_root`][bilevel.custom_root] /
            [`custom_fixed_point`][bilevel.custom_fixed_point], or plain with ``optimality_fn``.
        outer_loss: ``outer_loss(x*, *args) -> scalar tensor``.
        optimality_fn: ``F(x, *args)``; required unless ``inner_solver`` is decorated.
        solver: linear solver; overrides the decorated function's when given.
        argnums: arguments to differentiate (default: every float tree).
        has_aux: ``outer_loss`` returns ``(scalar, aux)``; ``aux`` (e.g. ``x*`` itself, to
            warm-start the next inner solve) is returned undifferentiated.

    Returns:
        ``fn(x0, *args) -> (value, grads)`` with ``grads`` a tuple aligned with ``args``;
        with ``has_aux``, ``fn(x0, *args) -> ((value, aux), grads)``.
    """
    if not callable(outer_loss):
        raise TypeError(f"outer_loss must be callable, got {type(outer_loss).__name__}")
    if isinstance(inner_solver, ImplicitFunction):
        root = inner_solver
        if optimality_fn is not None or solver is not None:
            root = ImplicitFunction(
                inner_solver.__wrapped__,
                inner_solver.optimality_fn if optimality_fn is None else optimality_fn,
                solver=inner_solver.solver if solver is None else solver,
                symmetric=None if optimality_fn is not None else inner_solver.symmetric,
                has_aux=inner_solver.has_aux,
                argnums=None,
                on_failure=inner_solver.on_failure,
                callback=inner_solver.callback,
                root_tol=inner_solver.root_tol,
            )
    elif optimality_fn is None:
        raise TypeError(
            "implicit_grad needs an optimality condition: pass optimality_fn= (e.g. "
            "bl.stationarity(inner_loss)) or decorate the inner solver with @bl.custom_root(F) "
            "/ @bl.custom_fixed_point(T)."
        )
    else:
        root = custom_root(optimality_fn, solver=solver)(inner_solver)

    def value_and_grads(x0: Tree, *args: Any) -> tuple[Any, tuple[Tree | None, ...]]:
        diff = diff_indices(args, argnums)

        def objective(*diff_args: Any) -> tuple[torch.Tensor, Any]:
            full = substitute(args, diff, diff_args)
            out = root(x0, *full)
            x_star = out[0] if root.has_aux else out
            value = outer_loss(x_star, *full)
            aux = None
            if has_aux:
                if not (isinstance(value, tuple) and len(value) == 2):
                    raise TypeError(
                        "has_aux=True: outer_loss must return a pair (scalar, aux), got "
                        f"{type(value).__name__}"
                    )
                value, aux = value
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
                raise ValueError(
                    f"outer_loss must return a scalar tensor, got {shape}; reduce it, e.g. "
                    "with .mean() or .sum()."
                )
            value = value.reshape(())
            return value, ((value, aux) if has_aux else value)

        if not diff:
            payload = objective()[1]
            detached = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, payload)
            return detached, (None,) * len(args)
        diff_args = [args[i] for i in diff]
        if (
            torch.compiler.is_compiling()
            or any_wrapped((x0, args))
            or any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(args))
        ):  # compiled, under torch.func transforms, or higher-order: torch.func.grad composes
            grads, value = torch.func.grad(
                objective, argnums=tuple(range(len(diff))), has_aux=True
            )(*diff_args)
        else:  # plain autograd: less overhead, and host-side solvers (bl.SciPy) work
            grads, value = _eager_grad(objective, diff_args)
        out: list[Tree | None] = [None] * len(args)
        for i, g in zip(diff, grads, strict=True):
            out[i] = g
        return value, tuple(out)

    return value_and_grads
