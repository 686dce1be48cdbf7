r"""The implicit differentiation rules of a root ``F(x*, θ) = 0``, as plain functions.

With ``A = ∂F/∂x`` and ``B = ∂F/∂θ`` at ``(x*, θ)`` the implicit function theorem gives
``∂x*/∂θ = −A⁻¹B`` (Krantz & Parks, *The Implicit Function Theorem*, 2002; Blondel et al.,
"Efficient and Modular Implicit Differentiation", NeurIPS 2022). Neither matrix is formed:

* reverse mode (``vjp_rule``): for a cotangent ``v`` on ``x*`` solve ``Aᵀu = v``; the
  cotangent on θ is ``−Bᵀu``.
* forward mode (``jvp_rule``): for a tangent ``t`` on θ solve ``A s = −B t``; ``s`` is
  the tangent of ``x*``.

Both go through ``linearise``, the one place that decides how products with ``A``,
``Aᵀ`` and ``Bᵀ`` are computed: by replaying one recorded autograd graph (untransformed
inputs, no ``create_graph``: cheapest, and host-side solvers work), or through
``torch.func.vjp`` closures (under ``torch.func`` transforms, with ``create_graph`` and while
``torch.compile`` traces). Everything here is plain ``torch`` code with no Python state, so
it runs eagerly, under ``vmap`` and compiled; the autograd binding and ``implicit_grad`` are
built on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .._transforms import any_wrapped
from ..linear import CG, GMRES, LinearOperator, LinearSolver, SolveInfo
from ..optimality import OptimalityFn, is_symmetric
from ..tree import (
    Tree,
    check_float_tree,
    check_same_structure,
    tree_flatten,
    tree_leaves,
    tree_map,
    tree_unflatten,
    tree_zeros_like,
)

__all__ = [
    "Linearisation",
    "diff_indices",
    "explain_mutation",
    "jvp_rule",
    "linearise",
    "resolve_solver",
    "root_jvp",
    "root_vjp",
    "substitute",
    "vjp_rule",
]

Operator = Callable[[Tree], Tree]


class _Lazy:
    """A linear operator built on first use: the transpose most solvers never ask for."""

    def __init__(self, build: Callable[[], Operator]) -> None:
        self.build: Callable[[], Operator] | None = build
        self.fn: Operator | None = None

    def __call__(self, v: Tree) -> Tree:
        if self.fn is None:
            assert self.build is not None
            self.fn, self.build = self.build(), None
        return self.fn(v)


@contextlib.contextmanager
def explain_mutation(what: str) -> Iterator[None]:
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


def substitute(args: Sequence[Any], indices: Sequence[int], values: Sequence[Any]) -> tuple:
    """``args`` with the entries at ``indices`` replaced by ``values``."""
    full = list(args)
    for i, v in zip(indices, values, strict=True):
        full[i] = v
    return tuple(full)


def is_float_tree(tree: Tree) -> bool:
    leaves = tree_leaves(tree)
    return bool(leaves) and all(
        isinstance(t, torch.Tensor) and t.is_floating_point() for t in leaves
    )


def diff_indices(args: Sequence[Any], argnums: int | Sequence[int] | None) -> list[int]:
    """Positions in ``args`` to differentiate: ``argnums`` validated, or every float tree."""
    if argnums is None:
        return [i for i, a in enumerate(args) if is_float_tree(a)]
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
        if not is_float_tree(args[i]):
            raise TypeError(
                f"argnums selects argument {i}, which is not a tree of floating-point tensors "
                "and cannot be differentiated; drop it from argnums or convert it to float."
            )
    return sorted({i % len(args) for i in nums})


def resolve_solver(solver: LinearSolver | None, symmetric: bool) -> LinearSolver:
    """The given solver, checked, or the default: CG for symmetric ``∂F/∂x``, else GMRES."""
    if solver is None:
        return CG(tol=1e-6, maxiter=100) if symmetric else GMRES(tol=1e-6, maxiter=100)
    if not isinstance(solver, LinearSolver):
        raise TypeError(
            "solver must be a bilevel linear solver such as bl.CG(...), bl.GMRES(...) or "
            f"bl.Dense(); got {type(solver).__name__}"
        )
    return solver


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

    vjp_transpose = torch.func.vjp(transpose, tree_zeros_like(out))[1]
    return lambda *tangents: vjp_transpose(tuple(tangents))[0]


@dataclasses.dataclass
class Linearisation:
    """Products with ``A = ∂F/∂x`` and ``B = ∂F/∂args`` at one point ``(x*, args)``.

    Attributes:
        rmatvec: ``u ↦ Aᵀu``.
        matvec: ``v ↦ A v`` (built on first use unless ``F`` is symmetric).
        pull_args: ``w ↦ [Bᵢᵀ w for each differentiated argument i]``; may be called once.
        unused: after ``pull_args``, the differentiated arguments that provably do not enter
            ``F`` (``None`` where this is not known: under ``torch.func`` transforms).
        symmetric: ``F`` declares ``A`` symmetric (then ``matvec`` is ``rmatvec``).
    """

    rmatvec: Operator
    matvec: Operator
    pull_args: Callable[[Tree], list[Tree]]
    unused: list[int] | None = None
    symmetric: bool = False

    def adjoint(self) -> LinearOperator:
        """``Aᵀ`` as a [`LinearOperator`][bilevel.LinearOperator]: the adjoint system's
        operator, whose own transpose is ``A``, tagged with ``F``'s symmetry."""
        return LinearOperator(self.rmatvec, self.matvec, symmetric=self.symmetric)


