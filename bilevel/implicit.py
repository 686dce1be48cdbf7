r"""Implicit differentiation of a root ``F(x*, θ) = 0`` in reverse and forward mode.

With ``A = ∂F/∂x`` and ``B = ∂F/∂θ`` at ``(x*, θ)`` the implicit function theorem gives
``∂x*/∂θ = −A⁻¹B`` (Krantz & Parks, *The Implicit Function Theorem*, 2002; Blondel et al.,
"Efficient and Modular Implicit Differentiation", NeurIPS 2022). Neither matrix is formed:

* reverse mode (VJP): for a cotangent ``v`` on ``x*`` solve ``Aᵀu = v``; the cotangent on θ
  is ``−Bᵀu``. ``Aᵀu`` is a VJP of ``F`` in ``x`` through one linearisation built per solve.
* forward mode (JVP): for a tangent ``t`` on θ solve ``A s = −B t``; ``s`` is the tangent of
  ``x*``. ``A s`` is a JVP of ``F`` in ``x`` (a VJP when ``F`` is marked symmetric).

:func:`custom_root` attaches this rule to any inner solver with a
``torch.autograd.Function`` that has a forward-mode rule and a generated ``vmap`` rule, so
``.backward()``, ``torch.autograd.grad``, ``torch.func.grad / vjp / jvp / vmap`` and
``torch.autograd.forward_ad`` all see ``x*(θ)`` as a differentiable function while the
inner solver's iterations are never recorded.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch

from ._transforms import any_batched, any_wrapped
from .errors import ConvergenceError, ConvergenceWarning
from .linear import CG, LinearSolver, SolveInfo
from .optimality import OptimalityFn, fixed_point, is_symmetric
from .tree import (
    Tree,
    check_float_tree,
    check_same_structure,
    tree_flatten,
    tree_leaves,
    tree_map,
    tree_norm,
    tree_unflatten,
    tree_zeros_like,
)

__all__ = [
    "ImplicitFunction",
    "custom_fixed_point",
    "custom_root",
    "implicit_grad",
    "root_jvp",
    "root_vjp",
]

OnFailure = Literal["warn", "raise", "ignore"]
_ON_FAILURE = ("warn", "raise", "ignore")

# Frames in these directories are not the user's: a warning is attributed to the first frame
# outside them (the line calling .backward(), torch.func.grad(...)(...), or the solver).
_INTERNAL_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))


def _warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the user's line, not to torch or bilevel internals."""
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _host(value: float | torch.Tensor) -> float:
    """A diagnostic scalar on the host (detached: it may carry a torch.func grad level)."""
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


class _Lazy:
    """A linear operator built on first use: the transpose most solvers never ask for."""

    def __init__(self, build: Callable[[], Callable[[Tree], Tree]]) -> None:
        self.build: Callable[[], Callable[[Tree], Tree]] | None = build
        self.fn: Callable[[Tree], Tree] | None = None

    def __call__(self, v: Tree) -> Tree:
        if self.fn is None:
            assert self.build is not None
            self.fn, self.build = self.build(), None
        return self.fn(v)


@contextlib.contextmanager
def _explain_mutation(what: str) -> Iterator[None]:
    """Turn functorch's in-place error (BatchNorm running statistics) into an actionable one."""
    try:
        yield
    except RuntimeError as error:
        if "mutate a captured Tensor" not in str(error):
            raise
        raise RuntimeError(
            f"{what} updates a tensor in place while torch.func differentiates it — typically "
            "a BatchNorm module with running statistics (track_running_stats=True) in train "
            "mode. Inside an inner problem the batch statistics are what the optimality "
            "condition uses, so the running averages have no meaning there: build the module "
            "with track_running_stats=False, or call "
            "torch.func.replace_all_batch_norm_modules_(model) once, or pass the buffers to "
            "torch.func.functional_call explicitly. (Outside torch.func transforms, plain "
            "autograd is used and the buffers are updated as in a forward pass.) "
            f"Original error: {error}"
        ) from error


# --- low-level rules --------------------------------------------------------------------


