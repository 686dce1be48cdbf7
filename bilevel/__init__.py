"""bilevel: implicit differentiation of bilevel problems in PyTorch."""

from . import distributed, inner, tree
from .errors import ConvergenceError, ConvergenceWarning
from .implicit import (
    ImplicitFunction,
    custom_fixed_point,
    custom_root,
    implicit_grad,
    root_jvp,
    root_vjp,
)
from .linear import (
    CG,
    GMRES,
    MINRES,
    Dense,
    LinearOperator,
    LinearSolver,
    Neumann,
    NormalCG,
    Result,
    SciPy,
    SolveInfo,
)
from .optimality import fixed_point, projected_gradient, proximal_gradient, stationarity
from .projection import projection_box, projection_l2_ball, projection_simplex
from .prox import prox_elastic_net, prox_lasso

__version__ = "0.1.0"

__all__ = [
    "CG",
    "GMRES",
    "MINRES",
    "ConvergenceError",
    "ConvergenceWarning",
    "Dense",
    "ImplicitFunction",
    "LinearOperator",
    "LinearSolver",
    "Neumann",
    "NormalCG",
    "Result",
    "SciPy",
    "SolveInfo",
    "custom_fixed_point",
    "custom_root",
    "distributed",
    "fixed_point",
    "implicit_grad",
    "inner",
    "projected_gradient",
    "projection_box",
    "projection_l2_ball",
    "projection_simplex",
    "prox_elastic_net",
    "prox_lasso",
    "proximal_gradient",
    "root_jvp",
    "root_vjp",
    "stationarity",
    "tree",
]
