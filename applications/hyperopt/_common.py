"""Shared pieces of the hyperparameter-optimisation examples.

Data splits of scikit-learn's bundled datasets, the :class:`Result` every example returns,
JSON / PNG output, a progress bar, and the small losses several examples share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DTYPE",
    "Adam",
    "ProgressBar",
    "Result",
    "Split",
    "load_split",
    "markdown_table",
    "new_figure",
    "single_threaded",
    "to_jsonable",
    "with_noise_features",
]

#: The examples run in float64: the problems are small and exact hypergradients are the point.
DTYPE = torch.float64


@dataclasses.dataclass
class Split:
    """Train / validation / test tensors of one dataset (features standardised on train)."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    feature_names: list[str]

    @property
    def n_features(self) -> int:
        return int(self.X_train.shape[1])

    def centred_targets(self, *, scale: bool = False) -> tuple[Split, float]:
        """Targets centred on the training mean (and divided by its std if ``scale``).

        Returns the new split and the factor by which squared errors shrank (the training
        targets' variance when ``scale``, else 1), to report errors in the original units.
        """
        mean = self.y_train.mean()
        std = self.y_train.std(unbiased=False) if scale else torch.ones((), dtype=DTYPE)
        split = dataclasses.replace(
            self,
            y_train=(self.y_train - mean) / std,
            y_val=(self.y_val - mean) / std,
            y_test=(self.y_test - mean) / std,
        )
        return split, float(std) ** 2

    def sizes(self) -> dict[str, int]:
        """Number of examples per part."""
        return {
            "train": int(self.X_train.shape[0]),
            "val": int(self.X_val.shape[0]),
            "test": int(self.X_test.shape[0]),
        }


