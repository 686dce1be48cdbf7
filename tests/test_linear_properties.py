"""Hypothesis properties and edge cases of the linear solvers.

Random matrices are drawn from a seed and a size chosen by hypothesis; references come from
``torch.linalg.solve``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import vmap

import bilevel as bl

F64 = torch.float64
sizes = st.integers(min_value=1, max_value=12)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def random_spd(n: int, condition: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    eigenvalues = torch.logspace(0.0, math.log10(condition), n, dtype=F64)
    return (q * eigenvalues) @ q.T


def random_nonsymmetric(n: int, seed: int) -> torch.Tensor:
    """``I + 0.9 K/‖K‖``: singular values in [0.1, 1.9], positive-definite symmetric part."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, n, generator=g, dtype=F64)
    return torch.eye(n, dtype=F64) + 0.9 * k / torch.linalg.matrix_norm(k, ord=2)


def random_vector(n: int, seed: int, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(*shape, n, generator=g, dtype=F64)


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x - reference) / torch.linalg.vector_norm(reference))


class Counted:
    """A matvec that counts its calls."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix, self.calls = matrix, 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.matrix @ v


# -- convergence on random systems ----------------------------------------------------------

SPD_SOLVERS = {
    "cg": lambda n: bl.CG(tol=1e-12, maxiter=20 * n + 50),
    "scipy_minres": lambda n: bl.SciPy("minres", tol=1e-13, maxiter=20 * n + 50),
    "dense_lu": lambda n: bl.Dense(),
    "dense_cholesky": lambda n: bl.Dense(positive_definite=True),
}


@pytest.mark.parametrize("name", list(SPD_SOLVERS))
@given(n=sizes, log_condition=st.floats(0.0, 4.0), seed=seeds)
def test_random_spd(name: str, n: int, log_condition: float, seed: int) -> None:
    a, b = random_spd(n, 10**log_condition, seed), random_vector(n, seed)
    x, info = SPD_SOLVERS[name](n)(lambda v: a @ v, b)
    assert info.converged, info
    # Forward error ≤ κ · relative residual.
    assert relative_error(x, torch.linalg.solve(a, b)) <= 1e-12 * 10**log_condition * 100


NONSYMMETRIC_SOLVERS = {
    "gmres": lambda n: bl.GMRES(tol=1e-12, maxiter=200, restart=min(n, 5)),
    "normal_cg": lambda n: bl.NormalCG(tol=1e-13, maxiter=20 * n + 50),
    "normal_cg_rmatvec": lambda n: bl.NormalCG(tol=1e-13, maxiter=20 * n + 50),
    "scipy_gmres": lambda n: bl.SciPy("gmres", tol=1e-12, maxiter=100),
    "scipy_bicgstab": lambda n: bl.SciPy("bicgstab", tol=1e-12, maxiter=20 * n + 50),
}


@pytest.mark.parametrize("name", list(NONSYMMETRIC_SOLVERS))
@given(n=sizes, seed=seeds)
def test_random_nonsymmetric(name: str, n: int, seed: int) -> None:
    a, b = random_nonsymmetric(n, seed), random_vector(n, seed)
    rmatvec = (lambda u: a.T @ u) if name.endswith("rmatvec") else None
    x, info = NONSYMMETRIC_SOLVERS[name](n)(lambda v: a @ v, b, rmatvec=rmatvec)
    assert info.converged, info
    assert relative_error(x, torch.linalg.solve(a, b)) <= 1e-8


@given(
    n=sizes,
    seed=seeds,
    log_condition=st.floats(0.0, 2.0),
    step=st.floats(0.05, 0.95),
    symmetric=st.booleans(),
)
def test_neumann_converges_when_spectral_radius_below_one(
    n: int, seed: int, log_condition: float, step: float, symmetric: bool
) -> None:
    if symmetric:  # eigenvalues in [1, κ]; α ∈ (0, 2/κ) gives ρ(I − αA) < 1
        a = random_spd(n, 10**log_condition, seed)
        alpha = step * 2.0 / 10**log_condition
    else:  # ‖I − A‖ ≤ 0.9
        a, alpha = random_nonsymmetric(n, seed), 1.0
    rho = float(torch.linalg.eigvals(torch.eye(n, dtype=F64) - alpha * a).abs().max())
    assert rho < 1.0
    b, reference = random_vector(n, seed), None
    reference = torch.linalg.solve(a, b)
    steps = min(math.ceil(math.log(1e-11) / math.log(max(rho, 1e-3))) + 5, 20_000)
    x, info = bl.Neumann(steps=steps, alpha=alpha)(lambda v: a @ v, b)
    assert bool(info.converged) and info.reason == "fixed_iterations"
    assert relative_error(x, reference) <= 1e-7 * 10**log_condition
    x, info = bl.Neumann(steps=steps, alpha=alpha, tol=1e-10)(lambda v: a @ v, b)
    assert info.converged and info.iterations <= steps, info


@given(n=sizes, seed=seeds, contraction=st.floats(0.0, 0.9))
def test_neumann_negative_alpha_solves_fixed_point_systems(
    n: int, seed: int, contraction: float
) -> None:
    """For F = T(x) − x, A = J − I; alpha = −1 sums the series Σ Jᵏ of (I − J)⁻¹."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, n, generator=g, dtype=F64)
    j = contraction * k / torch.linalg.matrix_norm(k, ord=2)
    a, b = j - torch.eye(n, dtype=F64), random_vector(n, seed)
    steps = 10 + math.ceil(math.log(1e-12) / math.log(max(contraction, 1e-3)))
    x, info = bl.Neumann(steps=steps, alpha=-1.0)(lambda v: a @ v, b)
    assert bool(info.converged)
    assert relative_error(x, torch.linalg.solve(a, b)) <= 1e-9


