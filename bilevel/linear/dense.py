"""Direct solve by materialising ``A``: LU, or Cholesky for SPD matrices."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._transforms import any_batched
from ._base import LinearProblem, LinearSolver, SolveInfo
from ._results import Result

__all__ = ["Dense"]


class Dense(LinearSolver):
    r"""Materialise ``A + ridge·I`` from ``matvec`` and factorise it.

    ``A`` is built column by column as ``A eⱼ`` for the ``n`` basis vectors of the
    flattened tree — one ``torch.func.vmap``-ed ``matvec`` call, or a Python loop of ``n``
    calls when ``matvec`` cannot be vmapped — and then solved by LU with partial pivoting
    (``torch.linalg.solve_ex``; any nonsingular ``A``) or, with ``positive_definite=True``,
    by Cholesky (``torch.linalg.cholesky_ex``; symmetric positive definite ``A``, about half
    the flops). See Golub & Van Loan, *Matrix Computations*, 4th ed., §3.2 and §4.2.

    Cost: ``n`` matvecs plus ``O(n³)`` flops (``2n³/3`` for LU, ``n³/3`` for Cholesky);
    memory ``n²`` numbers. Exact up to rounding, so the right choice for small systems
    (``n`` up to a few thousand), for tests, and as a reference. ``x0`` is ignored.

    Dense has no tolerance and no iterations (``info.iterations`` is 0). Its ``info`` reports
    the residual ``‖b − A x‖`` of the materialised matrix. Outside ``vmap`` the info holds
    Python values: ``"converged"``; ``"breakdown"`` when the factorisation fails (a
    Cholesky factorisation of a matrix that is not positive definite, or an exactly
    singular ``A`` for LU) or finds ``A`` numerically singular, in which case ``x`` is
    zero; or ``"nonfinite"``. Numerical singularity is read from the factor's pivots: the
    ratio ``min |uᵢᵢ| / max |uᵢᵢ|`` of the diagonal of ``U`` (of ``L``, squared, for
    Cholesky) is a cheap lower-side estimate of the reciprocal condition number, and a
    value below ``rcond`` (default ``n·ε``) means the computed ``x`` is dominated by
    rounding (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §9.1 and
    §15); ``info.stats["rcond"]`` holds it. Under
    ``torch.func.vmap`` nothing synchronises with the host: ``info.converged`` is a 0-d
    tensor (false after a failed factorisation or a non-finite residual), the reason is
    ``"fixed_iterations"``, and a failed element's ``x`` is zero. Dense is therefore usable
    wherever a fixed-K solver is.

    Cholesky is also used when ``A`` comes as a
    [`LinearOperator`][bilevel.LinearOperator] tagged ``positive_semidefinite`` (with
    ``ridge > 0`` that makes ``A + ridge·I`` positive definite; a singular semidefinite ``A``
    without ridge is reported as a breakdown, as LU would find it singular too).

    Args:
        positive_definite: use Cholesky; the caller promises ``A + ridge·I`` is SPD.
        ridge: solve ``(A + ridge·I) x = b`` instead (damps indefinite or singular ``A``).
        rcond: pivot-ratio threshold below which ``A`` counts as singular (default
            ``n·ε`` of the dtype); ``0`` accepts any nonzero pivot.
    """

    def __init__(
        self, *, positive_definite: bool = False, ridge: float = 0.0, rcond: float | None = None
    ) -> None:
        super().__init__(tol=0.0, atol=0.0, maxiter=0, ridge=ridge)
        if rcond is not None:
            if isinstance(rcond, bool) or not isinstance(rcond, int | float):
                raise TypeError(f"rcond must be a real number or None, got {type(rcond).__name__}")
            if not 0 <= rcond < 1:
                raise ValueError(f"rcond must be in [0, 1) (a pivot ratio), got {rcond!r}")
        self.positive_definite = bool(positive_definite)
        self.rcond = None if rcond is None else float(rcond)

    def _solve(self, problem: LinearProblem) -> tuple[torch.Tensor, SolveInfo]:
        b = problem.b
        matrix = materialise(problem.matvec, b)
        n = b.shape[-1]
        if self.positive_definite or problem.positive_semidefinite:
            factor, status = torch.linalg.cholesky_ex(matrix)
            x = torch.cholesky_solve(b[:, None], factor)[:, 0]
            pivots = torch.diagonal(factor).detach().abs() ** 2
        else:
            x, status = torch.linalg.solve_ex(matrix, b)
            # The pivots come from a second, undifferentiated factorisation: lu_solve's
            # forward-mode rule is wrong under vmap in torch 2.13 (vmap(jacfwd) of a batch
            # returns a wrong inverse for every element but the first), solve_ex's is right.
            with torch.no_grad():
                factor, _, _ = torch.linalg.lu_factor_ex(matrix.detach())
            pivots = torch.diagonal(factor).abs()
        rcond = pivots.min() / pivots.max().clamp_min(torch.finfo(b.dtype).tiny)
        threshold = n * torch.finfo(b.dtype).eps if self.rcond is None else self.rcond
        ok = (status == 0) & (rcond > threshold)
        x = torch.where(ok, x, 0)
        residual = torch.linalg.vector_norm(b - matrix @ x)
        stats = {"matvecs": n, "rcond": rcond}
        if any_batched(problem.b):
            stats["breakdowns"] = (~ok).to(torch.int64)
            return x, SolveInfo(
                ok & torch.isfinite(residual), 0, residual, Result.FIXED_ITERATIONS, stats
            )
        residual_norm = residual.item()
        stats["rcond"] = rcond.item()
        if not bool(torch.isfinite(b).all()):
            x = torch.full_like(b, float("nan"))
            stats["nonfinite_input"] = True
            return x, SolveInfo(False, 0, float("nan"), Result.NONFINITE, stats)
        if not bool(ok):
            return x, SolveInfo(False, 0, residual_norm, Result.BREAKDOWN, stats)
        finite = residual_norm < float("inf")  # false for inf and nan
        reason = Result.CONVERGED if finite else Result.NONFINITE
        return x, SolveInfo(finite, 0, residual_norm, reason, stats)


def materialise(matvec: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The ``n × n`` matrix of a linear ``matvec`` on flat vectors shaped like ``like``.

    Column ``j`` is ``matvec`` of the ``j``-th basis vector; all columns come from one
    ``torch.func.vmap``-ed call when possible, else from a loop.
    """
    basis = torch.eye(like.shape[-1], dtype=like.dtype, device=like.device)
    try:
        rows = torch.func.vmap(matvec)(basis)
    except (RuntimeError, NotImplementedError, TypeError):
        rows = torch.stack([matvec(e) for e in basis])
    return rows.mT
