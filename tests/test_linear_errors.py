"""Bad input to the linear solvers: the right exception, naming the offending argument."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from _solvers import SolverCase, solvers
from torch.func import vmap

import bilevel as bl

F64 = torch.float64


def identity(v: Any) -> Any:
    return v


# Adaptive rows: a fixed-K row pins tol = atol = 0, so it would not see a bad tol.
@pytest.mark.parametrize("case", solvers("adaptive"))
@pytest.mark.parametrize(
    ("argument", "value", "error"),
    [
        ("tol", -1e-6, ValueError),
        ("tol", float("nan"), ValueError),
        ("atol", -1.0, ValueError),
        ("maxiter", -1, ValueError),
        ("maxiter", 2.5, ValueError),
        ("ridge", -0.1, ValueError),
        ("tol", "small", TypeError),
    ],
)
def test_bad_options(case: SolverCase, argument: str, value: Any, error: type[Exception]) -> None:
    name = argument
    if case.cls is bl.Neumann and argument == "maxiter":
        name = "steps"  # Neumann's maxiter is an alias of steps
    with pytest.raises(error, match=rf"^{name}\b"):
        case(**{argument: value})


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: bl.Neumann(alpha=0.0), "alpha"),
        (lambda: bl.Neumann(alpha=float("inf")), "alpha"),
        (lambda: bl.Neumann(steps=3, maxiter=4), "steps"),
        (lambda: bl.GMRES(restart=0), "restart"),
        (lambda: bl.Dense(ridge=-1.0), "ridge"),
        (lambda: bl.CG(preconditioner=3), "preconditioner"),
    ],
)
def test_bad_solver_specific_options(make: Callable[[], Any], argument: str) -> None:
    with pytest.raises((ValueError, TypeError), match=argument):
        make()


def test_bad_scipy_method_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="method") as excinfo:
        bl.SciPy("qmr")
    for valid in ("minres", "cg", "gmres", "bicgstab", "lgmres"):
        assert valid in str(excinfo.value)


def test_scipy_options_that_the_bridge_owns() -> None:
    with pytest.raises(TypeError, match="callback"):
        bl.SciPy("cg", callback=print)


@pytest.mark.parametrize("case", solvers())
def test_non_callable_matvec(case: SolverCase) -> None:
    with pytest.raises(TypeError, match=r"^matvec must be callable"):
        case()(torch.eye(3), torch.ones(3))
    with pytest.raises(TypeError, match=r"^rmatvec must be callable"):
        case()(identity, torch.ones(3), rmatvec=torch.eye(3))


@pytest.mark.parametrize("case", solvers())
@pytest.mark.parametrize(
    "b",
    [torch.arange(3), {"a": torch.ones(2), "b": torch.ones(2, dtype=torch.int32)}, np.ones(3)],
    ids=["int", "int_leaf", "numpy"],
)
def test_non_float_b(case: SolverCase, b: Any) -> None:
    with pytest.raises(TypeError, match=r"^b must"):
        case()(identity, b)


@pytest.mark.parametrize("case", solvers())
def test_empty_b(case: SolverCase) -> None:
    with pytest.raises(ValueError, match=r"^b is an empty tree"):
        case()(identity, {})


@pytest.mark.parametrize("case", solvers())
@pytest.mark.parametrize(
    "x0",
    [
        torch.ones(4, dtype=F64),  # shape
        torch.ones(3, dtype=torch.float32),  # dtype
        (torch.ones(3, dtype=F64),),  # structure
        {"a": torch.ones(3, dtype=F64)},  # structure
    ],
    ids=["shape", "dtype", "tuple", "dict"],
)
def test_x0_mismatch(case: SolverCase, x0: Any) -> None:
    with pytest.raises(ValueError, match=r"^x0 must"):
        case()(identity, torch.ones(3, dtype=F64), x0=x0)


@pytest.mark.parametrize("case", solvers())
@pytest.mark.parametrize(
    "matvec",
    [
        lambda v: torch.cat([v, v]),  # shape
        lambda v: v.float(),  # dtype
        lambda v: {"x": v},  # structure
        lambda v: (v, v),  # structure
    ],
    ids=["shape", "dtype", "dict", "tuple"],
)
def test_matvec_output_mismatch(case: SolverCase, matvec: Callable[[Any], Any]) -> None:
    b = torch.ones(3, dtype=F64)
    with pytest.raises(ValueError, match=r"^matvec\(x\) must"):
        case()(matvec, b)


def test_rmatvec_output_mismatch() -> None:
    with pytest.raises(ValueError, match=r"^rmatvec\(x\) must"):
        bl.NormalCG()(identity, torch.ones(3, dtype=F64), rmatvec=lambda v: v[:2])


def test_normal_cg_untraceable_matvec_asks_for_rmatvec() -> None:
    a = np.diag([1.0, 2.0, 3.0])

    def numpy_matvec(v: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(a @ v.numpy())

    with pytest.raises(TypeError, match="rmatvec"):
        bl.NormalCG()(numpy_matvec, torch.ones(3, dtype=F64))
    x, info = bl.NormalCG(tol=1e-12)(numpy_matvec, torch.ones(3, dtype=F64), rmatvec=numpy_matvec)
    assert info.converged
    torch.testing.assert_close(x, torch.tensor([1.0, 1 / 2, 1 / 3], dtype=F64))


# SciPy refuses every torch.func transform, with its own message (next test).
@pytest.mark.parametrize("case", solvers("adaptive", exclude=("host",)))
@pytest.mark.parametrize(
    "tolerances", [{"tol": 1e-6}, {"tol": 0, "atol": 1e-8}], ids=["tol", "atol"]
)
def test_adaptive_solver_under_vmap_names_tol(case: SolverCase, tolerances: dict) -> None:
    solver = case(**tolerances)
    with pytest.raises(ValueError, match=r"tol=.*torch\.func\.vmap"):
        vmap(lambda b: solver(identity, b)[0])(torch.ones(2, 3, dtype=F64))


@pytest.mark.parametrize("tol", [0.0, 1e-6])
def test_scipy_under_torch_func_transforms(tol: float) -> None:
    solver = bl.SciPy("cg", tol=tol)
    with pytest.raises(ValueError, match="vmap"):
        vmap(lambda b: solver(identity, b)[0])(torch.ones(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="vmap"):
        torch.func.grad(lambda b: solver(identity, b)[0].sum())(torch.ones(3, dtype=F64))


@pytest.mark.parametrize(
    "preconditioner",
    [lambda r: r.float(), lambda r: r[:2], lambda r: {"r": r}],
    ids=["dtype", "shape", "structure"],
)
def test_preconditioner_output_mismatch(preconditioner: Callable[[Any], Any]) -> None:
    with pytest.raises(ValueError, match=r"^preconditioner\(x\) must"):
        bl.CG(preconditioner=preconditioner)(identity, torch.ones(3, dtype=F64))