def _default_solver(symmetric: bool) -> LinearSolver:
    if symmetric:
        return CG(tol=1e-6, maxiter=100)
    from .linear import GMRES  # GMRES lives beside CG; imported lazily to keep this import light

    return GMRES(tol=1e-6, maxiter=100)


def _substitute(args: Sequence[Any], indices: Sequence[int], values: Sequence[Any]) -> tuple:
    full = list(args)
    for i, v in zip(indices, values, strict=True):
        full[i] = v
    return tuple(full)


def _is_float_tree(tree: Tree) -> bool:
    leaves = tree_leaves(tree)
    return bool(leaves) and all(
        isinstance(t, torch.Tensor) and t.is_floating_point() for t in leaves
    )


def _checked(optimality_fn: OptimalityFn, x_star: Tree, args: Sequence[Any]) -> Callable:
    """``x ↦ F(x, *args)``, raising a clear error when its output is not shaped like ``x``."""
    first = [True]

    def fx(x: Tree) -> Tree:
        out = optimality_fn(x, *args)
        if first[0]:
            check_same_structure(
                x_star,
                out,
                reference_name="the inner solution x",
                other_name="optimality_fn(x, *args)",
            )
            first[0] = False
        return out

    return fx


def _root_vjp(
    optimality_fn: OptimalityFn,
    x_star: Tree,
    args: Sequence[Any],
    cotangent: Tree,
    solver: LinearSolver,
    diff_indices: Sequence[int],
    symmetric: bool = False,
    unused: list[int] | None = None,
) -> tuple[list[Tree], SolveInfo]:
    """``−Bᵀu`` per differentiated argument, with ``Aᵀu = cotangent``.

    ``unused``, when given, receives the differentiated arguments that provably do not enter
    ``F`` (known for free on the eager path, from autograd's unused inputs).
    """
    if not torch.is_grad_enabled() and not any_wrapped((x_star, args, cotangent)):
        return _root_vjp_eager(
            optimality_fn, x_star, args, cotangent, solver, diff_indices, symmetric, unused
        )
    fx = _checked(optimality_fn, x_star, args)
    with _explain_mutation("optimality_fn"):
        _, vjp_x = torch.func.vjp(fx, x_star)  # the linearisation, built once per solve

    def rmatvec(u: Tree) -> Tree:  # Aᵀu
        return vjp_x(u)[0]

    # The solve is Aᵀu = v: its operator's transpose is A itself (for NormalCG).
    transpose = rmatvec if symmetric else _Lazy(lambda: _jvp_operator(fx, [x_star]))
    u, info = solver(rmatvec, cotangent, rmatvec=transpose)
    if not diff_indices:
        return [], info

    def f_args(*diff_args: Any) -> Tree:
        return optimality_fn(x_star, *_substitute(args, diff_indices, diff_args))

    with _explain_mutation("optimality_fn"):
        _, vjp_args = torch.func.vjp(f_args, *(args[i] for i in diff_indices))
    neg_bt_u = vjp_args(tree_map(torch.neg, u))  # −Bᵀu
    return list(neg_bt_u), info


