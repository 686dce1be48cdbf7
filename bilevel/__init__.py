"""bilevel: implicit differentiation of bilevel problems in PyTorch."""

from . import tree
from .errors import ConvergenceError, ConvergenceWarning
from .linear import CG, LinearSolver, SolveInfo

__version__ = "0.1.0"

__all__ = [
    "CG",
    "ConvergenceError",
    "ConvergenceWarning",
    "LinearSolver",
    "SolveInfo",
    "tree",
]
