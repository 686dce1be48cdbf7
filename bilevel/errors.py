"""Warnings and errors raised when a linear solve does not reach its tolerance."""

from __future__ import annotations

__all__ = ["ConvergenceError", "ConvergenceWarning"]


class ConvergenceWarning(UserWarning):
    """A linear solve with ``tol > 0`` stopped before reaching its tolerance.

    Emitted by the implicit-differentiation layer under the default ``on_failure="warn"``.
    The gradient is still returned; it is as accurate as the reported ``residual_norm``.
    """


class ConvergenceError(RuntimeError):
    """A linear solve with ``tol > 0`` failed and ``on_failure="raise"`` was requested.

    The failed solve's [`SolveInfo`][bilevel.SolveInfo] is available as ``error.info``.

    Args:
        message: the explanation shown to the user: what failed and how to fix it.
        info: what describes the failure, kept as ``error.info``: the failed linear solve's
            [`SolveInfo`][bilevel.SolveInfo], ``None`` when no linear solve failed (a
            non-finite inner solution, a point that is not a root), or the
            ``scipy.optimize.OptimizeResult`` of a failed
            [`scipy_minimize`][bilevel.inner.scipy_minimize] solve.
    """

    def __init__(self, message: str, info: object = None) -> None:
        super().__init__(message)
        self.info = info