def _checked(optimality_fn: OptimalityFn, x_star: Tree, args: Sequence[Any]) -> Operator:
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


def linearise(
    optimality_fn: OptimalityFn,
    x_star: Tree,
    args: Sequence[Any],
    diff: Sequence[int],
    symmetric: bool,
) -> Linearisation:
    """Build the products with ``A``, ``Aᵀ`` and ``Bᵀ`` once; the backend is chosen here.

    Untransformed inputs without ``create_graph`` record one autograd graph of ``F`` in
    ``x`` and the differentiated arguments, replayed by every product. Anything else (a
    ``torch.func`` transform, ``create_graph``, ``torch.compile`` tracing) uses
    ``torch.func.vjp`` closures, which compose with every transform.
    """
    plain = (
        not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not any_wrapped((x_star, args))
    )
    if plain:
        return _linearise_autograd(optimality_fn, x_star, args, diff, symmetric)
    return _linearise_func(optimality_fn, x_star, args, diff, symmetric)


def _linearise_func(
    optimality_fn: OptimalityFn,
    x_star: Tree,
    args: Sequence[Any],
    diff: Sequence[int],
    symmetric: bool,
) -> Linearisation:
    fx = _checked(optimality_fn, x_star, args)
    with explain_mutation("optimality_fn"):
        vjp_x = torch.func.vjp(fx, x_star)[1]  # the linearisation, built once per solve

    def rmatvec(u: Tree) -> Tree:
        return vjp_x(u)[0]

    def matvec() -> Operator:
        with explain_mutation("optimality_fn"):
            return _jvp_operator(fx, [x_star])

    def pull_args(w: Tree) -> list[Tree]:
        def f_args(*diff_args: Any) -> Tree:
            return optimality_fn(x_star, *substitute(args, diff, diff_args))

        with explain_mutation("optimality_fn"):
            vjp_args = torch.func.vjp(f_args, *(args[i] for i in diff))[1]
        return list(vjp_args(w))

    return Linearisation(
        rmatvec, rmatvec if symmetric else _Lazy(matvec), pull_args, symmetric=symmetric
    )


def _linearise_autograd(
    optimality_fn: OptimalityFn,
    x_star: Tree,
    args: Sequence[Any],
    diff: Sequence[int],
    symmetric: bool,
) -> Linearisation:
    # One evaluation of F records a graph in both x and the differentiated args; every Aᵀu
    # replays it with retain_graph and the final Bᵀw reuses it once more. Plain autograd
    # costs less per product than a torch.func.vjp closure, and the shared graph saves a
    # second evaluation of F.
    x = tree_map(lambda t: t.detach().requires_grad_(True), x_star)
    probes = [tree_map(lambda t: t.detach().requires_grad_(True), args[i]) for i in diff]
    with torch.enable_grad():
        out = optimality_fn(x, *substitute(args, diff, probes))
    check_same_structure(
        x_star, out, reference_name="the inner solution x", other_name="optimality_fn(x, *args)"
    )
    x_leaves, x_spec = tree_flatten(x)
    out_leaves = tree_leaves(out)
    live = [i for i, t in enumerate(out_leaves) if t.requires_grad]  # the rest are constant
    single = len(x_leaves) == 1 and x_spec.is_leaf() and live == [0]

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

    def rmatvec(u: Tree) -> Tree:
        if single:  # one tensor: skip the tree bookkeeping
            (g,) = torch.autograd.grad(
                out_leaves[0], x_leaves[0], u, retain_graph=True, allow_unused=True
            )
            return torch.zeros_like(x_leaves[0]) if g is None else g
        return tree_unflatten(pull_back(u, x_leaves, retain=True), x_spec)

    def matvec() -> Operator:
        x_plain = tree_map(lambda t: t.detach(), x_star)
        with explain_mutation("optimality_fn"):
            return _jvp_operator(lambda x: optimality_fn(x, *args), [x_plain])

    lin = Linearisation(
        rmatvec, rmatvec if symmetric else _Lazy(matvec), lambda w: [], symmetric=symmetric
    )

    def pull_args(w: Tree) -> list[Tree]:
        missing: list[bool] = []
        flat = pull_back(w, tree_leaves(probes), retain=False, missing=missing)
        grads, pos, unused = [], 0, []
        for i, probe in zip(diff, probes, strict=True):
            leaves, spec = tree_flatten(probe)
            grads.append(tree_unflatten(flat[pos : pos + len(leaves)], spec))
            if missing and all(missing[pos : pos + len(leaves)]):
                unused.append(i)
            pos += len(leaves)
        lin.unused = unused
        return grads

    lin.pull_args = pull_args
    return lin


