"""The ready inner solvers of bilevel.inner, against closed-form minimisers."""

from __future__ import annotations

import pytest
import torch
from _references import F64, Ridge, rel_err
from _solvers import SolverCase, solvers

import bilevel as bl


def _tree_loss(x, lam, X, y):
    """Ridge on a dict {"w": (d-1,), "b": ()} — a tree with a 0-d leaf."""
    w = torch.cat([x["w"], x["b"].reshape(1)])
    return Ridge.inner_loss(w, lam, X, y)


def _tree_x0(d: int, dtype=F64):
    return {"w": torch.zeros(d - 1, dtype=dtype), "b": torch.zeros((), dtype=dtype)}


def _as_vector(x):
    return torch.cat([x["w"], x["b"].reshape(1)])


def _solvers(p: Ridge) -> dict:
    return {
        "gradient_descent": bl.inner.gradient_descent(_tree_loss, steps=400, lr=1 / p.lipschitz()),
        "torch_optimizer": bl.inner.torch_optimizer(
            _tree_loss, torch.optim.SGD, steps=400, lr=1 / p.lipschitz(), momentum=0.5
        ),
        "lbfgs": bl.inner.lbfgs(_tree_loss),
        "scipy_minimize": bl.inner.scipy_minimize(
            _tree_loss, "L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-16}
        ),
    }


@pytest.mark.parametrize("name", ["gradient_descent", "torch_optimizer", "lbfgs", "scipy_minimize"])
def test_solvers_reach_the_minimiser_on_trees_and_leave_inputs_alone(name: str) -> None:
    p = Ridge.make(d=5, seed=0)
    solver = _solvers(p)[name]
    lam = p.lam.clone().requires_grad_(True)  # the caller's tensors: must get no .grad
    x0 = _tree_x0(5)
    x0_copy = {k: v.clone() for k, v in x0.items()}
    x = solver(x0, lam, p.X, p.y)
    assert set(x) == {"w", "b"} and x["b"].shape == () and x["w"].shape == (4,)
    assert all(not t.requires_grad and t.grad_fn is None for t in x.values())
    assert rel_err(_as_vector(x), p.solve(p.lam)) <= 1e-8
    assert lam.grad is None
    assert all(torch.equal(x0[k], x0_copy[k]) for k in x0)
    assert name.split("_")[0] in solver.__name__


@pytest.mark.parametrize("name", ["gradient_descent", "lbfgs", "scipy_minimize"])
def test_float32_trees_keep_their_dtype(name: str) -> None:
    p = Ridge.make(d=4, seed=1, dtype=torch.float32)
    x = _solvers(p)[name](_tree_x0(4, torch.float32), *p.args())
    assert all(t.dtype == torch.float32 for t in x.values())
    assert rel_err(_as_vector(x), p.solve(p.lam.double())) <= 1e-4


