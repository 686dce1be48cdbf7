"""The shared test matrix: every linear solver × operator structure × dtype.

References come from ``torch.linalg.solve`` on an explicitly built matrix, never from the
code under test. The solvers are every row of ``tests/_solvers.py``: adding a solver means
adding one row there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _solvers import MODES, SOLVERS, TAGS, SolverCase, solvers

import bilevel as bl

# -- operators: each knows its explicit matrix, its spectrum bounds and how to ravel ------


@dataclasses.dataclass
class Operator:
    matrix: torch.Tensor  # explicit (n, n) matrix, used only for the reference solution
    matvec: Callable[[Any], Any]
    b: Any
    diagonal: Any  # diag(A) as a tree shaped like b (for the Jacobi preconditioner)
    ravel: Callable[[Any], torch.Tensor]
    lam_min: float
    lam_max: float


def _spd(n: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    eigenvalues = torch.linspace(1.0, 4.0, n, dtype=torch.float64)
    return ((q * eigenvalues) @ q.T).to(dtype)


def dense_operator(dtype: torch.dtype) -> Operator:
    g = torch.Generator().manual_seed(1)
    a = _spd(12, dtype, g)
    b = torch.randn(12, generator=g, dtype=torch.float64).to(dtype)
    return Operator(a, lambda v: a @ v, b, torch.diagonal(a).clone(), lambda t: t, 1.0, 4.0)


def block_operator(dtype: torch.dtype) -> Operator:
    """A dict tree {"w": (3, 2), "bias": (4,)} acted on by a coupled 10 × 10 SPD matrix."""
    g = torch.Generator().manual_seed(2)
    a = _spd(10, dtype, g)
    a11, a12, a21, a22 = a[:6, :6], a[:6, 6:], a[6:, :6], a[6:, 6:]

    def matvec(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        w, bias = v["w"].reshape(6), v["bias"]
        return {"w": (a11 @ w + a12 @ bias).reshape(3, 2), "bias": a21 @ w + a22 @ bias}

    def ravel(t: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([t["w"].reshape(6), t["bias"]])

    b = {
        "w": torch.randn(3, 2, generator=g, dtype=torch.float64).to(dtype),
        "bias": torch.randn(4, generator=g, dtype=torch.float64).to(dtype),
    }
    d = torch.diagonal(a)
    return Operator(a, matvec, b, {"w": d[:6].reshape(3, 2), "bias": d[6:]}, ravel, 1.0, 4.0)


def diagonal_operator(dtype: torch.dtype) -> Operator:
    """A 2-D leaf scaled element-wise: A = diag(d), d in [1, 4]."""
    g = torch.Generator().manual_seed(3)
    d = (1.0 + 3.0 * torch.rand(4, 5, generator=g, dtype=torch.float64)).to(dtype)
    b = torch.randn(4, 5, generator=g, dtype=torch.float64).to(dtype)
    lo, hi = float(d.min()), float(d.max())
    return Operator(torch.diag(d.reshape(-1)), lambda v: d * v, b, d, torch.ravel, lo, hi)


OPERATORS = {"dense": dense_operator, "block_dict": block_operator, "diagonal": diagonal_operator}

# -- solvers: every row of tests/_solvers.py, configured for the operator and dtype ------


def _tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-6


def _jacobi(op: Operator) -> Callable[[Any], Any]:
    inverse = bl.tree.tree_map(torch.reciprocal, op.diagonal)
    return lambda r: bl.tree.tree_map(torch.mul, inverse, r)


def _configure(case: SolverCase, op: Operator, dtype: torch.dtype) -> bl.LinearSolver:
    tol = _tol(dtype) / 10 if "indirect_tol" in case.tags else _tol(dtype)
    extra = {"preconditioner": _jacobi(op)} if "preconditioned" in case.tags else {}
    return case(
        tol=tol,
        maxiter=80 if "fixed_k" in case.tags else 200,
        restart=8,
        alpha=2.0 / (op.lam_min + op.lam_max),  # Neumann's optimal step on [λ_min, λ_max]
        **extra,
    )


@pytest.mark.parametrize("tagged", [False, True], ids=["matvec", "spd_operator"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("operator", list(OPERATORS))
@pytest.mark.parametrize("case", solvers())
def test_solver_matches_linalg_solve(
    case: SolverCase, operator: str, dtype: torch.dtype, tagged: bool
) -> None:
    op = OPERATORS[operator](dtype)
    # The same SPD matrix as a plain matvec, or as a LinearOperator that says so (Dense then
    # takes Cholesky, NormalCG and SciPy take A itself as Aᵀ).
    matvec = (
        bl.LinearOperator(op.matvec, symmetric=True, positive_semidefinite=True)
        if tagged
        else op.matvec
    )
    x, info = _configure(case, op, dtype)(matvec, op.b)

    reference = torch.linalg.solve(op.matrix.double(), op.ravel(op.b).double())
    # Same tree structure, shapes and dtypes as b.
    bl.tree.check_same_structure(op.b, x, reference_name="b", other_name="x")
    error = torch.linalg.vector_norm(op.ravel(x).double() - reference)
    rtol = 1e-8 if dtype == torch.float64 else 1e-4
    assert error <= rtol * torch.linalg.vector_norm(reference), (error, info)

    assert bool(info.converged), info
    assert info.reason in ("converged", "fixed_iterations")
    assert not info.failed
    assert torch.isfinite(torch.as_tensor(info.residual_norm))
    true_residual = torch.linalg.vector_norm(
        op.ravel(op.b).double() - op.matrix.double() @ op.ravel(x).double()
    )
    # The reported residual is the tracked one; it must agree with the true one up to rounding.
    slack = 1e-8 if dtype == torch.float64 else 1e-4
    b_norm = float(torch.linalg.vector_norm(op.ravel(op.b).double()))
    assert abs(float(info.residual_norm) - float(true_residual)) <= slack * b_norm * 10


# -- the solver list itself ------------------------------------------------------------------


def _public_solver_classes() -> set[type]:
    exported = {getattr(bl, name) for name in bl.__all__}
    exported |= {getattr(bl.linear, name) for name in bl.linear.__all__}
    return {
        obj
        for obj in exported
        if isinstance(obj, type)
        and issubclass(obj, bl.LinearSolver)
        and obj is not bl.LinearSolver
        and not obj.__name__.startswith("_")
    }


def test_every_exported_solver_has_a_row() -> None:
    """A public solver class without a row in tests/_solvers.py would escape every test."""
    listed = {type(case()) for case in SOLVERS}
    missing = sorted(cls.__name__ for cls in _public_solver_classes() - listed)
    assert not missing, f"add a row to tests/_solvers.py for {missing}"


def test_solver_rows_are_well_formed() -> None:
    names = [case.name for case in SOLVERS]
    assert len(names) == len(set(names)), names
    for case in SOLVERS:
        solver = case()
        assert type(solver) is case.cls, case
        assert case.tags <= TAGS, case.tags - TAGS
        assert len(case.tags & MODES) == 1, (case, case.tags & MODES)
        assert solver.fixed_iterations == ("adaptive" not in case.tags), case
        assert ("fixed_k" in case.tags) <= case(tol=1e-3).fixed_iterations, case
        if "host" in case.tags:
            assert "vmappable" not in case.tags, case
