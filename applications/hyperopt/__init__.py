"""Hyperparameter optimisation with implicit hypergradients: five worked examples.

Each example is a function returning a :class:`Result` (and, given ``out_dir``, writing
``results.json`` and ``figure.png``), configured by a dataclass with a ``quick()`` variant,
and a command line ``python -m applications.hyperopt <name>``:

* ``weight_decay``: logistic regression on breast cancer (optionally plus noise features), one L2
  strength per feature, against grid and random search over one shared strength;
* ``ridge``: ridge regression on diabetes, one L2 strength per feature; the implicit
  hypergradient beside its closed form, then against grid search;
* ``hyper_cleaning``: multinomial logistic regression on digits with 40% wrong training labels,
  one weight per training example, against uniform weights and a clean-only oracle;
* ``lasso``: the Lasso strength on diabetes through the proximal-gradient fixed point, against
  scikit-learn's ``LassoCV``;
* ``scipy_inner``: pseudo-Huber ridge regression on diabetes whose inner problem is solved by
  SciPy's L-BFGS-B on NumPy arrays; hypergradients against finite differences.

The datasets ship with scikit-learn (the applications' extra); nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._common import Result
from .hyper_cleaning import HyperCleaningConfig, run_hyper_cleaning
from .lasso import LassoConfig, run_lasso
from .ridge import RidgeConfig, run_ridge
from .scipy_inner import ScipyInnerConfig, run_scipy_inner
from .weight_decay import WeightDecayConfig, run_weight_decay

__all__ = [
    "EXAMPLES",
    "HyperCleaningConfig",
    "LassoConfig",
    "Result",
    "RidgeConfig",
    "ScipyInnerConfig",
    "WeightDecayConfig",
    "run_example",
    "run_hyper_cleaning",
    "run_lasso",
    "run_ridge",
    "run_scipy_inner",
    "run_weight_decay",
]

#: name -> (configuration class, run function, one-line description).
EXAMPLES: dict[str, tuple[type, Callable[..., Result], str]] = {
    "weight_decay": (
        WeightDecayConfig,
        run_weight_decay,
        "per-feature weight decay for logistic regression (breast cancer)",
    ),
    "ridge": (
        RidgeConfig,
        run_ridge,
        "per-feature ridge regression (diabetes); hypergradient vs closed form",
    ),
    "hyper_cleaning": (
        HyperCleaningConfig,
        run_hyper_cleaning,
        "data hyper-cleaning on digits with corrupted labels",
    ),
    "lasso": (
        LassoConfig,
        run_lasso,
        "Lasso strength through the proximal-gradient fixed point vs LassoCV (diabetes)",
    ),
    "scipy_inner": (
        ScipyInnerConfig,
        run_scipy_inner,
        "inner problem solved by scipy.optimize L-BFGS-B; exact hypergradients",
    ),
}


def run_example(name: str, config: Any | None = None, **kwargs: Any) -> Result:
    """Run the example ``name`` (see :data:`EXAMPLES`) with ``config`` and keyword options."""
    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; choose one of {sorted(EXAMPLES)}")
    return EXAMPLES[name][1](config, **kwargs)
