"""bilevel: implicit differentiation of bilevel problems in PyTorch."""

from . import tree
from .errors import ConvergenceError, ConvergenceWarning
from .implicit import (
    ImplicitFunction,
    custom_fixed_point,
    custom_root,
    implicit_grad,
    root_jvp,
    root_vjp,
)
from .linear import CG, LinearSolver, SolveInfo
from .optimality import fixed_point, stationarity

__version__ = "0.1.0"

__all__ = [
    "CG",
    "ConvergenceError",
    "ConvergenceWarning",
    "ImplicitFunction",
    "LinearSolver",
    "SolveInfo",
    "custom_fixed_point",
    "custom_root",
    "fixed_point",
    "implicit_grad",
    "root_jvp",
    "root_vjp",
    "stationarity",
    "tree",
]