def adjoint_solve(
    lin: Linearisation, cotangent: Tree, solver: LinearSolver
) -> tuple[Tree, SolveInfo]:
    """``u`` with ``Aᵀu = cotangent``; the solve's operator transpose is ``A`` itself."""
    return solver(lin.adjoint(), cotangent)


def vjp_rule(
    optimality_fn: OptimalityFn,
    x_star: Tree,
    args: Sequence[Any],
    cotangent: Tree,
    solver: LinearSolver,
    diff: Sequence[int],
    symmetric: bool,
    on_linearised: Callable[[Linearisation, Tree], None] | None = None,
    adjoint: Callable[[Tree, Sequence[Any], Tree], tuple[Tree, SolveInfo]] | None = None,
) -> tuple[list[Tree], SolveInfo, list[int] | None]:
    """``(−Bᵢᵀu for each i in diff, info, unused)`` with ``Aᵀu = cotangent``.

    ``unused`` lists the differentiated arguments that provably do not enter ``F`` (``None``
    where that is unknown). ``on_linearised(lin, cotangent)``, when given, sees the
    linearisation before the solve (the diagnostics' symmetry probe). ``adjoint(x_star,
    args, cotangent) -> (u, info)``, when given, replaces the solve (a backward that is
    itself differentiated, see ``ImplicitFunction._differentiable_adjoint``).
    """
    lin = linearise(optimality_fn, x_star, args, diff, symmetric)
    if on_linearised is not None:  # before pull_args, which may free the recorded graph
        on_linearised(lin, cotangent)
    if adjoint is None:
        u, info = adjoint_solve(lin, cotangent, solver)
    else:
        u, info = adjoint(x_star, args, cotangent)
    if not diff:
        return [], info, None
    grads = lin.pull_args(tree_map(torch.neg, u))  # −Bᵀu
    return grads, info, lin.unused


def jvp_rule(
    optimality_fn: OptimalityFn,
    x_star: Tree,
    args: Sequence[Any],
    tangents: Sequence[Tree | None],
    solver: LinearSolver,
    symmetric: bool,
) -> tuple[Tree, SolveInfo | None]:
    """``(s, info)`` with ``A s = −B t``, ``B t = Σᵢ ∂F/∂argsᵢ · tᵢ`` (``None``: zero)."""
    indices = [i for i, t in enumerate(tangents) if t is not None]
    if not indices:
        return tree_zeros_like(x_star), None

    def f_args(*diff_args: Any) -> Tree:
        return optimality_fn(x_star, *substitute(args, indices, diff_args))

    bt = _jvp_operator(f_args, [args[i] for i in indices])(*(tangents[i] for i in indices))
    fx = _checked(optimality_fn, x_star, args)
    with explain_mutation("optimality_fn"):
        vjp_x = torch.func.vjp(fx, x_star)[1]

    def vjp_matvec(s: Tree) -> Tree:  # Aᵀ s
        return vjp_x(s)[0]

    # A = Aᵀ: a VJP through one reused graph is the cheapest product.
    matvec = vjp_matvec if symmetric else _jvp_operator(fx, [x_star])
    operator = LinearOperator(matvec, vjp_matvec, symmetric=symmetric)
    return solver(operator, tree_map(torch.neg, bt))


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
    ``B = ∂F/∂args``. Plain ``torch`` code: it runs eagerly, under ``torch.func`` transforms
    and under ``torch.compile`` (with a fixed-K solver there).

    Args:
        optimality_fn: ``F(x, *args) -> tree like x``.
        x_star: the root (any tree of float tensors).
        args: the arguments of ``F`` after ``x``.
        cotangent: a tree shaped like ``x_star``.
        solver: linear solver for ``Aᵀu = v`` (default: CG if ``F`` is marked symmetric,
            else GMRES).
        argnums: which of ``args`` to differentiate (default: every float tree).

    Returns:
        A tuple aligned with ``args``: the cotangent of each differentiated argument, and
        ``None`` for the others (not floating-point trees, or not in ``argnums``).
    """
    args = tuple(args)
    check_float_tree(x_star, name="x_star")
    check_same_structure(x_star, cotangent, reference_name="x_star", other_name="cotangent")
    diff = diff_indices(args, argnums)
    symmetric = is_symmetric(optimality_fn)
    grads, _, _ = vjp_rule(
        optimality_fn, x_star, args, cotangent, resolve_solver(solver, symmetric), diff, symmetric
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

    Solves ``A s = −B t`` with ``A = ∂F/∂x`` and ``B t = Σᵢ ∂F/∂argsᵢ · tᵢ``.

    Args:
        optimality_fn: ``F(x, *args) -> tree like x``.
        x_star: the root (any tree of float tensors).
        args: the arguments of ``F`` after ``x``.
        tangents: aligned with ``args``; ``None`` means a zero tangent.
        solver: linear solver for ``A s = −B t`` (default: CG if ``F`` is marked symmetric,
            else GMRES).

    Returns:
        The tangent ``s`` of ``x*``, a tree shaped like ``x_star``.
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
    s, _ = jvp_rule(
        optimality_fn, x_star, args, tangents, resolve_solver(solver, symmetric), symmetric
    )
    return s
