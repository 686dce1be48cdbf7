"""Richardson iteration, i.e. the truncated Neumann series for ``A⁻¹ b``."""

from __future__ import annotations

import math

import torch

from ..tree import tree_axpy, tree_map, tree_norm, tree_sub
from ._base import LinearProblem, LinearSolver, Matvec, SolveInfo

__all__ = ["Neumann"]


def _spread(b: torch.Tensor) -> torch.Tensor:
    """A fixed unit vector of pseudo-random signs ``±1/√n`` shaped like ``b``.

    Deterministic (an integer hash of the index, no random generator), so it runs under
    ``torch.func.vmap`` and ``torch.compile`` and gives the same step size on every call.
    Its share of any unit vector ``e`` is ``qᵀe``, about ``±1/√n`` for a generic or a
    coordinate ``e`` and for Fourier modes, never the tiny share a structured ``b`` can have.
    """
    n = b.shape[-1]
    x = torch.arange(1, n + 1, dtype=torch.int64, device=b.device) * 2654435761 % 2**32
    for _ in range(2):  # xor-shift-multiply rounds; every product stays below 2**63
        x = (x ^ (x >> 16)) * 73244475 % 2**32
    x = x ^ (x >> 16)
    signs = ((x >> 7) & 1) * 2 - 1
    return signs.to(b.dtype) / math.sqrt(max(n, 1))


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

    **Step size.** With ``alpha=None`` (the default) ``α = 1/λ̂`` is estimated from
    ``power_iterations`` steps of the power method on ``A`` (Golub & Van Loan, §8.2.1),
    started from ``b/‖b‖`` plus a fixed vector of pseudo-random signs that gives every
    eigenvector a share of about ``1/√n``. Its Rayleigh quotient ``λ̂`` approaches the
    eigenvalue of largest magnitude from inside the spectrum, so for a symmetric positive
    definite ``A`` it gives ``α ≥ 1/λ_max`` and, once ``λ̂ > λ_max/2``, a convergent series
    (a contraction's ``J_T − I`` gives a negative ``λ̂`` and hence a negative ``α``). Why not
    from ``b`` alone: an eigenvalue that ``b`` excites only weakly, or at rounding level,
    stays hidden from the estimate, yet the series grows that component by ``|1 − αλ_max|``
    per step (``λ_max = 1000`` with ``b`` orthogonal to its eigenvector: ``λ̂ ≈ 400``,
    ``α λ_max ≈ 2.5``, divergence). The sign vector is a deterministic hash of the index,
    so the estimate is sync-free and runs under ``vmap`` and ``torch.compile``; worst case,
    ten steps see an isolated ``λ_max`` above twice the rest for ``n`` up to about
    ``10⁷``. The estimate is not differentiated (a step size is not part of the maths),
    costs ``power_iterations`` extra matvecs, and is reported in ``info.stats["alpha"]``. A
    fixed ``alpha`` costs nothing extra; ``α = 1`` diverges on any Hessian with
    ``λ_max > 2``.

    Fixed-K is the default (``tol=0``): exactly ``steps`` steps, no host synchronisation,
    usable under ``torch.func.vmap``; a series that diverged anyway (residual above ``‖b‖``
    or non-finite) is reported as diverged and returns ``x = 0`` (see
    [`SolveInfo`][bilevel.SolveInfo]). With ``tol > 0`` or ``atol > 0`` it stops once
    ``‖r‖ ≤ max(tol·‖b‖, atol)`` and reports ``"max_iterations"`` otherwise.

    Args:
        steps: number of terms ``K`` of the series (the iteration budget; ``maxiter`` is
            accepted as an alias).
        alpha: step size ``α ≠ 0`` (negative for ``A = J_T − I`` of a fixed point); ``None``
            (default) estimates ``α = 1/λ̂`` by the power method.
        tol: relative tolerance (default 0: fixed-K): stop once
            ``‖b − A x‖ ≤ max(tol·‖b‖, atol)``; ``tol = atol = 0`` selects fixed-K mode.
        atol: absolute tolerance on the residual norm.
        ridge: solve ``(A + ridge·I) x = b`` instead (damps indefinite or singular ``A``).
        maxiter: alias of ``steps`` for code that configures every solver the same way.
        power_iterations: power-method steps for the ``alpha=None`` estimate (ignored when
            ``alpha`` is given).
    """

    def __init__(
        self,
        *,
        steps: int | None = None,
        alpha: float | None = None,
        tol: float = 0.0,
        atol: float = 0.0,
        ridge: float = 0.0,
        maxiter: int | None = None,
        power_iterations: int = 10,
    ) -> None:
        if steps is not None and maxiter is not None and steps != maxiter:
            raise ValueError(
                f"steps={steps!r} and maxiter={maxiter!r} are aliases; pass only one of them"
            )
        budget = steps if steps is not None else maxiter if maxiter is not None else 10
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"steps must be a non-negative int, got {budget!r}")
        if alpha is not None:
            if isinstance(alpha, bool) or not isinstance(alpha, int | float):
                raise TypeError(
                    f"alpha must be a real number or None (estimate it), got {type(alpha).__name__}"
                )
            if alpha == 0 or not math.isfinite(alpha):
                raise ValueError(f"alpha must be finite and non-zero, got {alpha!r}")
        if (
            isinstance(power_iterations, bool)
            or not isinstance(power_iterations, int)
            or power_iterations < 1
        ):
            raise ValueError(f"power_iterations must be a positive int, got {power_iterations!r}")
        super().__init__(tol=tol, atol=atol, maxiter=budget, ridge=ridge)
        self.alpha = None if alpha is None else float(alpha)
        self.power_iterations = power_iterations

    @property
    def steps(self) -> int:
        """The number of series terms (same as ``maxiter``)."""
        return self.maxiter

    def _step_size(self, matvec: Matvec, b: torch.Tensor) -> tuple[float | torch.Tensor, int]:
        """``α`` and the matvecs spent on it: the given one, or ``1/λ̂`` by the power method."""
        if self.alpha is not None:
            return self.alpha, 0
        with torch.no_grad():  # a step size, not part of the maths: never differentiated
            tiny = torch.finfo(b.dtype).tiny
            b = b.detach()
            # Started from b alone, the estimate misses an eigenvalue that b excites only
            # weakly (or at rounding level), and the series then grows that component by
            # |1 − αλ_max| > 1 per step. The fixed sign vector gives every eigenvector a
            # share of about 1/√n whatever b is.
            v = b / torch.linalg.vector_norm(b).clamp_min(tiny) + _spread(b)
            rayleigh = torch.zeros((), dtype=b.dtype, device=b.device)
            for _ in range(self.power_iterations):
                v = v / torch.linalg.vector_norm(v).clamp_min(tiny)
                av = matvec(v).detach()
                rayleigh = torch.dot(v, av)
                v = av
            # λ̂ = 0 (A = 0 on the start vector) leaves any α valid: use 1.
            alpha = torch.where(rayleigh != 0, 1 / torch.where(rayleigh != 0, rayleigh, 1), 1)
        if not self.fixed_iterations:
            return float(alpha), self.power_iterations
        return alpha, self.power_iterations

    def _solve(self, problem: LinearProblem) -> tuple[torch.Tensor, SolveInfo]:
        matvec, b = problem.matvec, problem.b
        alpha, matvecs = self._step_size(matvec, b)
        if problem.x0 is None:
            x, r = tree_map(torch.zeros_like, b), b
        else:
            x, r, matvecs = problem.x0, tree_sub(b, matvec(problem.x0)), matvecs + 1

        if self.fixed_iterations:
            for _ in range(self.maxiter):
                x = x + alpha * r
                r = r - alpha * matvec(r)
            matvecs += self.maxiter
            return x, self._fixed_info(tree_norm(r), self.maxiter, matvecs=matvecs, alpha=alpha)

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
        return x, self._adaptive_info(r_norm, iterations, b_norm, matvecs=matvecs, alpha=alpha)
