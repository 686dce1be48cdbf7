"""MINRES for symmetric, possibly indefinite systems."""

from __future__ import annotations

import math

import torch

from ._base import LinearProblem, LinearSolver, SolveInfo
from ._results import Result

__all__ = ["MINRES"]


class MINRES(LinearSolver):
    r"""MINRES for ``(A + ridge·I) x = b`` with ``A`` symmetric, possibly indefinite.

    Lanczos builds an orthonormal basis ``V`` of the Krylov space ``span{r₀, Ar₀, …}`` and a
    tridiagonal ``T``; Givens rotations keep a QR factorisation of ``T`` up to date, and
    ``x_k`` minimises ``‖b − A x‖`` over ``x₀ + 𝒦_k``, so the residual norm never increases
    (Paige & Saunders, SIAM J. Numer. Anal. 12, 1975; Choi, Paige & Saunders, SIAM J. Sci.
    Comput. 33, 2011). ``A`` must be nonsingular, or singular with a consistent right-hand
    side. Unlike CG it needs no definiteness: it is the Krylov method for iMAML's ``H + λI``
    when the network Hessian ``H`` has eigenvalues below ``−λ``. The residual is the
    recurrence's ``|φ_k|``, no extra ``matvec``.

    Each iteration costs one ``matvec``, one inner product, one norm and five axpys; memory
    is seven vectors of the flattened size (trees are raveled once per ``matvec``).

    A Lanczos breakdown (``β_{k+1} ≈ 0``: the Krylov space is invariant) ends the iteration
    with the exact minimiser. It is lucky (residual 0) unless ``T_k`` is singular, i.e. the
    system is singular and inconsistent; then the last step is skipped.

    * Adaptive mode stops once ``|φ_k| ≤ max(tol·‖b‖, atol)``, or at a breakdown. A lucky
      breakdown is ``"converged"`` even when rounding left the residual above a ``tol`` set
      at the floor ``κ·ε`` (``info.stats["invariant_space"]`` is then true): no further
      Krylov step exists, and fixed-K mode gives the same verdict. An unlucky one (a
      singular, inconsistent system, residual above ``√ε‖r₀‖``) is ``"breakdown"``.
    * Fixed-K mode (``tol == atol == 0``) runs exactly ``maxiter`` matvecs with no host
      synchronisation: after a breakdown every step is masked to a no-op with
      ``torch.where`` (no division by a vanishing ``β`` or ``γ``), so ``x`` and its
      derivatives stay finite after exact convergence; vmappable and differentiable in
      reverse and forward mode. ``info.stats["breakdowns"]`` counts unlucky breakdowns.

    Args:
        tol: relative tolerance: stop once ``‖b − A x‖ ≤ max(tol·‖b‖, atol)``; ``tol = atol = 0``
            selects fixed-K mode.
        atol: absolute tolerance on the residual norm.
        maxiter: iteration budget (the exact number of iterations in fixed-K mode).
        ridge: solve ``(A + ridge·I) x = b`` instead.
    """

    assumes_symmetric = True

    def _solve(self, problem: LinearProblem) -> tuple[torch.Tensor, SolveInfo]:
        op, b = problem.matvec, problem.b
        x, r, matvecs = torch.zeros_like(b), b, 0
        if problem.x0 is not None:
            x = problem.x0
            r, matvecs = b - op(x), 1
        fixed = self.fixed_iterations
        eps = torch.finfo(b.dtype).eps
        beta1 = torch.linalg.vector_norm(r)
        alive = beta1 > 0  # false once the Krylov space is invariant (or r₀ = 0)
        v = torch.where(alive, r / torch.where(alive, beta1, 1), 0)
        v_old = w1 = w2 = torch.zeros_like(b)
        zero, one = beta1.new_zeros(()), beta1.new_ones(())
        # beta couples v_old and v; (c1, s1), (c2, s2) are the last two Givens rotations;
        # phibar is the signed residual norm; anorm a running lower bound on ‖A‖.
        beta, phibar, anorm, c1, s1, c2, s2 = zero, beta1, zero, one, zero, one, zero
        finite = torch.isfinite(beta1)
        breakdowns = torch.zeros((), dtype=torch.int64, device=b.device)
        b_norm = 0.0 if fixed else torch.linalg.vector_norm(b).item()
        threshold = self._threshold(b_norm)
        r_norm = 0.0 if fixed else beta1.item()
        invariant, iterations = False, 0
        while iterations < self.maxiter:
            if not fixed and (r_norm <= threshold or invariant or not math.isfinite(r_norm)):
                break
            p = op(v)
            alpha = torch.dot(v, p)
            p = p - alpha * v - beta * v_old
            beta_new = torch.linalg.vector_norm(p)
            # ‖A v_k‖ = ‖(β_k, α_k, β_{k+1})‖ ≤ ‖A‖, from scalars already at hand.
            column = torch.stack([beta, alpha, beta_new]).detach()
            anorm = torch.maximum(anorm, torch.linalg.vector_norm(column))
            # Rounding leaves β_{k+1} ~ ε‖A‖ at an invariant space, never exactly 0.
            cutoff = 16 * eps * anorm
            ok = alive & (beta_new > cutoff)
            # Column k of T̄_k is (β_k, α_k, β_{k+1}) in rows k−1..k+1; rotate by G_{k−2}, G_{k−1}.
            epsilon, dbar = s2 * beta, c2 * beta
            delta, gbar = c1 * dbar + s1 * alpha, c1 * alpha - s1 * dbar
            # The norm of a stack, not hypot: its derivative at (0, 0) is 0, not NaN.
            gamma = torch.linalg.vector_norm(torch.stack([gbar, beta_new]))
            # γ_k ≈ 0 happens only at a breakdown with T_k singular: skip the step there.
            step = alive & (gamma > cutoff)
            g = torch.where(step, gamma, 1)
            c, s = torch.where(step, gbar / g, 1), torch.where(step, beta_new / g, 0)
            phi = torch.where(step, c * phibar, 0)
            w = torch.where(step, (v - delta * w1 - epsilon * w2) / g, 0)
            x = x + phi * w
            # Skipping is a failure only if a residual was left (a singular, inconsistent
            # system); at √ε‖r₀‖ the solve had already converged to rounding.
            unlucky = alive & ~step & (phibar.abs() > math.sqrt(eps) * beta1)
            breakdowns = breakdowns + unlucky.to(breakdowns.dtype)
            phibar = torch.where(step, -s * phibar, phibar)
            finite = finite & torch.isfinite(alpha) & torch.isfinite(beta_new)
            # After a breakdown v = 0 and β = 0, so every later column is zero and every
            # later step a no-op; nothing is ever divided by the vanished β.
            v_old, v = v, torch.where(ok, p / torch.where(ok, beta_new, 1), 0)
            beta, alive = torch.where(ok, beta_new, 0), ok
            w2, w1, c2, s2, c1, s1 = w1, w, c1, s1, c, s
            iterations += 1
            if not fixed:  # one host sync per iteration, as in CG
                host = torch.stack([torch.where(finite, phibar.abs(), math.nan), ok.to(b.dtype)])
                r_norm, alive_host = host.tolist()
                invariant = alive_host == 0.0
        matvecs += iterations
        if fixed:
            residual = torch.where(finite, phibar.abs(), math.nan)
            info = self._fixed_info(residual, iterations, matvecs=matvecs, breakdowns=breakdowns)
            return x, info
        if invariant and threshold < r_norm < math.inf:
            # The minimiser over an invariant Krylov space solves the system exactly; what
            # residual is left is rounding (κ·ε‖b‖, which a tol near the floor can ask to beat).
            # Only a skipped step (T_k singular: a singular, inconsistent system) is a failure,
            # the same verdict fixed-K mode gives.
            if int(breakdowns) > 0:
                return x, SolveInfo(
                    False, iterations, r_norm, Result.BREAKDOWN, {"matvecs": matvecs}
                )
            return x, SolveInfo(
                True,
                iterations,
                r_norm,
                Result.CONVERGED,
                {"matvecs": matvecs, "invariant_space": True},
            )
        return x, self._adaptive_info(r_norm, iterations, b_norm, matvecs=matvecs)
