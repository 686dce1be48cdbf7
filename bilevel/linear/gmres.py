"""Restarted GMRES for general square systems."""

from __future__ import annotations

import math
from typing import cast

import torch

from ._base import LinearProblem, LinearSolver, Matvec, SolveInfo

__all__ = ["GMRES"]


class GMRES(LinearSolver):
    r"""Restarted GMRES(m) for ``(A + ridge·I) x = b`` with any nonsingular square ``A``.

    Each cycle builds an orthonormal basis ``V`` of the Krylov space
    ``span{r, Ar, …, A^{m−1}r}`` by Arnoldi (classical Gram–Schmidt applied twice), and takes
    the ``x`` in that space minimising ``‖b − A x‖``, a small least-squares problem on the
    ``(m+1)×m`` Hessenberg matrix (Saad & Schultz, SIAM J. Sci. Stat. Comput. 7, 1986;
    Saad, *Iterative Methods for Sparse Linear Systems*, 2nd ed., Alg. 6.9). No symmetry or
    definiteness is assumed; the residual never increases within a cycle, but a restarted
    run can stagnate on strongly non-normal or indefinite ``A``.

    Iteration ``j`` of a cycle costs one ``matvec`` and ``O(j·n)`` work for the
    orthogonalisation; memory is ``restart + 1`` vectors of the flattened size ``n``
    (trees are raveled into one vector internally). ``maxiter`` counts Arnoldi steps in
    total — i.e. matvecs — not restart cycles as in SciPy.

    * Adaptive mode tracks the residual with Givens rotations on the host, ends a cycle as
      soon as ``‖r‖ ≤ max(tol·‖b‖, atol)``, and recomputes the true residual (one extra
      ``matvec``) at every restart.
    * Fixed-K mode (``tol == atol == 0``) runs exactly ``maxiter`` Arnoldi steps with no host
      synchronisation: the least-squares problem is solved by a QR factorisation once per
      cycle and the residual is carried by the Arnoldi relation ``r = V (β e₁ − H y)``.
      A (lucky) breakdown — a new Krylov vector that vanishes — is masked with
      ``torch.where``, so the result stays finite after exact convergence. Vmappable.

    Args:
        tol: relative tolerance: stop once ``‖b − A x‖ ≤ max(tol·‖b‖, atol)``; ``tol = atol = 0``
            selects fixed-K mode.
        atol: absolute tolerance on the residual norm.
        maxiter: budget of Arnoldi steps (matvecs) over all cycles; exact in fixed-K mode.
        ridge: solve ``(A + ridge·I) x = b`` instead (damps indefinite or singular ``A``).
        restart: Krylov dimension ``m`` of one cycle (memory grows linearly with it).
    """

    def __init__(
        self,
        *,
        tol: float = 1e-6,
        atol: float = 0.0,
        maxiter: int = 100,
        restart: int = 20,
        ridge: float = 0.0,
    ) -> None:
        super().__init__(tol=tol, atol=atol, maxiter=maxiter, ridge=ridge)
        if isinstance(restart, bool) or not isinstance(restart, int) or restart < 1:
            raise ValueError(f"restart must be a positive int, got {restart!r}")
        self.restart = restart

    def _solve(self, problem: LinearProblem) -> tuple[torch.Tensor, SolveInfo]:
        b, op = problem.b, problem.matvec
        x, r, matvecs = torch.zeros_like(b), b, 0
        if problem.x0 is not None:
            x = problem.x0
            r, matvecs = b - op(x), 1
        fixed, left = self.fixed_iterations, self.maxiter
        b_norm = 0.0 if fixed else torch.linalg.vector_norm(b).item()
        r_norm = torch.linalg.vector_norm(r) if fixed else torch.linalg.vector_norm(r).item()
        threshold = 0.0 if fixed else self._threshold(b_norm)
        while left > 0 and (fixed or (threshold < r_norm < math.inf)):
            beta = torch.linalg.vector_norm(r)
            basis, columns = self._arnoldi(op, r, beta, min(self.restart, left), threshold)
            x, r, r_norm = self._update(x, beta, basis, columns)
            left -= len(columns)
            matvecs += len(columns)
            if not fixed:
                r, matvecs = b - op(x), matvecs + 1
                r_norm = torch.linalg.vector_norm(r).item()
        iterations = self.maxiter - left
        if fixed:
            return x, self._fixed_info(r_norm, iterations, matvecs=matvecs)
        # Adaptive: r_norm was read back with .item() after the last cycle.
        residual = cast(float, r_norm)
        return x, self._adaptive_info(residual, iterations, b_norm, matvecs=matvecs)

    def _arnoldi(
        self, op: Matvec, r: torch.Tensor, beta: torch.Tensor, steps: int, threshold: float
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Up to ``steps`` Arnoldi steps from ``r``; adaptive mode may stop early."""
        eps = torch.finfo(r.dtype).eps
        alive = beta > 0  # false once a basis vector vanished (r = 0, or a breakdown)
        basis = [torch.where(alive, r / torch.where(alive, beta, 1), 0)]
        units = torch.eye(steps + 1, dtype=r.dtype, device=r.device)
        columns: list[torch.Tensor] = []
        cs: list[float] = []
        sn: list[float] = []
        g = [beta.item()] if not self.fixed_iterations else []
        for j in range(steps):
            w = op(basis[j])
            w_norm = torch.linalg.vector_norm(w)
            v = torch.stack(basis)
            h = v @ w
            w = w - v.mT @ h
            h2 = v @ w  # second Gram-Schmidt pass keeps the basis orthogonal
            w, h = w - v.mT @ h2, h + h2
            hn = torch.linalg.vector_norm(w)
            ok = hn > eps * w_norm
            basis.append(torch.where(ok, w / torch.where(ok, hn, 1), 0))
            # The column of a vanished basis vector would be zero, making H rank deficient;
            # a unit column there gives that coefficient 0 and keeps the least-squares
            # solve well posed and differentiable.
            column = torch.cat([h, torch.where(ok, hn, 0)[None]])
            columns.append(torch.where(alive, column, units[j, : j + 2]))
            alive = alive & ok
            if self.fixed_iterations:
                continue
            col = columns[-1].tolist()  # adaptive: one host sync per step, as in CG
            for i in range(j):
                col[i], col[i + 1] = (
                    cs[i] * col[i] + sn[i] * col[i + 1],
                    (-sn[i] * col[i] + cs[i] * col[i + 1]),
                )
            d = math.hypot(col[j], col[j + 1])
            cs.append(col[j] / d if d > 0 else 1.0)
            sn.append(col[j + 1] / d if d > 0 else 0.0)
            g.append(-sn[j] * g[j])
            g[j] *= cs[j]
            if abs(g[j + 1]) <= threshold or not col[j + 1] > 0:
                break
        return basis, columns

    @staticmethod
    def _update(
        x: torch.Tensor, beta: torch.Tensor, basis: list[torch.Tensor], columns: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Minimise ``‖β e₁ − H y‖``; return the new ``x``, residual and its norm, sync-free."""
        k = len(columns)
        hess = torch.stack(
            [torch.nn.functional.pad(c, (0, k + 1 - c.shape[-1])) for c in columns], -1
        )
        q, rr = torch.linalg.qr(hess)
        rhs = beta * q[0]
        # Rank-deficient H (breakdown, singular A): zero the components along negligible
        # pivots instead of dividing by them, so everything stays finite.
        diag = torch.diagonal(rr).abs()
        tiny = diag <= torch.finfo(x.dtype).eps * k * torch.amax(hess.abs())
        eye = torch.eye(k, dtype=rr.dtype, device=rr.device)
        rr = torch.where(tiny[:, None], eye, rr)
        y = torch.linalg.solve_triangular(rr, torch.where(tiny, 0, rhs)[:, None], upper=True)[:, 0]
        small = -(hess @ y)
        small = torch.cat([small[:1] + beta, small[1:]])
        v = torch.stack(basis[: k + 1])
        return x + v[:k].mT @ y, v.mT @ small, torch.linalg.vector_norm(small)
