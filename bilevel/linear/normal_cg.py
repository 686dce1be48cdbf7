"""Conjugate gradient on the normal equations ``Aᵀ A x = Aᵀ b``."""

from __future__ import annotations

from typing import Any

import torch

from ..tree import Tree, tree_dot, tree_norm, tree_sub, tree_zeros_like
from ._base import LinearProblem, LinearSolver, Matvec, SolveInfo
from .cg import CG

__all__ = ["NormalCG"]


class NormalCG(LinearSolver):
    r"""CG applied to the normal equations ``(A + ridge·I)ᵀ (A + ridge·I) x = (A + ridge·I)ᵀ b``.

    Works for any nonsingular square ``A`` (Hestenes & Stiefel, 1952; "CGNR" in Saad,
    *Iterative Methods for Sparse Linear Systems*, 2nd ed., §8.3): ``AᵀA`` is symmetric
    positive definite, so the [`CG`][bilevel.CG] iteration applies unchanged — this
    solver runs exactly that iteration on the operator ``v ↦ Aᵀ(A v)``. The price is the
    squared condition number ``κ(A)²``, which slows convergence; prefer [`GMRES`][bilevel.GMRES]
    for badly conditioned nonsymmetric systems, and plain CG when ``A`` is SPD.

    ``Aᵀ`` comes from ``rmatvec`` when given. Otherwise it is derived from the (linear)
    ``matvec`` by a vector-Jacobian product, ``torch.func.vjp`` of ``matvec`` at a zero tree,
    built once per solve and reused at every iteration; that needs a ``matvec`` made of
    differentiable torch operations *that torch.func can see*. A ``matvec`` that calls
    ``torch.autograd.grad`` on a graph recorded outside it is opaque to ``torch.func`` and
    would transpose to zero, so a derived ``Aᵀ`` is verified once by the adjoint identity
    ``⟨A b, b⟩ = ⟨b, Aᵀ b⟩`` (one extra ``matvec``); a mismatch raises (adaptive mode) or
    counts as a breakdown (fixed-K). [`custom_root`][bilevel.custom_root] always passes
    ``rmatvec``.

    Each iteration costs one ``matvec``, one ``rmatvec`` and three tree inner products; memory
    is four trees (plus the VJP's saved tensors when ``rmatvec`` is derived). The stopping
    test applies to the normal-equation residual, ``‖Aᵀ(b − A x)‖ ≤ max(tol·‖Aᵀb‖, atol)``;
    ``info.residual_norm`` is the true ``‖b − A x‖`` (one extra ``matvec`` at the end) and
    ``info.stats["normal_residual_norm"]`` the tracked one. Fixed-K mode (``tol == atol == 0``)
    is sync-free and vmappable, as for CG.

    Args:
        tol: relative tolerance on the normal equations: stop once
            ``‖Aᵀ(b − A x)‖ ≤ max(tol·‖Aᵀb‖, atol)``; ``tol = atol = 0`` selects fixed-K mode.
        atol: absolute tolerance on the residual norm.
        maxiter: iteration budget (the exact number of iterations in fixed-K mode).
        ridge: solve ``(A + ridge·I) x = b`` instead (damps indefinite or singular ``A``).
    """

    def _solve(self, problem: LinearProblem) -> tuple[Tree, SolveInfo]:
        matvec, b = problem.matvec, problem.b
        rmatvec, extra_matvecs = problem.rmatvec, 1
        mismatch: torch.Tensor | None = None
        if rmatvec is None:
            rmatvec, extra_matvecs = _vjp_transpose(matvec, b), 3
        rhs = rmatvec(b)
        if problem.rmatvec is None:
            mismatch = _adjoint_mismatch(matvec, b, rhs)
            if not self.fixed_iterations and bool(mismatch):
                raise TypeError(
                    "NormalCG could not derive Aᵀ from matvec: torch.func.vjp of it fails the "
                    "adjoint test ⟨A b, b⟩ = ⟨b, Aᵀ b⟩ (a matvec built on torch.autograd.grad "
                    "of an outside graph is invisible to torch.func). Pass rmatvec= (u ↦ Aᵀu)."
                )

        def normal(v: Tree) -> Tree:
            return rmatvec(matvec(v))

        cg = CG(tol=self.tol, atol=self.atol, maxiter=self.maxiter)
        # AᵀA is positive semidefinite by construction: CG needs no indefiniteness probe.
        normal_problem = LinearProblem(
            normal, rhs, problem.x0, None, symmetric=True, positive_semidefinite=True
        )
        x, info = cg._solve(normal_problem)
        residual = tree_norm(tree_sub(b, matvec(x)))
        if not self.fixed_iterations:
            residual = residual.item()
        cg_products = info.stats["matvecs"]
        stats: dict[str, Any] = dict(info.stats)
        # CG's own divergence verdict is about the normal equations; the residual reported
        # here is the true ‖b − A x‖, so the shared test (above ‖b‖ = diverged) applies.
        stats.pop("diverged", None)
        if mismatch is not None and self.fixed_iterations:
            stats["breakdowns"] = stats["breakdowns"] + mismatch.to(torch.int64)
        stats.update(
            matvecs=cg_products + extra_matvecs,
            rmatvecs=cg_products + 1,
            normal_residual_norm=info.residual_norm,
        )
        return x, SolveInfo(info.converged, info.iterations, residual, info.reason, stats)


def _adjoint_mismatch(matvec: Matvec, b: Tree, atb: Tree) -> torch.Tensor:
    """0-d bool: ``⟨A b, b⟩`` and ``⟨b, Aᵀ b⟩`` disagree beyond rounding (sync-free)."""
    ab = matvec(b)
    lhs, rhs = tree_dot(ab, b), tree_dot(b, atb)
    eps = torch.finfo(lhs.dtype).eps
    scale = tree_norm(ab) * tree_norm(b) + tree_norm(atb) * tree_norm(b)
    return (lhs - rhs).abs() > 1e3 * eps * scale


def _vjp_transpose(matvec: Matvec, b: Tree) -> Matvec:
    """``u ↦ Aᵀu`` for a linear ``matvec``, by one ``torch.func.vjp`` built at zero."""
    try:
        vjp_fn = torch.func.vjp(matvec, tree_zeros_like(b))[1]
    except (RuntimeError, TypeError, NotImplementedError) as error:
        raise TypeError(
            "NormalCG needs Aᵀ: pass rmatvec=, or a matvec built from differentiable torch "
            f"operations so that torch.func.vjp can transpose it ({error})"
        ) from error

    def rmatvec(u: Tree) -> Tree:
        return vjp_fn(u)[0]

    return rmatvec
