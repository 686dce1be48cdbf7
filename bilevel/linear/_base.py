"""The protocol every linear solver obeys, and the diagnostics it returns.

A linear solver solves ``(A + ridge·I) x = b`` for a matrix-free ``A`` given as ``matvec``
(and, for solvers that need ``Aᵀ``, ``rmatvec``)::

    x, info = solver(matvec, b, x0=None, rmatvec=None)

``b``, ``x0`` and ``x`` are trees; ``matvec`` maps a tree to a tree of the same structure.
Subclasses implement ``LinearSolver._solve`` on an already validated
``LinearProblem``; this module owns argument checking, ridge, the trivial cases and the
two stopping regimes:

* **adaptive** (``tol > 0`` or ``atol > 0``): stop once ``‖b − A x‖ ≤ max(tol·‖b‖, atol)``; the
  loop reads the residual on the host each iteration, and ``info`` holds Python scalars.
* **fixed-K** (``tol == atol == 0``): run exactly ``maxiter`` iterations with no host
  synchronisation and no Python branch on tensor values, so the solve can run under
  ``torch.func.vmap`` and be captured on CUDA. Running out of the budget is never a
  failure, but divergence is: when the final residual is non-finite or above ``‖b‖`` the
  solve is *diverged* and returns ``x = 0`` instead, so the returned residual never exceeds
  ``‖b‖``. Every field is a 0-d tensor computed without a
  host sync; ``SolveInfo.failed`` reads them once, at the end.

A non-finite ``b`` (e.g. a NaN cotangent) is reported as ``reason="nonfinite"`` with
``stats["nonfinite_input"]`` true (``info.outcome == "nonfinite_input"``) and gives a NaN
``x`` in both modes, so that the NaN reaches the gradient instead of turning into zeros.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, overload

import torch

from .._transforms import any_batched
from ..tree import (
    Tree,
    check_float_tree,
    check_same_structure,
    tree_leaves,
    tree_map,
    tree_norm,
    tree_ravel,
    tree_zeros_like,
)
from ._operator import LinearOperator
from ._results import Result

Matvec = Callable[[Tree], Tree]
"""A linear map on trees, ``v ↦ A v``."""

__all__ = ["Flattening", "LinearProblem", "LinearSolver", "Matvec", "SolveInfo"]

#: Reasons a solve stops. ``fixed_iterations`` is the only reason a fixed-K solve reports
#: (its outcome lives in 0-d tensors: ``converged`` and the ``stats`` entries).
REASONS = (
    Result.CONVERGED,
    Result.MAX_ITERATIONS,
    Result.BREAKDOWN,
    Result.NONFINITE,
    Result.FIXED_ITERATIONS,
)


@dataclasses.dataclass(frozen=True)
class SolveInfo:
    """Diagnostics of one linear solve.

    Attributes:
        converged: whether the stopping criterion was met. In fixed-K mode a 0-d boolean
            tensor: false when the residual is non-finite or above ``‖b‖`` (diverged).
        iterations: iterations performed (each costs about one ``matvec``).
        residual_norm: ``‖b − (A + ridge·I) x‖`` for the returned ``x`` as tracked by the
            solver's recurrence (a 0-d tensor in fixed-K mode).
        reason: a [`Result`][bilevel.Result] (a string enum, so ``info.reason ==
            "converged"`` holds): ``"converged"``, ``"max_iterations"``, ``"breakdown"``
            (the method's assumption failed, e.g. CG met ``pᵀAp ≤ 0``, or ``Dense`` met a singular
            matrix), ``"nonfinite"`` (NaN/Inf in ``b`` — then ``x`` is NaN and
            ``stats["nonfinite_input"]`` is true — or produced by the iteration), or
            ``"fixed_iterations"`` (fixed-K mode).
        stats: solver-specific extras such as ``"matvecs"``. Fixed-K solves always carry
            these 0-d tensors: ``"breakdowns"`` (iterations in which the method's assumption
            failed and no step was taken, e.g. CG after a vanishing pivot, MINRES on a
            singular inconsistent system, Dense on a singular matrix),
            ``"diverged"`` (the final iterate's residual was non-finite or above ``‖b‖``, so
            ``x = 0`` was returned), ``"nonfinite"`` (NaN/Inf met during the iteration)
            and ``"nonfinite_input"`` (``b`` holds NaN/Inf).
    """

    converged: bool | torch.Tensor
    iterations: int | torch.Tensor
    residual_norm: float | torch.Tensor
    reason: Result
    stats: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.reason, Result):  # a plain string from user code
            if self.reason not in REASONS:
                raise ValueError(
                    f"reason must be one of {[str(r) for r in REASONS]}, got {self.reason!r}"
                )
            object.__setattr__(self, "reason", Result(self.reason))

    @property
    def fixed(self) -> bool:
        """True for the info of a fixed-K solve (fields are 0-d tensors)."""
        return self.reason == Result.FIXED_ITERATIONS

    @property
    def failed(self) -> bool:
        """True when the result should not be trusted as a solution of the system.

        Adaptive mode: the solve did not converge (any reason but ``"converged"``). Fixed-K
        mode: the solve diverged, met non-finite values, or broke down (e.g. CG on an
        indefinite system); exhausting the budget is not a failure. For a fixed-K info this
        reads its 0-d tensors on the host (one sync): do not call it under ``vmap``.
        """
        if not self.fixed:
            return self.reason.failure
        breakdowns = self.stats.get("breakdowns", 0)
        return not bool(self.converged) or bool(breakdowns > 0)

    @property
    def outcome(self) -> Result:
        """The reason, with a fixed-K solve's tensors resolved: ``"fixed_iterations"``,
        ``"diverged"``, ``"breakdown"``, ``"nonfinite"`` or ``"nonfinite_input"`` (one sync);
        a [`Result`][bilevel.Result], whose ``message`` and ``fix`` explain it."""
        stats = self.stats
        if not self.fixed:
            return Result.NONFINITE_INPUT if stats.get("nonfinite_input") else self.reason
        if bool(stats.get("nonfinite_input", False)):
            return Result.NONFINITE_INPUT
        if bool(stats.get("nonfinite", False)):
            return Result.NONFINITE
        if bool(stats.get("diverged", False)) or not bool(self.converged):
            return Result.DIVERGED
        if bool(stats.get("breakdowns", 0) > 0):
            return Result.BREAKDOWN
        return Result.FIXED_ITERATIONS

    def explain(self) -> str:
        """What this solve's outcome means and, for a failure, what to change (one sync).

        Returns:
            ``"<outcome> after <k> iterations (residual <r>): <message>. Fix: <fix>."``
        """
        residual = self.residual_norm
        value = float(residual.detach()) if isinstance(residual, torch.Tensor) else residual
        outcome = self.outcome
        return (
            f"{outcome} after {int(self.iterations)} iterations (residual {value:.3g}): "
            f"{outcome.explain()}"
        )


@dataclasses.dataclass(frozen=True)
class LinearProblem:
    """A validated system ``(A + ridge·I) x = b`` handed to ``LinearSolver._solve``.

    The solver sees one flat vector: ``b`` and ``x0`` are 1-D tensors and ``matvec`` /
    ``rmatvec`` map 1-D tensors to 1-D tensors (``LinearSolver.__call__`` ravels the trees
    once, on the way in, and unravels ``x`` on the way out). They already include the ridge
    term; ``rmatvec`` is ``None`` when the caller did not give one. ``x0`` is ``None`` for a
    zero initial guess. ``flattening`` maps trees shaped like the caller's ``b`` to this
    vector space, for solvers that take further tree operators (CG's preconditioner).

    Attributes:
        matvec: ``v ↦ (A + ridge·I) v`` on flat vectors.
        b: the right-hand side, a 1-D tensor.
        x0: the initial guess (1-D, like ``b``), or ``None`` for zero.
        rmatvec: ``u ↦ (A + ridge·I)ᵀ u`` on flat vectors, or ``None`` when not given.
        flattening: the map between the caller's trees and the flat vectors, or ``None``
            for a problem built directly on vectors (e.g. NormalCG's inner CG).
        symmetric: the caller's [`LinearOperator`][bilevel.LinearOperator] declares
            ``A = Aᵀ`` (then ``rmatvec`` is ``matvec``).
        positive_semidefinite: the operator declares ``A`` symmetric positive semidefinite.
    """

    matvec: Matvec
    b: Tree
    x0: Tree | None
    rmatvec: Matvec | None
    flattening: Flattening | None = None
    symmetric: bool = False
    positive_semidefinite: bool = False


class Flattening:
    """Views the trees of one problem as a single flat vector, for solvers' inner loops.

    Leaf-wise arithmetic on a tree of ``L`` leaves costs ``L`` kernels plus the pytree
    traversal per operation; a Krylov iteration does several such operations but only one
    ``matvec``. Raveling once per ``matvec`` instead (a ``torch.cat`` and a split) makes
    every other operation a single kernel. A 1-D tensor is used as is; other trees are
    raveled to their common dtype and unraveled back to each leaf's dtype.
    """

    def __init__(self, like: Tree) -> None:
        self.like = like
        self.identity = isinstance(like, torch.Tensor) and like.dim() == 1
        if self.identity:
            self.vector: torch.Tensor = like
            self.unravel: Callable[[torch.Tensor], Tree] = _same
        else:
            self.vector, self.unravel = tree_ravel(like)

    def ravel(self, tree: Tree) -> torch.Tensor:
        """The flat vector of a tree shaped like ``like`` (in ``like``'s common dtype)."""
        if self.identity:
            return tree
        leaves = tree_leaves(tree)
        flat = torch.cat([leaf.reshape(-1) for leaf in leaves])
        return flat if flat.dtype == self.vector.dtype else flat.to(self.vector.dtype)

    @overload
    def lift(self, fn: Matvec) -> Callable[[torch.Tensor], torch.Tensor]: ...
    @overload
    def lift(self, fn: None) -> None: ...
    @overload
    def lift(self, fn: Matvec | None) -> Callable[[torch.Tensor], torch.Tensor] | None: ...
    def lift(self, fn: Matvec | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``fn`` on trees as a map on flat vectors."""
        if fn is None or self.identity:
            return fn
        return lambda v: self.ravel(fn(self.unravel(v)))


def _same(v: torch.Tensor) -> torch.Tensor:
    return v


class _CheckedOperator:
    """Wraps a user operator on trees: validates the first output's structure against ``b``."""

    def __init__(self, fn: Matvec, b: Tree, name: str) -> None:
        self.fn, self.b, self.name = fn, b, name
        self.checked = False

    def __call__(self, v: Tree) -> Tree:
        out = self.fn(v)
        if not self.checked:
            check_same_structure(self.b, out, reference_name="b", other_name=f"{self.name}(x)")
            self.checked = True
        return out


def _flat_operator(
    flat: Flattening, fn: Matvec, name: str, ridge: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A user operator on trees as a checked map on flat vectors, ``v ↦ A v + ridge·v``."""
    lifted = flat.lift(_CheckedOperator(fn, flat.like, name))
    if not ridge:
        return lifted
    return lambda v: torch.add(lifted(v), v, alpha=ridge)


class LinearSolver(abc.ABC):
    """Base class of the matrix-free linear solvers.

    Args:
        tol: relative tolerance: stop when ``‖r‖ ≤ max(tol·‖b‖, atol)``. ``tol=0`` together
            with ``atol=0`` selects fixed-K mode (exactly ``maxiter`` iterations).
        atol: absolute tolerance on ``‖r‖``.
        maxiter: iteration budget (the exact count in fixed-K mode).
        ridge: solve ``(A + ridge·I) x = b`` instead; damps indefinite or singular systems.
    """

    #: Whether the solver assumes a symmetric ``A`` (CG, MINRES). The implicit layer reads it:
    #: such a solver on an optimality condition not declared symmetric triggers a one-time
    #: probe of ``∂F/∂x``'s symmetry, since on a non-symmetric ``A`` it solves the wrong system.
    assumes_symmetric: ClassVar[bool] = False

    def __init__(
        self,
        *,
        tol: float = 1e-6,
        atol: float = 0.0,
        maxiter: int = 100,
        ridge: float = 0.0,
    ) -> None:
        _check_nonnegative_number(tol, "tol")
        _check_nonnegative_number(atol, "atol")
        _check_nonnegative_number(ridge, "ridge")
        if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 0:
            raise ValueError(f"maxiter must be a non-negative int, got {maxiter!r}")
        self.tol = float(tol)
        self.atol = float(atol)
        self.maxiter = maxiter
        self.ridge = float(ridge)

    @property
    def fixed_iterations(self) -> bool:
        """True in fixed-K mode (``tol == atol == 0``): no host syncs, vmappable."""
        return self.tol == 0.0 and self.atol == 0.0

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"

    def __call__(
        self,
        matvec: Matvec,
        b: Tree,
        x0: Tree | None = None,
        rmatvec: Matvec | None = None,
    ) -> tuple[Tree, SolveInfo]:
        """Solve ``(A + ridge·I) x = b``.

        Args:
            matvec: ``v ↦ A v``, a linear map from trees shaped like ``b`` to such trees, or a
                [`LinearOperator`][bilevel.LinearOperator] carrying ``A``'s transpose and
                structure (symmetric, positive semidefinite).
            b: the right-hand side, a tree of floating-point tensors.
            x0: the initial guess, a tree shaped like ``b``; ``None`` starts from zero.
            rmatvec: ``u ↦ Aᵀ u`` for the solvers that apply the transpose (NormalCG,
                SciPy's methods that ask for it); ``None`` lets them derive it or not use it.

        Returns:
            ``(x, info)``: the solution, a tree shaped like ``b``, and its
            [`SolveInfo`][bilevel.SolveInfo] (Python scalars in adaptive mode, 0-d tensors in
            fixed-K mode or under ``vmap``).

        Raises:
            TypeError: ``matvec`` or ``rmatvec`` is not callable, or ``b`` holds a non-float
                tensor.
            ValueError: ``x0`` or ``matvec``'s output does not match ``b``'s structure, or an
                adaptive solve runs under ``torch.func.vmap``.
        """
        if not callable(matvec):
            raise TypeError(f"matvec must be callable (tree -> tree), got {type(matvec).__name__}")
        if rmatvec is not None and not callable(rmatvec):
            raise TypeError(f"rmatvec must be callable or None, got {type(rmatvec).__name__}")
        operator = _as_operator(matvec, rmatvec)
        rmatvec = operator.transpose_matvec
        check_float_tree(b, name="b")
        if x0 is not None:
            check_same_structure(b, x0, reference_name="b", other_name="x0")
        # The one boundary between trees and the flat vector every solver iterates on: each
        # update is then a single kernel whatever the tree (one ravel/unravel per matvec).
        flat = Flattening(b)
        problem = LinearProblem(
            matvec=_flat_operator(flat, operator.matvec, "matvec", self.ridge),
            b=flat.vector,
            x0=None if x0 is None else flat.ravel(x0),
            rmatvec=None
            if rmatvec is None
            else _flat_operator(flat, rmatvec, "rmatvec", self.ridge),
            flattening=flat,
            symmetric=operator.symmetric,
            positive_semidefinite=operator.positive_semidefinite,
        )
        if not self.fixed_iterations:
            if any_batched(b) or (x0 is not None and any_batched(x0)):
                raise ValueError(
                    f"{type(self).__name__}(tol={self.tol}, atol={self.atol}) stops adaptively, "
                    "which needs the residual on the host and cannot run under torch.func.vmap. "
                    f"Use fixed-K mode: {type(self).__name__}(tol=0, maxiter=K). Jacobians "
                    "built with vmap (torch.func.jacrev / jacfwd / hessian) batch the solve too: "
                    "pass chunk_size=1 to jacrev, or use a fixed-K solver."
                )
            trivial = self._trivial_solution(problem)
            if trivial is not None:
                x, info = trivial
                return flat.unravel(x), info
            x, info = self._solve(problem)
            return flat.unravel(x), info
        x, info = self._solve(problem)
        if info.fixed:  # not a direct solver that answered with host values outside vmap
            x, info = _guard_fixed(problem, x, info)
        return flat.unravel(x), info

    @abc.abstractmethod
    def _solve(self, problem: LinearProblem) -> tuple[torch.Tensor, SolveInfo]:
        """Solve a validated, flat problem (adaptive or fixed-K according to ``self``)."""

    # -- helpers shared by the iterative solvers ------------------------------------------

    def _threshold(self, b_norm: float) -> float:
        """Residual norm below which an adaptive solve stops."""
        return max(self.tol * b_norm, self.atol)

    def _trivial_solution(self, problem: LinearProblem) -> tuple[Tree, SolveInfo] | None:
        """Non-finite or zero ``b`` in adaptive mode: answer without iterating."""
        b_norm = float(tree_norm(problem.b).detach())
        if not math.isfinite(b_norm):
            # NaN, not zeros: a NaN cotangent must reach the gradient as NaN (what plain
            # autograd would give), never as a plausible zero.
            x = tree_map(lambda t: torch.full_like(t, math.nan), problem.b)
            return x, SolveInfo(False, 0, b_norm, Result.NONFINITE, {"nonfinite_input": True})
        if b_norm == 0.0:
            return tree_zeros_like(problem.b), SolveInfo(True, 0, 0.0, Result.CONVERGED)
        return None

    def _adaptive_info(
        self, residual_norm: float, iterations: int, b_norm: float, **stats: Any
    ) -> SolveInfo:
        """Info for an adaptive solve that ran out of budget or converged."""
        if not math.isfinite(residual_norm):
            return SolveInfo(False, iterations, residual_norm, Result.NONFINITE, stats)
        if residual_norm <= self._threshold(b_norm):
            return SolveInfo(True, iterations, residual_norm, Result.CONVERGED, stats)
        return SolveInfo(False, iterations, residual_norm, Result.MAX_ITERATIONS, stats)

    def _fixed_info(self, residual_norm: torch.Tensor, iterations: int, **stats: Any) -> SolveInfo:
        """Info for a fixed-K solve before the divergence guard of ``__call__`` (no sync).

        Solvers may pass ``breakdowns=`` (a 0-d count); the guard fills in ``converged``,
        ``diverged`` and ``nonfinite_input``.
        """
        return SolveInfo(
            torch.isfinite(residual_norm), iterations, residual_norm, Result.FIXED_ITERATIONS, stats
        )


def _guard_fixed(problem: LinearProblem, x: Tree, info: SolveInfo) -> tuple[Tree, SolveInfo]:
    """Fixed-K post-processing shared by every solver, sync-free and vmappable.

    * diverged (final residual non-finite or above ``‖b‖``, unless the solver gives its own
      verdict in ``stats["diverged"]``, as CG does on SPD systems): return ``x = 0``, whose
      residual is exactly ``‖b‖`` — so the returned residual never exceeds ``‖b‖``, whatever
      ``A`` is (a divergent iterate would be worse than no solve at all);
    * non-finite ``b``: return NaN, so that the NaN reaches the caller's gradient.
    """
    b_norm = tree_norm(problem.b)
    residual = torch.as_tensor(info.residual_norm, dtype=b_norm.dtype, device=b_norm.device)
    # NaN compares false: non-finite is diverged. The slack of a few ulps keeps a solve that
    # made no progress (residual = ‖b‖ up to rounding) from being called diverged.
    slack = 1.0 + 16 * torch.finfo(b_norm.dtype).eps
    diverged = ~(residual <= b_norm * slack)
    if "diverged" in info.stats:  # a solver whose residual may exceed ‖b‖ legitimately (CG)
        own = torch.as_tensor(info.stats["diverged"], device=b_norm.device)
        diverged = own | ~torch.isfinite(residual)
    finite_b = torch.isfinite(b_norm)
    x = tree_map(lambda t: torch.where(finite_b, torch.where(diverged, 0, t), math.nan), x)
    returned = torch.where(diverged, b_norm, residual)
    stats = dict(info.stats)
    stats.pop("diverged", None)
    zero = torch.zeros((), dtype=torch.int64, device=b_norm.device)
    breakdowns = torch.as_tensor(stats.pop("breakdowns", zero), device=b_norm.device)
    # A solver that met NaN/Inf inside its iteration (and kept a finite earlier iterate)
    # says so with ``nonfinite``: the result is then not trusted either.
    nonfinite = torch.as_tensor(stats.pop("nonfinite", False), device=b_norm.device)
    stats.update(
        breakdowns=breakdowns,
        diverged=diverged & finite_b,
        nonfinite_input=~finite_b,
        nonfinite=nonfinite | ~torch.isfinite(residual),
        final_residual_norm=residual,
    )
    converged = torch.as_tensor(info.converged, device=b_norm.device)
    converged = converged & finite_b & ~diverged & ~nonfinite
    return x, SolveInfo(converged, info.iterations, returned, Result.FIXED_ITERATIONS, stats)


def _as_operator(matvec: Matvec, rmatvec: Matvec | None) -> LinearOperator:
    """The solver's one reading of what the caller knows about ``A``."""
    if not isinstance(matvec, LinearOperator):
        return LinearOperator(matvec, rmatvec)
    if rmatvec is not None:
        if matvec.rmatvec is not None:
            raise ValueError(
                "rmatvec was given twice: as the solver's rmatvec= and as the LinearOperator's; "
                "pass it in one place"
            )
        return dataclasses.replace(matvec, rmatvec=rmatvec)
    return matvec


def _check_nonnegative_number(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not value >= 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
