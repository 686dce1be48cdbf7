"""The autograd binding: one ``torch.autograd.Function`` per ``ImplicitFunction``.

The binding turns an inner solver into a differentiable ``x*(θ)`` by attaching the rules of
``._rules`` to it. Only tensors (and one frozen, never-mutated ``_Signature``) go
through ``apply``; the configuration (optimality condition, linear solver, policy) lives on
the class, built once per implicit function. It has ``setup_context``, a backward, a
forward-mode rule and a generated ``vmap`` rule, so ``.backward()``,
``torch.autograd.grad``, ``torch.autograd.forward_ad`` and ``torch.func.grad / vjp / jvp /
vmap`` all see ``x*(θ)`` while the inner iterations are never recorded.

**torch.compile (torch 2.13).** Three facts of the compiler shape the traced paths:

* Under ``torch.func.grad`` / ``vjp`` / ``vmap`` dynamo inlines an ``autograd.Function``'s
  forward and silently drops its custom backward (pytorch#193279; the vmap composition of
  pytorch#129845 traces but inherits the drop). So while compiling inside a transform the
  forward also carries the reverse rule in a form dynamo keeps: it adds
  ``z = F(x*, θ) − sg(F(x*, θ))`` (zero in value, ``∂z/∂θ = B``) to ``x*`` and registers a
  gradient hook on ``z`` mapping the incoming cotangent ``v`` to ``−u`` with ``Aᵀu = v``;
  autograd then delivers ``−Bᵀu`` to θ, exactly the implicit cotangent.
* Dynamo refuses an ``autograd.Function`` with a custom ``jvp``, so the traced class has
  none, and forward mode (``torch.func.jvp``) under ``torch.compile`` raises (the compiler
  drops custom forward rules too, pytorch#192985, and a hook cannot carry one).
* With no transform active (``.backward()`` on a compiled function) AOTAutograd builds the
  backward, which keeps no hook on an intermediate tensor — the hook form would give a zero
  gradient without an error — so the call runs eagerly through a graph break
  (``_outside_graph``) and the binding's own backward applies; ``fullgraph=True``
  refuses that break loudly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import (
    retrieve_all_functorch_interpreters,
    retrieve_current_functorch_interpreter,
)

from ..linear import LinearSolver, SolveInfo
from ..optimality import OptimalityFn, is_symmetric
from ..tree import check_float_tree, tree_flatten, tree_leaves, tree_map, tree_unflatten
from ._rules import adjoint_solve, diff_indices, jvp_rule, linearise, resolve_solver, vjp_rule
from .diagnostics import Diagnosed, OnFailure, check_policy

__all__ = ["ImplicitFunction"]


@dataclasses.dataclass(frozen=True)
class _Signature:
    """The static part of one call: structure and non-tensor leaves of ``(x0, args)``.

    A plain class, not a ``NamedTuple``: ``torch.func`` would flatten a tuple into its
    fields when it batches the forward-mode rule (``torch.func.jvp`` of a ``vmap``, and so
    ``jacfwd(jacrev)``), and fail to match them with the tangents.
    """

    spec: Any  # pytree TreeSpec of (x0, [args])
    constants: tuple[Any, ...]  # one entry per leaf: None where the leaf is a tensor
    tensor_pos: tuple[int, ...]  # positions of the tensor leaves
    n_x0: int  # number of tensor leaves belonging to x0
    # While compiling: the structure x* must have (no side channel reports it back).
    x_spec: Any = None

    @property
    def n_x(self) -> int | None:
        return None if self.x_spec is None else self.x_spec.num_leaves

    @staticmethod
    def of(
        x0: Any, args: Sequence[Any], x_spec: Any = None
    ) -> tuple[list[torch.Tensor], _Signature]:
        leaves, spec = tree_flatten((x0, list(args)))
        pos = tuple(i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor))
        consts = tuple(None if isinstance(t, torch.Tensor) else t for t in leaves)
        n_x0 = sum(isinstance(t, torch.Tensor) for t in tree_leaves(x0))
        return [leaves[i] for i in pos], _Signature(spec, consts, pos, n_x0, x_spec)

    def rebuild(self, tensors: Sequence[Any]) -> tuple[Any, tuple]:
        leaves = list(self.constants)
        for i, t in zip(self.tensor_pos, tensors, strict=True):
            leaves[i] = t
        x0, args = tree_unflatten(leaves, self.spec)
        return x0, tuple(args)

    def arg_slices(self, args: Sequence[Any]) -> list[slice]:
        """Per argument, the slice of the tensor inputs (after x0's) holding its leaves."""
        out, pos = [], self.n_x0
        for a in args:
            n = sum(isinstance(t, torch.Tensor) for t in tree_leaves(a))
            out.append(slice(pos, pos + n))
            pos += n
        return out


def _detach(tree: Any) -> Any:
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tree)


