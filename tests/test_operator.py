"""bl.LinearOperator: the structure a caller declares is read, and a wrong promise is caught.

References are dense solves (``torch.linalg.solve``) and closed forms, never the code under
test. The implicit layer's symmetry probe is checked on a fixed point whose Jacobian is built
to be non-symmetric, where CG would otherwise return a plausible but wrong gradient.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import bilevel as bl

F64 = torch.float64


def _matrices() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=F64))
    spd = q @ torch.diag(torch.linspace(1.0, 5.0, 6, dtype=F64)) @ q.T
    indefinite = q @ torch.diag(torch.tensor([3.0, 2.0, 1.0, -1.0, -2.0, 4.0], dtype=F64)) @ q.T
    return spd, indefinite, torch.randn(6, generator=g, dtype=F64)


def test_a_symmetric_operator_is_its_own_transpose_for_normal_cg() -> None:
    # A matvec through NumPy is opaque to torch.func: NormalCG cannot derive Aᵀ from it.
    spd, _, b = _matrices()
    a_np = spd.numpy()

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(a_np @ v.detach().numpy())

    with pytest.raises(TypeError, match="rmatvec"):
        bl.NormalCG(tol=1e-12, maxiter=200)(matvec, b)
    x, info = bl.NormalCG(tol=1e-12, maxiter=200)(bl.LinearOperator(matvec, symmetric=True), b)
    assert info.converged and info.stats["rmatvecs"] > 0
    torch.testing.assert_close(x, torch.linalg.solve(spd, b), rtol=1e-8, atol=1e-10)


def test_dense_reads_the_semidefinite_tag() -> None:
    # A false promise makes Cholesky fail, which proves the tag reached Dense: LU, without
    # the tag, solves the same indefinite system.
    _, indefinite, b = _matrices()
    x, info = bl.Dense()(lambda v: indefinite @ v, b)
    assert info.reason == "converged"
    torch.testing.assert_close(x, torch.linalg.solve(indefinite, b))
    lying = bl.LinearOperator(lambda v: indefinite @ v, symmetric=True, positive_semidefinite=True)
    _, info = bl.Dense()(lying, b)
    assert info.reason == "breakdown" and info.failed


def test_operator_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match="matvec must be callable"):
        bl.LinearOperator(3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs symmetric=True"):
        bl.LinearOperator(lambda v: v, positive_semidefinite=True)
    with pytest.raises(ValueError, match="Aᵀ is unknown"):
        bl.LinearOperator(lambda v: v).transpose()
    with pytest.raises(ValueError, match="rmatvec was given twice"):
        op = bl.LinearOperator(lambda v: v, lambda u: u)
        bl.GMRES()(op, torch.ones(3, dtype=F64), rmatvec=lambda u: u)


def test_transpose() -> None:
    a = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=F64)
    v = torch.tensor([1.0, -1.0], dtype=F64)
    op = bl.LinearOperator(lambda x: a @ x, lambda u: a.T @ u)
    torch.testing.assert_close(op.transpose()(v), a.T @ v)
    torch.testing.assert_close(op.transpose().transpose()(v), a @ v)
    symmetric = bl.LinearOperator(lambda x: x * 2.0, symmetric=True)
    assert symmetric.transpose() is symmetric


# -- the implicit layer's symmetry probe ------------------------------------------------------

M = torch.tensor([[0.2, 0.6, 0.0], [0.0, 0.3, 0.5], [0.1, 0.0, 0.2]], dtype=F64)  # ρ(M) < 1


def _fixed_point(solver: bl.LinearSolver, on_failure: str = "warn"):
    def mapping(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return M @ x + theta  # ∂F/∂x = M − I: not symmetric

    @bl.custom_fixed_point(mapping, solver=solver, on_failure=on_failure)
    def solve(x0: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(torch.eye(3, dtype=F64) - M, theta)

    return solve


def _gradient(solve, theta: torch.Tensor) -> torch.Tensor:
    theta = theta.clone().requires_grad_(True)
    (solve(torch.zeros(3, dtype=F64), theta) @ torch.arange(1.0, 4.0, dtype=F64)).backward()
    assert theta.grad is not None
    return theta.grad


# d(cᵀx*)/dθ for x* = (I − M)⁻¹θ is (I − M)⁻ᵀc.
EXACT = torch.linalg.solve((torch.eye(3, dtype=F64) - M).T, torch.arange(1.0, 4.0, dtype=F64))
THETA = torch.tensor([1.0, -2.0, 0.5], dtype=F64)


@pytest.mark.parametrize("solver", [bl.CG(tol=1e-10), bl.MINRES(tol=1e-10)], ids=["cg", "minres"])
def test_a_symmetric_solver_on_a_non_symmetric_jacobian_is_reported(
    solver: bl.LinearSolver,
) -> None:
    solve = _fixed_point(solver)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrong = _gradient(solve, THETA)
    messages = [str(w.message) for w in caught if issubclass(w.category, bl.ConvergenceWarning)]
    assert any("assumes a symmetric" in m and "bl.GMRES" in m for m in messages), messages
    # What the warning protects against: the gradient really is wrong.
    assert not torch.allclose(wrong, EXACT, rtol=1e-3)
    # Once per implicit function.
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        _gradient(solve, THETA)
    assert not [w for w in again if "assumes a symmetric" in str(w.message)]


def test_the_probe_raises_when_asked() -> None:
    with pytest.raises(bl.ConvergenceError, match="assumes a symmetric"):
        _gradient(_fixed_point(bl.CG(tol=1e-10), on_failure="raise"), THETA)


def test_the_probe_runs_under_torch_func_grad() -> None:
    solve = _fixed_point(bl.CG(tol=1e-10), on_failure="raise")
    weights = torch.arange(1.0, 4.0, dtype=F64)
    with pytest.raises(bl.ConvergenceError, match="assumes a symmetric"):
        torch.func.grad(lambda t: solve(torch.zeros(3, dtype=F64), t) @ weights)(THETA)


def test_no_probe_warning_for_gmres_or_a_symmetric_jacobian() -> None:
    # GMRES assumes nothing: silent and exact.
    torch.testing.assert_close(_gradient(_fixed_point(bl.GMRES(tol=1e-12)), THETA), EXACT)

    # A gradient-descent map has a symmetric Jacobian I − ηH, so ∂F/∂x = −ηH is symmetric
    # (negative definite: MINRES, not CG): right, and not warned.
    h = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.5]], dtype=F64)

    def step(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return x - 0.3 * (h @ x - theta)

    @bl.custom_fixed_point(step, solver=bl.MINRES(tol=1e-12))
    def solve(x0: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(h, theta)

    exact = torch.linalg.solve(h, torch.arange(1.0, 4.0, dtype=F64))
    torch.testing.assert_close(_gradient(solve, THETA), exact)  # ConvergenceWarning is an error


def test_an_operator_through_the_scipy_bridge() -> None:
    # The bridge reads the operator (and its transpose) like every solver.
    spd, _, b = _matrices()
    a_np = spd.numpy()
    op = bl.LinearOperator(lambda v: torch.from_numpy(a_np @ v.numpy()), symmetric=True)
    x, info = bl.SciPy("minres", tol=1e-12)(op, b)
    assert info.converged
    np.testing.assert_allclose(x.numpy(), np.linalg.solve(a_np, b.numpy()), rtol=1e-8)


class _OldStyleScale(torch.autograd.Function):
    """An autograd.Function without setup_context: plain autograd only, opaque to torch.func."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return 3.0 * x

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return 3.0 * g


def test_the_probe_skips_an_optimality_condition_torch_func_cannot_linearise() -> None:
    # F(x, θ) = 3x − θ through an old-style autograd.Function: the backward works with plain
    # autograd, the probe's JVP cannot be built, and the gradient must still come out right.
    def optimality(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return _OldStyleScale.apply(x) - theta

    @bl.custom_root(optimality, solver=bl.CG(tol=1e-12))
    def solve(x0: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return theta / 3.0

    theta = THETA.clone().requires_grad_(True)
    solve(torch.zeros(3, dtype=F64), theta).sum().backward()  # no ConvergenceWarning (an error)
    assert theta.grad is not None
    torch.testing.assert_close(theta.grad, torch.full((3,), 1.0 / 3.0, dtype=F64))
