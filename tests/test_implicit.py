"""custom_root / custom_fixed_point / implicit_grad against closed forms and finite differences."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _references import F64, Ridge, central_fd, newton_logistic, rel_err
from _solvers import SolverCase, solvers

import bilevel as bl


def _ridge_solver(case: SolverCase) -> bl.LinearSolver:
    """A row configured for the ridge Hessians below (d ≤ 8, well conditioned)."""
    return case(tol=1e-12, maxiter=200)


# --- ridge: closed form, every linear solver, every AD entry point -------------------------


@pytest.mark.parametrize("case", solvers())
@pytest.mark.parametrize("hand_written", [False, True], ids=["stationarity", "gradient"])
def test_ridge_hypergradient_matches_closed_form(case: SolverCase, hand_written: bool) -> None:
    p = Ridge.make(d=8, seed=1)
    F = Ridge.gradient if hand_written else bl.stationarity(Ridge.inner_loss)
    solve = bl.custom_root(F, solver=_ridge_solver(case), symmetric=True)(p.closed_form_inner)
    lam = p.lam.clone().requires_grad_(True)
    p.outer_loss(solve(torch.zeros(8, dtype=F64), lam, p.X, p.y)).backward()
    assert rel_err(lam.grad, p.closed_form()) <= 1e-6
    assert solve.latest_info is not None and not solve.latest_info.failed


def test_every_autodiff_entry_point_agrees_with_closed_form() -> None:
    p = Ridge.make(d=5, seed=2)
    solve = bl.custom_root(bl.stationarity(Ridge.inner_loss), solver=bl.CG(tol=1e-13))(
        p.closed_form_inner
    )
    x0 = torch.zeros(5, dtype=F64)
    ref = p.closed_form()

    def hyper_objective(lam: torch.Tensor) -> torch.Tensor:
        return p.outer_loss(solve(x0, lam, p.X, p.y))

    results = {}
    lam = p.lam.clone().requires_grad_(True)
    hyper_objective(lam).backward()
    results["backward"] = lam.grad
    lam = p.lam.clone().requires_grad_(True)
    results["autograd.grad"] = torch.autograd.grad(hyper_objective(lam), lam)[0]
    results["func.grad"] = torch.func.grad(hyper_objective)(p.lam)
    _, vjp_fn = torch.func.vjp(hyper_objective, p.lam)
    results["func.vjp"] = vjp_fn(torch.ones((), dtype=F64))[0]
    results["implicit_grad"] = bl.implicit_grad(solve, p.outer_loss)(x0, *p.args())[1][0]
    results["implicit_grad+F"] = bl.implicit_grad(
        p.closed_form_inner, p.outer_loss, bl.stationarity(Ridge.inner_loss), bl.CG(tol=1e-13)
    )(x0, *p.args())[1][0]
    # forward mode: the Jacobian-vector product along each basis vector gives the gradient
    eye = torch.eye(5, dtype=F64)
    results["func.jvp"] = torch.stack(
        [torch.func.jvp(hyper_objective, (p.lam,), (e,))[1] for e in eye]
    )
    fwd = []
    with torch.autograd.forward_ad.dual_level():
        for e in eye:
            dual = torch.autograd.forward_ad.make_dual(p.lam, e)
            fwd.append(torch.autograd.forward_ad.unpack_dual(hyper_objective(dual)).tangent)
    results["forward_ad"] = torch.stack(fwd)
    for name, value in results.items():
        assert rel_err(value, ref) <= 1e-9, name


@pytest.mark.parametrize("case", solvers("host"))
def test_implicit_grad_with_a_host_side_linear_solver(case: SolverCase) -> None:
    # bl.SciPy cannot run under torch.func transforms; implicit_grad uses plain autograd
    # when its inputs are not transformed, so the SciPy bridge works there.
    p = Ridge.make(d=6, seed=17)
    solve = bl.custom_root(
        bl.stationarity(Ridge.inner_loss), solver=_ridge_solver(case), symmetric=True
    )(p.closed_form_inner)
    value, grads = bl.implicit_grad(solve, p.outer_loss, argnums=0)(
        torch.zeros(6, dtype=F64), *p.args()
    )
    assert rel_err(grads[0], p.closed_form()) <= 1e-6
    assert abs(float(value) - float(p.outer_loss(p.solve(p.lam)))) <= 1e-12


def test_jacobian_forward_and_reverse_agree_with_closed_form() -> None:
    p = Ridge.make(d=4, seed=3)
    # jacrev / jacfwd vmap over basis vectors: the linear solve must be fixed-K there
    solve = bl.custom_root(bl.stationarity(Ridge.inner_loss), solver=bl.CG(tol=0, maxiter=8))(
        p.closed_form_inner
    )
    x0 = torch.zeros(4, dtype=F64)

    def x_star(lam: torch.Tensor) -> torch.Tensor:
        return solve(x0, lam, p.X, p.y)

    # dw*/dλ = −H⁻¹ diag(w*)
    H = p.X.T @ p.X + torch.diag(p.lam)
    ref = -torch.linalg.solve(H, torch.diag(p.solve(p.lam)))
    assert rel_err(torch.func.jacrev(x_star)(p.lam), ref) <= 1e-10
    assert rel_err(torch.func.jacfwd(x_star)(p.lam), ref) <= 1e-10


def test_root_vjp_and_root_jvp_low_level() -> None:
    p = Ridge.make(d=4, seed=4)
    w = p.solve(p.lam)
    F = bl.stationarity(Ridge.inner_loss)
    H = p.X.T @ p.X + torch.diag(p.lam)
    v = torch.arange(1.0, 5.0, dtype=F64)
    grads = bl.root_vjp(F, w, p.args(), v, bl.CG(tol=1e-13))
    assert rel_err(grads[0], -torch.linalg.solve(H, v) * w) <= 1e-10
    assert grads[1] is not None and grads[2] is not None  # X, y are float trees too
    grads0 = bl.root_vjp(F, w, p.args(), v, bl.CG(tol=1e-13), argnums=0)
    assert grads0[1] is None and grads0[2] is None
    s = bl.root_jvp(F, w, p.args(), (v, None, None), bl.CG(tol=1e-13))
    assert rel_err(s, -torch.linalg.solve(H, v * w)) <= 1e-10


# --- logistic regression against finite differences ----------------------------------------


def test_logistic_regression_l2_vs_finite_differences() -> None:
    rng = np.random.default_rng(0)
    n, d, nv = 60, 5, 40
    X, Xv = rng.normal(size=(n, d)), rng.normal(size=(nv, d))
    w_true = rng.normal(size=d)
    y = np.sign(X @ w_true + 0.5 * rng.normal(size=n))
    yv = np.sign(Xv @ w_true + 0.5 * rng.normal(size=nv))
    theta = np.log(0.1 + rng.random(d))  # λ = exp(θ): per-feature strengths on a log scale

    def inner_loss(w, theta, X, y):
        return torch.nn.functional.softplus(-y * (X @ w)).mean() + 0.5 * (theta.exp() * w**2).sum()

    def outer_np(theta_np: np.ndarray) -> float:
        w = newton_logistic(X, y, np.exp(theta_np))
        return float(np.logaddexp(0.0, -yv * (Xv @ w)).mean())

    t = {k: torch.tensor(v) for k, v in dict(X=X, y=y, Xv=Xv, yv=yv, theta=theta).items()}

    def newton(x0, theta, X, y):
        return torch.tensor(newton_logistic(X.numpy(), y.numpy(), theta.exp().numpy()))

    def outer(w, theta, X, y):
        return torch.nn.functional.softplus(-t["yv"] * (t["Xv"] @ w)).mean()

    ref = central_fd(outer_np, theta, h=1e-5)
    for inner in (newton, bl.inner.lbfgs(inner_loss)):
        solve = bl.custom_root(bl.stationarity(inner_loss), solver=bl.CG(tol=1e-12))(inner)
        value, (g_theta, g_X, g_y) = bl.implicit_grad(solve, outer, argnums=0)(
            torch.zeros(d, dtype=F64), t["theta"], t["X"], t["y"]
        )
        assert g_X is None and g_y is None
        assert abs(float(value) - outer_np(theta)) <= 1e-10
        assert rel_err(g_theta, torch.tensor(ref)) <= 1e-6


# --- the tanh fixed point ------------------------------------------------------------------


def _tanh_problem(seed: int = 0, d: int = 5, m: int = 3):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=F64)
    W = 0.5 * W / torch.linalg.matrix_norm(W, ord=2)  # ‖W‖₂ = 0.5: a contraction
    U = torch.randn(d, m, generator=g, dtype=F64)
    theta = torch.randn(m, generator=g, dtype=F64)

    def T(x, theta, W, U):
        return torch.tanh(W @ x + U @ theta)

    def iterate(x0, theta, W, U):
        x = x0
        for _ in range(80):  # 0.5⁸⁰ ≈ 1e-24
            x = T(x, theta, W, U)
        return x

    return T, iterate, theta, W, U


def test_tanh_fixed_point_vjp_and_jvp_vs_finite_differences() -> None:
    T, iterate, theta, W, U = _tanh_problem()
    d, m = W.shape[0], U.shape[1]
    x0 = torch.zeros(d, dtype=F64)
    solve = bl.custom_fixed_point(T, solver=bl.GMRES(tol=1e-13, maxiter=100))(iterate)
    assert isinstance(solve.solver, bl.GMRES) and not solve.symmetric

    def x_star_np(th: np.ndarray, j: int) -> float:
        return float(iterate(x0, torch.tensor(th), W, U)[j])

    jac_fd = np.stack(
        [central_fd(lambda th, j=j: x_star_np(th, j), theta.numpy(), 1e-6) for j in range(d)]
    )
    jac_fd = torch.tensor(jac_fd)  # (d, m)

    def x_star(th):
        return solve(x0, th, W, U)

    v = torch.linspace(-1, 1, d, dtype=F64)
    t = torch.linspace(0.5, 2, m, dtype=F64)
    _, vjp_fn = torch.func.vjp(x_star, theta)
    assert rel_err(vjp_fn(v)[0], v @ jac_fd) <= 1e-7
    _, jvp_out = torch.func.jvp(x_star, (theta,), (t,))
    assert rel_err(jvp_out, jac_fd @ t) <= 1e-7
    # the default solver of a fixed point is GMRES too
    default = bl.custom_fixed_point(T)(iterate)
    assert isinstance(default.solver, bl.GMRES)


# --- structure: argnums, x0, non-float args, has_aux, trees, 0-d, dtypes, vmap -----------------


def test_argnums_x0_and_non_float_arguments() -> None:
    p = Ridge.make(d=4, seed=5)
    labels = torch.arange(4)  # an integer tensor: never differentiated

    def inner_loss(w, lam, X, y, labels, scale):
        return Ridge.inner_loss(w, lam, X, y) * scale

    def inner(x0, lam, X, y, labels, scale):
        return p.closed_form_inner(x0, lam, X, y)

    solve = bl.custom_root(bl.stationarity(inner_loss), solver=bl.CG(tol=1e-13), argnums=0)(inner)
    x0 = torch.zeros(4, dtype=F64, requires_grad=True)
    lam = p.lam.clone().requires_grad_(True)
    X = p.X.clone().requires_grad_(True)
    p.outer_loss(solve(x0, lam, X, p.y, labels, 1)).backward()
    assert x0.grad is None  # x0 never gets a gradient
    assert X.grad is None  # not in argnums
    assert rel_err(lam.grad, p.closed_form()) <= 1e-9

    _, grads = bl.implicit_grad(inner, p.outer_loss, bl.stationarity(inner_loss))(
        torch.zeros(4, dtype=F64), p.lam, p.X, p.y, labels, 1
    )
    assert grads[3] is None and grads[4] is None  # int tensor, python int
    assert rel_err(grads[0], p.closed_form()) <= 1e-6
    assert grads[1].shape == p.X.shape and grads[2].shape == p.y.shape
    _, grads = bl.implicit_grad(inner, p.outer_loss, bl.stationarity(inner_loss), argnums=(0,))(
        torch.zeros(4, dtype=F64), p.lam, p.X, p.y, labels, 1
    )
    assert grads[1] is None and grads[2] is None
    with pytest.raises(TypeError, match="argnums selects argument 3"):
        bl.implicit_grad(inner, p.outer_loss, bl.stationarity(inner_loss), argnums=3)(
            torch.zeros(4, dtype=F64), p.lam, p.X, p.y, labels, 1
        )


def test_implicit_grad_direct_term_is_included() -> None:
    # outer = ½‖X_v w* − y_v‖² + ½ c Σ λⱼ²: the direct term c·λ adds to the implicit one.
    p = Ridge.make(d=4, seed=6)
    c = 0.3

    def outer(w, lam, X, y):
        return p.outer_loss(w) + 0.5 * c * (lam**2).sum()

    _, (g, _, _) = bl.implicit_grad(
        p.closed_form_inner, outer, bl.stationarity(Ridge.inner_loss), bl.CG(tol=1e-13)
    )(torch.zeros(4, dtype=F64), *p.args())
    assert rel_err(g, p.closed_form() + c * p.lam) <= 1e-9


def test_has_aux_passes_aux_through() -> None:
    p = Ridge.make(d=4, seed=7)

    @bl.custom_root(bl.stationarity(Ridge.inner_loss), solver=bl.CG(tol=1e-13), has_aux=True)
    def solve(x0, lam, X, y):
        return p.closed_form_inner(x0, lam, X, y), {"iterations": 1, "note": "closed form"}

    lam = p.lam.clone().requires_grad_(True)
    w, aux = solve(torch.zeros(4, dtype=F64), lam, p.X, p.y)
    assert aux == {"iterations": 1, "note": "closed form"}
    p.outer_loss(w).backward()
    assert rel_err(lam.grad, p.closed_form()) <= 1e-9
    _, grads = bl.implicit_grad(solve, p.outer_loss)(torch.zeros(4, dtype=F64), *p.args())
    assert rel_err(grads[0], p.closed_form()) <= 1e-9

    @bl.custom_root(bl.stationarity(Ridge.inner_loss), has_aux=True)
    def bad(x0, lam, X, y):
        return p.closed_form_inner(x0, lam, X, y)

    with pytest.raises(TypeError, match="has_aux=True"):
        bad(torch.zeros(4, dtype=F64), *p.args())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_and_float64(dtype: torch.dtype) -> None:
    p = Ridge.make(d=6, seed=8, dtype=dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    solve = bl.custom_root(bl.stationarity(Ridge.inner_loss), solver=bl.CG(tol=tol))(
        p.closed_form_inner
    )
    lam = p.lam.clone().requires_grad_(True)
    w = solve(torch.zeros(6, dtype=dtype), lam, p.X, p.y)
    assert w.dtype == dtype
    p.outer_loss(w).backward()
    assert lam.grad.dtype == dtype
    assert rel_err(lam.grad, p.closed_form()) <= (1e-3 if dtype == torch.float32 else 1e-9)


def test_dict_parameters_from_an_nn_module() -> None:
    p = Ridge.make(d=4, seed=9)
    model = torch.nn.Linear(4, 1).double()
    params0 = {k: torch.zeros_like(v) for k, v in model.named_parameters()}

    def inner_loss(params, lam, X, y):
        pred = torch.func.functional_call(model, params, (X,)).squeeze(-1)
        reg = sum((q**2).sum() for q in params.values())
        return 0.5 * ((pred - y) ** 2).sum() + 0.5 * lam * reg

    def outer(params, lam, X, y):
        pred = torch.func.functional_call(model, params, (p.Xv,)).squeeze(-1)
        return 0.5 * ((pred - p.yv) ** 2).sum()

    lam = torch.tensor(0.7, dtype=F64)
    solve = bl.custom_root(bl.stationarity(inner_loss), solver=bl.CG(tol=1e-12))(
        bl.inner.lbfgs(inner_loss)
    )
    value, (g_lam, _, _) = bl.implicit_grad(solve, outer)(params0, lam, p.X, p.y)
    # closed form on the augmented design [X, 1] with the same λ on weight and bias
    Xa = torch.cat([p.X, torch.ones(len(p.X), 1, dtype=F64)], 1)
    Xva = torch.cat([p.Xv, torch.ones(len(p.Xv), 1, dtype=F64)], 1)
    H = Xa.T @ Xa + lam * torch.eye(5, dtype=F64)
    wa = torch.linalg.solve(H, Xa.T @ p.y)
    ref = -torch.linalg.solve(H, Xva.T @ (Xva @ wa - p.yv)) @ wa
    assert g_lam.shape == ()
    assert rel_err(g_lam, ref) <= 1e-6
    assert abs(float(value) - float(0.5 * ((Xva @ wa - p.yv) ** 2).sum())) <= 1e-9
    out = solve(params0, lam, p.X, p.y)
    assert set(out) == {"weight", "bias"} and out["weight"].shape == (1, 4)


def test_zero_dimensional_problem() -> None:
    # x* solves x³ + x − θ = 0, so dx*/dθ = 1 / (3x*² + 1).
    def F(x, theta):
        return x**3 + x - theta

    @bl.custom_root(F, solver=bl.GMRES(tol=1e-14, maxiter=5))
    def newton(x0, theta):
        x = x0
        for _ in range(60):
            x = x - (x**3 + x - theta) / (3 * x**2 + 1)
        return x

    theta = torch.tensor(2.5, dtype=F64, requires_grad=True)
    x = newton(torch.tensor(0.0, dtype=F64), theta)
    assert x.shape == ()
    (g,) = torch.autograd.grad(x, theta)
    x = float(x.detach())
    assert abs(x**3 + x - 2.5) <= 1e-12
    assert abs(float(g) - 1 / (3 * x**2 + 1)) <= 1e-12
    _, t = torch.func.jvp(
        lambda th: newton(torch.tensor(0.0, dtype=F64), th),
        (theta.detach(),),
        (torch.tensor(1.0, dtype=F64),),
    )
    assert abs(float(t) - float(g)) <= 1e-12


def test_vmap_over_eight_hyperparameter_vectors_equals_loop() -> None:
    p = Ridge.make(d=5, seed=10)
    inner = bl.inner.gradient_descent(Ridge.inner_loss, steps=150, lr=1.0 / p.lipschitz())
    solve = bl.custom_root(bl.stationarity(Ridge.inner_loss), solver=bl.CG(tol=0, maxiter=10))(
        inner
    )
    hyper = bl.implicit_grad(solve, p.outer_loss, argnums=0)
    lams = 0.5 + torch.rand(8, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    x0 = torch.zeros(5, dtype=F64)

    def one(lam):
        value, grads = hyper(x0, lam, p.X, p.y)
        return value, grads[0]

    values, grads = torch.func.vmap(one)(lams)
    for i in range(8):
        v, g = one(lams[i])
        assert torch.allclose(values[i], v, rtol=1e-12, atol=1e-14)
        assert torch.allclose(grads[i], g, rtol=1e-10, atol=1e-13)
        assert rel_err(g, p.closed_form(lams[i])) <= 1e-6
    # the decorated solution itself is vmappable too
    xs = torch.func.vmap(lambda lam: solve(x0, lam, p.X, p.y))(lams)
    assert torch.allclose(xs[3], p.solve(lams[3]), atol=1e-10)


# --- memory: the inner iterations are never recorded ---------------------------------------


def _graph_size(tensor: torch.Tensor) -> int:
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return len(seen)


def test_graph_of_a_2000_step_inner_loop_is_as_small_as_one_step() -> None:
    p = Ridge.make(d=4, seed=11)
    F = bl.stationarity(Ridge.inner_loss)
    sizes = {}
    for steps in (1, 2000):
        inner = bl.inner.gradient_descent(Ridge.inner_loss, steps=steps, lr=1.0 / p.lipschitz())
        solve = bl.custom_root(F, solver=bl.CG(tol=1e-10))(inner)
        lam = p.lam.clone().requires_grad_(True)
        loss = p.outer_loss(solve(torch.zeros(4, dtype=F64), lam, p.X, p.y))
        sizes[steps] = _graph_size(loss)
        loss.backward()
        if steps == 2000:
            assert rel_err(lam.grad, p.closed_form()) <= 1e-6
    assert sizes[2000] == sizes[1]

    # the counter is sensitive: differentiating through the same loop unrolled grows the graph
    lam = p.lam.clone().requires_grad_(True)
    w = torch.zeros(4, dtype=F64)
    for _ in range(50):
        w = w - (1.0 / p.lipschitz()) * Ridge.gradient(w, lam, p.X, p.y)
    assert _graph_size(p.outer_loss(w)) > 50 * sizes[1]


# --- errors and warnings -------------------------------------------------------------------


def test_optimality_output_shape_mismatch_is_a_clear_error() -> None:
    p = Ridge.make(d=4, seed=12)

    def bad_F(w, lam, X, y):
        return Ridge.gradient(w, lam, X, y)[:3]

    solve = bl.custom_root(bad_F, solver=bl.CG())(p.closed_form_inner)
    lam = p.lam.clone().requires_grad_(True)
    with pytest.raises(ValueError, match=r"optimality_fn\(x, \*args\).*shape"):
        p.outer_loss(solve(torch.zeros(4, dtype=F64), lam, p.X, p.y)).backward()

    def bad_tree(w, lam, X, y):
        return (Ridge.gradient(w, lam, X, y),)

    solve = bl.custom_root(bad_tree, solver=bl.CG())(p.closed_form_inner)
    with pytest.raises(ValueError, match="structure"):
        bl.implicit_grad(solve, p.outer_loss)(torch.zeros(4, dtype=F64), *p.args())


def test_implicit_grad_without_optimality_condition() -> None:
    p = Ridge.make(d=3)
    with pytest.raises(TypeError, match="optimality_fn"):
        bl.implicit_grad(p.closed_form_inner, p.outer_loss)


def test_outer_loss_must_be_scalar() -> None:
    p = Ridge.make(d=3)
    fn = bl.implicit_grad(
        p.closed_form_inner, lambda w, *args: w**2, bl.stationarity(Ridge.inner_loss)
    )
    with pytest.raises(ValueError, match="scalar"):
        fn(torch.zeros(3, dtype=F64), *p.args())


def test_inner_solver_must_return_float_tensors() -> None:
    p = Ridge.make(d=3)
    solve = bl.custom_root(bl.stationarity(Ridge.inner_loss))(lambda x0, *args: x0.long())
    with pytest.raises(TypeError, match="floating-point"):
        solve(torch.zeros(3, dtype=F64), *p.args())
    with pytest.raises(TypeError, match="tensor"):
        bl.custom_root(bl.stationarity(Ridge.inner_loss))(lambda x0, *args: 1.0)(
            torch.zeros(3, dtype=F64), *p.args()
        )


def test_bad_decorator_arguments() -> None:
    with pytest.raises(TypeError, match="callable"):
        bl.custom_root("not a function")
    with pytest.raises(ValueError, match="on_failure"):
        bl.custom_root(Ridge.gradient, on_failure="explode")(Ridge.make(d=2).closed_form_inner)
    with pytest.raises(TypeError, match="linear solver"):
        bl.custom_root(Ridge.gradient, solver="cg")(Ridge.make(d=2).closed_form_inner)


def _ridge_backward(solve, p: Ridge) -> torch.Tensor:
    lam = p.lam.clone().requires_grad_(True)
    p.outer_loss(solve(torch.zeros(len(p.lam), dtype=F64), lam, p.X, p.y)).backward()
    return lam.grad


def test_failure_policy_warn_raise_ignore_and_fixed_k() -> None:
    p = Ridge.make(d=8, seed=13)
    F = bl.stationarity(Ridge.inner_loss)
    failing = bl.CG(tol=1e-14, maxiter=1)

    warn = bl.custom_root(F, solver=failing)(p.closed_form_inner)
    with pytest.warns(bl.ConvergenceWarning, match="max_iterations"):
        grad = _ridge_backward(warn, p)
    assert torch.isfinite(grad).all()  # the gradient is still returned
    assert warn.latest_info.reason == "max_iterations" and warn.latest_info.failed

    raising = bl.custom_root(F, solver=failing, on_failure="raise")(p.closed_form_inner)
    with pytest.raises(bl.ConvergenceError) as excinfo:
        _ridge_backward(raising, p)
    assert excinfo.value.info.reason == "max_iterations"

    ignoring = bl.custom_root(F, solver=failing, on_failure="ignore")(p.closed_form_inner)
    fixed_k = bl.custom_root(F, solver=bl.CG(tol=0, maxiter=1))(p.closed_form_inner)
    for solve in (ignoring, fixed_k):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _ridge_backward(solve, p)
    assert ignoring.latest_info.failed  # silent, but still recorded
    assert fixed_k.latest_info.reason == "fixed_iterations" and not fixed_k.latest_info.failed


def test_cg_breakdown_on_indefinite_hessian_is_reported() -> None:
    # g(x, θ) = ½ xᵀ D x − θᵀx with D = diag(1, −1, 2): x* = θ / D is a saddle point.
    D = torch.tensor([1.0, -1.0, 2.0], dtype=F64)

    def inner_loss(x, theta):
        return 0.5 * (D * x * x).sum() - (theta * x).sum()

    solve = bl.custom_root(bl.stationarity(inner_loss), solver=bl.CG(tol=1e-10))(
        lambda x0, theta: theta / D
    )
    theta = torch.ones(3, dtype=F64, requires_grad=True)
    x = solve(torch.zeros(3, dtype=F64), theta)
    with pytest.warns(bl.ConvergenceWarning, match="breakdown"):
        x[1].backward()  # cotangent e₂: curvature e₂ᵀ D e₂ = −1 < 0 on the first step
    assert solve.latest_info.reason == "breakdown" and not solve.latest_info.converged
    # Dense (LU) handles the indefinite system exactly
    dense = bl.custom_root(bl.stationarity(inner_loss), solver=bl.Dense())(lambda x0, th: th / D)
    theta.grad = None
    dense(torch.zeros(3, dtype=F64), theta)[1].backward()
    assert torch.allclose(theta.grad, torch.tensor([0.0, -1.0, 0.0], dtype=F64))


def test_non_finite_inner_solution_is_reported() -> None:
    p = Ridge.make(d=3, seed=18)
    solve = bl.custom_root(bl.stationarity(Ridge.inner_loss), solver=bl.CG(tol=1e-10))(
        lambda x0, *args: torch.full((3,), float("nan"), dtype=F64)
    )
    # Said at the forward pass, where it happens, and again by the backward solve.
    with pytest.warns(bl.ConvergenceWarning) as record:
        _ridge_backward(solve, p)
    messages = [str(w.message) for w in record]
    assert any("non-finite inner solution" in m for m in messages), messages
    assert solve.latest_info.reason == "nonfinite"


def test_unused_argument_warning_when_theta_only_sets_x0() -> None:
    # The iMAML porting bug: θ initialises the inner solver but the inner loss forgets λ(φ − θ).
    p = Ridge.make(d=4, seed=14)

    def inner_loss(phi, theta, X, y):
        return Ridge.inner_loss(phi, p.lam, X, y)

    def inner(x0, theta, X, y):
        return p.closed_form_inner(theta, p.lam, X, y)

    solve = bl.custom_root(bl.stationarity(inner_loss), solver=bl.CG(tol=1e-10), argnums=0)(inner)
    theta = torch.zeros(4, dtype=F64, requires_grad=True)
    with pytest.warns(UserWarning, match="does not enter optimality_fn"):
        p.outer_loss(solve(theta, theta, p.X, p.y)).backward()
    assert torch.all(theta.grad == 0)


def test_adaptive_solver_under_vmap_is_a_clear_error() -> None:
    p = Ridge.make(d=3, seed=15)
    solve = bl.custom_root(bl.stationarity(Ridge.inner_loss), solver=bl.CG(tol=1e-8))(
        p.closed_form_inner
    )
    hyper = bl.implicit_grad(solve, p.outer_loss, argnums=0)
    lams = 0.5 + torch.rand(4, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"vmap.*fixed-K|fixed-K.*vmap|tol=0"):
        torch.func.vmap(lambda lam: hyper(torch.zeros(3, dtype=F64), lam, p.X, p.y)[1][0])(lams)


def test_latest_info_and_callback_are_observable() -> None:
    p = Ridge.make(d=6, seed=16)
    seen: list[bl.SolveInfo] = []
    solve = bl.custom_root(
        bl.stationarity(Ridge.inner_loss), solver=bl.CG(tol=1e-10), callback=seen.append
    )(p.closed_form_inner)
    assert solve.latest_info is None
    _ridge_backward(solve, p)
    assert len(seen) == 1 and seen[0] is solve.latest_info
    info = solve.latest_info
    assert info.converged and info.reason == "converged" and 0 < info.iterations <= 6
    assert info.residual_norm <= 1e-10 * float(torch.linalg.norm(torch.ones(6)) * 1e3)
    # forward mode reports too
    torch.func.jvp(
        lambda lam: solve(torch.zeros(6, dtype=F64), lam, p.X, p.y),
        (p.lam,),
        (torch.ones(6, dtype=F64),),
    )
    assert len(seen) == 2 and seen[1].converged


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_end_to_end() -> None:
    p = Ridge.make(d=6, seed=19)
    dev = torch.device("cuda")
    args = tuple(t.to(dev) for t in p.args())
    x0 = torch.zeros(6, dtype=F64, device=dev)
    F = bl.stationarity(Ridge.inner_loss)
    for inner in (
        bl.inner.gradient_descent(Ridge.inner_loss, steps=300, lr=1 / p.lipschitz()),
        bl.inner.scipy_minimize(Ridge.inner_loss, options={"gtol": 1e-12, "ftol": 1e-16}),
    ):
        solve = bl.custom_root(F, solver=bl.CG(tol=1e-12))(inner)
        w = solve(x0, *args)
        assert w.device.type == "cuda"
        _, grads = bl.implicit_grad(solve, lambda w, *a: p.outer_loss(w.cpu()), argnums=0)(
            x0, *args
        )
        assert grads[0].device.type == "cuda"
        assert rel_err(grads[0].cpu(), p.closed_form()) <= 1e-6
    # vmap with fixed-K on the device, and a device-side projection
    fixed = bl.custom_root(F, solver=bl.CG(tol=0, maxiter=12))(p.closed_form_inner)
    lams = (0.5 + torch.rand(4, 6, dtype=F64)).to(dev)
    xs = torch.func.vmap(lambda lam: fixed(x0, lam, *args[1:]))(lams)
    assert xs.device.type == "cuda"
    assert torch.allclose(bl.projection_simplex(xs).sum(-1).cpu(), torch.ones(4, dtype=F64))


# The host bridge's result is detached: nothing to differentiate a second time.
@pytest.mark.parametrize("case", solvers(exclude=("host",)))
def test_second_order_hessian_of_outer_loss_matches_closed_form(case: SolverCase) -> None:
    """Differentiating the backward rule itself (Hessian in θ) through any solver."""
    tol = 1e-13 if "indirect_tol" in case.tags else 1e-12
    if "needs_contraction" in case.tags:
        maxiter = 200  # κ ≈ 5 here: the series' rate is about 1 − 1/κ
    elif "fixed_k" in case.tags:
        maxiter = 12
    else:
        maxiter = 100
    solver = case(tol=tol, maxiter=maxiter)
    torch.manual_seed(3)
    n, d = 30, 5
    X, y = torch.randn(n, d, dtype=F64), torch.randn(n, dtype=F64)
    Xv, yv = torch.randn(20, d, dtype=F64), torch.randn(20, dtype=F64)

    def closed(th: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(X.T @ X + torch.diag(th.exp()), X.T @ y)

    def inner_loss(w: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (th.exp() * w**2).sum()

    root = bl.custom_root(bl.stationarity(inner_loss), solver=solver)(lambda w0, th: closed(th))
    theta = torch.randn(d, dtype=F64)
    reference = torch.autograd.functional.hessian(
        lambda t: 0.5 * ((Xv @ closed(t) - yv) ** 2).sum(), theta
    )
    hessian = torch.autograd.functional.hessian(
        lambda t: 0.5 * ((Xv @ root(torch.zeros(d, dtype=F64), t) - yv) ** 2).sum(), theta
    )
    assert rel_err(hessian, reference) < 1e-8


def _stationary_outer(case: SolverCase) -> tuple[Ridge, bl.ImplicitFunction, torch.Tensor]:
    """Ridge, its implicit solve, and dw*/dλ = −H⁻¹diag(w*) in closed form."""
    if "needs_contraction" in case.tags:
        solver = case(tol=1e-13, maxiter=400)
    else:
        solver = case(tol=1e-13, maxiter=12 if "fixed_k" in case.tags else 100)
    p = Ridge.make(d=4, seed=6)
    solve = bl.custom_root(bl.stationarity(Ridge.inner_loss), solver=solver)(p.closed_form_inner)
    jacobian = -torch.linalg.solve(p.X.T @ p.X + torch.diag(p.lam), torch.diag(p.solve(p.lam)))
    return p, solve, jacobian


@pytest.mark.parametrize("case", solvers())
def test_second_order_where_the_outer_loss_is_stationary_in_x_star(case: SolverCase) -> None:
    """A backward whose cotangent is 0 must still be differentiable in it.

    L(λ) = ½‖w*(λ) − w*(λ₀)‖² has ∂L/∂w* = 0 at λ₀ and the Hessian JᵀJ there; the
    double-backward trick of torch.autograd.functional.jvp / hvp differentiates a backward
    fed a zero cotangent too. Differentiating the solver's iterations gave 0 for every
    iterative solver there (u = 0 for b = 0, a constant), with no warning.
    """
    p, solve, jacobian = _stationary_outer(case)
    x0, target = torch.zeros(4, dtype=F64), p.solve(p.lam)

    def loss(lam: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((solve(x0, lam, p.X, p.y) - target) ** 2).sum()

    v = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    hessian = torch.autograd.functional.hessian(loss, p.lam)
    assert rel_err(hessian, jacobian.T @ jacobian) < 1e-8
    _, hv = torch.autograd.functional.hvp(loss, p.lam, v)
    assert rel_err(hv, jacobian.T @ jacobian @ v) < 1e-8
    _, jv = torch.autograd.functional.jvp(lambda lam: solve(x0, lam, p.X, p.y), p.lam, v)
    assert rel_err(jv, jacobian @ v) < 1e-8


@pytest.mark.parametrize("case", solvers("vmappable"))
def test_func_hessian_where_the_outer_loss_is_stationary_in_x_star(case: SolverCase) -> None:
    p, solve, jacobian = _stationary_outer(case)
    x0, target = torch.zeros(4, dtype=F64), p.solve(p.lam)

    def loss(lam: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((solve(x0, lam, p.X, p.y) - target) ** 2).sum()

    assert rel_err(torch.func.hessian(loss)(p.lam), jacobian.T @ jacobian) < 1e-8
    v = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    _, hv = torch.func.jvp(torch.func.grad(loss), (p.lam,), (v,))
    assert rel_err(hv, jacobian.T @ jacobian @ v) < 1e-8


def test_forward_mode_of_a_vmapped_solve_and_forward_over_forward() -> None:
    p = Ridge.make(d=4, seed=7)
    solve = bl.custom_root(bl.stationarity(Ridge.inner_loss), solver=bl.CG(tol=0, maxiter=8))(
        p.closed_form_inner
    )
    x0, v = torch.zeros(4, dtype=F64), torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    lams = torch.stack([p.lam, 2 * p.lam])

    def batch(scale: torch.Tensor) -> torch.Tensor:
        return torch.func.vmap(lambda lam: solve(x0, scale * lam, p.X, p.y))(lams)

    # jvp of a vmap: d/ds w*(s·λᵢ) at s = 1 is J(λᵢ) λᵢ, J = −H⁻¹diag(w*). It used to fail
    # inside torch.func on the implicit function's call signature.
    _, tangent = torch.func.jvp(batch, (torch.ones((), dtype=F64),), (torch.ones((), dtype=F64),))
    for lam, got in zip(lams, tangent, strict=True):
        h = p.X.T @ p.X + torch.diag(lam)
        assert rel_err(got, -torch.linalg.solve(h, p.solve(lam) * lam)) < 1e-10
    # Forward-over-forward would drop the outer derivative (a silent zero): it refuses.
    with pytest.raises(NotImplementedError, match="forward-over-forward"):
        torch.func.jvp(
            lambda lam: torch.func.jvp(lambda m: solve(x0, m, p.X, p.y), (lam,), (v,))[1],
            (p.lam,),
            (v,),
        )


def test_implicit_grad_has_aux_returns_the_solution_for_warm_starts() -> None:
    torch.manual_seed(4)
    X, y = torch.randn(25, 4, dtype=F64), torch.randn(25, dtype=F64)

    def inner_loss(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * lam * (w**2).sum()

    def closed(lam: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(X.T @ X + lam * torch.eye(4, dtype=F64), X.T @ y)

    solve = bl.custom_root(bl.stationarity(inner_loss), solver=bl.CG(tol=1e-12))(
        lambda w0, lam: closed(lam)
    )
    lam = torch.tensor(0.7, dtype=F64)
    (value, x_star), grads = bl.implicit_grad(
        solve, lambda w, lam: ((w**2).sum(), w), has_aux=True
    )(torch.zeros(4, dtype=F64), lam)
    assert rel_err(x_star, closed(lam)) < 1e-12 and not x_star.requires_grad
    reference = torch.func.grad(lambda t: (closed(t) ** 2).sum())(lam)
    assert abs(float(value) - float((closed(lam) ** 2).sum())) < 1e-12
    assert rel_err(grads[0], reference) < 1e-8
    with pytest.raises(TypeError, match="has_aux=True: outer_loss must return a pair"):
        bl.implicit_grad(solve, lambda w, lam: (w**2).sum(), has_aux=True)(
            torch.zeros(4, dtype=F64), lam
        )


def test_jacobians_of_a_root_adaptive_row_by_row_and_fixed_k_vectorised() -> None:
    """jacrev/jacfwd batch the solve with vmap: fixed-K works, adaptive needs chunk_size=1."""
    torch.manual_seed(5)
    W = 0.15 * torch.randn(4, 4, dtype=F64)
    U = torch.randn(4, 3, dtype=F64)

    def T(x: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        return torch.tanh(W @ x + U @ th)

    def iterate(x0: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        x = x0
        for _ in range(200):
            x = T(x, th)
        return x

    theta, x0 = torch.randn(3, dtype=F64), torch.zeros(4, dtype=F64)
    x_star = iterate(x0, theta)
    # Reference: dx*/dθ = (I − ∂T/∂x)⁻¹ ∂T/∂θ, from the closed-form derivative of tanh.
    s = 1 - x_star**2
    reference = torch.linalg.solve(torch.eye(4, dtype=F64) - s[:, None] * W, s[:, None] * U)

    adaptive = bl.custom_fixed_point(T, solver=bl.GMRES(tol=1e-12))(iterate)
    fixed = bl.custom_fixed_point(T, solver=bl.GMRES(tol=0, maxiter=8))(iterate)
    rows = torch.func.jacrev(lambda t: adaptive(x0, t), chunk_size=1)(theta)
    assert rel_err(rows, reference) < 1e-10
    assert rel_err(torch.func.jacrev(lambda t: fixed(x0, t))(theta), reference) < 1e-10
    assert rel_err(torch.func.jacfwd(lambda t: fixed(x0, t))(theta), reference) < 1e-10
    with pytest.raises(ValueError, match="chunk_size=1"):
        torch.func.jacrev(lambda t: adaptive(x0, t))(theta)
    with pytest.raises(ValueError, match="stops adaptively"):  # torch.autograd.functional's vmap
        torch.autograd.functional.jacobian(
            lambda t: adaptive(x0, t), theta, strategy="forward-mode", vectorize=True
        )