def _under_transform() -> bool:
    """True inside a ``torch.func`` transform (a form dynamo traces in torch 2.13)."""
    return bool(torch._C._are_functorch_transforms_active())


def _under_jvp() -> bool:
    if not _under_transform():
        return False
    interpreter = retrieve_current_functorch_interpreter()
    return interpreter is not None and interpreter.key() == TransformType.Jvp


def _backward_differentiated() -> bool:
    """Whether the backward pass now running is differentiated in turn, as supported here.

    True for ``create_graph=True`` (a Hessian by autograd, the double-backward trick of
    ``torch.autograd.functional.jvp`` / ``hvp``) and under an outer ``torch.func.jvp`` level
    (``torch.func.hessian``, ``jacfwd(jacrev)``, ``jvp(grad)``). Not for reverse-over-reverse
    ``torch.func`` (``jacrev(jacrev)``): torch 2.13's level checks reject a custom function
    applied inside a ``torch.func`` backward and differentiated after that level exited, so
    the solver's iterations are differentiated there, exact except where the cotangent is 0.
    """
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if not _under_transform():
        return True
    return any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())


def _nested_jvp() -> bool:
    """True under two or more ``torch.func.jvp`` levels (forward-over-forward)."""
    if not _under_transform():
        return False
    levels = retrieve_all_functorch_interpreters()
    return sum(i.key() == TransformType.Jvp for i in levels) > 1


def _forward(owner: ImplicitFunction, tensors: Sequence[Any], sig: _Signature) -> tuple:
    """x* (and aux) from the inner solver on detached inputs: the binding's forward.

    While compiling under a ``torch.func`` transform this is called directly, not through
    ``autograd.Function.apply``: dynamo (torch 2.13) either inlines an ``autograd.Function``
    there and drops its backward (pytorch#193279) or, when an input is an intermediate of the
    graph, traces it as a higher-order op that cannot hold the ``ImplicitFunction``; the
    reverse rule travels as a gradient hook instead (``_traced_rule``).
    """
    x0, args = sig.rebuild(tensors)
    # Detached inputs: nothing the inner solver does can reach the caller's graph.
    x_star, aux = owner._solve(_detach(x0), _detach(args))
    x_leaves, x_spec = tree_flatten(x_star)
    aux_leaves, aux_spec = tree_flatten(aux)
    aux_tensors = [t.detach() for t in aux_leaves if isinstance(t, torch.Tensor)]
    compiling = torch.compiler.is_compiling()
    if not compiling:  # read by __call__ / setup_context right after this forward
        owner._layout = (x_spec, aux_spec, aux_leaves)
        owner._check_root(x_star, args)
    elif sig.n_x is not None and len(x_leaves) != sig.n_x:
        raise RuntimeError(
            f"under torch.compile, {owner._name} returned {len(x_leaves)} tensors as "
            f"x*, but {sig.n_x} were expected (the structure of x0, or of its last "
            "eager call): call it once eagerly with these argument shapes first"
        )
    out = [t.detach() for t in x_leaves]
    if compiling and torch.is_grad_enabled():
        out = owner._traced_rule(out, x_spec, args)
    return (*out, *aux_tensors)


