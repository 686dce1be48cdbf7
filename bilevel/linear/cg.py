"""Conjugate gradient for symmetric positive-definite systems."""

from __future__ import annotations

import torch

from ..tree import Tree, tree_axpy, tree_dot, tree_map, tree_norm, tree_sub, tree_where
from ._base import LinearProblem, LinearSolver, Matvec, SolveInfo

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
    * fixed-K mode skips that step (no update of ``x``), restarts the search direction from
      the residual, and counts the skipped steps in ``info.stats["skipped_steps"]``, so the
      result stays finite.

    Args:
        tol, atol, maxiter, ridge: see :class:`~bilevel.linear.LinearSolver`.
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

    def _precondition(self, r: Tree) -> Tree:
        return r if self.preconditioner is None else self.preconditioner(r)

    def _solve(self, problem: LinearProblem) -> tuple[Tree, SolveInfo]:
        matvec, b = problem.matvec, problem.b
        if problem.x0 is None:
            x, r, matvecs = tree_map(torch.zeros_like, b), b, 0
        else:
            x, r, matvecs = problem.x0, tree_sub(b, matvec(problem.x0)), 1
        z = self._precondition(r)
        p, rz = z, tree_dot(r, z)
        if self.fixed_iterations:
            return self._solve_fixed(matvec, x, r, p, rz, matvecs)

        b_norm = float(tree_norm(b).detach())
        threshold = self._threshold(b_norm)
        r_norm = float(tree_norm(r).detach())
        iterations = 0
        while r_norm > threshold and iterations < self.maxiter and r_norm == r_norm:
            ap = matvec(p)
            matvecs += 1
            iterations += 1
            curvature = float(tree_dot(p, ap).detach())
            if not curvature > 0.0:
                reason = "nonfinite" if curvature != curvature else "breakdown"
                info = SolveInfo(False, iterations, r_norm, reason, {"matvecs": matvecs})
                return x, info
            alpha = float(rz.detach()) / curvature
            x = tree_axpy(alpha, p, x)
            r = tree_axpy(-alpha, ap, r)
            r_norm = float(tree_norm(r).detach())
            z = self._precondition(r)
            rz_new = tree_dot(r, z)
            p = tree_axpy(float(rz_new.detach()) / float(rz.detach()), p, z)
            rz = rz_new
        return x, self._adaptive_info(r_norm, iterations, b_norm, matvecs=matvecs)

    def _solve_fixed(
        self, matvec: Matvec, x: Tree, r: Tree, p: Tree, rz: torch.Tensor, matvecs: int
    ) -> tuple[Tree, SolveInfo]:
        # Every branch is a torch.where on 0-d tensors: no host sync, vmappable.
        skipped = torch.zeros((), dtype=torch.int64, device=rz.device)
        for _ in range(self.maxiter):
            ap = matvec(p)
            curvature = tree_dot(p, ap)
            # Exact convergence gives p = 0 and curvature 0: a no-op step, not a skip.
            positive = curvature > 0
            active = rz > 0
            alpha = torch.where(positive, rz / torch.where(positive, curvature, 1), 0)
            x = tree_where(positive, tree_axpy(alpha, p, x), x)
            r = tree_where(positive, tree_axpy(-alpha, ap, r), r)
            z = self._precondition(r)
            rz_new = tree_dot(r, z)
            beta = torch.where(active, rz_new / torch.where(active, rz, 1), 0)
            # After a skipped step restart from steepest descent instead of reusing p.
            p = tree_where(positive, tree_axpy(beta, p, z), z)
            rz = rz_new
            skipped = skipped + (~positive & active).to(skipped.dtype)
        matvecs += self.maxiter
        info = self._fixed_info(tree_norm(r), self.maxiter, skipped_steps=skipped, matvecs=matvecs)
        return x, info
