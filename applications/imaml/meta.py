"""The iMAML application's meta-learning names in one place (compatibility module).

The inner solvers live in :mod:`applications.imaml.inner` and the meta-learners in
:mod:`applications.imaml.learners`; this module only re-exports their public names, so that
``from applications.imaml.meta import IMAML, GradientDescent`` keeps working.
"""

from __future__ import annotations

from .inner import GradientDescent, InnerSolver, NewtonCG, TorchOptimizer
from .learners import FOMAML, IMAML, MAML, MetaLearner, build_meta_learner, confidence_interval

__all__ = [
    "FOMAML",
    "IMAML",
    "MAML",
    "GradientDescent",
    "InnerSolver",
    "MetaLearner",
    "NewtonCG",
    "TorchOptimizer",
    "build_meta_learner",
    "confidence_interval",
]