def mse(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared error of the linear model ``X w`` against ``y``."""
    return float(((y - X @ w) ** 2).mean())


def _load_sklearn(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn import datasets  # scikit-learn belongs to the applications' extra

    loaders = {
        "breast_cancer": datasets.load_breast_cancer,
        "diabetes": datasets.load_diabetes,
        "digits": datasets.load_digits,
    }
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(loaders)}")
    bunch = loaders[name]()
    names = getattr(bunch, "feature_names", None)
    if names is None:
        names = [f"x{j}" for j in range(bunch.data.shape[1])]
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target), list(names)


def load_split(
    name: str,
    *,
    n_train: int,
    n_val: int,
    n_test: int | None = None,
    seed: int = 0,
    stratify: bool = False,
) -> Split:
    """Shuffle a bundled scikit-learn dataset and split it into train / validation / test.

    Features are standardised with the training part's mean and standard deviation
    (constant features are left centred, not divided by zero). Targets are returned as
    float64 for regression (``diabetes``) and int64 class labels otherwise.

    Args:
        name: ``"breast_cancer"``, ``"diabetes"`` or ``"digits"``.
        n_train, n_val: sizes of the training and validation parts.
        n_test: size of the test part (default: every remaining example).
        seed: seed of the shuffle.
        stratify: keep class proportions equal across the parts (classification only).
    """
    X, y, names = _load_sklearn(name)
    n = X.shape[0]
    n_test = n - n_train - n_val if n_test is None else n_test
    if min(n_train, n_val, n_test) <= 0 or n_train + n_val + n_test > n:
        raise ValueError(
            f"split sizes train={n_train}, val={n_val}, test={n_test} do not fit the "
            f"{n} examples of {name!r}"
        )
    rng = np.random.default_rng(seed)
    if stratify:
        from sklearn.model_selection import train_test_split

        rest, test_idx = train_test_split(
            np.arange(n), test_size=n_test, stratify=y, random_state=int(rng.integers(2**31))
        )
        train_idx, val_idx = train_test_split(
            rest,
            train_size=n_train,
            test_size=n_val,
            stratify=y[rest],
            random_state=int(rng.integers(2**31)),
        )
    else:
        perm = rng.permutation(n)
        train_idx = perm[:n_train]
        val_idx = perm[n_train : n_train + n_val]
        test_idx = perm[n_train + n_val : n_train + n_val + n_test]
    mean = X[train_idx].mean(0)
    std = X[train_idx].std(0)
    std[std == 0] = 1.0
    Xs = (X - mean) / std
    regression = name == "diabetes"
    y_t = torch.as_tensor(y, dtype=DTYPE if regression else torch.int64)

    def part(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.as_tensor(Xs[idx], dtype=DTYPE), y_t[torch.as_tensor(idx)]

    (Xtr, ytr), (Xva, yva), (Xte, yte) = part(train_idx), part(val_idx), part(test_idx)
    return Split(Xtr, ytr, Xva, yva, Xte, yte, names)


def with_noise_features(data: Split, n_noise: int, *, seed: int = 0) -> Split:
    """Append ``n_noise`` independent standard-normal features (named ``noise_k``) to a split."""
    if n_noise == 0:
        return data
    gen = torch.Generator().manual_seed(10_007 + seed)

    def aug(X: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(X.shape[0], n_noise, generator=gen, dtype=X.dtype)
        return torch.cat([X, noise], dim=1)

    return Split(
        aug(data.X_train),
        data.y_train,
        aug(data.X_val),
        data.y_val,
        aug(data.X_test),
        data.y_test,
        data.feature_names + [f"noise_{k}" for k in range(n_noise)],
    )


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch and NumPy/SciPy's BLAS on one thread inside the block (also a decorator).

    The examples' problems are small (at most a few hundred × a few hundred); there, extra
    threads only add synchronisation, and on a busy machine they cost far more: measured on
    the 2-core CI machine under load, the quick ``weight_decay`` run took 9.5 s with two torch
    threads and 2.4 s with one, and SciPy's L-BFGS-B spent 3 ms per iteration of an
    11-variable problem in multi-threaded OpenBLAS calls against 0.1 ms single-threaded.
    The previous thread counts are restored on exit.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
            yield
        else:
            with threadpool_limits(limits=1, user_api="blas"):
                yield
    finally:
        torch.set_num_threads(previous)


class Adam:
    """Adam (Kingma & Ba, 2015) on one tensor, fed with gradients computed elsewhere.

    ``new = opt.step(grad)`` returns the updated value (projected onto ``bounds`` when
    given); the tensor passed in is not touched.
    (A dozen lines instead of ``torch.optim.Adam``, whose first use imports the compiler
    stack — seconds on a small CPU.)
    """

    def __init__(
        self,
        value: torch.Tensor,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        bounds: tuple[float, float] | None = None,
    ) -> None:
        self.value = value.detach().clone()
        self.lr, (self.b1, self.b2), self.bounds = lr, betas, bounds
        self.m = torch.zeros_like(self.value)
        self.v = torch.zeros_like(self.value)
        self.t = 0

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        """One update with ``grad``; returns the new value."""
        self.t += 1
        grad = grad.detach()
        self.m = self.b1 * self.m + (1 - self.b1) * grad
        self.v = self.b2 * self.v + (1 - self.b2) * grad**2
        m_hat = self.m / (1 - self.b1**self.t)
        v_hat = self.v / (1 - self.b2**self.t)
        self.value = self.value - self.lr * m_hat / (v_hat.sqrt() + 1e-8)
        if self.bounds is not None:  # projected step: keep the value in its box
            self.value = self.value.clamp(*self.bounds)
        return self.value


class ProgressBar:
    """A tqdm bar counting inner solves, with the latest metrics as postfix (or nothing)."""

    def __init__(self, total: int, *, desc: str, enabled: bool = True) -> None:
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: float) -> None:
        """Advance by ``n`` and show ``postfix`` (e.g. the current validation loss)."""
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self._bar.update(n)

    def close(self) -> None:
        """Remove the bar."""
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def to_jsonable(obj: Any) -> Any:
    """Convert tensors, arrays, dataclasses and non-finite floats into JSON-friendly values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e4:
            return f"{value:.4f}"
        return f"{value:.3e}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Render a list of dicts (same keys) as a GitHub-flavoured markdown table."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = [
        "| " + " | ".join(keys) + " |",
        "|" + "|".join("---" for _ in keys) + "|",
    ]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


@dataclasses.dataclass
class Result:
    """What every example returns.

    Attributes:
        name: the example's name (``"weight_decay"``, ...).
        config: the configuration it ran with (a plain dict).
        rows: the comparison table, one dict per method (same keys in every row).
        summary: the headline numbers (what the tests and the docs quote).
        history: per-iteration curves (outer loss, hyperparameters, ...).
        details: anything else worth keeping (learned hyperparameters, check tables).
        seconds: wall-clock time of the run.
        files: paths of the written JSON and PNG, when an output directory was given.
    """

    name: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    history: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    files: dict[str, str] = dataclasses.field(default_factory=dict)

    def row(self, method: str) -> dict[str, Any]:
        """The table row whose ``method`` entry is ``method``."""
        for r in self.rows:
            if r.get("method") == method:
                return r
        raise KeyError(
            f"no row for method {method!r}; rows: {[r.get('method') for r in self.rows]}"
        )

    def table(self) -> str:
        """The comparison table in markdown."""
        return markdown_table(self.rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of every field."""
        return to_jsonable(self)

    def save(self, out_dir: str | os.PathLike[str], figure: Any | None = None) -> dict[str, str]:
        """Write ``results.json`` (and ``figure.png`` from a matplotlib figure) to ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if figure is not None:
            png = out / "figure.png"
            figure.savefig(png, dpi=110, bbox_inches="tight")
            import matplotlib.pyplot as plt

            plt.close(figure)
            self.files["figure"] = str(png)
        path = out / "results.json"
        self.files["json"] = str(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return self.files


def new_figure(ncols: int, *, width: float = 4.2, height: float = 3.2) -> tuple[Any, Any]:
    """A row of ``ncols`` matplotlib axes on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])
