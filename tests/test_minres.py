"""MINRES on symmetric indefinite systems.

Every reference comes from ``torch.linalg`` on the explicit matrix or from a closed form,
never from the solver under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import grad, jacfwd, jvp, vmap

import bilevel as bl

F64 = torch.float64


def indefinite(n: int, negatives: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    """Q diag(λ) Qᵀ with ``negatives`` eigenvalues in [−4, −0.5], the rest in [0.5, 4]."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    magnitude = 0.5 + 3.5 * torch.rand(n, generator=g, dtype=F64)
    sign = torch.ones(n, dtype=F64)
    sign[:negatives] = -1.0
    a = (q * (sign * magnitude)) @ q.T
    return ((a + a.T) / 2).to(dtype)


def rhs(n: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(n, generator=g, dtype=F64).to(dtype)


@st.composite
def systems(draw: st.DrawFn, max_n: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    n = draw(st.integers(2, max_n))
    negatives = draw(st.integers(1, n - 1))  # both signs: genuinely indefinite
    seed = draw(st.integers(0, 2**31 - 1))
    return indefinite(n, negatives, seed), rhs(n, seed)


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x - reference) / torch.linalg.vector_norm(reference))


@given(system=systems())
def test_adaptive_matches_linalg_solve(system: tuple[torch.Tensor, torch.Tensor]) -> None:
    a, b = system
    x, info = bl.MINRES(tol=1e-12, maxiter=20 * a.shape[0])(lambda v: a @ v, b)
    assert info.reason == "converged", info
    assert relative_error(x, torch.linalg.solve(a, b)) <= 1e-9
    # The recurrence residual agrees with the true one.
    true = float(torch.linalg.vector_norm(b - a @ x))
    assert abs(info.residual_norm - true) <= 1e-10 * float(torch.linalg.vector_norm(b))


@given(system=systems())
def test_fixed_k_matches_linalg_solve(system: tuple[torch.Tensor, torch.Tensor]) -> None:
    a, b = system
    n = a.shape[0]
    x, info = bl.MINRES(tol=0, maxiter=n + 5)(lambda v: a @ v, b)
    assert relative_error(x, torch.linalg.solve(a, b)) <= 1e-8
    assert not info.failed and info.stats["matvecs"] == n + 5
    assert int(info.stats["breakdowns"]) == 0


@given(system=systems(max_n=20))
def test_fixed_k_residual_never_increases(system: tuple[torch.Tensor, torch.Tensor]) -> None:
    a, b = system
    b_norm = float(torch.linalg.vector_norm(b))
    previous = b_norm
    for k in range(1, a.shape[0] + 1):
        x, _ = bl.MINRES(tol=0, maxiter=k)(lambda v: a @ v, b)
        residual = float(torch.linalg.vector_norm(b - a @ x))  # explicit, not the recurrence
        assert residual <= b_norm * (1 + 1e-10)
        assert residual <= previous + 1e-10 * b_norm, (k, residual, previous)
        previous = residual


def test_fixed_k_float32() -> None:
    a64, b64 = indefinite(25, 5, seed=3), rhs(25, seed=3)
    a, b = a64.float(), b64.float()
    x, info = bl.MINRES(tol=0, maxiter=40)(lambda v: a @ v, b)
    assert x.dtype == torch.float32 and info.residual_norm.dtype == torch.float32
    assert relative_error(x.double(), torch.linalg.solve(a64, b64)) <= 1e-4
    assert not info.failed


def test_vmap_over_right_hand_sides_equals_loop() -> None:
    a = indefinite(12, 4, seed=5)
    bs = torch.randn(6, 12, generator=torch.Generator().manual_seed(6), dtype=F64)
    solver = bl.MINRES(tol=0, maxiter=15)
    batched = vmap(lambda b: solver(lambda v: a @ v, b)[0])(bs)
    looped = torch.stack([solver(lambda v: a @ v, b)[0] for b in bs])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(batched, torch.linalg.solve(a, bs.T).T, rtol=1e-8, atol=1e-8)