def _root_vjp_eager(
    optimality_fn: OptimalityFn,
    x_star: Tree,
    args: Sequence[Any],
    cotangent: Tree,
    solver: LinearSolver,
    diff_indices: Sequence[int],
    symmetric: bool,
    unused: list[int] | None,
) -> tuple[list[Tree], SolveInfo]:
    """:func:`_root_vjp` outside ``torch.func`` transforms and without ``create_graph``.

    One evaluation of ``F`` records a graph in both ``x`` and the differentiated args; every
    ``Aᵀu`` replays it with ``torch.autograd.grad(..., retain_graph=True)`` and the final
    ``−Bᵀu`` reuses it once more. Plain autograd costs less per product than a
    ``torch.func.vjp`` closure, and the shared graph saves a second evaluation of ``F``.
    """
    x = tree_map(lambda t: t.detach().requires_grad_(True), x_star)
    probes = [tree_map(lambda t: t.detach().requires_grad_(True), args[i]) for i in diff_indices]
    with torch.enable_grad():
        out = optimality_fn(x, *_substitute(args, diff_indices, probes))
    check_same_structure(
        x_star, out, reference_name="the inner solution x", other_name="optimality_fn(x, *args)"
    )
    x_leaves, x_spec = tree_flatten(x)
    out_leaves = tree_leaves(out)
    live = [i for i, t in enumerate(out_leaves) if t.requires_grad]  # the rest are constant

    def pull_back(
        u: Tree, inputs: list[torch.Tensor], retain: bool, missing: list[bool] | None = None
    ) -> list[torch.Tensor]:
        u_leaves = tree_leaves(u)
        grads: Sequence[torch.Tensor | None] = [None] * len(inputs)
        if live and inputs:
            grads = torch.autograd.grad(
                [out_leaves[i] for i in live],
                inputs,
                grad_outputs=[u_leaves[i] for i in live],
                retain_graph=retain,
                allow_unused=True,
            )
        if missing is not None:
            missing.extend(g is None for g in grads)
        return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads, strict=True)]

    def rmatvec(u: Tree) -> Tree:  # Aᵀu
        if single:  # one tensor: skip the tree bookkeeping
            (g,) = torch.autograd.grad(
                out_leaves[0], x_leaves[0], u, retain_graph=True, allow_unused=True
            )
            return torch.zeros_like(x_leaves[0]) if g is None else g
        return tree_unflatten(pull_back(u, x_leaves, retain=True), x_spec)

    def build_matvec() -> Callable[[Tree], Tree]:  # A v, for solvers that need Aᵀ's transpose
        x_plain = tree_map(lambda t: t.detach(), x_star)
        with _explain_mutation("optimality_fn"):
            return _jvp_operator(lambda x: optimality_fn(x, *args), [x_plain])

    single = len(x_leaves) == 1 and x_spec.is_leaf() and live == [0]
    transpose = rmatvec if symmetric else _Lazy(build_matvec)
    u, info = solver(rmatvec, cotangent, rmatvec=transpose)
    if not diff_indices:
        return [], info
    probe_leaves = tree_leaves(probes)
    missing: list[bool] = []
    flat = pull_back(tree_map(torch.neg, u), probe_leaves, retain=False, missing=missing)  # −Bᵀu
    grads, pos = [], 0
    for i, probe in zip(diff_indices, probes, strict=True):
        leaves, spec = tree_flatten(probe)
        grads.append(tree_unflatten(flat[pos : pos + len(leaves)], spec))
        if unused is not None and missing and all(missing[pos : pos + len(leaves)]):
            unused.append(i)
        pos += len(leaves)
    return grads, info


def _jvp_operator(f: Callable[..., Tree], primals: Sequence[Any]) -> Callable[..., Tree]:
    """``t ↦ J_f(primals) t`` through one graph built here and reused for every ``t``.

    The linear map ``t ↦ J t`` is obtained by transposing ``w ↦ Jᵀw`` (a VJP) with a second
    VJP. Unlike ``torch.func.jvp`` this needs no dual level, so it also works inside
    ``torch.autograd.forward_ad``, and each product replays a recorded graph instead of
    re-running the forward pass.
    """
    out = f(*primals)

    def transpose(w: Tree) -> tuple:
        return torch.func.vjp(f, *primals)[1](w)

    _, vjp_transpose = torch.func.vjp(transpose, tree_zeros_like(out))
    return lambda *tangents: vjp_transpose(tuple(tangents))[0]


def _root_jvp(
    optimality_fn: OptimalityFn,
    x_star: Tree,
    args: Sequence[Any],
    tangents: Sequence[Tree | None],
    solver: LinearSolver,
    symmetric: bool,
) -> tuple[Tree, SolveInfo | None]:
    indices = [i for i, t in enumerate(tangents) if t is not None]
    if not indices:
        return tree_zeros_like(x_star), None

    def f_args(*diff_args: Any) -> Tree:
        return optimality_fn(x_star, *_substitute(args, indices, diff_args))

    bt = _jvp_operator(f_args, [args[i] for i in indices])(*(tangents[i] for i in indices))
    fx = _checked(optimality_fn, x_star, args)
    with _explain_mutation("optimality_fn"):
        _, vjp_x = torch.func.vjp(fx, x_star)

    def vjp_matvec(s: Tree) -> Tree:  # Aᵀ s
        return vjp_x(s)[0]

    # A = Aᵀ: a VJP through one reused graph is the cheapest product.
    matvec = vjp_matvec if symmetric else _jvp_operator(fx, [x_star])
    return solver(matvec, tree_map(torch.neg, bt), rmatvec=vjp_matvec)