def _binding(owner: ImplicitFunction) -> type[torch.autograd.Function]:
    """The ``autograd.Function`` of ``owner``: its rules, closed over its configuration."""

    class ImplicitRoot(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*inputs: Any) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
            *tensors, sig = inputs
            return _forward(owner, tensors, sig)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
            *tensors, sig = inputs
            ctx.sig = sig
            if sig.x_spec is not None:  # compiling: the structure travels in the signature
                ctx.x_spec = sig.x_spec
            else:
                assert owner._layout is not None  # set by the eager forward just before
                ctx.x_spec = owner._layout[0]
            ctx.n_x = n_x = ctx.x_spec.num_leaves
            ctx.n_aux = len(output) - n_x
            if ctx.n_aux:
                ctx.mark_non_differentiable(*output[n_x:])
            ctx.save_for_backward(*output[:n_x], *tensors)
            ctx.save_for_forward(*output[:n_x], *tensors)

        @staticmethod
        def backward(ctx: Any, *cotangents: Any) -> tuple:  # type: ignore[override]
            sig: _Signature = ctx.sig
            saved = ctx.saved_tensors
            x_star = tree_unflatten(list(saved[: ctx.n_x]), ctx.x_spec)
            tensors = saved[ctx.n_x :]
            _, args = sig.rebuild(tensors)
            needs = ctx.needs_input_grad[: len(tensors)]
            slices = sig.arg_slices(args)
            diff = [i for i in owner._diff(args) if any(needs[slices[i]])]
            cotangent = tree_unflatten(
                [
                    torch.zeros_like(t) if c is None else c
                    for t, c in zip(saved[: ctx.n_x], cotangents[: ctx.n_x], strict=True)
                ],
                ctx.x_spec,
            )
            differentiated = _backward_differentiated()
            grads, info, unused = vjp_rule(
                owner.optimality_fn,
                x_star,
                args,
                cotangent,
                owner.solver,
                diff,
                owner.symmetric,
                on_linearised=owner._symmetry_probe(),
                adjoint=owner._differentiable_adjoint if differentiated else None,
            )
            owner._report(info, "backward")
            owner._warn_unused(unused)
            per_tensor: list[Any] = [None] * len(tensors)
            for i, g in zip(diff, grads, strict=True):
                leaves = [t for t in tree_leaves(g)]
                for j, leaf in zip(range(slices[i].start, slices[i].stop), leaves, strict=True):
                    per_tensor[j] = leaf
            return (*per_tensor, None)

        @staticmethod
        def jvp(ctx: Any, *tangents: Any) -> tuple:
            if _nested_jvp():
                # torch 2.13 runs this rule on the inner level's tensors only: the outer
                # level's tangent of the result would come back as zero, without an error.
                raise NotImplementedError(
                    f"torch.func.jvp of torch.func.jvp (forward-over-forward, e.g. "
                    f"jacfwd(jacfwd)) through {owner._name} is not supported: the outer "
                    "derivative would be silently zero. Take second derivatives with reverse "
                    "mode outside: torch.func.jacfwd(torch.func.jacrev(f)) or torch.func.hessian, "
                    "or torch.func.jvp(torch.func.grad(f), ...) for a Hessian-vector product."
                )
            sig: _Signature = ctx.sig
            saved = ctx.saved_tensors
            x_star = tree_unflatten(list(saved[: ctx.n_x]), ctx.x_spec)
            tensors = saved[ctx.n_x :]
            _, args = sig.rebuild(tensors)
            slices = sig.arg_slices(args)
            chosen = set(owner._diff(args))
            arg_tangents: list[Any] = []
            for i, a in enumerate(args):
                parts = tangents[slices[i]]
                if i not in chosen or all(t is None for t in parts):
                    arg_tangents.append(None)
                    continue
                # A partially given tangent: missing leaves are zero.
                leaves, spec = tree_flatten(a)
                it = iter(parts)
                filled = [
                    (lambda t, leaf: torch.zeros_like(leaf) if t is None else t)(next(it), leaf)
                    if isinstance(leaf, torch.Tensor)
                    else leaf
                    for leaf in leaves
                ]
                arg_tangents.append(tree_unflatten(filled, spec))
            s, info = jvp_rule(
                owner.optimality_fn, x_star, args, arg_tangents, owner.solver, owner.symmetric
            )
            if info is not None:
                owner._report(info, "forward-mode")
            return (*tree_leaves(s), *([None] * ctx.n_aux))

    ImplicitRoot.__name__ = ImplicitRoot.__qualname__ = f"ImplicitRoot[{owner._name}]"
    return ImplicitRoot


