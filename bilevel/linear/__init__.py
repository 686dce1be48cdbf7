"""Matrix-free linear solvers sharing one protocol: ``x, info = solver(matvec, b, x0, rmatvec)``."""

from ._base import LinearProblem, LinearSolver, Matvec, SolveInfo
from ._operator import LinearOperator
from ._results import Result
from .cg import CG
from .dense import Dense
from .gmres import GMRES
from .minres import MINRES
from .neumann import Neumann
from .normal_cg import NormalCG
from .scipy_bridge import SciPy

__all__ = [
    "CG",
    "GMRES",
    "MINRES",
    "Dense",
    "LinearOperator",
    "LinearProblem",
    "LinearSolver",
    "Matvec",
    "Neumann",
    "NormalCG",
    "Result",
    "SciPy",
    "SolveInfo",
]