def _resolve_solver(solver: LinearSolver | None, symmetric: bool) -> LinearSolver:
    if solver is None:
        return _default_solver(symmetric)
    if not isinstance(solver, LinearSolver):
        raise TypeError(
            "solver must be a bilevel linear solver such as bl.CG(...), bl.GMRES(...) or "
            f"bl.Dense(); got {type(solver).__name__}"
        )
    return solver


def root_vjp(
    optimality_fn: OptimalityFn,
    x_star: Tree,
    args: Sequence[Any],
    cotangent: Tree,
    solver: LinearSolver | None = None,
    *,
    argnums: int | Sequence[int] | None = None,
) -> tuple[Tree | None, ...]:
    r"""Cotangents on ``args`` of a cotangent ``v`` on the root ``x*`` of ``F(x, *args) = 0``.

    Solves ``Aᵀu = v`` with ``A = ∂F/∂x`` and returns ``−Bᵀu`` per argument, with
    ``B = ∂F/∂args``. Arguments that are not floating-point trees (or not in ``argnums``)
    get ``None``.

    Args:
        optimality_fn: ``F(x, *args) -> tree like x``.
        x_star: the root (any tree of float tensors).
        args: the arguments of ``F`` after ``x``.
        cotangent: a tree shaped like ``x_star``.
        solver: linear solver for ``Aᵀu = v`` (default: CG if ``F`` is marked symmetric,
            else GMRES).
        argnums: which of ``args`` to differentiate (default: every float tree).
    """
    args = tuple(args)
    check_float_tree(x_star, name="x_star")
    check_same_structure(x_star, cotangent, reference_name="x_star", other_name="cotangent")
    diff = _diff_indices(args, argnums)
    symmetric = is_symmetric(optimality_fn)
    grads, _ = _root_vjp(
        optimality_fn,
        x_star,
        args,
        cotangent,
        _resolve_solver(solver, symmetric),
        diff,
        symmetric,
    )
    out: list[Tree | None] = [None] * len(args)
    for i, g in zip(diff, grads, strict=True):
        out[i] = g
    return tuple(out)


def root_jvp(
    optimality_fn: OptimalityFn,
    x_star: Tree,
    args: Sequence[Any],
    tangents: Sequence[Tree | None],
    solver: LinearSolver | None = None,
) -> Tree:
    r"""Tangent of the root ``x*`` of ``F(x, *args) = 0`` for tangents on ``args``.

    Solves ``A s = −B t`` with ``A = ∂F/∂x``, ``B t = Σᵢ ∂F/∂argsᵢ · tᵢ``; ``tangents`` is
    aligned with ``args``, ``None`` meaning a zero tangent.
    """
    args, tangents = tuple(args), tuple(tangents)
    if len(args) != len(tangents):
        raise ValueError(
            f"tangents must align with args: got {len(tangents)} tangents for {len(args)} args"
        )
    check_float_tree(x_star, name="x_star")
    for i, (a, t) in enumerate(zip(args, tangents, strict=True)):
        if t is not None:
            check_same_structure(a, t, reference_name=f"args[{i}]", other_name=f"tangents[{i}]")
    symmetric = is_symmetric(optimality_fn)
    s, _ = _root_jvp(
        optimality_fn, x_star, args, tangents, _resolve_solver(solver, symmetric), symmetric
    )
    return s


