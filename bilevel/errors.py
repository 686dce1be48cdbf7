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
    """

    def __init__(self, message: str, info: object = None) -> None:
        super().__init__(message)
        self.info = info