def test_vmap_over_operators() -> None:
    a = torch.stack([indefinite(8, k, seed=k) for k in range(1, 5)])
    b = rhs(8, seed=0)
    solver = bl.MINRES(tol=0, maxiter=12)
    x = vmap(lambda m: solver(lambda v: m @ v, b)[0])(a)
    reference = torch.linalg.solve(a, b.expand(4, 8).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(x, reference, rtol=1e-8, atol=1e-8)


@given(system=systems(max_n=12))
def test_gradient_matches_analytic(system: tuple[torch.Tensor, torch.Tensor]) -> None:
    m, b = system
    n = m.shape[0]
    c = torch.linspace(-1.0, 1.0, n, dtype=F64)
    solver = bl.MINRES(tol=0, maxiter=n + 5)

    def loss(m: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = (m + m.T) / 2  # MINRES assumes symmetry: differentiate along symmetric dA
        return c @ solver(lambda v: a @ v, b)[0]

    grad_m, grad_b = grad(loss, argnums=(0, 1))(m, b)
    # d(cᵀA⁻¹b)/db = A⁻ᵀc; d/dA = −A⁻ᵀc xᵀ, symmetrised by A = (M + Mᵀ)/2.
    x, y = torch.linalg.solve(m, b), torch.linalg.solve(m.T, c)
    g_a = -torch.outer(y, x)
    torch.testing.assert_close(grad_b, y, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(grad_m, (g_a + g_a.T) / 2, rtol=1e-7, atol=1e-7)
    # Forward mode agrees: the tangent of x along db is A⁻¹ db.
    db = torch.ones(n, dtype=F64)
    _, tangent = jvp(lambda b: solver(lambda v: m @ v, b)[0], (b,), (db,))
    torch.testing.assert_close(tangent, torch.linalg.solve(m, db), rtol=1e-7, atol=1e-7)


def test_exact_convergence_stays_finite() -> None:
    # A = 3I: the Krylov space is invariant after one step (β₂ = 0); four masked steps follow.
    b = rhs(6, seed=7)

    def solve(scale: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return bl.MINRES(tol=0, maxiter=5)(lambda v: scale * v, b)[0]

    three = torch.tensor(3.0, dtype=F64)
    torch.testing.assert_close(solve(three, b), b / 3)
    grad_scale, grad_b = grad(lambda s, b: solve(s, b).sum(), argnums=(0, 1))(three, b)
    torch.testing.assert_close(grad_b, torch.full_like(b, 1 / 3))
    torch.testing.assert_close(grad_scale, -b.sum() / 9)  # d(Σ b/s)/ds = −Σb/s²
    jacobian = jacfwd(solve, argnums=1)(three, b)
    torch.testing.assert_close(jacobian, torch.eye(6, dtype=F64) / 3)
    _, info = bl.MINRES(tol=0, maxiter=5)(lambda v: 3 * v, b)
    assert int(info.stats["breakdowns"]) == 0 and not info.failed


def test_zero_rhs_fixed_k() -> None:
    a = indefinite(5, 2, seed=8)
    b = torch.zeros(5, dtype=F64)
    x, info = bl.MINRES(tol=0, maxiter=4)(lambda v: a @ v, b)
    assert torch.equal(x, b) and float(info.residual_norm) == 0.0 and not info.failed
    g = grad(lambda b: bl.MINRES(tol=0, maxiter=4)(lambda v: a @ v, b)[0].sum())(b)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("tol", [0.0, 1e-12])
def test_warm_start(tol: float) -> None:
    # n = 100: large enough that convergence comes before the finite termination at n.
    a, b = indefinite(100, 30, seed=9), rhs(100, seed=9)
    reference = torch.linalg.solve(a, b)
    x0 = reference + 1e-3 * torch.ones(100, dtype=F64)
    solver = bl.MINRES(tol=tol, maxiter=80)
    x, info = solver(lambda v: a @ v, b, x0=x0)
    assert relative_error(x, reference) <= 1e-9
    assert info.stats["matvecs"] == info.iterations + 1  # one more for r₀ = b − A x₀
    # Starting close costs fewer iterations than starting at zero.
    if tol:
        _, cold = solver(lambda v: a @ v, b)
        assert info.iterations < cold.iterations


@pytest.mark.parametrize("tol", [0.0, 1e-12])
def test_ridge(tol: float) -> None:
    # Eigenvalues ±[0.5, 4] shifted by 0.3: still indefinite, and none of them near 0.
    a, b = indefinite(15, 5, seed=10), rhs(15, seed=10)
    x, info = bl.MINRES(tol=tol, maxiter=40, ridge=0.3)(lambda v: a @ v, b)
    reference = torch.linalg.solve(a + 0.3 * torch.eye(15, dtype=F64), b)
    assert relative_error(x, reference) <= 1e-9 and not info.failed


@pytest.mark.parametrize("seed", range(3))
def test_invariant_space_below_the_rounding_floor_is_converged(seed: int) -> None:
    # Two distinct eigenvalues, 1 and 1e4: the Krylov space is invariant after two steps and
    # the exact minimiser there is the solution, but rounding leaves a residual ~κ·ε‖b‖ far
    # above tol = 1e-18. That is convergence to rounding, not a breakdown (fixed-K agrees).
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=F64))
    a = q @ torch.diag(torch.tensor([1.0, 1e4] * 6, dtype=F64)) @ q.T
    b = torch.randn(12, generator=g, dtype=F64)
    reference = torch.linalg.solve(a, b)
    x, info = bl.MINRES(tol=1e-18, maxiter=50)(lambda v: a @ v, b)
    assert info.reason == "converged" and info.stats["invariant_space"], info
    assert info.iterations == 2 and info.residual_norm > 1e-18 * float(b.norm())
    assert relative_error(x, reference) <= 1e-10
    x, info = bl.MINRES(tol=0, maxiter=5)(lambda v: a @ v, b)
    assert not info.failed and relative_error(x, reference) <= 1e-10


def test_singular_systems() -> None:
    d = torch.tensor([1.0, 2.0, 0.0], dtype=F64)
    # Consistent: b in range(A), the minimiser in the Krylov space is the solution.
    x, info = bl.MINRES(tol=1e-12)(lambda v: d * v, torch.tensor([1.0, 1.0, 0.0], dtype=F64))
    torch.testing.assert_close(x, torch.tensor([1.0, 0.5, 0.0], dtype=F64))
    assert info.reason == "converged"
    # Inconsistent: the residual cannot go below its null-space part, 1.
    b = torch.ones(3, dtype=F64)
    x, info = bl.MINRES(tol=1e-12)(lambda v: d * v, b)
    assert info.reason == "breakdown" and math.isclose(info.residual_norm, 1.0, rel_tol=1e-12)
    torch.testing.assert_close(x[:2], torch.tensor([1.0, 0.5], dtype=F64))
    x, info = bl.MINRES(tol=0, maxiter=6)(lambda v: d * v, b)
    assert int(info.stats["breakdowns"]) == 1 and info.failed and torch.isfinite(x).all()


def test_nonfinite_matvec_is_reported() -> None:
    b = torch.ones(4, dtype=F64)
    _, info = bl.MINRES(tol=1e-8)(lambda v: v * math.nan, b)
    assert info.reason == "nonfinite"
    _, info = bl.MINRES(tol=0, maxiter=3)(lambda v: v * math.nan, b)
    assert info.outcome == "nonfinite"