# -- fixed-K mode ---------------------------------------------------------------------------


@given(n=sizes, k=st.integers(0, 15), restart=st.integers(1, 6), seed=seeds)
def test_fixed_k_performs_exactly_k_matvecs(n: int, k: int, restart: int, seed: int) -> None:
    a, b = random_nonsymmetric(n, seed), random_vector(n, seed)
    for solver, extra in (
        (bl.CG(tol=0, maxiter=k), 0),
        (bl.Neumann(steps=k, alpha=0.1), 0),
        (bl.Neumann(steps=k, power_iterations=3), 3),  # the step-size estimate's matvecs
        (bl.GMRES(tol=0, maxiter=k, restart=restart), 0),
    ):
        matvec = Counted(a)
        _, info = solver(matvec, b)
        assert matvec.calls == k + extra, solver
        assert info.iterations == k and info.reason == "fixed_iterations"
    # NormalCG: k products with A and with Aᵀ, plus Aᵀb and the final true residual.
    matvec, rmatvec = Counted(a), Counted(a.T)
    _, info = bl.NormalCG(tol=0, maxiter=k)(matvec, b, rmatvec=rmatvec)
    assert (matvec.calls, rmatvec.calls) == (k + 1, k + 1)
    assert (info.stats["matvecs"], info.stats["rmatvecs"]) == (k + 1, k + 1)


