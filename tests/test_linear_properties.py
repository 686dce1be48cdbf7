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
from _solvers import SolverCase, cases, solvers
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


def _tight(case: SolverCase, tol: float) -> float:
    """``tol`` in terms of ``‖b − A x‖ / ‖b‖``: ten times tighter for an indirect test."""
    return tol / 10 if "indirect_tol" in case.tags else tol


# κ up to 1e4 and tol = 1e-12, near the rounding floor κ·ε: not for a solver that squares
# κ or converges only linearly.
SPD_EXCLUDED = ("fixed_k", "squares_condition", "needs_contraction")


@pytest.mark.parametrize("case", solvers(exclude=SPD_EXCLUDED))
@given(n=sizes, log_condition=st.floats(0.0, 4.0), seed=seeds)
def test_random_spd(case: SolverCase, n: int, log_condition: float, seed: int) -> None:
    a, b = random_spd(n, 10**log_condition, seed), random_vector(n, seed)
    x, info = case(tol=_tight(case, 1e-12), maxiter=20 * n + 50)(lambda v: a @ v, b)
    assert info.converged, info
    # Forward error ≤ κ · relative residual.
    assert relative_error(x, torch.linalg.solve(a, b)) <= 1e-12 * 10**log_condition * 100


# Neumann's own test is below: its step size is chosen there from the spectrum.
NONSYMMETRIC = cases("handles_nonsymmetric", exclude=("fixed_k", "needs_contraction"))


@pytest.mark.parametrize(
    ("case", "with_rmatvec"),
    [pytest.param(c, False, id=c.name) for c in NONSYMMETRIC]
    + [
        pytest.param(c, True, id=f"{c.name}_rmatvec")
        for c in NONSYMMETRIC
        if "uses_rmatvec" in c.tags
    ],
)
@given(n=sizes, seed=seeds)
def test_random_nonsymmetric(case: SolverCase, with_rmatvec: bool, n: int, seed: int) -> None:
    a, b = random_nonsymmetric(n, seed), random_vector(n, seed)
    rmatvec = (lambda u: a.T @ u) if with_rmatvec else None
    solver = case(tol=_tight(case, 1e-12), maxiter=20 * n + 50, restart=min(n, 5))
    x, info = solver(lambda v: a @ v, b, rmatvec=rmatvec)
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


@pytest.mark.parametrize("case", solvers("fixed_k"))
@given(n=sizes, k=st.integers(0, 15), restart=st.integers(1, 6), seed=seeds)
def test_fixed_k_performs_exactly_k_matvecs(
    case: SolverCase, n: int, k: int, restart: int, seed: int
) -> None:
    a, b = random_nonsymmetric(n, seed), random_vector(n, seed)
    # A given step size costs nothing; Neumann's estimate costs its power iterations.
    for solver in {
        repr(s): s
        for s in (
            case(maxiter=k, restart=restart, alpha=0.1),
            case(maxiter=k, restart=restart, power_iterations=3),
        )
    }.values():
        extra = 3 if getattr(solver, "alpha", 0.1) is None else 0
        if isinstance(solver, bl.CG) and k > 0:
            extra = 1  # the curvature probe of the next direction (CG's docstring)
        matvec, rmatvec = Counted(a), Counted(a.T)
        _, info = solver(matvec, b, rmatvec=rmatvec)
        assert info.iterations == k and info.reason == "fixed_iterations"
        if "uses_rmatvec" in case.tags:
            # k products with A and with Aᵀ, plus Aᵀb and the final true residual.
            assert (matvec.calls, rmatvec.calls) == (k + 1, k + 1)
            assert (info.stats["matvecs"], info.stats["rmatvecs"]) == (k + 1, k + 1)
        else:
            assert (matvec.calls, rmatvec.calls) == (k + extra, 0), solver


