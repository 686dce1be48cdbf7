"""Matrix-free linear solvers sharing one protocol: ``x, info = solver(matvec, b, x0, rmatvec)``."""

from ._base import LinearProblem, LinearSolver, Matvec, SolveInfo
from .cg import CG

__all__ = ["CG", "LinearProblem", "LinearSolver", "Matvec", "SolveInfo"]
