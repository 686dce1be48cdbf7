"""The result codes: every reason and outcome is reachable, explains itself and stays a string.

Each case is built to produce one outcome (an SPD system that converges, a budget too small,
an indefinite system for adaptive CG, a NaN product, a Neumann series with α = 1 on a
Hessian with λ_max > 2, a NaN right-hand side), and the test checks the reported member,
that it is the documented failure or success, and that its message and fix reach the user.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import bilevel as bl

F64 = torch.float64
SPD = torch.diag(torch.tensor([1.0, 2.0, 5.0, 10.0], dtype=F64))
INDEFINITE = torch.diag(torch.tensor([3.0, 1.0, -2.0, 0.5], dtype=F64))
B = torch.ones(4, dtype=F64)


def _solve(solver: bl.LinearSolver, a: torch.Tensor, b: torch.Tensor = B) -> bl.SolveInfo:
    return solver(lambda v: a @ v, b)[1]


CASES = [
    ("converged", lambda: _solve(bl.CG(tol=1e-10), SPD), "converged"),
    ("max_iterations", lambda: _solve(bl.CG(tol=1e-12, maxiter=1), SPD), "max_iterations"),
    ("breakdown", lambda: _solve(bl.CG(tol=1e-10), INDEFINITE), "breakdown"),
    ("nonfinite", lambda: bl.CG(tol=1e-8)(lambda v: v * math.nan, B)[1], "nonfinite"),
    ("fixed_iterations", lambda: _solve(bl.CG(tol=0, maxiter=4), SPD), "fixed_iterations"),
    ("diverged", lambda: _solve(bl.Neumann(steps=30, alpha=1.0), SPD), "diverged"),
    (
        "nonfinite_input",
        lambda: _solve(bl.CG(tol=0, maxiter=4), SPD, torch.full((4,), math.nan, dtype=F64)),
        "nonfinite_input",
    ),
    ("dense_singular", lambda: _solve(bl.Dense(), torch.diag(B * 0)), "breakdown"),
]


@pytest.mark.parametrize(("name", "make", "expected"), CASES, ids=[c[0] for c in CASES])
def test_each_outcome_is_reported_and_explained(name: str, make, expected: str) -> None:
    info = make()
    outcome = info.outcome
    assert isinstance(outcome, bl.Result) and outcome == expected, info
    assert outcome.failure == (expected not in ("converged", "fixed_iterations"))
    assert info.failed == outcome.failure
    text = info.explain()
    assert text.startswith(f"{expected} after") and outcome.message in text
    if outcome.failure:
        assert outcome.fix and f"Fix: {outcome.fix}" in text


def test_members_are_strings_with_text() -> None:
    assert {str(m) for m in bl.Result} == {
        "converged",
        "max_iterations",
        "breakdown",
        "nonfinite",
        "fixed_iterations",
        "diverged",
        "nonfinite_input",
    }
    for member in bl.Result:
        assert member == member.value and f"{member}" == member.value
        assert json.dumps({"reason": member}) == f'{{"reason": "{member.value}"}}'
        assert member.message, member
        assert bool(member.fix) == member.failure, member


def test_solve_info_takes_a_string_reason_and_refuses_an_unknown_one() -> None:
    info = bl.SolveInfo(True, 3, 1e-9, "converged")
    assert info.reason is bl.Result.CONVERGED and not info.failed
    with pytest.raises(ValueError, match="reason must be one of"):
        bl.SolveInfo(True, 3, 1e-9, "succeeded")


def test_the_implicit_layer_quotes_the_fix() -> None:
    # A saddle point: the Hessian of x² − y² is indefinite, adaptive CG breaks down.
    def loss(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return 0.5 * (x[0] ** 2 - x[1] ** 2) - theta @ x

    @bl.custom_root(bl.stationarity(loss), solver=bl.CG(tol=1e-10))
    def saddle(x0: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return torch.stack([theta[0], -theta[1]])

    theta = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        saddle(torch.zeros(2, dtype=F64), theta).sum().backward()
    messages = [str(w.message) for w in caught if issubclass(w.category, bl.ConvergenceWarning)]
    assert len(messages) == 1 and bl.Result.BREAKDOWN.fix in messages[0], messages
