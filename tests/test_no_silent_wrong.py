"""Every gradient bilevel returns is right, or it says loudly why not (issue 11).

Each test is a case that used to return a wrong number with no signal. References come from
closed forms and dense solves written here, never from the code under test.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from _references import Ridge, rel_err
from _solvers import SolverCase, solvers
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import bilevel as bl

F64 = torch.float64


# -- 1. NormalCG through every autograd entry point ------------------------------------------


def _fixed_point_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x = tanh(W x + θ)``-free linear DEQ: ``x = M x + θ`` with a non-symmetric contraction."""
    g = torch.Generator().manual_seed(seed)
    m = 0.4 * torch.randn(5, 5, generator=g, dtype=F64) / 5**0.5
    theta = torch.randn(5, generator=g, dtype=F64)
    c = torch.randn(5, generator=g, dtype=F64)
    return m, theta, c


def _deq(solver: bl.LinearSolver, m: torch.Tensor) -> bl.ImplicitFunction:
    @bl.custom_fixed_point(lambda x, theta: m @ x + theta, solver=solver)
    def solve(x0: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        x = x0
        for _ in range(200):
            x = m @ x + theta
        return x

    return solve


@pytest.mark.parametrize("case", solvers("uses_rmatvec"))
@pytest.mark.parametrize("entry", ["backward", "autograd.grad", "func.grad", "vmap"])
def test_normal_cg_hypergradient_is_right_through_every_entry_point(
    case: SolverCase, entry: str
) -> None:
    """Every solver that applies Aᵀ (NormalCG) gets it right through every entry point."""
    m, theta, c = _fixed_point_problem()
    # x* = (I − M)⁻¹θ, so d(cᵀx*)/dθ = (I − M)⁻ᵀc: a dense solve written here.
    reference = torch.linalg.solve((torch.eye(5, dtype=F64) - m).T, c)
    solver = case(tol=1e-12, maxiter=40 if "fixed_k" in case.tags else 200)
    if entry == "vmap" and "vmappable" not in case.tags:
        pytest.skip("adaptive solvers refuse vmap by design (tested elsewhere)")
    solve = _deq(solver, m)
    x0 = torch.zeros(5, dtype=F64)

    def outer(t: torch.Tensor) -> torch.Tensor:
        return c @ solve(x0, t)

    if entry == "backward":
        t = theta.clone().requires_grad_(True)
        outer(t).backward()
        grad = t.grad
    elif entry == "autograd.grad":
        t = theta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(outer(t), t)
    elif entry == "func.grad":
        grad = torch.func.grad(outer)(theta)
    else:
        grad = torch.func.vmap(torch.func.grad(outer))(torch.stack([theta, theta]))[1]
    assert rel_err(grad, reference) <= 1e-8
    if entry in ("backward", "autograd.grad"):
        info = solve.latest_info
        assert info is not None and int(info.iterations) > 0 and not info.failed


def test_normal_cg_refuses_a_matvec_it_cannot_transpose() -> None:
    # A matvec built on torch.autograd.grad of an outside graph is invisible to torch.func:
    # its derived transpose would be zero. The adjoint test catches it.
    a = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=F64)
    w = torch.zeros(2, dtype=F64, requires_grad=True)
    out = a @ w

    def matvec(v: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(out, w, v, retain_graph=True)
        return g  # Aᵀv, computed by plain autograd

    with pytest.raises(TypeError, match="rmatvec="):
        bl.NormalCG(tol=1e-10)(matvec, torch.ones(2, dtype=F64))
    _, info = bl.NormalCG(tol=0, maxiter=4)(matvec, torch.ones(2, dtype=F64))
    assert info.failed and info.outcome == "breakdown"


# -- 2. fixed-K solves never return a residual above ‖b‖ -------------------------------------


def test_fixed_k_cg_on_the_reported_indefinite_diagonal() -> None:
    a = torch.diag(torch.tensor([3.0, 1.0, -2.0, 0.5], dtype=F64))
    b = torch.ones(4, dtype=F64)
    x_star = torch.linalg.solve(a, b)
    for k in (2, 20, 60):
        x, info = bl.CG(tol=0, maxiter=k)(lambda v: a @ v, b)
        assert float(torch.linalg.vector_norm(b - a @ x)) <= float(b.norm()) * (1 + 1e-12)
        assert float(info.residual_norm) <= float(b.norm()) * (1 + 1e-12)
        if k >= 4:  # 4 distinct eigenvalues: the Krylov space holds x*
            assert rel_err(x, x_star) <= 1e-10, k


def test_fixed_k_cg_that_makes_no_progress_on_an_indefinite_system_is_a_breakdown() -> None:
    # diag(1, −3), b = (1, 1): the first step has curvature −2 and doubles the residual, so
    # one step cannot beat x₀ = 0. Returning 0 silently would be a zero hypergradient.
    a = torch.diag(torch.tensor([1.0, -3.0], dtype=F64))
    b = torch.ones(2, dtype=F64)
    x, info = bl.CG(tol=0, maxiter=1)(lambda v: a @ v, b)
    assert torch.equal(x, torch.zeros(2, dtype=F64))
    assert info.failed and info.outcome == "breakdown" and int(info.stats["breakdowns"]) == 1
    # Two steps span the Krylov space of two eigenvalues: exact, and not a failure.
    x, info = bl.CG(tol=0, maxiter=2)(lambda v: a @ v, b)
    assert rel_err(x, torch.linalg.solve(a, b)) <= 1e-12 and not info.failed

    # Through custom_root: F = a x − θ has the root x* = a⁻¹θ, ∂(sum x*)/∂θ = a⁻ᵀ1.
    @bl.custom_root(lambda x, theta: a @ x - theta, solver=bl.CG(tol=0, maxiter=1))
    def solve(x0: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(a, theta)

    theta = torch.ones(2, dtype=F64, requires_grad=True)
    with pytest.warns(bl.ConvergenceWarning, match="negative curvature in 1 of 1"):
        solve(torch.zeros(2, dtype=F64), theta).sum().backward()
    with pytest.warns(bl.ConvergenceWarning, match="negative curvature in 1 of 1"):
        torch.func.grad(lambda t: solve(torch.zeros(2, dtype=F64), t).sum())(theta.detach())

    # Under vmap nothing is read on the host: the verdict comes back per element. b = (1, 1)
    # stalls; b = (1, 0) lies in an eigenspace, one step is exact.
    def one(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, info = bl.CG(tol=0, maxiter=1)(lambda v: a @ v, b)
        return x, info.stats["breakdowns"]

    xs, breakdowns = torch.vmap(one)(torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=F64))
    assert breakdowns.tolist() == [1, 0]
    torch.testing.assert_close(xs, torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=F64))


def test_fixed_k_cg_ending_on_a_tiny_positive_pivot_of_an_indefinite_system_says_so() -> None:
    # diag(1, −1), b = (1, 1 − 10⁻⁶): the first curvature bᵀAb ≈ 2·10⁻⁶ is positive, so one
    # CG step looks like an SPD step, and lands on x ≈ 10⁶·b (residual ≈ 10⁶‖b‖). The system
    # is indefinite, so that is no A-norm approximation of x* = (1, −1 + 10⁻⁶): it used to be
    # returned with converged=True and no warning, a hypergradient off by a factor 10⁶.
    a = torch.diag(torch.tensor([1.0, -1.0], dtype=F64))
    b = torch.tensor([1.0, 1.0 - 1e-6], dtype=F64)
    x, info = bl.CG(tol=0, maxiter=1)(lambda v: a @ v, b)
    assert float(torch.linalg.vector_norm(b - a @ x)) <= float(b.norm()) * (1 + 1e-12)
    assert info.failed and info.outcome == "breakdown"
    assert bool(info.stats["negative_curvature_after"])
    # Two steps span the Krylov space: x* = a⁻¹b up to the rounding of the 10⁶ step, and
    # not a failure.
    x, info = bl.CG(tol=0, maxiter=2)(lambda v: a @ v, b)
    assert rel_err(x, torch.linalg.solve(a, b)) <= 1e-3 and not info.failed

    # Through custom_root on the saddle ½xᵀax − θᵀx: the gradient of cᵀx* = cᵀa⁻¹θ is a⁻ᵀc.
    def saddle(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return 0.5 * x @ (a @ x) - theta @ x

    @bl.custom_root(bl.stationarity(saddle), solver=bl.CG(tol=0, maxiter=1))
    def solve(x0: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(a, theta)

    theta = b.clone().requires_grad_(True)
    with pytest.warns(bl.ConvergenceWarning, match="search direction after them"):
        (b @ solve(torch.zeros(2, dtype=F64), theta)).backward()
    assert float(theta.grad.abs().max()) <= 1.0  # not 10⁶: the breakdown returned x₀

    # An SPD system whose one CG step overshoots in residual (‖r₁‖ ≈ 9.9 > ‖b‖ ≈ 1.0) keeps
    # that step: its A-norm error is below x₀'s, and the probe finds positive curvature.
    spd = torch.diag(torch.tensor([100.0, 0.01], dtype=F64))
    c = torch.tensor([0.1, 1.0], dtype=F64)
    x, info = bl.CG(tol=0, maxiter=1)(lambda v: spd @ v, c)
    torch.testing.assert_close(x, c * (c @ c) / (c @ spd @ c))  # the first CG iterate
    assert float(torch.linalg.vector_norm(c - spd @ x)) > 9 * float(c.norm())
    assert not info.failed and not bool(info.stats["negative_curvature_after"])


def _indefinite(n: int, negatives: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An iMAML-like ``H + λI``: Q diag(e) Qᵀ with a few eigenvalues in [−3, −0.5]."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    e = torch.cat(
        [
            -0.5 - 2.5 * torch.rand(negatives, generator=g, dtype=F64),
            0.5 + 9.5 * torch.rand(n - negatives, generator=g, dtype=F64),
        ]
    )
    return (q * e) @ q.T, torch.randn(n, generator=g, dtype=F64)


def test_fixed_k_cg_converges_on_an_imaml_like_indefinite_matrix() -> None:
    # The skip-and-restart guard this replaces reached an error of 1e10 at K = 100 here.
    a, b = _indefinite(200, 6, seed=0)
    x_star = torch.linalg.solve(a, b)
    errors = {}
    for k in (5, 20, 100):
        x, info = bl.CG(tol=0, maxiter=k)(lambda v: a @ v, b)
        errors[k] = rel_err(x, x_star)
        assert float(torch.linalg.vector_norm(b - a @ x)) <= float(b.norm())
        assert bool(info.converged) and int(info.stats["negative_curvature"]) >= 1
    assert errors[100] <= 1e-10 and errors[20] < errors[5] < 1.0, errors


def _fixed_k_variants(case: SolverCase, n: int) -> list[bl.LinearSolver]:
    """The row at a full and a short budget; Neumann (3n steps) estimates α or takes α = 1."""
    if "needs_contraction" in case.tags:
        return [case(maxiter=3 * n), case(maxiter=3 * n, alpha=1.0)]
    variants = [case(maxiter=n, restart=max(1, n // 2)), case(maxiter=max(1, n // 3))]
    return list({repr(s): s for s in variants}.values())


@pytest.mark.parametrize("case", solvers("vmappable"))
@given(
    n=st.integers(2, 24),
    negatives=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_fixed_k_residual_never_exceeds_b_on_symmetric_indefinite_systems(
    case: SolverCase, n: int, negatives: int, seed: int, scale: float
) -> None:
    a, b = _indefinite(n, min(negatives, n - 1), seed)
    a = scale * a
    b_norm = float(b.norm())
    for solver in _fixed_k_variants(case, n):
        name = repr(solver)
        x, info = solver(lambda v: a @ v, b, rmatvec=lambda v: a.T @ v)
        true_residual = float(torch.linalg.vector_norm(b - a @ x))
        assert torch.isfinite(x).all(), name
        if int(info.stats.get("negative_curvature", 1)) == 0:
            # Every curvature CG met was positive: it cannot tell A from an SPD matrix and
            # keeps CG's A-norm semantics (its residual may exceed ‖b‖ there); it stays finite.
            continue
        assert float(info.residual_norm) <= b_norm * (1 + 1e-10), name
        assert true_residual <= b_norm * (1 + 1e-6), (name, true_residual, b_norm)


@pytest.mark.parametrize("seed", range(8))
def test_normal_cg_fixed_k_residual_is_bounded_even_with_a_wrong_transpose(seed: int) -> None:
    # A wrong rmatvec makes CG run on a non-symmetric "normal" operator: its iterates can
    # have a true residual far above ‖b‖, which the shared guard must turn into x = 0.
    g = torch.Generator().manual_seed(seed)
    a, wrong, b = (torch.randn(*shape, generator=g, dtype=F64) for shape in ((6, 6), (6, 6), (6,)))
    x, info = bl.NormalCG(tol=0, maxiter=6)(lambda v: a @ v, b, rmatvec=lambda v: wrong @ v)
    true_residual = float(torch.linalg.vector_norm(b - a @ x))
    assert true_residual <= float(b.norm()) * (1 + 1e-10)
    assert float(info.residual_norm) <= float(b.norm()) * (1 + 1e-10)


# -- 3. a NaN cotangent gives NaN, and says where it came from -------------------------------


# SciPy refuses torch.func.grad and detaches its result: no gradient to carry the NaN.
@pytest.mark.parametrize("case", solvers(exclude=("host",)))
@pytest.mark.parametrize("entry", ["backward", "func.grad"])
def test_nan_cotangent_gives_nan_gradient_and_a_nonfinite_reason(
    case: SolverCase, entry: str
) -> None:
    solver = case(tol=1e-10, maxiter=10 if "fixed_k" in case.tags else 100)
    p = Ridge.make(d=4, seed=3)
    solve = bl.custom_root(bl.stationarity(Ridge.inner_loss), solver=solver)(p.closed_form_inner)
    x0 = torch.zeros(4, dtype=F64)

    def outer(lam: torch.Tensor) -> torch.Tensor:
        w = solve(x0, lam, p.X, p.y)
        return torch.sqrt(w - w.max() - 1.0).sum()  # √ of a negative number: NaN cotangent

    with pytest.warns(bl.ConvergenceWarning, match="cotangent reaching x\\* holds NaN") as record:
        if entry == "backward":
            lam = p.lam.clone().requires_grad_(True)
            outer(lam).backward()
            grad = lam.grad
        else:
            grad = torch.func.grad(outer)(p.lam)
    assert torch.isnan(grad).all()
    assert record[0].filename == __file__  # attributed to this line, not to torch internals
    if entry == "backward":
        assert solve.latest_info.reason in ("nonfinite", "fixed_iterations")
        assert solve.latest_info.outcome == "nonfinite_input"


# -- 4. Neumann's step size --------------------------------------------------------------------


def _stiff_ridge() -> Ridge:
    p = Ridge.make(d=6, seed=5)
    return Ridge(3.0 * p.X, 3.0 * p.y, p.Xv, p.yv, p.lam)  # λ_max(XᵀX + diag λ) > 2


def test_neumann_default_step_size_is_safe_on_a_stiff_hessian() -> None:
    p = _stiff_ridge()
    assert p.lipschitz() > 2.0  # α = 1 would diverge here
    solve = bl.custom_root(bl.stationarity(Ridge.inner_loss), solver=bl.Neumann(steps=400))(
        p.closed_form_inner
    )
    lam = p.lam.clone().requires_grad_(True)
    p.outer_loss(solve(torch.zeros(6, dtype=F64), lam, p.X, p.y)).backward()
    assert rel_err(lam.grad, p.closed_form()) <= 1e-6
    assert 0 < float(solve.latest_info.stats["alpha"]) < 2 / p.lipschitz()


@pytest.mark.parametrize("share", [1e-6, 1e-9, 0.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_neumann_default_step_size_sees_an_eigenvalue_b_barely_excites(
    share: float, dtype: torch.dtype
) -> None:
    """λ_max = 1000 with ``b`` almost (or, up to rounding, exactly) orthogonal to its
    eigenvector: a power method started from ``b`` alone finds λ ≈ 400, the step α = 1/400
    makes ``|1 − αλ_max| = 1.5``, and the rounding-level component grows until the series
    diverges. The default step must see λ_max and converge."""
    n = 40
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(3)))
    eig = torch.cat(
        [
            torch.tensor([1000.0, 400.0, 300.0], dtype=F64),
            torch.linspace(100, 200, n - 3, dtype=F64),
        ]
    )
    a = q @ torch.diag(eig) @ q.T
    coeffs = torch.randn(n - 1, dtype=F64, generator=torch.Generator().manual_seed(4))
    b = q[:, 1:] @ coeffs + share * q[:, 0]
    reference = torch.linalg.solve(a, b)  # dense, float64
    a32, b32 = a.to(dtype), b.to(dtype)
    x, info = bl.Neumann(steps=300)(lambda v: a32 @ v, b32)
    alpha = float(info.stats["alpha"])
    assert 0 < alpha * 1000.0 < 2.0
    assert bool(info.converged)
    assert rel_err(x.to(F64), reference) <= (1e-8 if dtype == F64 else 1e-4)


def test_neumann_with_a_divergent_alpha_says_so() -> None:
    p = _stiff_ridge()
    solve = bl.custom_root(
        bl.stationarity(Ridge.inner_loss), solver=bl.Neumann(steps=200, alpha=1.0)
    )(p.closed_form_inner)
    lam = p.lam.clone().requires_grad_(True)
    with pytest.warns(bl.ConvergenceWarning, match="diverged"):
        p.outer_loss(solve(torch.zeros(6, dtype=F64), lam, p.X, p.y)).backward()
    assert torch.isfinite(lam.grad).all()  # bounded: the implicit term is dropped, not 1e48
    assert bool(solve.latest_info.stats["diverged"]) and solve.latest_info.failed
    with pytest.raises(bl.ConvergenceError, match="diverged"):
        bl.custom_root(
            bl.stationarity(Ridge.inner_loss),
            solver=bl.Neumann(steps=200, alpha=1.0),
            on_failure="raise",
        )(p.closed_form_inner)(torch.zeros(6, dtype=F64), lam, p.X, p.y).sum().backward()


# -- 5. Dense on a numerically singular matrix ------------------------------------------------


@pytest.mark.parametrize("positive_definite", [False, True])
def test_dense_reports_a_numerically_singular_matrix(positive_definite: bool) -> None:
    u = torch.tensor([1.0, 2.0, 2.0], dtype=F64) / 3
    a = torch.outer(u, u) + 1e-17 * torch.eye(3, dtype=F64)  # rank one up to rounding
    x, info = bl.Dense(positive_definite=positive_definite)(
        lambda v: a @ v, torch.ones(3, dtype=F64)
    )
    assert info.reason == "breakdown" and info.failed and info.stats["rcond"] < 1e-14
    assert torch.equal(x, torch.zeros(3, dtype=F64))

    # batched: the same verdict without a host sync
    def batched(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, info = bl.Dense(positive_definite=positive_definite)(lambda v: a @ v, b)
        return info.converged, info.stats["breakdowns"]

    converged, breakdowns = torch.func.vmap(batched)(torch.ones(2, 3, dtype=F64))
    assert not converged.any() and (breakdowns == 1).all()
    _, info = bl.Dense()(lambda v: (a + torch.eye(3, dtype=F64)) @ v, torch.ones(3, dtype=F64))
    assert info.reason == "converged"


def test_dense_breakdown_reaches_the_user_through_custom_root() -> None:
    def inner_loss(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return 0.5 * (x[0] + x[1]) ** 2 - theta @ x  # singular Hessian [[1, 1], [1, 1]]

    solve = bl.custom_root(bl.stationarity(inner_loss), solver=bl.Dense())(
        lambda x0, theta: torch.zeros(2, dtype=F64)
    )
    theta = torch.ones(2, dtype=F64, requires_grad=True)
    with pytest.warns(bl.ConvergenceWarning, match="breakdown"):
        solve(torch.zeros(2, dtype=F64), theta).sum().backward()


# -- 6. an inner solver that did not reach the root --------------------------------------------


def test_root_tol_catches_an_inner_solver_that_stopped_early() -> None:
    p = Ridge.make(d=4, seed=6)
    F = bl.stationarity(Ridge.inner_loss)
    stalled = bl.inner.gradient_descent(Ridge.inner_loss, steps=3, lr=0.1)
    x0 = torch.zeros(4, dtype=F64)
    with pytest.warns(
        bl.ConvergenceWarning, match=r"not a root of optimality_fn: ‖F\(x\*, args\)‖"
    ):
        bl.custom_root(F, root_tol=1e-6)(stalled)(x0, *p.args())
    with pytest.raises(bl.ConvergenceError, match="root_tol"):
        bl.custom_root(F, root_tol=1e-6, on_failure="raise")(stalled)(x0, *p.args())
    converged = bl.inner.gradient_descent(Ridge.inner_loss, steps=3000, lr=1 / p.lipschitz())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bl.custom_root(F, root_tol=1e-6)(converged)(x0, *p.args())


def test_a_nan_inner_solution_is_reported_before_any_gradient() -> None:
    p = Ridge.make(d=3, seed=7)
    solve = bl.custom_root(bl.stationarity(Ridge.inner_loss), on_failure="raise")(
        lambda x0, *args: torch.full((3,), math.nan, dtype=F64)
    )
    with pytest.raises(bl.ConvergenceError, match="non-finite inner solution"):
        solve(torch.zeros(3, dtype=F64), *p.args())


@pytest.mark.parametrize(
    ("value", "error"), [(-1.0, ValueError), (math.inf, ValueError), ("1", TypeError)]
)
def test_root_tol_is_validated(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="root_tol"):
        bl.custom_root(bl.stationarity(Ridge.inner_loss), root_tol=value)(lambda x0, *a: x0)  # type: ignore[arg-type]


# -- 7. BatchNorm with running statistics -------------------------------------------------------


def _batchnorm_problem(track: bool) -> tuple[Callable, dict, nn.Module]:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=track), nn.Tanh(), nn.Linear(4, 1)
    ).double()
    X, y = torch.randn(16, 3, dtype=F64), torch.randn(16, 1, dtype=F64)

    def inner_loss(p: dict, theta: dict) -> torch.Tensor:
        out = torch.func.functional_call(net, p, (X,))
        return ((out - y) ** 2).mean() + sum(((p[k] - theta[k]) ** 2).sum() for k in p)

    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    return inner_loss, params, net


def _batchnorm_hypergradient(track: bool) -> tuple[dict, nn.Module]:
    inner_loss, params, net = _batchnorm_problem(track)
    solve = bl.custom_root(bl.stationarity(inner_loss), solver=bl.CG(tol=1e-12, maxiter=500))(
        bl.inner.gradient_descent(inner_loss, steps=400, lr=0.05)
    )
    theta = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    x_star = solve(params, theta)
    sum((v**2).sum() for v in x_star.values()).backward()
    return {k: v.grad for k, v in theta.items()}, net


def test_batchnorm_with_running_statistics_gives_the_batch_statistics_gradient() -> None:
    # Train-mode BatchNorm normalises with batch statistics either way; the running averages
    # are a side effect. So the gradient must equal the one without running statistics.
    with_stats, net = _batchnorm_hypergradient(track=True)
    without, _ = _batchnorm_hypergradient(track=False)
    for k in with_stats:
        assert rel_err(with_stats[k], without[k]) <= 1e-8, k
    assert int(net[1].num_batches_tracked) > 0  # the buffers were updated, as in a forward pass


def test_batchnorm_running_statistics_under_torch_func_names_the_fix() -> None:
    inner_loss, params, _ = _batchnorm_problem(track=True)
    solve = bl.custom_root(bl.stationarity(inner_loss), solver=bl.CG(tol=1e-8))(
        lambda p0, theta: {k: v.detach() for k, v in p0.items()}
    )

    def outer(theta: dict) -> torch.Tensor:
        return sum((v**2).sum() for v in solve(params, theta).values())

    with pytest.raises(RuntimeError, match="track_running_stats=False"):
        torch.func.grad(outer)(params)


# -- 9. smaller messages -------------------------------------------------------------------------


def test_forgetting_has_aux_names_it() -> None:
    p = Ridge.make(d=3, seed=8)
    solve = bl.custom_root(bl.stationarity(Ridge.inner_loss))(
        lambda x0, *args: (p.closed_form_inner(x0, *args), 7)
    )
    with pytest.raises(TypeError, match="has_aux=True"):
        solve(torch.zeros(3, dtype=F64), *p.args())


@pytest.mark.parametrize("argnums", ["0", 0.0, [0, "1"], True])
def test_argnums_of_the_wrong_type_is_a_type_error(argnums: object) -> None:
    with pytest.raises(TypeError, match="argnums must be an int or a sequence of ints"):
        bl.root_vjp(
            bl.stationarity(Ridge.inner_loss),
            torch.zeros(3, dtype=F64),
            Ridge.make(d=3).args(),
            torch.ones(3, dtype=F64),
            argnums=argnums,  # type: ignore[arg-type]
        )


def test_convergence_warning_points_at_the_users_line() -> None:
    p = Ridge.make(d=8, seed=13)
    solve = bl.custom_root(bl.stationarity(Ridge.inner_loss), solver=bl.CG(tol=1e-14, maxiter=1))(
        p.closed_form_inner
    )
    lam = p.lam.clone().requires_grad_(True)
    with pytest.warns(bl.ConvergenceWarning) as record:
        p.outer_loss(solve(torch.zeros(8, dtype=F64), lam, p.X, p.y)).backward()
    assert record[0].filename == __file__
