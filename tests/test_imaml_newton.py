"""The Hessian-free inner solver's truncated CG (line-search Newton–CG, Nocedal & Wright Alg. 7.1).

References are dense solves and the algorithm's defining properties, never the code under test:
on a positive definite system the full CG run is the Newton direction; on an indefinite one every
returned direction is a descent direction, and the steepest-descent fallback is exact.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import vmap

import bilevel as bl
from applications.imaml.inner import NewtonCG, _newton_direction

F64 = torch.float64


def _quadratic(H: torch.Tensor, b: torch.Tensor):
    """``f(φ) = ½ φᵀHφ + bᵀφ`` on a one-leaf parameter dict, and its exact Hessian product."""

    def loss(p):
        x = p["w"]
        return 0.5 * x @ (H @ x) + b @ x

    def hvp(v):
        return {"w": H @ v["w"]}

    return loss, hvp


def _symmetric(seed: int, n: int, spectrum: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q @ torch.diag(spectrum.to(F64)) @ q.T


def test_full_run_on_positive_definite_system_is_the_newton_direction():
    n, shift = 6, 0.5
    H = _symmetric(0, n, torch.tensor([0.1, 0.5, 1.0, 2.0, 5.0, 9.0]))
    g = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=F64)
    _, hvp = _quadratic(H, torch.zeros(n, dtype=F64))
    d = _newton_direction(hvp, {"w": g}, shift, steps=n)["w"]
    expected = torch.linalg.solve(H + shift * torch.eye(n, dtype=F64), g)
    torch.testing.assert_close(d, expected, rtol=1e-9, atol=1e-11)


def test_negative_curvature_on_the_first_iteration_falls_back_to_steepest_descent():
    # gᵀ(H + shift·I)g = 0.01·1.5 − 1·2.5 < 0: the first CG direction has negative curvature.
    H = torch.diag(torch.tensor([1.0, -3.0], dtype=F64))
    g = torch.tensor([0.1, 1.0], dtype=F64)
    _, hvp = _quadratic(H, torch.zeros(2, dtype=F64))
    d = _newton_direction(hvp, {"w": g}, 0.5, steps=5)["w"]
    torch.testing.assert_close(d, g, rtol=0, atol=0)


def test_a_linear_solver_answers_the_same_system_uphill():
    # Why NewtonCG has its own CG: a linear solver solves the indefinite system, and its
    # answer A⁻¹g is an ascent direction (gᵀA⁻¹g < 0); with fewer iterations bl.CG may instead
    # report a breakdown and keep x0 = 0, which for a Newton step is no step at all.
    A = torch.diag(torch.tensor([1.5, -2.5], dtype=F64))
    g = torch.tensor([0.1, 1.0], dtype=F64)
    x, _ = bl.CG(tol=0, maxiter=5)(lambda v: A @ v, g)
    torch.testing.assert_close(x, torch.linalg.solve(A, g))
    assert g @ x < 0


def test_newton_cg_decreases_an_objective_whose_hessian_is_indefinite():
    H = torch.diag(torch.tensor([1.0, -3.0], dtype=F64))
    b = torch.tensor([0.1, 1.0], dtype=F64)
    loss, _ = _quadratic(H, b)
    # bounded below only through the proximal term: f + λ/2‖φ − c‖² with λ = 4 > 3
    center = {"w": torch.zeros(2, dtype=F64)}
    p0 = {"w": torch.zeros(2, dtype=F64)}
    solver = NewtonCG(steps=3, cg_steps=2, lr=1.0, damping=0.0)
    p = solver(loss, p0, center, 4.0)

    def objective(q):
        return loss(q) + 2.0 * torch.sum((q["w"] - center["w"]) ** 2)

    # the proximal Hessian diag(5, 1) is positive definite: the minimiser is closed-form
    minimiser = -torch.linalg.solve(H + 4.0 * torch.eye(2, dtype=F64), b)
    assert objective(p) < objective(p0)
    torch.testing.assert_close(p["w"], minimiser, rtol=1e-9, atol=1e-12)

    # without the proximal term the damped system is indefinite at φ0 and every step must
    # still go downhill instead of stalling at φ0
    p = NewtonCG(steps=2, cg_steps=3, lr=1.0, damping=0.5)(loss, p0)
    assert loss(p) < loss(p0) - 0.1


@settings(deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 7),
    negatives=st.integers(0, 3),
    shift=st.floats(0.0, 2.0),
    steps=st.integers(1, 8),
)
def test_every_direction_is_a_descent_direction(seed, n, negatives, shift, steps):
    negatives = min(negatives, n - 1)
    g = torch.Generator().manual_seed(seed)
    magnitudes = torch.rand(n, generator=g, dtype=F64) * 10 + 0.05
    spectrum = magnitudes * torch.tensor([-1.0] * negatives + [1.0] * (n - negatives), dtype=F64)
    H = _symmetric(seed, n, spectrum)
    grad = torch.randn(n, generator=g, dtype=F64)
    _, hvp = _quadratic(H, torch.zeros(n, dtype=F64))
    d = _newton_direction(hvp, {"w": grad}, shift, steps)["w"]
    assert torch.isfinite(d).all()
    assert grad @ d > 0


def test_vmap_matches_a_loop_over_tasks_of_either_curvature():
    n, shift, steps = 5, 0.3, 4
    Hs = torch.stack(
        [
            _symmetric(0, n, torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0])),  # positive definite
            _symmetric(1, n, torch.tensor([-4.0, 1.0, 2.0, 3.0, 4.0])),  # one negative
            _symmetric(2, n, torch.tensor([-4.0, -3.0, -2.0, -1.0, -0.5])),  # negative definite
        ]
    )
    gs = torch.randn(3, n, generator=torch.Generator().manual_seed(3), dtype=F64)

    def one(H, g):
        return _newton_direction(lambda v: {"w": H @ v["w"]}, {"w": g}, shift, steps)["w"]

    batched = vmap(one)(Hs, gs)
    looped = torch.stack([one(H, g) for H, g in zip(Hs, gs, strict=True)])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)
    # the negative definite task stops on its first direction: steepest descent
    torch.testing.assert_close(batched[2], gs[2], rtol=0, atol=0)


def test_backtracking_rescues_a_newton_step_that_overshoots():
    # f(x) = √(1 + x²) at x = 2: the Newton step x − f'/f'' = −x³ = −8 overshoots (f rises
    # from √5 to √65), −3 at half the step still does, a quarter step lands on −0.5 (f = √1.25).
    def loss(p):
        return torch.sqrt(1 + p["w"] ** 2).sum()

    p0 = {"w": torch.tensor([2.0], dtype=F64)}
    solver = NewtonCG(steps=1, cg_steps=1, lr=1.0, damping=0.0, backtracks=4)
    torch.testing.assert_close(solver(loss, p0)["w"], torch.tensor([-0.5], dtype=F64))
    # one try only: the step is refused and the weights stay where they were
    once = NewtonCG(steps=1, cg_steps=1, lr=1.0, damping=0.0, backtracks=1)
    torch.testing.assert_close(once(loss, p0)["w"], p0["w"], rtol=0, atol=0)
    # under vmap each task backtracks on its own: x = 2 needs a quarter step, x = 0.5 the
    # full Newton step (−0.125, f decreases)
    xs = torch.tensor([[2.0], [0.5]], dtype=F64)
    out = vmap(lambda x: solver(loss, {"w": x})["w"])(xs)
    torch.testing.assert_close(out, torch.tensor([[-0.5], [-0.125]], dtype=F64))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_backtracks_is_validated(bad):
    with pytest.raises((TypeError, ValueError), match="backtracks"):
        NewtonCG(backtracks=bad)