@torch.compiler.disable(reason="implicit differentiation under plain autograd runs eagerly")
def _outside_graph(owner: ImplicitFunction, x0: Any, args: tuple) -> Any:
    """``owner(x0, *args)`` run eagerly: a graph break under ``torch.compile``.

    With no ``torch.func`` transform active, the backward of a compiled graph is built by
    AOTAutograd, which (torch 2.13) neither traces this binding's forward as an
    ``autograd.Function`` subgraph nor keeps a gradient hook on an intermediate tensor: the
    hook form of the rule would give a zero gradient without an error. Running the call
    eagerly keeps the binding's backward; ``fullgraph=True`` refuses the break loudly. For
    one graph, differentiate inside the compiled function with ``torch.func.grad``.
    """
    return owner(x0, *args)


class ImplicitFunction(Diagnosed):
    """An inner solver made differentiable by the implicit function theorem.

    Created by [`custom_root`][bilevel.custom_root] /
    [`custom_fixed_point`][bilevel.custom_fixed_point]; call it like the inner solver,
    ``x_star = f(x0, *args)``. Attributes:

    * ``latest_info``: the [`SolveInfo`][bilevel.SolveInfo] of the most recent backward (or
      forward-mode) linear solve, ``None`` before the first one; not updated under
      ``torch.func.vmap`` or while ``torch.compile`` traces (where a fixed-K solve has
      nothing to report on the host).
    * ``optimality_fn``, ``solver``, ``symmetric``, ``argnums``, ``has_aux``, ``on_failure``,
      ``callback``, ``root_tol``.

    Args:
        inner_solver: ``inner_solver(x0, *args) -> x*`` (or ``(x*, aux)`` with ``has_aux``);
            run on detached inputs, its iterations are not recorded.
        optimality_fn: ``F(x, *args) -> tree like x`` with ``F(x*, *args) = 0``.
        solver: the linear solver of the backward and forward-mode systems; ``None`` picks
            ``CG(tol=1e-6, maxiter=100)`` when ``∂F/∂x`` is symmetric, else
            ``GMRES(tol=1e-6, maxiter=100)``.
        symmetric: whether ``∂F/∂x`` is symmetric; ``None`` reads ``optimality_fn``'s own
            ``symmetric`` mark.
        has_aux: the inner solver returns ``(x*, aux)``; ``aux`` is passed through
            undifferentiated.
        argnums: which ``args`` (0-based, after ``x0``) receive gradients; ``None`` for every
            float tree.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"``: what a failed linear solve, a
            non-finite inner solution or a missed root does (see
            [`custom_root`][bilevel.custom_root]).
        callback: called with each backward/forward solve's [`SolveInfo`][bilevel.SolveInfo],
            or ``None``.
        root_tol: when set, the forward pass applies ``on_failure`` if
            ``‖F(x*, args)‖ > root_tol``; ``None`` checks only that ``x*`` is finite.

    Raises:
        TypeError: ``inner_solver`` or ``optimality_fn`` is not callable, ``solver`` is not a
            [`LinearSolver`][bilevel.LinearSolver], or ``callback`` is neither callable nor
            ``None``.
        ValueError: ``on_failure`` is not one of the three policies, or ``root_tol`` is
            negative or non-finite.
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
        self.root_tol = check_policy(on_failure, callback, root_tol)
        self.__wrapped__ = inner_solver
        self.optimality_fn = optimality_fn
        self.symmetric = is_symmetric(optimality_fn) if symmetric is None else bool(symmetric)
        self.solver = resolve_solver(solver, self.symmetric)
        self.has_aux = has_aux
        self.argnums = argnums
        self.on_failure: OnFailure = on_failure
        self.callback = callback
        self.latest_info: SolveInfo | None = None
        self._dependence_checked = False
        self._symmetry_checked = False
        self._checks_solution = True
        self._layout: tuple[Any, Any, list[Any]] | None = None
        functools.update_wrapper(self, inner_solver)
        self._function = _binding(self)

    def __repr__(self) -> str:
        return (
            f"ImplicitFunction({self._name}, optimality_fn={self.optimality_fn!r}, "
            f"solver={self.solver!r})"
        )

    def _diff(self, args: Sequence[Any]) -> list[int]:
        return diff_indices(args, self.argnums)

    def _solve(self, x0: Any, args: tuple) -> tuple[Any, Any]:
        """Run the inner solver with gradients enabled; returns ``(x*, aux)``, checked."""
        with torch.enable_grad():
            out = self.__wrapped__(x0, *args)
        aux = None
        if self.has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    "has_aux=True: the inner solver must return a pair (x, aux), got "
                    f"{type(out).__name__}"
                )
            out, aux = out
        try:
            check_float_tree(out, name="the inner solver's output x")
        except TypeError as error:
            if isinstance(out, tuple) and len(out) == 2 and not self.has_aux:
                raise TypeError(
                    f"{error}. The inner solver returned a pair: if it is (x, aux), decorate "
                    "with has_aux=True (custom_root(..., has_aux=True)) so that aux is passed "
                    "through undifferentiated."
                ) from error
            raise
        return out, aux

    def _differentiable_adjoint(
        self, x_star: Any, args: Sequence[Any], cotangent: Any
    ) -> tuple[Any, SolveInfo]:
        """``u`` with ``(∂F/∂x)ᵀu = v``, for a backward pass that is itself differentiated.

        Differentiating the linear solver's iterations instead gives a wrong derivative where
        ``v = 0`` — an outer loss stationary in ``x*`` (its Hessian at an optimum), or the zero
        cotangent of the double-backward trick of ``torch.autograd.functional.jvp`` / ``hvp``:
        an iterative solver returns a constant ``u = 0`` there, so the derivative in ``v``,
        ``(∂F/∂x)⁻ᵀ``, comes out as zero. Here ``u`` is the root of the linear condition
        ``G(u; v, x*, args) = (∂F/∂x)ᵀu − v``, differentiated by the same implicit rule as
        ``x*``: exact at any ``v``, whatever the solver, and at no cost to the first-order
        result (the same solve gives ``u``).
        """
        optimality_fn, symmetric, solver = self.optimality_fn, self.symmetric, self.solver
        infos: list[SolveInfo] = []

        def residual(u: Any, v: Any, x: Any, *a: Any) -> Any:
            pull = torch.func.vjp(lambda y: optimality_fn(y, *a), x)[1]
            return tree_map(torch.sub, pull(u)[0], v)

        def adjoint(u0: Any, v: Any, x: Any, *a: Any) -> Any:
            u, info = adjoint_solve(linearise(optimality_fn, x, a, [], symmetric), v, solver)
            infos.append(info)
            return u

        residual.symmetric = symmetric  # type: ignore[attr-defined]  # ∂G/∂u = (∂F/∂x)ᵀ
        adjoint.__name__ = f"{self._name} (adjoint solve)"
        root = ImplicitFunction(
            adjoint,
            residual,
            solver=solver,
            symmetric=symmetric,
            has_aux=False,
            argnums=None,
            on_failure=self.on_failure,
            callback=self.callback,
        )
        # This function reports the solve itself, and has probed F's symmetry already; a
        # NaN u comes from a NaN cotangent, reported as such by the caller.
        root._dependence_checked = root._symmetry_checked = True
        root._checks_solution = False
        u = root(tree_map(torch.zeros_like, cotangent), cotangent, x_star, *args)
        return u, infos[-1]

    def _traced_rule(self, x_leaves: list[torch.Tensor], x_spec: Any, args: tuple) -> list:
        """The reverse rule as a gradient hook, for a forward that dynamo inlines."""
        if _under_jvp():
            raise NotImplementedError(
                f"torch.func.jvp through {self._name} under torch.compile is not supported: "
                "torch 2.13's compiler drops an autograd.Function's forward-mode rule "
                "(pytorch#192985) and a gradient hook cannot carry one. Use reverse mode "
                "(torch.func.grad / vjp), or run the jvp eagerly."
            )
        diff = self._diff(args)
        if not diff:
            return x_leaves
        x = tree_unflatten(x_leaves, x_spec)
        held = tuple(a if i in diff else _detach(a) for i, a in enumerate(args))
        residual = tree_leaves(self.optimality_fn(x, *held))
        if len({t.dtype for t in residual}) != 1:
            raise TypeError(
                f"under torch.compile, {self._name}'s x* must have one dtype across its leaves "
                "(the compiled rule ravels the cotangent into one vector)"
            )
        zero = torch.cat([(r - r.detach()).reshape(-1) for r in residual])
        if not zero.requires_grad:  # e.g. vmap alone: no reverse pass will ask for the rule
            return x_leaves
        sizes = [t.numel() for t in x_leaves]
        plain = _detach(args)

        def hook(v: torch.Tensor) -> torch.Tensor:
            parts = [p.view_as(t) for p, t in zip(v.split(sizes), x_leaves, strict=True)]
            lin = linearise(self.optimality_fn, x, plain, [], self.symmetric)
            u, _ = adjoint_solve(lin, tree_unflatten(parts, x_spec), self.solver)
            return -torch.cat([t.reshape(-1) for t in tree_leaves(u)])

        zero.register_hook(hook)
        return [t + z.view_as(t) for t, z in zip(x_leaves, zero.split(sizes), strict=True)]

    def __call__(self, x0: Any, *args: Any) -> Any:
        """Run the inner solver; its result is differentiable in ``args`` by the IFT.

        Args:
            x0: the inner solver's starting point, a tree of tensors; it never receives a
                gradient.
            *args: the inner solver's other arguments, passed on unchanged; the float
                trees among them (or those selected by ``argnums``) are differentiated.

        Returns:
            ``x*``, the inner solver's output (a tree; with ``has_aux``, the pair
            ``(x*, aux)`` with ``aux`` undifferentiated).
        """
        if self.argnums is not None:
            diff_indices(args, self.argnums)  # validate early, with the caller's frame
        if torch.compiler.is_compiling() and not _under_transform():
            return _outside_graph(self, x0, args)
        layout = None
        if torch.compiler.is_compiling():
            # A traced forward cannot report x*'s structure back: take it from the last
            # eager call, or else assume x* is shaped like x0 (checked in forward). Never
            # written to self here: a traced mutation would guard, and recompile, on it.
            layout = self._layout
            if layout is None:
                if self.has_aux:
                    raise RuntimeError(
                        f"{self._name} has has_aux=True: call it once outside torch.compile "
                        "first, so that the structure of its aux output is known when tracing"
                    )
                layout = (tree_flatten(x0)[1], None, [])
        tensors, sig = _Signature.of(x0, args, None if layout is None else layout[0])
        out = (
            self._function.apply(*tensors, sig) if layout is None else _forward(self, tensors, sig)
        )
        if layout is None:
            layout = self._layout
        assert layout is not None
        x_spec, aux_spec, aux_leaves = layout
        n = len(out) if sig.x_spec is None and not self.has_aux else x_spec.num_leaves
        x_star = tree_unflatten(list(out[:n]), x_spec)
        if not self.has_aux:
            return x_star
        assert aux_spec is not None  # with has_aux the forward recorded aux's structure
        it = iter(out[n:])
        aux = tree_unflatten(
            [next(it) if isinstance(t, torch.Tensor) else t for t in aux_leaves], aux_spec
        )
        return x_star, aux
