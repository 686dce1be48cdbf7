"""Optimality conditions, proximal operators and projections.

References are independent of the code under test: explicit formulas, SciPy root finding,
scikit-learn solvers refined by exact solves on the support, and central finite differences.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch
from _references import F64, central_fd, rel_err

import bilevel as bl

# --- the operators -------------------------------------------------------------------------


def test_prox_lasso_is_soft_thresholding_and_differentiable_in_strength() -> None:
    v = torch.tensor([-3.0, -0.5, 0.0, 0.2, 1.5, 4.0], dtype=F64)
    lam = torch.tensor(0.7, dtype=F64, requires_grad=True)
    out = bl.prox_lasso(v, lam, 2.0)  # threshold 1.4
    expected = np.sign(v.numpy()) * np.maximum(np.abs(v.numpy()) - 1.4, 0)
    np.testing.assert_allclose(out.detach().numpy(), expected, atol=1e-15)
    (g,) = torch.autograd.grad(out.sum(), lam)
    # d/dλ Σ prox = −scale · Σ_{|v|>threshold} sign(v) = −2 (−1 + 1 + 1) = −2
    assert float(g) == pytest.approx(-2.0)
    # per-coordinate strengths, and trees with a tree of strengths
    per = bl.prox_lasso(v, torch.full((6,), 0.7, dtype=F64), 2.0)
    assert torch.equal(per, out.detach())
    tree = bl.prox_lasso({"a": v, "b": -v}, {"a": 0.1, "b": 2.0})
    assert torch.allclose(tree["b"], bl.prox_lasso(-v, 2.0))
    with pytest.raises(ValueError, match="strength"):
        bl.prox_lasso(v, None)
    with pytest.raises(ValueError, match="structure of x"):
        bl.prox_lasso({"a": v}, {"b": 1.0})


def test_prox_elastic_net_formula() -> None:
    v = torch.linspace(-3, 3, 13, dtype=F64)
    l1, l2, s = 0.5, 0.8, 0.5
    expected = np.sign(v.numpy()) * np.maximum(np.abs(v.numpy()) - s * l1, 0) / (1 + s * l2)
    np.testing.assert_allclose(bl.prox_elastic_net(v, (l1, l2), s).numpy(), expected, atol=1e-15)
    # it is the minimiser of s·g(x) + ½‖x − v‖² coordinate-wise
    for vi in (-2.0, 0.1, 1.3):
        res = scipy.optimize.minimize_scalar(
            lambda x, vi=vi: s * (l1 * abs(x) + 0.5 * l2 * x * x) + 0.5 * (x - vi) ** 2,
            bounds=(-5, 5),
            method="bounded",
            options={"xatol": 1e-12},
        )
        got = float(bl.prox_elastic_net(torch.tensor(vi, dtype=F64), (l1, l2), s))
        assert got == pytest.approx(res.x, abs=1e-8)
    with pytest.raises(ValueError, match=r"\(l1, l2\)"):
        bl.prox_elastic_net(v, 0.5)


def test_projection_box() -> None:
    v = torch.tensor([-2.0, 0.3, 5.0], dtype=F64)
    lo = torch.tensor(-1.0, dtype=F64, requires_grad=True)
    hi = torch.tensor([1.0, 1.0, 2.0], dtype=F64, requires_grad=True)
    out = bl.projection_box(v, (lo, hi))
    assert torch.equal(out.detach(), torch.tensor([-1.0, 0.3, 2.0], dtype=F64))
    g_lo, g_hi = torch.autograd.grad(out.sum(), (lo, hi))
    assert float(g_lo) == 1.0 and torch.equal(g_hi, torch.tensor([0.0, 0.0, 1.0], dtype=F64))
    assert torch.equal(bl.projection_box(v, (0.0, 1.0)), torch.tensor([0.0, 0.3, 1.0], dtype=F64))
    with pytest.raises(ValueError, match="bounds"):
        bl.projection_box(v, None)


def _simplex_reference(v: np.ndarray, r: float) -> np.ndarray:
    """Projection onto {x ≥ 0, Σx = r} by root finding on τ: Σ max(v − τ, 0) = r."""
    tau = scipy.optimize.brentq(
        lambda t: np.maximum(v - t, 0).sum() - r, v.min() - r - 1, v.max(), xtol=1e-15
    )
    return np.maximum(v - tau, 0)


def test_projection_simplex_matches_root_finding_reference() -> None:
    rng = np.random.default_rng(0)
    V = rng.normal(size=(20, 7)) * rng.choice([0.1, 1, 10], size=(20, 1))
    radii = rng.uniform(0.5, 3, size=20)
    out = bl.projection_simplex(torch.tensor(V), torch.tensor(radii)).numpy()
    for i in range(20):
        np.testing.assert_allclose(out[i], _simplex_reference(V[i], radii[i]), atol=1e-12)
    # default radius 1, a 0-d leaf is the one-point simplex {r}, trees
    assert float(bl.projection_simplex(torch.tensor([5.0, 5.0])).sum()) == pytest.approx(1.0)
    assert float(bl.projection_simplex(torch.tensor(-3.0), 2.0)) == 2.0
    tree = bl.projection_simplex({"p": torch.tensor(V[0]), "q": torch.tensor(V[1])})
    assert float(tree["q"].sum()) == pytest.approx(1.0)


def test_projection_simplex_jacobian_and_radius_derivative() -> None:
    v = torch.tensor([0.9, -0.3, 0.6, 0.1, 2.0], dtype=F64)
    r = torch.tensor(2.0, dtype=F64)
    x = bl.projection_simplex(v, r)
    s = (x > 0).to(F64)
    jac = torch.func.jacrev(bl.projection_simplex)(v, r)
    np.testing.assert_allclose(jac.numpy(), (torch.diag(s) - torch.outer(s, s) / s.sum()).numpy())
    dr = torch.func.jacrev(bl.projection_simplex, argnums=1)(v, r)
    np.testing.assert_allclose(dr.numpy(), (s / s.sum()).numpy())
    # runs under vmap
    batch = torch.func.vmap(bl.projection_simplex, in_dims=(0, None))(torch.stack([v, -v]), r)
    assert torch.allclose(batch[0], x)


def test_projection_l2_ball() -> None:
    v = torch.tensor([3.0, 4.0], dtype=F64)
    assert torch.allclose(bl.projection_l2_ball(v, 2.5), torch.tensor([1.5, 2.0], dtype=F64))
    assert torch.equal(bl.projection_l2_ball(v, 10.0), v)
    tree = bl.projection_l2_ball({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])})
    assert float(tree["a"]) == pytest.approx(0.6) and float(tree["b"]) == pytest.approx(0.8)
    z = torch.zeros(3, dtype=F64, requires_grad=True)  # no NaN at the centre
    (g,) = torch.autograd.grad(bl.projection_l2_ball(z, 1.0).sum(), z)
    assert torch.equal(g, torch.ones(3, dtype=F64))
    r = torch.tensor(2.5, dtype=F64, requires_grad=True)
    (gr,) = torch.autograd.grad(bl.projection_l2_ball(v, r).sum(), r)
    assert float(gr) == pytest.approx(7 / 5)


def test_conditions_are_marked_and_pick_the_right_default_solver() -> None:
    def f(x, *args):
        return (x**2).sum()

    conditions = {
        "stationarity": (bl.stationarity(f), True),
        "fixed_point": (bl.fixed_point(lambda x, *a: x / 2), False),
        "proximal": (bl.proximal_gradient(f, bl.prox_lasso, prox_hyper=0), False),
        "projected": (bl.projected_gradient(f, bl.projection_simplex), False),
    }
    for name, (F, symmetric) in conditions.items():
        assert F.symmetric is symmetric, name
        solve = bl.custom_root(F)(lambda x0, *args: x0)
        assert isinstance(solve.solver, bl.CG if symmetric else bl.GMRES), name
    assert "prox_lasso" in conditions["proximal"][0].__name__


def test_hyper_selectors_and_argument_checks() -> None:
    def f(x, lam, c):
        return 0.5 * ((x - c) ** 2).sum()

    x = torch.tensor([0.5, -2.0], dtype=F64)
    c = torch.tensor([1.0, -1.0], dtype=F64)
    lam = torch.tensor(0.3, dtype=F64)
    by_index = bl.proximal_gradient(f, bl.prox_lasso, 0.5, prox_hyper=0)(x, lam, c)
    by_callable = bl.proximal_gradient(f, bl.prox_lasso, 0.5, prox_hyper=lambda lam, c: lam)(
        x, lam, c
    )
    assert torch.equal(by_index, by_callable)
    # at the minimiser (soft-threshold of c) the residual vanishes
    x_star = bl.prox_lasso(c, lam)
    assert torch.allclose(
        bl.proximal_gradient(f, bl.prox_lasso, 0.5, prox_hyper=0)(x_star, lam, c),
        torch.zeros(2, dtype=F64),
    )
    with pytest.raises(IndexError, match="prox_hyper=5"):
        bl.proximal_gradient(f, bl.prox_lasso, prox_hyper=5)(x, lam, c)
    with pytest.raises(TypeError, match="prox_hyper"):
        bl.proximal_gradient(f, bl.prox_lasso, prox_hyper="lam")
    with pytest.raises(ValueError, match="step"):
        bl.projected_gradient(f, bl.projection_simplex, step=0.0)
    with pytest.raises(TypeError, match="callable"):
        bl.projected_gradient(f, "simplex")
    with pytest.raises(ValueError, match="strength"):  # forgot prox_hyper
        bl.proximal_gradient(f, bl.prox_lasso)(x, lam, c)


# --- Lasso and elastic net: hypergradients vs closed form on the support and FD ---------------


def _lasso_data(seed: int = 0, n: int = 60, d: int = 12):
    rng = np.random.default_rng(seed)
    X, Xv = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    w_true = np.where(rng.random(d) < 0.5, rng.normal(size=d) * 2, 0.0)
    y = X @ w_true + 0.3 * rng.normal(size=n)
    yv = Xv @ w_true + 0.3 * rng.normal(size=n)
    return X, y, Xv, yv


def _enet_exact(X, y, l1: float, l2: float, w_guess: np.ndarray) -> np.ndarray:
    """Exact minimiser of ‖Xw − y‖²/(2n) + l1‖w‖₁ + ½ l2‖w‖², given the support and signs."""
    n = len(y)
    S = np.flatnonzero(np.abs(w_guess) > 1e-9)
    s = np.sign(w_guess[S])
    w = np.zeros(X.shape[1])
    XS = X[:, S]
    w[S] = np.linalg.solve(XS.T @ XS / n + l2 * np.eye(len(S)), XS.T @ y / n - l1 * s)
    # KKT check: the support and signs are right
    assert np.all(np.sign(w[S]) == s)
    grad = X.T @ (X @ w - y) / n + l2 * w
    off = np.setdiff1d(np.arange(X.shape[1]), S)
    assert np.all(np.abs(grad[off]) < l1 - 1e-8)
    return w


def test_lasso_strength_hypergradient_vs_finite_differences_on_the_support() -> None:
    from sklearn.linear_model import Lasso

    X, y, Xv, yv = _lasso_data()
    n, d = X.shape
    alpha = 0.15

    def sk_lasso(x0, alpha, X, y):  # a black-box inner solver
        model = Lasso(alpha=float(alpha), fit_intercept=False, tol=1e-14, max_iter=100_000)
        model.fit(X.numpy(), y.numpy())
        return torch.tensor(model.coef_, dtype=F64)

    def f(w, alpha, X, y):
        return ((X @ w - y) ** 2).sum() / (2 * len(y))

    L = float(np.linalg.eigvalsh(X.T @ X / n).max())
    F = bl.proximal_gradient(f, bl.prox_lasso, step=1.0 / L, prox_hyper=0)
    solve = bl.custom_root(F, solver=bl.GMRES(tol=1e-12, maxiter=200))(sk_lasso)
    Xt, yt, Xvt, yvt = (torch.tensor(a) for a in (X, y, Xv, yv))

    def outer(w, *args):
        return 0.5 * ((Xvt @ w - yvt) ** 2).sum()

    value, grads = bl.implicit_grad(solve, outer, argnums=0)(
        torch.zeros(d, dtype=F64), torch.tensor(alpha, dtype=F64), Xt, yt
    )
    w_guess = sk_lasso(None, alpha, Xt, yt).numpy()
    support = np.abs(w_guess) > 1e-9
    assert 2 <= support.sum() <= d - 2  # a genuinely sparse problem

    def outer_np(a: np.ndarray) -> float:
        w = _enet_exact(X, y, float(a[0]), 0.0, w_guess)
        return 0.5 * float(((Xv @ w - yv) ** 2).sum())

    fd = central_fd(outer_np, np.array([alpha]), h=1e-6)[0]
    assert abs(float(value) - outer_np(np.array([alpha]))) <= 1e-8
    assert grads[0].shape == ()
    assert abs(float(grads[0]) - fd) <= 1e-6 * abs(fd)
    # and the derivative of the zero coordinates is zero
    jac = torch.func.jacfwd(
        lambda a: solve(torch.zeros(d, dtype=F64), a, Xt, yt),
    )
    solve.solver = bl.GMRES(tol=0, maxiter=d)  # jacfwd vmaps: fixed-K
    dw = jac(torch.tensor(alpha, dtype=F64))
    assert torch.all(dw[torch.tensor(~support)] == 0)


def test_elastic_net_hypergradients_vs_finite_differences() -> None:
    from sklearn.linear_model import ElasticNet

    X, y, Xv, yv = _lasso_data(seed=1)
    d = X.shape[1]
    l1, l2 = 0.1, 0.3

    def sk_enet(x0, l1, l2, X, y):
        a = float(l1 + l2)
        model = ElasticNet(
            alpha=a, l1_ratio=float(l1) / a, fit_intercept=False, tol=1e-14, max_iter=100_000
        )
        model.fit(X.numpy(), y.numpy())
        return torch.tensor(model.coef_, dtype=F64)

    def f(w, l1, l2, X, y):
        return ((X @ w - y) ** 2).sum() / (2 * len(y))

    F = bl.proximal_gradient(
        f, bl.prox_elastic_net, step=0.5, prox_hyper=lambda l1, l2, X, y: (l1, l2)
    )
    solve = bl.custom_root(F, solver=bl.GMRES(tol=1e-12, maxiter=200))(sk_enet)
    Xt, yt = torch.tensor(X), torch.tensor(y)

    def outer(w, *args):
        return 0.5 * ((torch.tensor(Xv) @ w - torch.tensor(yv)) ** 2).sum()

    _, grads = bl.implicit_grad(solve, outer, argnums=(0, 1))(
        torch.zeros(d, dtype=F64), torch.tensor(l1, dtype=F64), torch.tensor(l2, dtype=F64), Xt, yt
    )
    w_guess = sk_enet(None, l1, l2, Xt, yt).numpy()

    def outer_np(h: np.ndarray) -> float:
        w = _enet_exact(X, y, float(h[0]), float(h[1]), w_guess)
        return 0.5 * float(((Xv @ w - yv) ** 2).sum())

    fd = central_fd(outer_np, np.array([l1, l2]), h=1e-6)
    assert rel_err(torch.stack(grads[:2]), torch.tensor(fd)) <= 1e-6


# --- constrained quadratics: simplex, box, ball ----------------------------------------------


def _spd(d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(d, d))
    return M.T @ M / d + np.eye(d)


def test_simplex_constrained_quadratic_vs_kkt_closed_form_and_fd() -> None:
    # x*(c) = argmin_{x ∈ Δ} ½ xᵀQx + cᵀx;  outer L = ½‖x* − x_t‖².
    d = 6
    Q = _spd(d, 0)
    rng = np.random.default_rng(1)
    c = rng.normal(size=d)
    x_t = rng.dirichlet(np.ones(d))
    Qt = torch.tensor(Q)
    L = float(np.linalg.eigvalsh(Q).max())

    def f(x, c):
        return 0.5 * x @ Qt @ x + c @ x

    def kkt(c_np: np.ndarray, support: np.ndarray) -> np.ndarray:
        """Q_SS x_S − ν1 = −c_S, 1ᵀx_S = 1; zero off the support."""
        S = np.flatnonzero(support)
        K = np.block([[Q[np.ix_(S, S)], -np.ones((len(S), 1))], [np.ones((1, len(S))), 0]])
        sol = np.linalg.solve(K, np.concatenate([-c_np[S], [1.0]]))
        x = np.zeros(d)
        x[S] = sol[:-1]
        return x

    res = scipy.optimize.minimize(
        lambda x: 0.5 * x @ Q @ x + c @ x,
        np.ones(d) / d,
        jac=lambda x: Q @ x + c,
        method="SLSQP",
        bounds=[(0, None)] * d,
        constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
        options={"ftol": 1e-15, "maxiter": 500},
    )
    support = res.x > 1e-7
    assert 1 < support.sum() < d  # some coordinates at zero: the projection matters
    x_ref = kkt(c, support)
    assert np.all(x_ref[support] > 0)

    def pgd(x0, c):  # black-box inner solver: projected gradient descent
        x = x0
        for _ in range(400):
            x = bl.projection_simplex(x - (Qt @ x + c) / L)
        return x

    F = bl.projected_gradient(f, bl.projection_simplex, step=1.0 / L)
    solve = bl.custom_root(F, solver=bl.GMRES(tol=1e-12, maxiter=100))(pgd)
    c_t = torch.tensor(c, requires_grad=True)
    x = solve(torch.ones(d, dtype=F64) / d, c_t)
    np.testing.assert_allclose(x.detach().numpy(), x_ref, atol=1e-10)
    (0.5 * ((x - torch.tensor(x_t)) ** 2).sum()).backward()

    fd = central_fd(lambda cc: 0.5 * float(((kkt(cc, support) - x_t) ** 2).sum()), c, h=1e-6)
    assert rel_err(c_t.grad, torch.tensor(fd)) <= 1e-7
    assert torch.all(c_t.grad[torch.tensor(~support)].abs() <= 1e-12)


def test_box_constrained_quadratic_bounds_as_hyperparameters_vs_fd() -> None:
    # x*(u) = argmin_{0 ≤ x ≤ u} ½ xᵀQx − bᵀx;  the upper bounds u are the hyperparameter.
    d = 5
    Q = _spd(d, 2)
    b = np.array([3.0, -1.0, 2.0, 0.5, 4.0])
    u = np.array([0.5, 1.0, 2.0, 1.0, 0.8])

    def exact(u_np: np.ndarray) -> np.ndarray:
        res = scipy.optimize.minimize(
            lambda x: 0.5 * x @ Q @ x - b @ x,
            np.zeros(d),
            jac=lambda x: Q @ x - b,
            method="L-BFGS-B",
            bounds=list(zip(np.zeros(d), u_np, strict=True)),
            options={"gtol": 1e-14, "ftol": 1e-16, "maxiter": 1000},
        )
        # polish: exact solve on the free coordinates
        x = res.x.copy()
        lower, upper = x <= 1e-9, x >= u_np - 1e-9
        x[lower], x[upper] = 0.0, u_np[upper]
        free = ~(lower | upper)
        x[free] = np.linalg.solve(
            Q[np.ix_(free, free)], b[free] - Q[np.ix_(free, ~free)] @ x[~free]
        )
        return x

    x_ref = exact(u)
    assert np.any(np.isclose(x_ref, u)) and np.any((x_ref > 1e-6) & (x_ref < u - 1e-6))
    Qt, bt = torch.tensor(Q), torch.tensor(b)

    def f(x, u):
        return 0.5 * x @ Qt @ x - bt @ x

    F = bl.projected_gradient(
        f, bl.projection_box, step=0.3, proj_hyper=lambda u: (torch.zeros_like(u), u)
    )
    solve = bl.custom_root(F, solver=bl.GMRES(tol=1e-12, maxiter=100))(
        lambda x0, u: torch.tensor(exact(u.numpy()))
    )
    u_t = torch.tensor(u, requires_grad=True)
    x = solve(torch.zeros(d, dtype=F64), u_t)
    (x * torch.arange(1.0, d + 1, dtype=F64)).sum().backward()
    fd = central_fd(lambda uu: float(exact(uu) @ np.arange(1.0, d + 1)), u, h=1e-6)
    assert rel_err(u_t.grad, torch.tensor(fd)) <= 1e-6


def test_l2_ball_radius_hypergradient_vs_fd() -> None:
    # x*(r) = argmin_{‖x‖ ≤ r} ½‖Ax − b‖² with the constraint active.
    rng = np.random.default_rng(3)
    A, b = rng.normal(size=(8, 4)), rng.normal(size=8) * 3
    r = 0.5

    def exact(r_: float) -> np.ndarray:  # (AᵀA + μI)x = Aᵀb with ‖x‖ = r, μ > 0
        def norm_gap(mu: float) -> float:
            return np.linalg.norm(np.linalg.solve(A.T @ A + mu * np.eye(4), A.T @ b)) - r_

        mu = scipy.optimize.brentq(norm_gap, 0.0, 1e6, xtol=1e-15, rtol=1e-15)
        return np.linalg.solve(A.T @ A + mu * np.eye(4), A.T @ b)

    assert np.linalg.norm(np.linalg.lstsq(A, b, rcond=None)[0]) > r  # active constraint
    At, bt = torch.tensor(A), torch.tensor(b)

    def f(x, r):
        return 0.5 * ((At @ x - bt) ** 2).sum()

    F = bl.projected_gradient(f, bl.projection_l2_ball, step=0.05, proj_hyper=0)
    solve = bl.custom_root(F, solver=bl.GMRES(tol=1e-12, maxiter=50))(
        lambda x0, r: torch.tensor(exact(float(r)))
    )
    r_t = torch.tensor(r, dtype=F64, requires_grad=True)
    solve(torch.zeros(4, dtype=F64), r_t).sum().backward()
    fd = central_fd(lambda rr: float(exact(float(rr[0])).sum()), np.array([r]), h=1e-6)[0]
    assert float(r_t.grad) == pytest.approx(fd, rel=1e-6)


@pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr Node")  # torch.func.linearize
def test_stationarity_is_the_same_in_every_autodiff_mode() -> None:
    # F = ∇ₓ loss for loss = ½ Σ λ x² + Σ x³: F = λx + 3x², ∂F/∂x = diag(λ + 6x).
    def loss(x, lam):
        return 0.5 * (lam * x * x).sum() + (x**3).sum()

    F = bl.stationarity(loss)
    g = torch.Generator().manual_seed(0)
    x, lam, t = (torch.randn(4, generator=g, dtype=F64) for _ in range(3))
    expected, expected_jvp = lam * x + 3 * x**2, (lam + 6 * x) * t
    assert torch.allclose(F(x, lam), expected)
    x_leaf = x.clone().requires_grad_(True)  # plain autograd path, differentiable
    out = F(x_leaf, lam)
    assert torch.allclose(out, expected) and out.requires_grad
    assert torch.allclose(torch.autograd.grad(out, x_leaf, t)[0], expected_jvp)
    assert torch.allclose(torch.func.jvp(lambda z: F(z, lam), (x,), (t,))[1], expected_jvp)
    assert torch.allclose(torch.func.linearize(lambda z: F(z, lam), x)[1](t), expected_jvp)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, t)
        tangent = torch.autograd.forward_ad.unpack_dual(F(dual, lam)).tangent
    assert torch.allclose(tangent, expected_jvp)
    batch = torch.func.vmap(F, in_dims=(0, None))(torch.stack([x, 2 * x]), lam)
    assert torch.allclose(batch[1], F(2 * x, lam))
    with pytest.raises(ValueError, match="scalar"):
        bl.stationarity(lambda z: z**2)(x_leaf)


# --- parameter validation (issue 11, item 9) ------------------------------------------------
#
# An invalid hyperparameter used to return nonsense silently (prox_lasso(v, -1) enlarged v,
# projection_l2_ball(v, -1) flipped its sign). Each case raises, naming the argument.

_V = torch.tensor([3.0, -4.0, 0.5], dtype=F64)
_NAN, _INF = float("nan"), float("inf")


def _quadratic(x, *args):
    return 0.5 * (x**2).sum()


_VALIDATION_ERRORS = {
    # prox_lasso
    "lasso negative strength": (lambda: bl.prox_lasso(_V, -1.0), ValueError, r"strength.*≥ 0"),
    "lasso negative strength entry": (
        lambda: bl.prox_lasso(_V, torch.tensor([0.1, -2.0, 0.1], dtype=F64)),
        ValueError,
        r"strength.*1 invalid entry, e\.g\. -2\.0",
    ),
    "lasso negative strength in a tree": (
        lambda: bl.prox_lasso({"a": _V}, {"a": -0.5}),
        ValueError,
        "strength",
    ),
    "lasso nan strength": (lambda: bl.prox_lasso(_V, _NAN), ValueError, "strength must be finite"),
    "lasso inf strength": (lambda: bl.prox_lasso(_V, _INF), ValueError, "strength must be finite"),
    "lasso string strength": (lambda: bl.prox_lasso(_V, "0.1"), TypeError, "strength.*got str"),
    "lasso bool strength": (lambda: bl.prox_lasso(_V, True), TypeError, "strength"),
    "lasso complex strength": (
        lambda: bl.prox_lasso(_V, torch.tensor(1j)),
        TypeError,
        "strength must be a real tensor",
    ),
    "lasso zero scale": (lambda: bl.prox_lasso(_V, 0.1, 0.0), ValueError, r"scale.*> 0"),
    "lasso negative scale": (lambda: bl.prox_lasso(_V, 0.1, -1.0), ValueError, "scale"),
    # prox_elastic_net
    "enet negative l1": (lambda: bl.prox_elastic_net(_V, (-0.1, 0.2)), ValueError, "l1"),
    "enet negative l2": (lambda: bl.prox_elastic_net(_V, (0.1, -0.2)), ValueError, "l2"),
    "enet nan l2": (lambda: bl.prox_elastic_net(_V, (0.1, _NAN)), ValueError, "l2"),
    "enet string l1": (lambda: bl.prox_elastic_net(_V, ("a", 0.2)), TypeError, "l1"),
    "enet zero scale": (lambda: bl.prox_elastic_net(_V, (0.1, 0.2), 0), ValueError, "scale"),
    # projection_box
    "box lower > upper": (
        lambda: bl.projection_box(_V, (1.0, 0.0)),
        ValueError,
        r"box is empty.*lower=1\.0, upper=0\.0.*[Ss]wap",
    ),
    "box lower > upper entry": (
        lambda: bl.projection_box(
            _V, (torch.zeros(3, dtype=F64), torch.tensor([1.0, -1.0, 1.0], dtype=F64))
        ),
        ValueError,
        r"empty at 1 coordinate.*upper=-1\.0",
    ),
    "box nan bound": (lambda: bl.projection_box(_V, (_NAN, 1.0)), ValueError, "lower=nan"),
    "box lower = inf": (lambda: bl.projection_box(_V, (_INF, _INF)), ValueError, "empty"),
    "box upper = -inf": (lambda: bl.projection_box(_V, (-_INF, -_INF)), ValueError, "empty"),
    "box string bound": (lambda: bl.projection_box(_V, (0.0, "1")), TypeError, "upper"),
    "box bool bound": (lambda: bl.projection_box(_V, (False, 1.0)), TypeError, "lower"),
    # projection_simplex
    "simplex zero radius": (lambda: bl.projection_simplex(_V, 0.0), ValueError, r"radius.*> 0"),
    "simplex negative radius entry": (
        lambda: bl.projection_simplex(torch.ones(2, 3), torch.tensor([1.0, -1.0])),
        ValueError,
        "radius",
    ),
    "simplex inf radius": (lambda: bl.projection_simplex(_V, _INF), ValueError, "finite"),
    "simplex string radius": (lambda: bl.projection_simplex(_V, "1"), TypeError, "radius"),
    # projection_l2_ball
    "ball negative radius": (lambda: bl.projection_l2_ball(_V, -1.0), ValueError, r"radius.*> 0"),
    "ball zero tensor radius": (
        lambda: bl.projection_l2_ball(_V, torch.tensor(0.0, dtype=F64)),
        ValueError,
        "radius",
    ),
    "ball nan radius": (lambda: bl.projection_l2_ball(_V, _NAN), ValueError, "finite"),
    "ball vector radius": (
        lambda: bl.projection_l2_ball(_V, torch.ones(3)),
        ValueError,
        r"0-d tensor.*shape \(3,\)",
    ),
    "ball string radius": (lambda: bl.projection_l2_ball(_V, "1"), TypeError, "radius"),
    # proximal_gradient / projected_gradient
    "proximal negative step": (
        lambda: bl.proximal_gradient(_quadratic, bl.prox_lasso, -0.1, prox_hyper=0),
        ValueError,
        r"proximal_gradient: step.*η > 0",
    ),
    "proximal inf step": (
        lambda: bl.proximal_gradient(_quadratic, bl.prox_lasso, _INF, prox_hyper=0),
        ValueError,
        "step",
    ),
    "proximal string step": (
        lambda: bl.proximal_gradient(_quadratic, bl.prox_lasso, "0.1", prox_hyper=0),
        TypeError,
        "step must be a Python number",
    ),
    "projected nan step": (
        lambda: bl.projected_gradient(_quadratic, bl.projection_simplex, _NAN),
        ValueError,
        r"projected_gradient: step",
    ),
    "projected tensor step": (
        lambda: bl.projected_gradient(_quadratic, bl.projection_simplex, torch.tensor(0.1)),
        TypeError,
        "step",
    ),
    "proximal non-callable f": (
        lambda: bl.proximal_gradient("f", bl.prox_lasso),
        TypeError,
        "f must be callable",
    ),
    "projected non-callable projection": (
        lambda: bl.projected_gradient(_quadratic, None),
        TypeError,
        "projection must be callable",
    ),
    "proj_hyper wrong type": (
        lambda: bl.projected_gradient(_quadratic, bl.projection_box, proj_hyper=1.5),
        TypeError,
        "proj_hyper",
    ),
    # the invalid hyperparameter reached through the condition, from args
    "condition passes a negative radius": (
        lambda: bl.projected_gradient(_quadratic, bl.projection_l2_ball, proj_hyper=0)(
            _V, torch.tensor(-1.0, dtype=F64)
        ),
        ValueError,
        "projection_l2_ball: radius",
    ),
    "stationarity non-callable": (lambda: bl.stationarity(3), TypeError, "loss must be callable"),
    "fixed_point non-callable": (lambda: bl.fixed_point(None), TypeError, "T must be callable"),
}


@pytest.mark.parametrize("case", list(_VALIDATION_ERRORS))
def test_invalid_parameters_raise_naming_the_argument(case: str) -> None:
    call, error, message = _VALIDATION_ERRORS[case]
    with pytest.raises(error, match=message):
        call()


def test_valid_edge_values_are_accepted() -> None:
    # λ = 0 is the identity, ±inf bounds leave a side of the box open, lower = upper pins
    assert torch.equal(bl.prox_lasso(_V, 0.0), _V)
    assert torch.equal(bl.prox_elastic_net(_V, (0, 0)), _V)
    assert torch.equal(
        bl.projection_box(_V, (-_INF, 1.0)), torch.tensor([1.0, -4.0, 0.5], dtype=F64)
    )
    assert torch.equal(bl.projection_box(_V, (2.0, 2.0)), torch.full((3,), 2.0, dtype=F64))
    assert torch.equal(
        bl.prox_lasso(_V, torch.tensor([0, 1, 0])), torch.tensor([3.0, -3.0, 0.5], dtype=F64)
    )


# --- the helpers under torch.func transforms with tensor-valued parameters --------------------


def test_prox_lasso_under_vmap_and_grad_with_tensor_strengths() -> None:
    lams = torch.tensor([[0.1, 1.0, 0.2], [2.0, 0.0, 1.0]], dtype=F64)  # per-coordinate
    batch = torch.func.vmap(bl.prox_lasso, in_dims=(None, 0))(_V, lams)
    v = _V.numpy()
    for i in range(2):
        expected = np.sign(v) * np.maximum(np.abs(v) - lams[i].numpy(), 0)
        np.testing.assert_allclose(batch[i].numpy(), expected, atol=1e-15)
    # d/dλⱼ prox(v)ⱼ = −scale · sign(vⱼ) on |vⱼ| > scale·λⱼ, else 0
    lam = torch.tensor([0.1, 1.0, 0.6], dtype=F64)
    g = torch.func.grad(lambda lam: (bl.prox_lasso(_V, lam, 0.5) * torch.arange(1.0, 4.0)).sum())(
        lam
    )
    mask = (_V.abs() > 0.5 * lam).to(F64)
    assert torch.equal(g, -0.5 * torch.sign(_V) * mask * torch.arange(1.0, 4.0, dtype=F64))
    # per-sample gradients: vmap of grad
    per = torch.func.vmap(torch.func.grad(lambda lam: bl.prox_lasso(_V, lam).sum()))(lams)
    for i in range(2):
        mask = (_V.abs() > lams[i]).to(F64)
        assert torch.equal(per[i], -torch.sign(_V) * mask)


def test_elastic_net_and_box_under_vmap_and_jacfwd_with_tensor_parameters() -> None:
    l2s = torch.tensor([0.0, 1.0, 3.0], dtype=F64)
    batch = torch.func.vmap(lambda l2: bl.prox_elastic_net(_V, (0.5, l2)))(l2s)
    v = _V.numpy()
    for i, l2 in enumerate(l2s.tolist()):
        expected = np.sign(v) * np.maximum(np.abs(v) - 0.5, 0) / (1 + l2)
        np.testing.assert_allclose(batch[i].numpy(), expected, atol=1e-15)
    lower = torch.tensor([[-1.0, -1.0, 0.0], [0.0, -5.0, 1.0]], dtype=F64)
    upper = lower + 1.0
    boxed = torch.func.vmap(lambda lo, hi: bl.projection_box(_V, (lo, hi)))(lower, upper)
    np.testing.assert_array_equal(boxed.numpy(), np.clip(v, lower.numpy(), upper.numpy()))
    # ∂proj/∂upper is the 0/1 mask of coordinates clipped at the upper bound
    d_upper = torch.func.jacfwd(lambda hi: bl.projection_box(_V, (lower[0], hi)))(upper[0])
    assert torch.equal(d_upper, torch.diag((_V > upper[0]).to(F64)))


def test_radii_under_vmap_and_grad() -> None:
    radii = torch.tensor([1.0, 5.0, 10.0], dtype=F64)
    v = torch.tensor([3.0, 4.0], dtype=F64)  # ‖v‖ = 5
    balls = torch.func.vmap(bl.projection_l2_ball, in_dims=(None, 0))(v, radii)
    expected = torch.stack([v / 5, v, v])  # inside or on the ball: unchanged
    assert torch.allclose(balls, expected, rtol=0, atol=1e-15)
    # outside: proj = r v/‖v‖, so d Σ proj / dr = Σ v/‖v‖ = 7/5
    gr = torch.func.grad(lambda r: bl.projection_l2_ball(v, r).sum())(torch.tensor(2.0, dtype=F64))
    assert float(gr) == pytest.approx(7 / 5, abs=1e-15)
    simplex = torch.func.vmap(bl.projection_simplex, in_dims=(None, 0))(v, radii)
    for i, r in enumerate(radii.tolist()):
        np.testing.assert_allclose(simplex[i].numpy(), _simplex_reference(v.numpy(), r), atol=1e-12)


def test_conditions_with_tensor_hyperparameters_under_vmap() -> None:
    # x*(r) = argmin_{‖x‖ ≤ r} ½‖x − c‖² = c · min(1, r/‖c‖): F vanishes there for every r.
    c = torch.tensor([3.0, 4.0], dtype=F64)
    F = bl.projected_gradient(
        lambda x, r: 0.5 * ((x - c) ** 2).sum(), bl.projection_l2_ball, 0.5, proj_hyper=0
    )
    radii = torch.tensor([1.0, 2.0, 7.0], dtype=F64)
    x_star = c * torch.clamp(radii / 5.0, max=1.0).unsqueeze(1)
    residual = torch.func.vmap(F)(x_star, radii)
    assert float(residual.abs().max()) <= 1e-15


def test_invalid_tensor_parameters_under_transforms_give_nan_not_nonsense() -> None:
    # under vmap a value cannot be read on the host: the check is sync-free, an invalid entry
    # makes that sample's result NaN (the valid samples are untouched)
    lams = torch.tensor([0.5, -1.0], dtype=F64)
    out = torch.func.vmap(bl.prox_lasso, in_dims=(None, 0))(_V, lams)
    assert torch.equal(out[0], torch.tensor([2.5, -3.5, 0.0], dtype=F64))
    assert torch.isnan(out[1]).all()
    radii = torch.tensor([1.0, -1.0], dtype=F64)
    out = torch.func.vmap(bl.projection_l2_ball, in_dims=(None, 0))(_V, radii)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()
    lower, upper = torch.tensor([0.0, 2.0], dtype=F64), torch.tensor([1.0, 1.0], dtype=F64)
    out = torch.func.vmap(lambda lo, hi: bl.projection_box(_V, (lo, hi)))(lower, upper)
    assert torch.equal(out[0], torch.tensor([1.0, 0.0, 0.5], dtype=F64))
    assert torch.isnan(out[1]).all()
    # and a gradient taken under torch.func.grad is NaN, not a silent zero
    g = torch.func.grad(lambda lam: bl.prox_lasso(_V, lam).sum())(torch.tensor(-1.0, dtype=F64))
    assert torch.isnan(g)
    g = torch.func.grad(lambda r: bl.projection_l2_ball(_V, r).sum())(torch.tensor(-1.0, dtype=F64))
    assert torch.isnan(g)


def test_checks_do_not_break_a_full_graph_under_torch_compile() -> None:
    # reading a value on the host would be a graph break (an error with fullgraph=True)
    compiled = torch.compile(
        lambda v, lam, r: (bl.prox_lasso(v, lam), bl.projection_l2_ball(v, r)),
        fullgraph=True,
        backend="eager",
    )
    lam = torch.tensor([0.5, 0.1, -1.0], dtype=F64)
    lasso, ball = compiled(_V, lam, torch.tensor(100.0, dtype=F64))
    assert torch.equal(lasso[:2], torch.tensor([2.5, -3.9], dtype=F64))
    assert torch.isnan(lasso[2])  # the invalid strength's coordinate
    assert torch.equal(ball, _V)  # inside the ball of radius 100
