"""Conjugate gradient for symmetric positive-definite systems."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor

from ..tree import Tree, tree_dot
from ._base import LinearProblem, LinearSolver, Matvec, SolveInfo, _CheckedOperator
from ._results import Result

__all__ = ["CG"]


class CG(LinearSolver):
    r"""(Preconditioned) conjugate gradient for ``(A + ridge·I) x = b``.

    Assumes ``A`` symmetric positive definite (Hestenes & Stiefel, 1952; Saad, *Iterative
    Methods for Sparse Linear Systems*, 2nd ed., Alg. 6.18 and 9.1). Each iteration costs one
    ``matvec``, one preconditioner application and three tree inner products; memory is four
    trees. In exact arithmetic the error in the ``A``-norm is minimised over the Krylov space,
    so ``k`` iterations of a system with condition number ``κ`` shrink it by
    ``2((√κ − 1)/(√κ + 1))^k``.

    Non-positive curvature ``pᵀAp ≤ 0`` means ``A`` is not positive definite (e.g. a neural
    network Hessian ``H + λI`` with an eigenvalue of ``H`` below ``−λ``):

    * adaptive mode stops and reports ``reason="breakdown"`` — never "converged";
    * fixed-K mode keeps iterating: on a symmetric indefinite ``A`` the CG iterates are
      Lanczos–Galerkin approximations (Paige & Saunders, 1975, §4), which converge in the
      same number of steps as MINRES but with a residual that can spike. The solver counts
      such steps in ``info.stats["negative_curvature"]``. One extra ``matvec`` after the
      last step measures the curvature of the next search direction (skipped for a
      [`LinearOperator`][bilevel.LinearOperator] tagged ``positive_semidefinite``;
      ``info.stats["negative_curvature_after"]``): an indefinite ``A`` can show only positive
      curvatures for ``K`` steps and end on a tiny positive pivot, whose iterate is far from
      the solution; the next pivot is then large and negative, which no SPD ``A`` gives.
      While every curvature was positive it returns the last iterate (on an SPD ``A`` its
      ``A``-norm error is at most that of ``x₀``, even where the residual is above
      ``‖b‖``); once ``A`` is proven indefinite, the iterate with the smallest residual norm
      seen, so the residual never exceeds that of the start (``‖b‖`` from ``x₀ = 0``). If
      no iterate improves on ``x₀`` there, the solve counts as a breakdown
      (``info.failed``): returning ``x₀`` would otherwise be a silent zero hypergradient.
      A vanishing pivot ``|pᵀAp| ≤ ε‖p‖‖Ap‖`` (or a non-finite value) freezes the iterate
      and counts in ``info.stats["breakdowns"]``. On a 200-dim ``H + λI`` with 6 negative
      eigenvalues this reaches relative error 0.07 / 1e-15 at
      K = 20 / 100, as MINRES does (``benchmarks/indefinite_krylov.py``); the alternative of
      freezing at the first negative curvature stalls at 0.73. [`MINRES`][bilevel.MINRES]
      has a monotone residual by construction and is the textbook choice there.

    Args:
        tol: relative tolerance: stop once ``‖b − A x‖ ≤ max(tol·‖b‖, atol)``; ``tol = atol = 0``
            selects fixed-K mode.
        atol: absolute tolerance on the residual norm.
        maxiter: iteration budget (the exact number of iterations in fixed-K mode).
        ridge: solve ``(A + ridge·I) x = b`` instead (damps indefinite or singular ``A``).
        preconditioner: optional ``M: tree -> tree`` approximating ``A⁻¹``; must be symmetric
            positive definite.
    """

    assumes_symmetric = True

    def __init__(
        self,
        *,
        tol: float = 1e-6,
        atol: float = 0.0,
        maxiter: int = 100,
        ridge: float = 0.0,
        preconditioner: Matvec | None = None,
    ) -> None:
        super().__init__(tol=tol, atol=atol, maxiter=maxiter, ridge=ridge)
        if preconditioner is not None and not callable(preconditioner):
            raise TypeError(
                "preconditioner must be a callable tree -> tree approximating A⁻¹, "
                f"got {type(preconditioner).__name__}"
            )
        self.preconditioner = preconditioner

    def _solve(self, problem: LinearProblem) -> tuple[Tensor, SolveInfo]:
        precondition = _identity
        if self.preconditioner is not None:
            flat = problem.flattening
            if flat is None:
                raise TypeError("CG with a preconditioner needs the problem's flattening")
            checked = _CheckedOperator(self.preconditioner, flat.like, "preconditioner")
            precondition = flat.lift(checked)
        return self._solve_flat(problem, precondition)

    def _solve_flat(
        self, problem: LinearProblem, precondition: Callable[[Tensor], Tensor]
    ) -> tuple[Tensor, SolveInfo]:
        # Everything here is one flat vector of b's dtype: plain torch calls, no tree walks.
        matvec, b = problem.matvec, problem.b
        if problem.x0 is None:
            x, r, matvecs = torch.zeros_like(b), b, 0
        else:
            x, r, matvecs = problem.x0, b - matvec(problem.x0), 1
        z = precondition(r)
        p, rz = z, tree_dot(r, z)
        if self.fixed_iterations:
            probe = not problem.positive_semidefinite
            return self._solve_fixed(matvec, precondition, x, r, p, rz, matvecs, probe)

        # Adaptive: scalars live on the host; one fused kernel per update. Without a
        # preconditioner rᵀz = ‖r‖², so the residual norm costs no extra reduction. When the
        # solve itself is being differentiated (a create_graph backward, a Hessian of the
        # outer loss) the step sizes stay 0-d tensors so that they remain in the graph.
        plain = precondition is _identity
        b_norm = torch.linalg.vector_norm(b).item()
        threshold = self._threshold(b_norm)
        rz_t, rz = rz, rz.item()
        r_norm = math.sqrt(rz) if plain else torch.linalg.vector_norm(r).item()
        iterations = 0
        while r_norm > threshold and iterations < self.maxiter and r_norm == r_norm:
            ap = matvec(p)
            matvecs += 1
            iterations += 1
            curvature_t = tree_dot(p, ap)
            curvature = curvature_t.item()
            if not curvature > 0.0:
                reason = Result.NONFINITE if curvature != curvature else Result.BREAKDOWN
                info = SolveInfo(False, iterations, r_norm, reason, {"matvecs": matvecs})
                return x, info
            track = torch.is_grad_enabled() and (ap.requires_grad or b.requires_grad)
            alpha = rz_t / curvature_t if track else rz / curvature
            # Untracked, alpha is the host float rz / curvature (the stub types it as a union).
            x = x + alpha * p if track else torch.add(x, p, alpha=cast(float, alpha))
            r = r - alpha * ap if track else torch.add(r, ap, alpha=-cast(float, alpha))
            z = precondition(r)
            rz_new_t = tree_dot(r, z)
            rz_new = rz_new_t.item()
            r_norm = math.sqrt(rz_new) if plain else torch.linalg.vector_norm(r).item()
            p = z + (rz_new_t / rz_t) * p if track else torch.add(z, p, alpha=rz_new / rz)
            rz_t, rz = rz_new_t, rz_new
        return x, self._adaptive_info(r_norm, iterations, b_norm, matvecs=matvecs)

    def _solve_fixed(
        self,
        matvec: Callable[[Tensor], Tensor],
        precondition: Callable[[Tensor], Tensor],
        x: Tensor,
        r: Tensor,
        p: Tensor,
        rz: Tensor,
        matvecs: int,
        probe: bool = True,
    ) -> tuple[Tensor, SolveInfo]:
        # No host sync and no Python branch on tensor values: vmappable. On a symmetric
        # indefinite A the CG iterates are the Galerkin (Lanczos) approximations, which
        # exist whenever pᵀAp ≠ 0 and reach the solution like MINRES does, but their residual
        # is not monotone: spikes where the Lanczos matrix is nearly singular. So:
        # * a negative-curvature step is taken (skipping it and restarting breaks the Krylov
        #   structure and can grow x without bound) and counted;
        # * a vanishing pivot |pᵀAp| ≤ ε‖p‖‖Ap‖ with r ≠ 0, or a non-finite value, is a
        #   breakdown: the iterate is frozen there;
        # * what is returned: while every curvature was positive, the last iterate — on an SPD
        #   A it minimises the A-norm error over the Krylov space, so ‖x − x*‖_A ≤ ‖x*‖_A
        #   even where its residual is above ‖b‖ (CG's residual is not monotone); once A is
        #   proven indefinite, the iterate with the smallest residual seen (initially x₀), so
        #   the residual never exceeds the start's.
        # Exact convergence gives r = p = 0: a no-op step, not a breakdown. Every operation
        # is differentiable, in reverse and forward mode, with finite derivatives in the
        # masked branches.
        plain = precondition is _identity
        eps = 64 * torch.finfo(rz.dtype).eps
        tiny = torch.finfo(rz.dtype).tiny
        active = finite = torch.isfinite(rz)
        breakdowns = torch.zeros((), dtype=torch.int64, device=rz.device)
        negative = torch.zeros((), dtype=torch.int64, device=rz.device)
        best_x, best_norm = x, torch.linalg.vector_norm(r)
        improved = torch.zeros((), dtype=torch.bool, device=rz.device)
        for _ in range(self.maxiter):
            ap = matvec(p)
            curvature = tree_dot(p, ap)
            scale = torch.linalg.vector_norm(p) * torch.linalg.vector_norm(ap)
            finite = finite & torch.isfinite(curvature)
            pivot_ok = (curvature.abs() > eps * scale) & torch.isfinite(curvature)
            done = rz == 0  # exact convergence: nothing left to do, not a breakdown
            broke = active & ~pivot_ok & ~done
            active = active & pivot_ok
            breakdowns = breakdowns + broke.to(breakdowns.dtype)
            negative = negative + (active & (curvature < 0)).to(negative.dtype)
            step = active.to(curvature.dtype)
            # step first, and a pivot kept away from 0: no inf·0 in any masked branch
            safe = torch.where(active, curvature, 1.0)
            alpha = rz * step / safe
            x = torch.addcmul(x, alpha, p)
            r = torch.addcmul(r, alpha, ap, value=-1)
            z = precondition(r)
            rz_new = tree_dot(r, z)
            finite = finite & torch.isfinite(rz_new)
            active = active & torch.isfinite(rz_new)
            p = torch.addcmul(z, rz_new * step / rz.clamp_min(tiny), p)
            rz = torch.where(active, rz_new, rz)
            r_norm = rz_new.clamp_min(0).sqrt() if plain else torch.linalg.vector_norm(r)
            better = active & (r_norm <= best_norm)
            improved = improved | (better & (r_norm < best_norm))
            best_x = torch.where(better, x, best_x)
            best_norm = torch.where(better, r_norm, best_norm)
        matvecs += self.maxiter
        after = torch.zeros((), dtype=torch.bool, device=rz.device)
        if probe and self.maxiter > 0:
            # One more curvature, of the next search direction. An indefinite A whose first K
            # curvatures were all positive can end on a tiny positive pivot: a residual spike
            # (x far from the solution, e.g. 1e6·‖x*‖) that looks like CG's A-norm behaviour on
            # an SPD A. The pivot after a tiny one is large and negative, which an SPD A never
            # gives: it proves A indefinite, and the guard below applies.
            ap = matvec(p)
            curvature = tree_dot(p, ap)
            scale = torch.linalg.vector_norm(p) * torch.linalg.vector_norm(ap)
            after = active & torch.isfinite(curvature) & (curvature < -eps * scale)
            matvecs += 1
        indefinite = (negative > 0) | after
        # Proven indefinite and no iterate beat x₀: what is returned is x₀ itself (x = 0 for
        # a hypergradient: a zero gradient). CG's assumption failed and it made no progress:
        # that is a breakdown, reported, not a plausible zero.
        stalled = indefinite & ~improved & (best_norm > 0)
        breakdowns = breakdowns + stalled.to(breakdowns.dtype)
        x = torch.where(indefinite, best_x, x)
        r_norm = torch.where(indefinite, best_norm, torch.linalg.vector_norm(r))
        stats = {
            "breakdowns": breakdowns,
            "negative_curvature": negative,
            "negative_curvature_after": after,
            "nonfinite": ~finite,
            # CG's own verdict replaces the shared residual test (see above): a residual
            # above ‖b‖ on an SPD system is not divergence.
            "diverged": ~torch.isfinite(r_norm),
            "matvecs": matvecs,
        }
        return x, SolveInfo(
            torch.isfinite(r_norm), self.maxiter, r_norm, Result.FIXED_ITERATIONS, stats
        )


def _identity(r: Tree) -> Tree:
    return r
