"""Richardson iteration, i.e. the truncated Neumann series for ``A⁻¹ b``."""

from __future__ import annotations

import math

import torch

from ..tree import Tree, tree_axpy, tree_map, tree_norm, tree_sub
from ._base import Flattening, LinearProblem, LinearSolver, SolveInfo

__all__ = ["Neumann"]


class Neumann(LinearSolver):
    r"""Truncated Neumann series ``x = α Σ_{k<K} (I − αA)^k b`` (Richardson iteration).

    From ``x₀ = 0`` the Richardson iteration ``x ← x + α(b − A x)`` produces exactly the
    partial sums of the Neumann series of ``(αA)⁻¹ = Σ_k (I − αA)^k``; the residual obeys
    ``r ← (I − αA) r`` and is tracked by that recurrence (Richardson, 1911; Saad, *Iterative
    Methods for Sparse Linear Systems*, 2nd ed., §4.2; its use for hypergradients: Lorraine,
    Vicol & Duvenaud, AISTATS 2020).

    Assumes the spectral radius ``ρ(I − αA) < 1`` — e.g. ``A`` symmetric positive definite
    with ``0 < α < 2/λ_max(A)`` — and then converges linearly with rate ``ρ``; otherwise the
    series diverges. ``A`` need not be symmetric, and ``α`` may be negative: for a fixed
    point ``x = T(x)`` the optimality condition ``F = T(x) − x`` has ``A = J_T − I``, and
    ``α = −1`` gives the classical series ``−Σ_k J_Tᵏ b``, convergent when ``T`` contracts.

    Each step costs one ``matvec`` and two vector updates; memory is three vectors of the
    flattened size. It is the cheapest and least accurate solver here: use it with a small,
    fixed number of steps when ``A`` is well conditioned and a rough solve is enough
    (``K`` steps cost exactly ``K`` matvecs).

    Fixed-K is the default (``tol=0``): exactly ``steps`` steps, no host synchronisation,
    usable under ``torch.func.vmap``. With ``tol > 0`` or ``atol > 0`` it stops once
    ``‖r‖ ≤ max(tol·‖b‖, atol)`` and reports ``"max_iterations"`` otherwise.

    Args:
        steps: number of terms ``K`` of the series (the iteration budget; ``maxiter`` is
            accepted as an alias).
        alpha: step size ``α ≠ 0`` (negative for ``A = J_T − I`` of a fixed point).
        tol: relative tolerance (default 0: fixed-K): stop once
            ``‖b − A x‖ ≤ max(tol·‖b‖, atol)``; ``tol = atol = 0`` selects fixed-K mode.
        atol: absolute tolerance on the residual norm.
        ridge: solve ``(A + ridge·I) x = b`` instead (damps indefinite or singular ``A``).
        maxiter: alias of ``steps`` for code that configures every solver the same way.
    """

    def __init__(
        self,
        *,
        steps: int | None = None,
        alpha: float = 1.0,
        tol: float = 0.0,
        atol: float = 0.0,
        ridge: float = 0.0,
        maxiter: int | None = None,
    ) -> None:
        if steps is not None and maxiter is not None and steps != maxiter:
            raise ValueError(
                f"steps={steps!r} and maxiter={maxiter!r} are aliases; pass only one of them"
            )
        budget = steps if steps is not None else maxiter if maxiter is not None else 10
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"steps must be a non-negative int, got {budget!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float):
            raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
        if alpha == 0 or not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite and non-zero, got {alpha!r}")
        super().__init__(tol=tol, atol=atol, maxiter=budget, ridge=ridge)
        self.alpha = float(alpha)

    @property
    def steps(self) -> int:
        """The number of series terms (same as ``maxiter``)."""
        return self.maxiter

    def _solve(self, problem: LinearProblem) -> tuple[Tree, SolveInfo]:
        flat = Flattening(problem.b)  # one kernel per update whatever the tree
        x, info = self._solve_flat(flat.problem(problem))
        return flat.unravel(x), info

    def _solve_flat(self, problem: LinearProblem) -> tuple[torch.Tensor, SolveInfo]:
        matvec, b, alpha = problem.matvec, problem.b, self.alpha
        if problem.x0 is None:
            x, r, matvecs = tree_map(torch.zeros_like, b), b, 0
        else:
            x, r, matvecs = problem.x0, tree_sub(b, matvec(problem.x0)), 1

        if self.fixed_iterations:
            for _ in range(self.maxiter):
                x = tree_axpy(alpha, r, x)
                r = tree_axpy(-alpha, matvec(r), r)
            matvecs += self.maxiter
            return x, self._fixed_info(tree_norm(r), self.maxiter, matvecs=matvecs)

        b_norm = tree_norm(b).item()
        threshold = self._threshold(b_norm)
        r_norm = tree_norm(r).item()
        iterations = 0
        while r_norm > threshold and iterations < self.maxiter and math.isfinite(r_norm):
            x = tree_axpy(alpha, r, x)
            r = tree_axpy(-alpha, matvec(r), r)
            r_norm = tree_norm(r).item()
            iterations += 1
            matvecs += 1
        return x, self._adaptive_info(r_norm, iterations, b_norm, matvecs=matvecs)