BATCHED_SOLVERS: dict[str, Callable[[int], bl.LinearSolver]] = {
    "cg": lambda n: bl.CG(tol=0, maxiter=n),
    "gmres": lambda n: bl.GMRES(tol=0, maxiter=n + 2, restart=max(1, n // 2 + 1)),
    "neumann": lambda n: bl.Neumann(steps=30, alpha=0.5),
    "normal_cg": lambda n: bl.NormalCG(tol=0, maxiter=n),
    "dense": lambda n: bl.Dense(),
}


@pytest.mark.parametrize("name", list(BATCHED_SOLVERS))
@given(n=sizes, batch=st.integers(1, 4), seed=seeds)
def test_vmap_over_right_hand_sides_equals_loop(name: str, n: int, batch: int, seed: int) -> None:
    a = random_spd(n, 3.0, seed)  # SPD suits every solver in the list
    bs = random_vector(n, seed, batch)
    solver = BATCHED_SOLVERS[name](n)
    batched = vmap(lambda b: solver(lambda v: a @ v, b)[0])(bs)
    looped = torch.stack([solver(lambda v: a @ v, b)[0] for b in bs])
    torch.testing.assert_close(batched, looped, rtol=1e-9, atol=1e-11)


def test_vmap_over_matrices_and_trees() -> None:
    """vmap over a batch of operators, with a dict tree, for every vmappable solver."""
    a = torch.stack([random_spd(5, 4.0, s) for s in range(3)])
    bs = {"u": random_vector(3, 7, 3), "v": random_vector(2, 8, 3)}

    def split(a_i: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        def matvec(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out = a_i @ torch.cat([t["u"], t["v"]])
            return {"u": out[:3], "v": out[3:]}

        return matvec

    reference = torch.linalg.solve(a, torch.cat([bs["u"], bs["v"]], -1))
    for name, make in BATCHED_SOLVERS.items():
        solver = bl.Neumann(steps=200, alpha=0.4) if name == "neumann" else make(8)
        x = vmap(lambda a_i, b, s=solver: s(split(a_i), b)[0])(a, bs)
        torch.testing.assert_close(torch.cat([x["u"], x["v"]], -1), reference, msg=name)


# -- ridge, warm start, 0-d, zero and non-finite right-hand sides -----------------------------

ALL_SOLVERS: dict[str, Callable[[], bl.LinearSolver]] = {
    "cg": lambda: bl.CG(tol=1e-12),
    "cg_fixed": lambda: bl.CG(tol=0, maxiter=30),
    "neumann": lambda: bl.Neumann(steps=400, alpha=0.3),
    "neumann_adaptive": lambda: bl.Neumann(steps=400, alpha=0.3, tol=1e-12),
    "gmres": lambda: bl.GMRES(tol=1e-12, restart=4),
    "gmres_fixed": lambda: bl.GMRES(tol=0, maxiter=30, restart=4),
    "normal_cg": lambda: bl.NormalCG(tol=1e-13),
    "normal_cg_fixed": lambda: bl.NormalCG(tol=0, maxiter=40),
    "dense": lambda: bl.Dense(),
    "dense_cholesky": lambda: bl.Dense(positive_definite=True),
    **{f"scipy_{m}": (lambda m=m: bl.SciPy(m, tol=1e-12)) for m in bl.linear.scipy_bridge.METHODS},
}
ADAPTIVE = [name for name in ALL_SOLVERS if "fixed" not in name and name != "neumann"]


def _with(solver: bl.LinearSolver, **changes: Any) -> bl.LinearSolver:
    kwargs = {k: v for k, v in vars(solver).items() if k not in ("options",)}
    if isinstance(solver, bl.Dense):
        kwargs = {"positive_definite": solver.positive_definite, "ridge": solver.ridge}
    elif isinstance(solver, bl.Neumann):
        kwargs["steps"] = kwargs.pop("maxiter")
    elif isinstance(solver, bl.SciPy):
        kwargs.update(solver.options)
    kwargs.update(changes)
    return type(solver)(**kwargs)


@pytest.mark.parametrize("name", list(ALL_SOLVERS))
def test_ridge(name: str) -> None:
    a = random_spd(6, 5.0, 11) - 0.5 * torch.eye(6, dtype=F64)  # eigenvalues in [0.5, 4.5]
    b = random_vector(6, 11)
    solver = _with(ALL_SOLVERS[name](), ridge=0.5)
    x, info = solver(lambda v: a @ v, b)
    assert bool(info.converged), info
    reference = torch.linalg.solve(a + 0.5 * torch.eye(6, dtype=F64), b)
    assert relative_error(x, reference) <= 1e-8


@pytest.mark.parametrize("name", list(ALL_SOLVERS))
def test_warm_start(name: str) -> None:
    a, b = random_spd(6, 5.0, 12), random_vector(6, 12)
    reference = torch.linalg.solve(a, b)
    solver = ALL_SOLVERS[name]()
    x, info = solver(lambda v: a @ v, b, x0=reference + 1e-3)
    assert bool(info.converged), info
    assert relative_error(x, reference) <= 1e-8
    if name in ADAPTIVE and not name.startswith("dense"):
        # Starting at the solution: nothing (or almost nothing) left to do.
        _, cold = solver(lambda v: a @ v, b)
        _, warm = solver(lambda v: a @ v, b, x0=reference)
        assert warm.iterations <= max(1, cold.iterations // 2), (warm, cold)


@pytest.mark.parametrize("name", list(ALL_SOLVERS))
def test_zero_dimensional_b(name: str) -> None:
    b = torch.tensor(1.5, dtype=F64)
    x, info = ALL_SOLVERS[name]()(lambda v: 3.0 * v, b)
    assert x.shape == () and bool(info.converged), info
    torch.testing.assert_close(x, torch.tensor(0.5, dtype=F64))


@pytest.mark.parametrize("name", ADAPTIVE)
def test_zero_b_returns_zero_without_iterating(name: str) -> None:
    a = random_spd(4, 3.0, 13)
    b = {"p": torch.zeros(3, dtype=F64), "q": torch.zeros((), dtype=F64)}

    def matvec(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = a @ torch.cat([t["p"], t["q"][None]])
        return {"p": out[:3], "q": out[3]}

    x, info = ALL_SOLVERS[name]()(matvec, b, x0={"p": torch.ones(3, dtype=F64), "q": b["q"]})
    assert info.converged is True and info.iterations == 0 and info.reason == "converged"
    assert all(bool((leaf == 0).all()) for leaf in x.values())


@pytest.mark.parametrize("name", list(ALL_SOLVERS))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_b_never_converged(name: str, bad: float) -> None:
    a = random_spd(4, 3.0, 14)
    b = random_vector(4, 14)
    b[2] = bad
    _, info = ALL_SOLVERS[name]()(lambda v: a @ v, b)
    assert not bool(info.converged), info
    if name in ADAPTIVE:
        assert info.reason == "nonfinite" and info.failed


# -- CG on indefinite systems ---------------------------------------------------------------


def test_cg_indefinite_is_breakdown_in_adaptive_mode() -> None:
    a = torch.diag(torch.tensor([3.0, 2.0, -1.0, 1.0], dtype=F64))
    b = torch.ones(4, dtype=F64)
    x, info = bl.CG(tol=1e-10)(lambda v: a @ v, b)
    assert info.reason == "breakdown" and info.converged is False and info.failed
    assert torch.isfinite(x).all()


@given(n=st.integers(2, 10), seed=seeds, k=st.integers(1, 20))
def test_cg_fixed_k_stays_finite_on_indefinite(n: int, seed: int, k: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    eigenvalues = torch.linspace(-2.0, 3.0, n, dtype=F64)
    eigenvalues[0] = -2.0  # at least one strongly negative eigenvalue
    a = (q * eigenvalues) @ q.T
    # A right-hand side that sees it, large enough that rᵀr / tiny would overflow.
    b = 1e3 * (q[:, 0] + 0.1 * random_vector(n, seed))
    x, info = bl.CG(tol=0, maxiter=k)(lambda v: a @ v, b)
    assert torch.isfinite(x).all() and bool(info.converged)
    assert torch.isfinite(info.residual_norm)


def test_cg_fixed_k_takes_and_counts_negative_curvature_steps() -> None:
    a = torch.diag(torch.tensor([1.0, -1.0], dtype=F64))
    b = torch.tensor([0.0, 1.0], dtype=F64)  # pᵀAp = −1 on the very first step
    x, info = bl.CG(tol=0, maxiter=5)(lambda v: a @ v, b)
    # The Galerkin step along p = b solves this system exactly; skipping it would not.
    torch.testing.assert_close(x, torch.tensor([0.0, -1.0], dtype=F64))
    assert int(info.stats["negative_curvature"]) >= 1 and int(info.stats["breakdowns"]) == 0
    assert info.reason == "fixed_iterations" and not info.failed


def test_fixed_k_stays_finite_after_exact_convergence() -> None:
    a = torch.diag(torch.tensor([2.0, 2.0, 2.0], dtype=F64))  # one step solves it exactly
    b = torch.ones(3, dtype=F64)
    for solver in (
        bl.CG(tol=0, maxiter=10),
        bl.GMRES(tol=0, maxiter=10, restart=3),
        bl.NormalCG(tol=0, maxiter=10),
        bl.Neumann(steps=10, alpha=0.5),
    ):
        x, info = solver(lambda v: a @ v, b)
        torch.testing.assert_close(x, b / 2, msg=str(solver))
        assert bool(info.converged) and torch.isfinite(info.residual_norm)


@pytest.mark.parametrize("name", list(ALL_SOLVERS))
def test_matvec_that_returns_its_input(name: str) -> None:
    """The identity operator aliases its input: no solver may be confused by that."""
    b = {"u": random_vector(5, 15), "v": random_vector(3, 16)}
    solver = ALL_SOLVERS[name]()
    if isinstance(solver, bl.Neumann):
        solver = bl.Neumann(steps=60, alpha=0.5)
    x, info = solver(lambda v: v, b)
    assert bool(info.converged), info
    torch.testing.assert_close(x, b)


DIFFERENTIABLE = {
    "cg_fixed": lambda: bl.CG(tol=0, maxiter=8),
    "gmres_fixed": lambda: bl.GMRES(tol=0, maxiter=8, restart=4),
    "neumann": lambda: bl.Neumann(steps=200, alpha=0.3),
    "normal_cg_fixed": lambda: bl.NormalCG(tol=0, maxiter=12),
    "dense": lambda: bl.Dense(),
    "dense_cholesky": lambda: bl.Dense(positive_definite=True),
}


@pytest.mark.parametrize("name", list(DIFFERENTIABLE))
def test_fixed_k_solvers_are_differentiable(name: str) -> None:
    """Reverse and forward mode through a solve give A⁻¹ (also after exact convergence)."""
    solver = DIFFERENTIABLE[name]()
    b = random_vector(4, 17)
    # A random SPD matrix, and 2·I, where one step solves exactly and every later step
    # meets a vanishing direction (p = 0, or GMRES's lucky breakdown).
    for a in (random_spd(4, 3.0, 17), 2.0 * torch.eye(4, dtype=F64)):

        def solve(b: torch.Tensor, a: torch.Tensor = a) -> torch.Tensor:
            return solver(lambda v: a @ v, b)[0]

        inverse = torch.linalg.inv(a)
        torch.testing.assert_close(torch.func.jacrev(solve)(b), inverse)
        torch.testing.assert_close(torch.func.jacfwd(solve)(b), inverse)


def test_fixed_k_cg_reports_nonfinite_matvec() -> None:
    def matvec(v: torch.Tensor) -> torch.Tensor:
        return v * torch.tensor([1.0, math.nan, 2.0], dtype=F64)

    x, info = bl.CG(tol=0, maxiter=3)(matvec, torch.ones(3, dtype=F64))
    assert not bool(info.converged) and bool(info.stats["nonfinite"])
    assert info.failed and info.outcome == "nonfinite" and torch.isfinite(x).all()


def test_dense_falls_back_to_a_loop_for_matvecs_vmap_cannot_trace() -> None:
    a = random_spd(5, 10.0, 18)

    def numpy_matvec(v: torch.Tensor) -> torch.Tensor:  # .numpy() is impossible under vmap
        return torch.from_numpy(a.numpy() @ v.numpy())

    b = random_vector(5, 18)
    x, info = bl.Dense()(numpy_matvec, b)
    assert info.converged and info.stats["matvecs"] == 5
    torch.testing.assert_close(x, torch.linalg.solve(a, b))