def _batched(case: SolverCase, n: int, steps: int = 30) -> bl.LinearSolver:
    """A vmappable row configured for an n-dim SPD system with eigenvalues in [1, 4]."""
    maxiter = steps if "needs_contraction" in case.tags else n + 2
    return case(maxiter=maxiter, restart=max(1, n // 2 + 1), alpha=0.4)


@pytest.mark.parametrize("case", solvers("vmappable"))
@given(n=sizes, batch=st.integers(1, 4), seed=seeds)
def test_vmap_over_right_hand_sides_equals_loop(
    case: SolverCase, n: int, batch: int, seed: int
) -> None:
    a = random_spd(n, 3.0, seed)  # SPD suits every solver
    bs = random_vector(n, seed, batch)
    solver = _batched(case, n)
    batched = vmap(lambda b: solver(lambda v: a @ v, b)[0])(bs)
    looped = torch.stack([solver(lambda v: a @ v, b)[0] for b in bs])
    torch.testing.assert_close(batched, looped, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("case", solvers("vmappable"))
def test_vmap_over_matrices_and_trees(case: SolverCase) -> None:
    """vmap over a batch of operators, with a dict tree, for every vmappable solver."""
    a = torch.stack([random_spd(5, 4.0, s) for s in range(3)])
    bs = {"u": random_vector(3, 7, 3), "v": random_vector(2, 8, 3)}

    def split(a_i: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        def matvec(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out = a_i @ torch.cat([t["u"], t["v"]])
            return {"u": out[:3], "v": out[3:]}

        return matvec

    reference = torch.linalg.solve(a, torch.cat([bs["u"], bs["v"]], -1))
    solver = _batched(case, 8, steps=200)
    x = vmap(lambda a_i, b: solver(split(a_i), b)[0])(a, bs)
    torch.testing.assert_close(torch.cat([x["u"], x["v"]], -1), reference)


# -- ridge, warm start, 0-d, zero and non-finite right-hand sides -----------------------------


def _configure(case: SolverCase, **changes: Any) -> bl.LinearSolver:
    """A row configured for the small SPD systems below (eigenvalues in [0.5, 5])."""
    if "needs_contraction" in case.tags:
        maxiter = 400
    elif "fixed_k" in case.tags:
        maxiter = 40
    else:
        maxiter = 100
    settings = {"tol": _tight(case, 1e-12), "maxiter": maxiter, "restart": 4, "alpha": 0.3}
    return case(**{**settings, **changes})


@pytest.mark.parametrize("case", solvers())
def test_ridge(case: SolverCase) -> None:
    a = random_spd(6, 5.0, 11) - 0.5 * torch.eye(6, dtype=F64)  # eigenvalues in [0.5, 4.5]
    b = random_vector(6, 11)
    solver = _configure(case, ridge=0.5)
    x, info = solver(lambda v: a @ v, b)
    assert bool(info.converged), info
    reference = torch.linalg.solve(a + 0.5 * torch.eye(6, dtype=F64), b)
    assert relative_error(x, reference) <= 1e-8


@pytest.mark.parametrize("case", solvers())
def test_warm_start(case: SolverCase) -> None:
    a, b = random_spd(6, 5.0, 12), random_vector(6, 12)
    reference = torch.linalg.solve(a, b)
    solver = _configure(case)
    x, info = solver(lambda v: a @ v, b, x0=reference + 1e-3)
    assert bool(info.converged), info
    assert relative_error(x, reference) <= 1e-8
    if "adaptive" in case.tags:
        # Starting at the solution: nothing (or almost nothing) left to do.
        _, cold = solver(lambda v: a @ v, b)
        _, warm = solver(lambda v: a @ v, b, x0=reference)
        assert warm.iterations <= max(1, cold.iterations // 2), (warm, cold)


@pytest.mark.parametrize("case", solvers())
def test_zero_dimensional_b(case: SolverCase) -> None:
    b = torch.tensor(1.5, dtype=F64)
    x, info = _configure(case)(lambda v: 3.0 * v, b)
    assert x.shape == () and bool(info.converged), info
    torch.testing.assert_close(x, torch.tensor(0.5, dtype=F64))


@pytest.mark.parametrize("case", solvers(exclude=("fixed_k",)))
def test_zero_b_returns_zero_without_iterating(case: SolverCase) -> None:
    a = random_spd(4, 3.0, 13)
    b = {"p": torch.zeros(3, dtype=F64), "q": torch.zeros((), dtype=F64)}

    def matvec(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = a @ torch.cat([t["p"], t["q"][None]])
        return {"p": out[:3], "q": out[3]}

    x, info = _configure(case)(matvec, b, x0={"p": torch.ones(3, dtype=F64), "q": b["q"]})
    assert info.converged is True and info.iterations == 0 and info.reason == "converged"
    assert all(bool((leaf == 0).all()) for leaf in x.values())


@pytest.mark.parametrize("case", solvers())
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_b_never_converged(case: SolverCase, bad: float) -> None:
    a = random_spd(4, 3.0, 14)
    b = random_vector(4, 14)
    b[2] = bad
    _, info = _configure(case)(lambda v: a @ v, b)
    assert not bool(info.converged), info
    if "fixed_k" not in case.tags:
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


@pytest.mark.parametrize("case", solvers("vmappable"))
def test_fixed_k_stays_finite_after_exact_convergence(case: SolverCase) -> None:
    a = torch.diag(torch.tensor([2.0, 2.0, 2.0], dtype=F64))  # one step solves it exactly
    b = torch.ones(3, dtype=F64)
    solver = case(maxiter=10, restart=3, alpha=0.5)
    x, info = solver(lambda v: a @ v, b)
    torch.testing.assert_close(x, b / 2)
    assert bool(info.converged) and torch.isfinite(torch.as_tensor(info.residual_norm))


@pytest.mark.parametrize("case", solvers())
def test_matvec_that_returns_its_input(case: SolverCase) -> None:
    """The identity operator aliases its input: no solver may be confused by that."""
    b = {"u": random_vector(5, 15), "v": random_vector(3, 16)}
    x, info = _configure(case)(lambda v: v, b)
    assert bool(info.converged), info
    torch.testing.assert_close(x, b)


@pytest.mark.parametrize("case", solvers("vmappable"))
def test_fixed_k_solvers_are_differentiable(case: SolverCase) -> None:
    """Reverse and forward mode through a solve give A⁻¹ (also after exact convergence)."""
    solver = case(maxiter=200 if "needs_contraction" in case.tags else 12, restart=4, alpha=0.3)
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