def _diff_indices(args: Sequence[Any], argnums: int | Sequence[int] | None) -> list[int]:
    if argnums is None:
        return [i for i, a in enumerate(args) if _is_float_tree(a)]
    if (
        isinstance(argnums, bool)
        or not isinstance(argnums, int | Sequence)
        or isinstance(argnums, str | bytes)
    ):
        raise TypeError(
            f"argnums must be an int or a sequence of ints (positions in args, after x0), "
            f"got {type(argnums).__name__} {argnums!r}"
        )
    nums = [argnums] if isinstance(argnums, int) else list(argnums)
    for i in nums:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(
                f"argnums must be an int or a sequence of ints, got an entry "
                f"{type(i).__name__} {i!r}"
            )
        if not -len(args) <= i < len(args):
            raise ValueError(f"argnums entry {i!r} is out of range for {len(args)} argument(s)")
        if not _is_float_tree(args[i]):
            raise TypeError(
                f"argnums selects argument {i}, which is not a tree of floating-point tensors "
                "and cannot be differentiated; drop it from argnums or convert it to float."
            )
    return sorted({i % len(args) for i in nums})


# --- the autograd rule ------------------------------------------------------------------


class _Call:
    """Per-call state passed through ``torch.autograd.Function.apply`` (not a tensor)."""

    def __init__(self, owner: ImplicitFunction, spec: Any, n_x0: int) -> None:
        self.owner, self.spec, self.n_x0 = owner, spec, n_x0
        self.x_spec: Any = None
        self.aux: Any = None

    def split(self, leaves: Sequence[Any]) -> tuple[Tree, tuple]:
        x0, args = tree_unflatten(leaves, self.spec)
        return x0, tuple(args)


class _ImplicitRoot(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(call: _Call, *leaves: Any) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        # Detached inputs: nothing the inner solver does can reach the caller's graph.
        detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in leaves]
        x0, args = call.split(detached)
        with torch.enable_grad():
            out = call.owner.__wrapped__(x0, *args)
        if call.owner.has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    "has_aux=True: the inner solver must return a pair (x, aux), got "
                    f"{type(out).__name__}"
                )
            out, call.aux = out
        try:
            check_float_tree(out, name="the inner solver's output x")
        except TypeError as error:
            if isinstance(out, tuple) and len(out) == 2 and not call.owner.has_aux:
                raise TypeError(
                    f"{error}. The inner solver returned a pair: if it is (x, aux), decorate "
                    "with has_aux=True (custom_root(..., has_aux=True)) so that aux is passed "
                    "through undifferentiated."
                ) from error
            raise
        x_leaves, call.x_spec = tree_flatten(out)
        call.owner._check_root(out, args)
        return tuple(t.detach() for t in x_leaves)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        call, leaves = inputs[0], inputs[1:]
        ctx.call = call
        tensor_pos = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
        ctx.tensor_pos, ctx.leaves = (
            tensor_pos,
            [None if isinstance(t, torch.Tensor) else t for t in leaves],
        )
        ctx.n_out = len(output)
        ctx.save_for_backward(*output, *(leaves[i] for i in tensor_pos))
        ctx.save_for_forward(*output, *(leaves[i] for i in tensor_pos))

    @staticmethod
    def _restore(ctx: Any) -> tuple[Tree, tuple]:
        saved = ctx.saved_tensors
        x_star = tree_unflatten(saved[: ctx.n_out], ctx.call.x_spec)
        leaves = list(ctx.leaves)
        for i, t in zip(ctx.tensor_pos, saved[ctx.n_out :], strict=True):
            leaves[i] = t
        _, args = ctx.call.split(leaves)
        return x_star, args

    @staticmethod
    def backward(ctx: Any, *cotangents: torch.Tensor) -> tuple:  # type: ignore[override]
        call: _Call = ctx.call
        owner = call.owner
        x_star, args = _ImplicitRoot._restore(ctx)
        needs = ctx.needs_input_grad[1 + call.n_x0 :]
        diff = _requested_args(owner, args, needs, call)
        cotangent = tree_unflatten(list(cotangents), call.x_spec)
        unused: list[int] = []
        grads, info = _root_vjp(
            owner.optimality_fn,
            x_star,
            args,
            cotangent,
            owner.solver,
            diff,
            owner.symmetric,
            unused,
        )
        owner._report(info, "backward")
        owner._warn_unused(unused)
        per_arg: list[Tree | None] = [None] * len(args)
        for i, g in zip(diff, grads, strict=True):
            per_arg[i] = g
        arg_grads = tree_leaves_aligned(args, per_arg)
        return (None,) + (None,) * call.n_x0 + tuple(arg_grads)

    @staticmethod
    def jvp(ctx: Any, *tangent_leaves: Any) -> tuple[torch.Tensor, ...]:
        call: _Call = ctx.call
        owner = call.owner
        x_star, args = _ImplicitRoot._restore(ctx)
        _, arg_tangent_leaves = tree_unflatten(list(tangent_leaves[1:]), call.spec)
        tangents: list[Tree | None] = []
        for i, (a, t) in enumerate(zip(args, arg_tangent_leaves, strict=True)):
            t_leaves = tree_leaves(t)
            if i not in owner._argnum_set(args) or all(v is None for v in t_leaves):
                tangents.append(None)
            else:  # a partially given tangent: missing leaves are zero
                tangents.append(
                    tree_map(
                        lambda leaf, tl: torch.zeros_like(leaf) if tl is None else tl,
                        a,
                        t,
                    )
                )
        s, info = _root_jvp(
            owner.optimality_fn, x_star, args, tangents, owner.solver, owner.symmetric
        )
        if info is not None:
            owner._report(info, "forward-mode")
        return tuple(tree_leaves(s))


