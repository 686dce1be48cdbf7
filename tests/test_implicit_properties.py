"""Property-based tests (hypothesis) of implicit differentiation.

Each property is checked against an independent float64 reference: a closed form, or an
algebraic identity that any correct implementation satisfies.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _references import F64, Ridge, rel_err
from _solvers import SolverCase, solvers
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevel as bl

seeds = st.integers(min_value=0, max_value=2**31 - 1)


# --- random quadratic bilevel problems against the closed form -------------------------------


def _quadratic(seed: int, d: int):
    """inner ½ xᵀA(θ)x − bᵀx with A(θ) = A₀ + diag(θ); outer ½‖x − x_t‖² + ⟨c, θ⟩."""
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(d, d))
    A0 = M.T @ M / d + 0.1 * np.eye(d)
    b, x_t, c = rng.normal(size=d), rng.normal(size=d), rng.normal(size=d)
    theta = rng.uniform(0.1, 2.0, size=d)
    A = A0 + np.diag(theta)
    x = np.linalg.solve(A, b)
    u = np.linalg.solve(A.T, x - x_t)
    grad = -u * x + c  # d/dθⱼ: −uⱼ xⱼ (since ∂A/∂θⱼ = eⱼeⱼᵀ) plus the direct term
    value = 0.5 * np.sum((x - x_t) ** 2) + c @ theta
    return (torch.tensor(a) for a in (A0, b, x_t, c, theta, x, grad)), value


# Forward mode (jvp) rules out the host bridge; 1e-10 in 10·d iterations on κ of tens
# rules out Neumann's linear rate.
@pytest.mark.parametrize("case", solvers(exclude=("host", "needs_contraction")))
@settings(max_examples=30)
@given(seed=seeds, d=st.integers(1, 7))
def test_random_quadratic_bilevel_matches_closed_form(case: SolverCase, seed: int, d: int) -> None:
    (A0, b, x_t, c, theta, x_ref, grad_ref), value_ref = _quadratic(seed, d)

    def inner_loss(x, theta, A0, b):
        return 0.5 * x @ (A0 + torch.diag(theta)) @ x - b @ x

    def exact(x0, theta, A0, b):
        return torch.linalg.solve(A0 + torch.diag(theta), b)

    def outer(x, theta, A0, b):
        return 0.5 * ((x - x_t) ** 2).sum() + c @ theta

    tol = 1e-14 if "indirect_tol" in case.tags else 1e-13
    linear = case(tol=tol, maxiter=10 * d)
    solve = bl.custom_root(bl.stationarity(inner_loss), solver=linear)(exact)
    value, grads = bl.implicit_grad(solve, outer, argnums=0)(
        torch.zeros(d, dtype=F64), theta, A0, b
    )
    assert abs(float(value) - value_ref) <= 1e-10 * max(1.0, abs(value_ref))
    assert rel_err(solve(torch.zeros(d, dtype=F64), theta, A0, b), x_ref) <= 1e-10
    assert rel_err(grads[0], grad_ref) <= 1e-8
    # forward mode: the directional derivative along a random direction
    t = torch.tensor(np.random.default_rng(seed + 1).normal(size=d))
    _, dvalue = torch.func.jvp(
        lambda th: outer(solve(torch.zeros(d, dtype=F64), th, A0, b), th, A0, b), (theta,), (t,)
    )
    assert abs(float(dvalue) - float(grad_ref @ t)) <= 1e-8 * max(1.0, float(grad_ref.norm()))


# --- adjoint identity of the tanh fixed point --------------------------------------------------


@settings(max_examples=30)
@given(seed=seeds, d=st.integers(1, 6), m=st.integers(1, 4), contraction=st.floats(0.1, 0.9))
def test_tanh_fixed_point_vjp_is_the_adjoint_of_jvp(
    seed: int, d: int, m: int, contraction: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=F64)
    W = contraction * W / torch.linalg.matrix_norm(W, ord=2)
    U = torch.randn(d, m, generator=g, dtype=F64)
    theta, v, t = (torch.randn(k, generator=g, dtype=F64) for k in (m, d, m))

    def T(x, theta, W, U):
        return torch.tanh(W @ x + U @ theta)

    @bl.custom_fixed_point(T, solver=bl.GMRES(tol=1e-13, maxiter=100))
    def iterate(x0, theta, W, U):
        x = x0
        for _ in range(400):
            x = T(x, theta, W, U)
        return x

    x0 = torch.zeros(d, dtype=F64)
    x_star, vjp_fn = torch.func.vjp(lambda th: iterate(x0, th, W, U), theta)
    assert torch.allclose(x_star, T(x_star, theta, W, U), atol=1e-13)
    _, jvp_out = torch.func.jvp(lambda th: iterate(x0, th, W, U), (theta,), (t,))
    lhs, rhs = float(vjp_fn(v)[0] @ t), float(v @ jvp_out)
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))
    # and both agree with the explicit Jacobian (I − ∂T/∂x)⁻¹ ∂T/∂θ
    s = 1 - x_star**2  # tanh' at the pre-activation
    jac = torch.linalg.solve(torch.eye(d, dtype=F64) - s[:, None] * W, s[:, None] * U)
    assert rel_err(jvp_out, jac @ t) <= 1e-9


# --- solver-agnosticism: the hypergradient does not depend on the inner solver ----------------


def _inner_solvers(p: Ridge) -> dict:
    return {
        "closed_form": p.closed_form_inner,
        "gradient_descent": bl.inner.gradient_descent(
            Ridge.inner_loss, steps=300, lr=1.0 / p.lipschitz()
        ),
        "scipy_lbfgs": bl.inner.scipy_minimize(
            Ridge.inner_loss, "L-BFGS-B", options={"gtol": 1e-13, "ftol": 1e-16, "maxiter": 500}
        ),
        "torch_lbfgs": bl.inner.lbfgs(Ridge.inner_loss),
    }


@settings(max_examples=8)
@given(seed=seeds, d=st.integers(2, 8))
def test_hypergradient_is_the_same_whichever_inner_solver(seed: int, d: int) -> None:
    p = Ridge.make(d=d, seed=seed)
    ref = p.closed_form()
    F = bl.stationarity(Ridge.inner_loss)
    grads = {}
    for name, inner in _inner_solvers(p).items():
        solve = bl.custom_root(F, solver=bl.CG(tol=1e-12, maxiter=100))(inner)
        x0 = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=F64)
        grads[name] = bl.implicit_grad(solve, p.outer_loss, argnums=0)(x0, *p.args())[1][0]
        assert rel_err(grads[name], ref) <= 1e-6, name
    for name, g in grads.items():
        assert rel_err(g, grads["closed_form"]) <= 1e-6, name


# --- tree-structure invariance ---------------------------------------------------------------


@settings(max_examples=20)
@given(seed=seeds, d=st.integers(2, 8), split=st.integers(1, 7))
def test_splitting_x_into_a_dict_does_not_change_the_hypergradient(
    seed: int, d: int, split: int
) -> None:
    split = min(split, d - 1)
    p = Ridge.make(d=d, seed=seed)

    def as_vector(x):
        return torch.cat([x["head"], x["tail"]])

    def inner_loss(x, lam, X, y):
        return Ridge.inner_loss(as_vector(x), lam, X, y)

    def inner(x0, lam, X, y):
        w = p.closed_form_inner(None, lam, X, y)
        return {"head": w[:split], "tail": w[split:]}

    solve = bl.custom_root(bl.stationarity(inner_loss), solver=bl.CG(tol=1e-13, maxiter=100))(inner)
    x0 = {"head": torch.zeros(split, dtype=F64), "tail": torch.zeros(d - split, dtype=F64)}
    _, grads = bl.implicit_grad(solve, lambda x, *a: p.outer_loss(as_vector(x)), argnums=0)(
        x0, *p.args()
    )
    assert rel_err(grads[0], p.closed_form()) <= 1e-9