def test_gradient_descent_is_vmappable_and_equals_the_loop() -> None:
    p = Ridge.make(d=4, seed=2)
    solver = bl.inner.gradient_descent(Ridge.inner_loss, steps=50, lr=1 / p.lipschitz())
    lams = 0.5 + torch.rand(6, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    x0 = torch.zeros(4, dtype=F64)
    batched = torch.func.vmap(lambda lam: solver(x0, lam, p.X, p.y))(lams)
    for i in range(6):
        # the eager (autograd) and functional (torch.func.grad) paths compute the same iterates
        assert torch.allclose(batched[i], solver(x0, lams[i], p.X, p.y), rtol=1e-12, atol=1e-14)
    # x, lr as documented: exact GD iterates
    w = x0.clone()
    for _ in range(50):
        w = w - (1 / p.lipschitz()) * Ridge.gradient(w, lams[0], p.X, p.y)
    assert torch.allclose(batched[0], w, rtol=1e-12, atol=1e-14)


def test_gradient_descent_with_zero_steps_returns_x0() -> None:
    x0 = torch.arange(3.0, dtype=F64)
    out = bl.inner.gradient_descent(lambda x: (x**2).sum(), steps=0)(x0)
    assert torch.equal(out, x0)


def test_torch_optimizer_builds_fresh_state_every_call() -> None:
    p = Ridge.make(d=4, seed=3)
    solver = bl.inner.torch_optimizer(Ridge.inner_loss, torch.optim.Adam, steps=25, lr=0.05)
    x0 = torch.zeros(4, dtype=F64)
    assert torch.equal(solver(x0, *p.args()), solver(x0, *p.args()))


def test_lbfgs_reports_its_state_and_uses_dtype_aware_tolerance() -> None:
    p = Ridge.make(d=6, seed=4)
    solver = bl.inner.lbfgs(Ridge.inner_loss)
    assert solver.last_state is None
    x = solver(torch.zeros(6, dtype=F64), *p.args())
    assert 0 < solver.last_state["n_iter"] <= 500
    grad = Ridge.gradient(x, *p.args())
    assert float(grad.abs().max()) <= 1e-9


def test_scipy_minimize_bounds_result_and_failure_policy() -> None:
    p = Ridge.make(d=4, seed=5)
    solver = bl.inner.scipy_minimize(Ridge.inner_loss, bounds=[(0.0, 0.05)] * 4)
    x = solver(torch.zeros(4, dtype=F64), *p.args())
    assert torch.all((x >= 0) & (x <= 0.05))
    assert solver.last_result.success

    failing = bl.inner.scipy_minimize(
        Ridge.inner_loss, "BFGS", options={"maxiter": 1}, raise_on_failure=True
    )
    with pytest.raises(bl.ConvergenceError, match="BFGS") as excinfo:
        failing(torch.zeros(4, dtype=F64), *p.args())
    assert not excinfo.value.info.success
    silent = bl.inner.scipy_minimize(Ridge.inner_loss, "BFGS", options={"maxiter": 1})
    silent(torch.zeros(4, dtype=F64), *p.args())  # returns the last iterate
    assert not silent.last_result.success


def test_ready_solvers_under_custom_root_with_a_dict_of_parameters() -> None:
    p = Ridge.make(d=5, seed=6)
    F = bl.stationarity(_tree_loss)
    ref = p.closed_form()

    def outer(x, *args):
        return p.outer_loss(_as_vector(x))

    for name, inner in _solvers(p).items():
        if name == "torch_optimizer":
            continue  # SGD for a few hundred steps is not accurate enough for 1e-6
        solve = bl.custom_root(F, solver=bl.CG(tol=1e-12))(inner)
        _, grads = bl.implicit_grad(solve, outer, argnums=0)(_tree_x0(5), *p.args())
        assert rel_err(grads[0], ref) <= 1e-6, name


def test_argument_errors() -> None:
    with pytest.raises(TypeError, match="loss must be callable"):
        bl.inner.gradient_descent("loss")
    with pytest.raises(ValueError, match="steps"):
        bl.inner.gradient_descent(lambda x: x.sum(), steps=-1)
    with pytest.raises(TypeError, match="Optimizer subclass"):
        bl.inner.torch_optimizer(lambda x: x.sum(), "adam")
    with pytest.raises(TypeError, match="lbfgs"):
        bl.inner.torch_optimizer(lambda x: x.sum(), torch.optim.LBFGS)
    with pytest.raises(ValueError, match="max_iter"):
        bl.inner.lbfgs(lambda x: x.sum(), max_iter=1.5)
    with pytest.raises(TypeError, match="method"):
        bl.inner.scipy_minimize(lambda x: x.sum(), method=None)
    x0 = torch.zeros(3, dtype=F64)
    for solver in (
        bl.inner.gradient_descent(lambda x: x**2, steps=1),
        bl.inner.torch_optimizer(lambda x: x**2, steps=1),
        bl.inner.lbfgs(lambda x: x**2),
        bl.inner.scipy_minimize(lambda x: x**2),
    ):
        with pytest.raises(ValueError, match="scalar"):
            solver(x0)
        with pytest.raises(TypeError, match="floating-point"):
            solver(torch.zeros(3, dtype=torch.int64))


# --- torch.func transforms through custom_root (issue 11, item 8) ----------------------------


def _ridge_jacobian_by_hand(p: Ridge) -> torch.Tensor:
    """∂w*/∂λ for w*(λ) = (XᵀX + diag λ)⁻¹Xᵀy: differentiating (XᵀX + diag λ)w* = Xᵀy in λⱼ
    gives A ∂w*/∂λⱼ = −eⱼ w*ⱼ, so the Jacobian is −A⁻¹ diag(w*)."""
    A = p.X.T @ p.X + torch.diag(p.lam)
    w_star = torch.linalg.solve(A, p.X.T @ p.y)
    return -torch.linalg.solve(A, torch.diag(w_star))


@pytest.mark.parametrize("transform", ["jacfwd", "jacrev"])
@pytest.mark.parametrize("case", solvers("vmappable"))
def test_gradient_descent_under_jacfwd_and_jacrev_matches_the_closed_form(
    transform: str, case: SolverCase
) -> None:
    # jacfwd runs custom_root's forward inside a vmap level with plain inputs, where
    # torch.func forbids requires_grad_(): the eager-autograd path used to crash there.
    p = Ridge.make(d=4, seed=7)
    linear = case(maxiter=300 if "needs_contraction" in case.tags else 8)
    inner = bl.inner.gradient_descent(Ridge.inner_loss, steps=600, lr=1 / p.lipschitz())
    solve = bl.custom_root(bl.stationarity(Ridge.inner_loss), solver=linear)(inner)
    x0 = torch.zeros(4, dtype=F64)
    jacobian = getattr(torch.func, transform)(lambda lam: solve(x0, lam, p.X, p.y))(p.lam)
    assert rel_err(jacobian, _ridge_jacobian_by_hand(p)) <= 1e-9


def test_gradient_descent_runs_under_vmap_of_jacfwd() -> None:
    p = Ridge.make(d=3, seed=8)
    inner = bl.inner.gradient_descent(Ridge.inner_loss, steps=600, lr=1 / (p.lipschitz() + 1))
    solve = bl.custom_root(bl.stationarity(Ridge.inner_loss), solver=bl.Dense())(inner)
    x0 = torch.zeros(3, dtype=F64)
    lams = torch.stack([p.lam, p.lam + 1])
    jac = torch.func.vmap(torch.func.jacfwd(lambda lam: solve(x0, lam, p.X, p.y)))(lams)
    for i in range(2):
        q = Ridge(p.X, p.y, p.Xv, p.yv, lams[i])
        assert rel_err(jac[i], _ridge_jacobian_by_hand(q)) <= 1e-9


@pytest.mark.parametrize("name", ["torch_optimizer", "lbfgs", "scipy_minimize"])
@pytest.mark.parametrize("transform", ["jacfwd", "vmap"])
def test_solvers_that_need_autograd_refuse_transforms_clearly(name: str, transform: str) -> None:
    p = Ridge.make(d=4, seed=9)
    inner = {
        "torch_optimizer": bl.inner.torch_optimizer(Ridge.inner_loss, torch.optim.SGD, steps=5),
        "lbfgs": bl.inner.lbfgs(Ridge.inner_loss, max_iter=5),
        "scipy_minimize": bl.inner.scipy_minimize(Ridge.inner_loss, options={"maxiter": 5}),
    }[name]
    solve = bl.custom_root(bl.stationarity(Ridge.inner_loss), solver=bl.Dense())(inner)
    x0 = torch.zeros(4, dtype=F64)
    if transform == "jacfwd":
        run = torch.func.jacfwd(lambda lam: solve(x0, lam, p.X, p.y))
        lam = p.lam
    else:
        run = torch.func.vmap(lambda lam: solve(x0, lam, p.X, p.y))
        lam = torch.stack([p.lam, p.lam])
    with pytest.raises(RuntimeError, match=rf"bl\.inner\.{name} cannot run inside a torch\.func"):
        run(lam)
    # the message names the alternatives: the transform-safe solver and reverse mode
    with pytest.raises(RuntimeError, match=r"Use bl\.inner\.gradient_descent.*jacrev"):
        run(lam)


@pytest.mark.parametrize("name", ["torch_optimizer", "lbfgs", "scipy_minimize"])
def test_solvers_that_need_autograd_still_work_under_jacrev(name: str) -> None:
    # reverse mode runs custom_root's forward outside the transform: no refusal there
    p = Ridge.make(d=4, seed=10)
    solver = _solvers(p)[name]
    solve = bl.custom_root(bl.stationarity(_tree_loss), solver=bl.Dense())(solver)
    jac = torch.func.jacrev(lambda lam: _as_vector(solve(_tree_x0(4), lam, p.X, p.y)))(p.lam)
    tol = 1e-3 if name == "torch_optimizer" else 1e-6  # SGD for 400 steps is approximate
    assert rel_err(jac, _ridge_jacobian_by_hand(p)) <= tol


@pytest.mark.parametrize("lr", [0.0, -0.1, float("inf"), float("nan")])
def test_gradient_descent_rejects_a_non_positive_or_non_finite_lr(lr: float) -> None:
    with pytest.raises(ValueError, match="lr must be finite and > 0"):
        bl.inner.gradient_descent(lambda x: (x**2).sum(), lr=lr)


def test_gradient_descent_rejects_a_non_numeric_lr() -> None:
    with pytest.raises(TypeError, match="lr must be a positive number or a 0-d tensor"):
        bl.inner.gradient_descent(lambda x: (x**2).sum(), lr="0.1")
