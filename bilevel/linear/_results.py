"""Why a linear solve stopped: one enum whose members say what happened and what to do.

Every solver reports its stopping reason as a member of [`Result`][bilevel.Result], and
[`SolveInfo.outcome`][bilevel.SolveInfo.outcome] resolves a fixed-K solve's 0-d tensors to
one. Each member carries a ``message`` (what it means for the returned ``x``) and a ``fix``
(what to change), so that a warning raised three layers up — by the implicit layer, or by a
user's own code reading ``info`` — names the cause and the remedy without a lookup table of
its own. The members are strings (``Result.CONVERGED == "converged"``), so code that compares
``info.reason`` with a string, or writes it to JSON, keeps working.

Modelled on the result codes of Lineax (``lineax.RESULTS``: successful / max_steps_reached /
breakdown / nonfinite_input), with the two fixed-K outcomes this library adds.
"""

from __future__ import annotations

import enum

__all__ = ["Result"]


class Result(str, enum.Enum):
    """The reason a linear solve stopped, or the outcome of a fixed-K solve.

    Reasons (``info.reason``): ``CONVERGED``, ``MAX_ITERATIONS``, ``BREAKDOWN``, ``NONFINITE``
    and ``FIXED_ITERATIONS`` (a fixed-K solve, whose verdict lives in 0-d tensors). Outcomes
    (``info.outcome``, which reads those tensors once) add ``DIVERGED`` and
    ``NONFINITE_INPUT``. Each member's ``message`` says what it means for the returned ``x``
    and its ``fix`` what to change (empty for the two successes).
    """

    CONVERGED = "converged"
    MAX_ITERATIONS = "max_iterations"
    BREAKDOWN = "breakdown"
    NONFINITE = "nonfinite"
    FIXED_ITERATIONS = "fixed_iterations"
    DIVERGED = "diverged"
    NONFINITE_INPUT = "nonfinite_input"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def message(self) -> str:
        """What the result means for the returned ``x``."""
        return _TEXT[self][0]

    @property
    def fix(self) -> str:
        """What to change when the result is a failure (empty for the successes)."""
        return _TEXT[self][1]

    @property
    def failure(self) -> bool:
        """Whether ``x`` should not be trusted (every member but the two successes)."""
        return self not in (Result.CONVERGED, Result.FIXED_ITERATIONS)

    def explain(self) -> str:
        """The message, followed by the fix when there is one.

        Returns:
            One sentence for a success; ``"<message>. Fix: <fix>."`` for a failure.
        """
        return f"{self.message}. Fix: {self.fix}." if self.fix else f"{self.message}."


# message, fix
_TEXT: dict[Result, tuple[str, str]] = {
    Result.CONVERGED: (
        "the residual met max(tol·‖b‖, atol), or the solve was exact",
        "",
    ),
    Result.MAX_ITERATIONS: (
        "the iteration budget ran out before the residual met the tolerance; x is the last iterate",
        "raise maxiter, loosen tol, damp with ridge=, or precondition the system",
    ),
    Result.BREAKDOWN: (
        "the method's assumption failed: CG met non-positive curvature pᵀAp ≤ 0 (A is not "
        "positive definite), Dense found A singular or not positive definite, MINRES or GMRES "
        "met a singular, inconsistent system",
        "use bl.MINRES for a symmetric indefinite A, bl.GMRES for a non-symmetric one, or damp "
        "with ridge=",
    ),
    Result.NONFINITE: (
        "NaN/Inf appeared: in b, or during the iteration (a series that diverged, or non-finite "
        "products with A)",
        "for Neumann leave alpha=None to estimate the step; for a singular A add ridge=; check "
        "that the operator's products are finite",
    ),
    Result.FIXED_ITERATIONS: (
        "fixed-K mode ran exactly maxiter iterations; running out of them is not a failure, "
        "and its verdict is in the info's 0-d tensors (see SolveInfo.outcome)",
        "",
    ),
    Result.DIVERGED: (
        "the fixed-K solve diverged (its final residual was non-finite or above ‖b‖), so x = 0 "
        "was returned instead",
        "for Neumann lower alpha (or leave alpha=None to estimate it); for an indefinite A use "
        "bl.MINRES or add ridge=",
    ),
    Result.NONFINITE_INPUT: (
        "the right-hand side b holds NaN/Inf, so x is NaN (never a plausible zero)",
        "find where the NaN in b comes from; for a hypergradient, b is the cotangent of the "
        "outer loss at x*",
    ),
}