def tree_leaves_aligned(args: Sequence[Any], per_arg: Sequence[Tree | None]) -> list[Any]:
    """Flatten per-argument gradients into one entry per leaf of ``args`` (``None`` fills)."""
    out: list[Any] = []
    for a, g in zip(args, per_arg, strict=True):
        n = len(tree_leaves(a))
        out.extend([None] * n if g is None else tree_leaves(g))
    return out


def _requested_args(
    owner: ImplicitFunction, args: Sequence[Any], needs: Sequence[bool], call: _Call
) -> list[int]:
    """Float-tree arguments in ``argnums`` with at least one leaf needing a gradient."""
    offsets, pos = [], 0
    for a in args:
        offsets.append(pos)
        pos += len(tree_leaves(a))
    chosen = owner._argnum_set(args)
    return [
        i
        for i, a in enumerate(args)
        if i in chosen and any(needs[offsets[i] : offsets[i] + len(tree_leaves(a))])
    ]


class ImplicitFunction:
    """An inner solver made differentiable by the implicit function theorem.

    Created by :func:`custom_root` / :func:`custom_fixed_point`; call it like the inner
    solver, ``x_star = f(x0, *args)``. Attributes:

    * ``latest_info``: the :class:`SolveInfo` of the most recent backward (or forward-mode)
      linear solve, ``None`` before the first one; not updated under ``torch.func.vmap``
      (where a fixed-K solve has nothing to report).
    * ``optimality_fn``, ``solver``, ``symmetric``, ``argnums``, ``has_aux``, ``on_failure``.
    """

    def __init__(
        self,
        inner_solver: Callable[..., Any],
        optimality_fn: OptimalityFn,
        *,
        solver: LinearSolver | None,
        symmetric: bool | None,
        has_aux: bool,
        argnums: int | Sequence[int] | None,
        on_failure: OnFailure,
        callback: Callable[[SolveInfo], None] | None,
        root_tol: float | None = None,
    ) -> None:
        if not callable(inner_solver):
            raise TypeError(f"inner_solver must be callable, got {type(inner_solver).__name__}")
        if not callable(optimality_fn):
            raise TypeError(
                "optimality_fn must be callable F(x, *args) -> tree like x, got "
                f"{type(optimality_fn).__name__}"
            )
        if on_failure not in _ON_FAILURE:
            raise ValueError(f"on_failure must be one of {_ON_FAILURE}, got {on_failure!r}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable(SolveInfo), got {type(callback).__name__}")
        if root_tol is not None:
            if isinstance(root_tol, bool) or not isinstance(root_tol, int | float):
                raise TypeError(
                    f"root_tol must be a real number or None, got {type(root_tol).__name__}"
                )
            if not (root_tol >= 0 and math.isfinite(root_tol)):
                raise ValueError(f"root_tol must be finite and >= 0, got {root_tol!r}")
        self.root_tol = None if root_tol is None else float(root_tol)
        self.__wrapped__ = inner_solver
        self.optimality_fn = optimality_fn
        self.symmetric = is_symmetric(optimality_fn) if symmetric is None else bool(symmetric)
        self.solver = _resolve_solver(solver, self.symmetric)
        self.has_aux = has_aux
        self.argnums = argnums
        self.on_failure: OnFailure = on_failure
        self.callback = callback
        self.latest_info: SolveInfo | None = None
        self._dependence_checked = False
        functools.update_wrapper(self, inner_solver)

    def __repr__(self) -> str:
        name = getattr(self.__wrapped__, "__name__", "inner_solver")
        return (
            f"ImplicitFunction({name}, optimality_fn={self.optimality_fn!r}, "
            f"solver={self.solver!r})"
        )

    def _argnum_set(self, args: Sequence[Any]) -> set[int]:
        return set(_diff_indices(args, self.argnums))

    def __call__(self, x0: Tree, *args: Any) -> Any:
        if self.argnums is not None:
            _diff_indices(args, self.argnums)  # validate early, with the caller's frame
        leaves, spec = tree_flatten((x0, list(args)))
        call = _Call(self, spec, len(tree_leaves(x0)))
        out_leaves = _ImplicitRoot.apply(call, *leaves)
        x_star = tree_unflatten(list(out_leaves), call.x_spec)
        return (x_star, call.aux) if self.has_aux else x_star

    # -- diagnostics ------------------------------------------------------------------------

    @property
    def _name(self) -> str:
        return getattr(self.__wrapped__, "__name__", "inner_solver")

    def _fail(self, message: str, info: SolveInfo | None) -> None:
        """Apply ``on_failure`` to a diagnosed problem."""
        if self.on_failure == "ignore":
            return
        if self.on_failure == "raise":
            raise ConvergenceError(message, info)
        _warn(message, ConvergenceWarning)

    def _check_root(self, x_star: Tree, args: Sequence[Any]) -> None:
        """After the inner solve: x* finite, and ``‖F(x*, args)‖ ≤ root_tol`` when set.

        One host sync (skipped under ``vmap``, where nothing can be read on the host). The
        implicit function theorem differentiates the *root*: at a point that is not one the
        gradient is wrong by about ``‖A⁻¹‖·‖F‖``, with no other sign of trouble.
        """
        if any_batched((x_star, args)):
            return
        leaves = tree_leaves(x_star)
        # One host sync for the whole tree, not one per leaf.
        bad = int(sum((~torch.isfinite(t)).sum() for t in leaves))
        if bad:
            self._fail(
                f"{self._name} returned a non-finite inner solution ({bad} NaN/Inf entries), so "
                "its implicit gradient is meaningless: the inner solve diverged — lower its "
                "step size, clip its updates, or check its inputs.",
                None,
            )
            return
        if self.root_tol is None:
            return
        # x requires grad so that stationarity() takes its plain-autograd path (no torch.func
        # transform, so modules with running statistics still work).
        x = tree_map(lambda t: t.detach().requires_grad_(True), x_star)
        with torch.enable_grad(), _explain_mutation("optimality_fn"):
            residual = float(tree_norm(tree_map(torch.detach, self.optimality_fn(x, *args))))
        if residual <= self.root_tol:
            return
        self._fail(
            f"{self._name} returned a point that is not a root of optimality_fn: "
            f"‖F(x*, args)‖ = {residual:.3g} > root_tol = {self.root_tol:.3g}. The implicit "
            "gradient assumes F(x*) = 0 and is off by about ‖(∂F/∂x)⁻¹‖·‖F‖: run the inner "
            "solver longer or with a tighter tolerance, or raise root_tol if this accuracy is "
            "enough.",
            None,
        )

    def _report(self, info: SolveInfo, direction: str) -> None:
        """Record the solve's info and apply the failure policy (one host sync at the end)."""
        if any_batched(tree_leaves((info.residual_norm, dict(info.stats)))):
            return  # under vmap: batched diagnostics cannot outlive the transform
        self.latest_info = info
        if self.callback is not None:
            self.callback(info)
        if self.on_failure == "ignore" or not info.failed:
            return
        outcome = info.outcome
        residual = _host(info.residual_norm)
        head = (
            f"implicit differentiation of {self._name} ({direction} linear solve, "
            f"{self.solver!r}): "
        )
        if outcome == "nonfinite_input":
            message = head + (
                "the cotangent reaching x* holds NaN/Inf, so the gradient is NaN. It comes "
                "from the outer loss or from a layer applied to x* after this solve, not from "
                "the linear solve: check the outer loss at x* (e.g. log of 0, division by 0)."
            )
        elif outcome == "nonfinite":
            message = head + (
                f"NaN/Inf appeared during the solve ({info.iterations} iterations): either the "
                "iteration diverged (Neumann with too large an alpha — leave alpha=None to "
                "estimate it; a singular ∂F/∂x — add ridge=) or the products with ∂F/∂x are "
                "non-finite (a non-finite inner solution?). The gradient is not trustworthy."
            )
        elif outcome == "diverged":
            message = head + (
                f"the fixed-K solve diverged (final residual "
                f"{_host(info.stats['final_residual_norm']):.3g} above ‖b‖), so x = 0 was used "
                "and the implicit term of the gradient is zero. For Neumann lower alpha (or "
                "leave alpha=None to estimate it); for indefinite ∂F/∂x use bl.MINRES or add "
                "ridge=."
            )
        elif outcome == "breakdown" and info.fixed:
            message = head + (
                f"the fixed-K solve broke down in {int(info.stats['breakdowns'])} of "
                f"{info.iterations} iterations (e.g. a singular or not positive definite "
                f"∂F/∂x); the iterate reached before it (residual {residual:.3g}) was used. "
                "Use bl.MINRES "
                "for symmetric indefinite systems, bl.GMRES otherwise, or add ridge=."
            )
        else:
            message = head + (
                f"stopped with reason={info.reason!r} after {info.iterations} iterations "
                f"(residual {residual:.3g}). The gradient is only as accurate as that "
                "residual; raise maxiter, loosen tol, add ridge=, or pass on_failure='ignore'."
            )
            if info.reason == "breakdown":
                message += (
                    " A breakdown means ∂F/∂x is not positive definite (CG) or singular "
                    "(Dense) at the inner solution (e.g. a saddle point or an unconverged "
                    "inner solve): damp with ridge=, or use bl.MINRES / bl.GMRES."
                )
        self._fail(message, info)

    def _warn_unused(self, unused: Sequence[int]) -> None:
        """Warn (once) when a differentiated argument does not enter ``F``.

        The classic porting bug: θ only initialises the inner solver (``x0``), so the
        implicit gradient through ``F`` is identically zero. Autograd reports such inputs
        as unused in the backward pass, so this costs nothing and evaluates nothing.
        """
        if not unused or self._dependence_checked:
            return
        self._dependence_checked = True
        for i in unused:
            _warn(
                f"argument {i} of {self._name} is differentiated but does not enter "
                "optimality_fn, so its implicit gradient is zero. If it only sets the initial "
                "point, the optimality condition is missing its dependence on it (e.g. "
                "iMAML's proximal term λ(φ − θ)).",
                UserWarning,
            )


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


# --- decorators -------------------------------------------------------------------------


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
        A decorator producing an :class:`ImplicitFunction`.
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
    r"""Like :func:`custom_root` for a fixed point ``x* = T(x*, *args)``.

    The optimality function is ``F = T(x, *args) − x`` (:func:`bilevel.fixed_point`); the
    linear systems involve ``I − ∂T/∂x``, invertible when ``T`` is a contraction in ``x``.
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
            :func:`custom_root` / :func:`custom_fixed_point`, or plain with ``optimality_fn``.
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
        diff = _diff_indices(args, argnums)

        def objective(*diff_args: Any) -> tuple[torch.Tensor, Any]:
            full = _substitute(args, diff, diff_args)
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
        if any_wrapped((x0, args)) or any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(args)
        ):  # under torch.func transforms, or higher-order use: compose with torch.func.grad
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
