r"""Per-feature weight decay for logistic regression, tuned by hypergradient descent.

Data: breast-cancer (30 standardised features; 100 train / 200 validation / 269 test).
Optionally ``n_noise`` pure-noise Gaussian features are appended — the situation per-feature
decay is made for: one shared strength must compromise between features worth keeping and
features worth silencing, while per-feature strengths can silence the noise alone.

Inner problem (``w`` the weights, ``b`` the bias)::

    w*(θ) = argmin_{w,b}  mean_i BCE(xᵢᵀw + b, yᵢ) + ½ Σⱼ exp(θⱼ) wⱼ²

solved by damped Newton to a gradient norm of ``1e-10``. Outer problem: the mean
validation cross-entropy of ``w*(θ)``. One hyperparameter per feature — far too many for
a grid, but one hypergradient costs one inner solve plus one linear solve
with the Hessian, whatever the number of hyperparameters.

Baselines: grid search and random search over one shared strength ``λ``, given the same
number of inner solves as the hypergradient run has outer steps. Every method is judged
by the validation loss of the configuration it picks (the best one it saw), then reported
on a held-out test set.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import bilevel as bl

from ._common import (
    DTYPE,
    Adam,
    ProgressBar,
    Result,
    Split,
    load_split,
    new_figure,
    single_threaded,
    with_noise_features,
)

__all__ = ["WeightDecayConfig", "logistic_newton", "run_weight_decay"]


@dataclasses.dataclass
class WeightDecayConfig:
    """Settings of :func:`run_weight_decay`.

    Attributes:
        n_train, n_val: sizes of the training and validation parts (the rest is test).
        n_noise: number of irrelevant standard-normal features appended to the 30 real ones.
        steps: outer steps of hypergradient descent = inner solves of every method. Many
            more steps keep lowering the validation loss but start to overfit the 200
            validation examples (see ``docs/hyperopt.md``).
        lr: Adam step size on ``θ = log λ``.
        init_log_lam: initial ``θⱼ`` (every feature).
        log_lam_min, log_lam_max: search range of the baselines, and the box ``θ`` is
            clipped to.
        inner_tol: gradient-norm tolerance of the Newton inner solver.
        seed: seed of the data split, the noise features and random search.
    """

    n_train: int = 100
    n_val: int = 200
    n_noise: int = 0
    steps: int = 20
    lr: float = 0.1
    init_log_lam: float = math.log(1e-2)
    log_lam_min: float = math.log(1e-5)
    log_lam_max: float = math.log(10.0)
    inner_tol: float = 1e-10
    seed: int = 0

    @classmethod
    def quick(cls, seed: int = 0) -> WeightDecayConfig:
        """A configuration that runs in a couple of seconds."""
        return cls(steps=15, seed=seed)


# --- the inner problem ------------------------------------------------------------------


def inner_loss(
    params: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor, *_: Any
) -> torch.Tensor:
    """Regularised mean cross-entropy; ``params = [w, b]``, ``log_lam`` per feature."""
    logits = X @ params[:-1] + params[-1]
    return (
        F.binary_cross_entropy_with_logits(logits, y)
        + 0.5 * (log_lam.exp() * params[:-1] ** 2).sum()
    )


def logistic_newton(
    params: torch.Tensor,
    lam: torch.Tensor,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    tol: float = 1e-10,
    maxiter: int = 100,
) -> torch.Tensor:
    """Damped Newton for L2-regularised logistic regression (bias unregularised).

    ``lam`` holds one strength per feature. Uses the exact gradient and Hessian and an
    Armijo backtracking line search; stops when the gradient norm is below ``tol``.
    """
    n = X.shape[0]
    Xb = torch.cat([X, torch.ones(n, 1, dtype=X.dtype)], dim=1)
    reg = torch.cat([lam, lam.new_zeros(1)])

    def value(p: torch.Tensor) -> float:
        return float(F.binary_cross_entropy_with_logits(Xb @ p, y) + 0.5 * (reg * p**2).sum())

    p = params.clone()
    f = value(p)
    for _ in range(maxiter):
        s = torch.sigmoid(Xb @ p)
        grad = Xb.T @ (s - y) / n + reg * p
        if float(grad.norm()) <= tol:
            break
        hess = (Xb.T * (s * (1 - s))) @ Xb / n + torch.diag(reg)
        step = torch.linalg.solve(hess, grad)
        t, slope = 1.0, float(grad @ step)  # slope: the Newton decrement squared
        trial = p - step
        f_trial = value(trial)
        # Armijo backtracking far from the optimum; near it (tiny decrement, where rounding
        # hides the decrease of f) the full Newton step is taken.
        while slope > 1e-12 and f_trial > f - 1e-4 * t * slope and t > 1e-10:
            t *= 0.5
            trial = p - t * step
            f_trial = value(trial)
        p, f = trial, f_trial
    return p


# The Hessian is small (31 × 31; 131 × 131 with 100 noise features): bl.Dense materialises
# it and solves by Cholesky, exactly.
@bl.custom_root(bl.stationarity(inner_loss), solver=bl.Dense(positive_definite=True))
def solve_inner(
    params0: torch.Tensor,
    log_lam: torch.Tensor,
    X: torch.Tensor,
    y: torch.Tensor,
    X_val: torch.Tensor,
    y_val: torch.Tensor,
    tol: float = 1e-10,
) -> torch.Tensor:
    """``argmin inner_loss`` by Newton; differentiable in ``log_lam`` by the IFT."""
    return logistic_newton(params0, log_lam.exp(), X, y, tol=tol)


def outer_loss(
    params: torch.Tensor,
    log_lam: torch.Tensor,
    X: torch.Tensor,
    y: torch.Tensor,
    X_val: torch.Tensor,
    y_val: torch.Tensor,
    *_: Any,
) -> torch.Tensor:
    """Mean validation cross-entropy of the inner solution."""
    return F.binary_cross_entropy_with_logits(X_val @ params[:-1] + params[-1], y_val)


def evaluate(params: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``params`` on ``(X, y)``."""
    logits = X @ params[:-1] + params[-1]
    loss = float(F.binary_cross_entropy_with_logits(logits, y))
    acc = float(((logits > 0).to(y.dtype) == y).to(DTYPE).mean())
    return loss, acc


# --- the experiment -----------------------------------------------------------------------


def _metrics(method: str, params: torch.Tensor, data: Split, y: dict[str, torch.Tensor]) -> dict:
    val_loss, val_acc = evaluate(params, data.X_val, y["val"])
    test_loss, test_acc = evaluate(params, data.X_test, y["test"])
    return {
        "method": method,
        "val_loss": val_loss,
        "val_acc": val_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
    }


@single_threaded()
def run_weight_decay(
    config: WeightDecayConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> Result:
    """Tune per-feature weight decay by hypergradient descent; compare with grid / random search.

    Args:
        config: settings (default :class:`WeightDecayConfig`).
        out_dir: where to write ``results.json`` and ``figure.png`` (nothing written if None).
        progress: show a progress bar.

    Returns:
        A :class:`~applications.hyperopt._common.Result` whose rows are the three methods
        with validation / test loss and accuracy.
    """
    cfg = config or WeightDecayConfig()
    start = time.perf_counter()
    data = load_split(
        "breast_cancer", n_train=cfg.n_train, n_val=cfg.n_val, seed=cfg.seed, stratify=True
    )
    data = with_noise_features(data, cfg.n_noise, seed=cfg.seed)
    y = {
        "train": data.y_train.to(DTYPE),
        "val": data.y_val.to(DTYPE),
        "test": data.y_test.to(DTYPE),
    }
    d = data.n_features
    args = (data.X_train, y["train"], data.X_val, y["val"])
    bar = ProgressBar(3 * cfg.steps, desc="weight_decay", enabled=progress)

    # 1. hypergradient descent on θ (per-feature log-strengths), Adam, warm-started inner solves.
    theta = torch.full((d,), cfg.init_log_lam, dtype=DTYPE, requires_grad=True)
    opt = Adam(theta, lr=cfg.lr, bounds=(cfg.log_lam_min, cfg.log_lam_max))
    params = torch.zeros(d + 1, dtype=DTYPE)
    hist_val: list[float] = []
    best = (math.inf, theta.clone(), params)
    for _ in range(cfg.steps):
        # One inner solve (warm-started) and one implicit backward pass per outer step.
        params = solve_inner(params.detach(), theta, *args, cfg.inner_tol)
        value = outer_loss(params, theta, *args)
        (grad,) = torch.autograd.grad(value, theta)
        value = float(value.detach())
        hist_val.append(value)
        if value < best[0]:
            best = (value, theta.detach().clone(), params.detach().clone())
        with torch.no_grad():
            theta.copy_(opt.step(grad))
        bar.update(val_loss=value)
    theta_best, params_hg = best[1], best[2]

    # 2. baselines over one shared strength, the same number of inner solves.
    def shared(log_lam: float) -> tuple[float, torch.Tensor]:
        p = logistic_newton(
            torch.zeros(d + 1, dtype=DTYPE),
            torch.full((d,), math.exp(log_lam), dtype=DTYPE),
            data.X_train,
            y["train"],
            tol=cfg.inner_tol,
        )
        bar.update()
        return evaluate(p, data.X_val, y["val"])[0], p

    grid = np.linspace(cfg.log_lam_min, cfg.log_lam_max, cfg.steps)
    grid_vals = [shared(float(t)) for t in grid]
    rng = np.random.default_rng(cfg.seed + 1)
    rand = rng.uniform(cfg.log_lam_min, cfg.log_lam_max, cfg.steps)
    rand_vals = [shared(float(t)) for t in rand]
    bar.close()
    i_grid = int(np.argmin([v for v, _ in grid_vals]))
    i_rand = int(np.argmin([v for v, _ in rand_vals]))

    rows = [
        _metrics("hypergradient (per-feature)", params_hg, data, y),
        _metrics("grid search (shared)", grid_vals[i_grid][1], data, y),
        _metrics("random search (shared)", rand_vals[i_rand][1], data, y),
    ]
    for r in rows:
        r["inner_solves"] = cfg.steps
    init = _metrics(
        "initial (shared)",
        logistic_newton(
            torch.zeros(d + 1, dtype=DTYPE),
            torch.full((d,), math.exp(cfg.init_log_lam), dtype=DTYPE),
            data.X_train,
            y["train"],
        ),
        data,
        y,
    )
    result = Result(
        name="weight_decay",
        config=dataclasses.asdict(cfg),
        rows=rows,
        summary={
            "test_loss": {r["method"]: r["test_loss"] for r in rows},
            "val_loss": {r["method"]: r["val_loss"] for r in rows},
            "initial": init,
            "grid_best_lambda": math.exp(grid[i_grid]),
            "random_best_lambda": math.exp(rand[i_rand]),
        },
        history={
            "hypergradient_val_loss": hist_val,
            "grid_log_lambda": grid.tolist(),
            "grid_val_loss": [v for v, _ in grid_vals],
            "random_log_lambda": rand.tolist(),
            "random_val_loss": [v for v, _ in rand_vals],
        },
        details={
            "learned_lambda": dict(zip(data.feature_names, theta_best.exp().tolist(), strict=True)),
            "split": data.sizes(),
            "median_log10_lambda_real": float((theta_best[:30] / math.log(10)).median()),
            "median_log10_lambda_noise": (
                float((theta_best[30:] / math.log(10)).median()) if cfg.n_noise else None
            ),
        },
    )
    result.seconds = time.perf_counter() - start
    if out_dir is not None:
        result.save(out_dir, _figure(result, cfg))
    return result


def _figure(result: Result, cfg: WeightDecayConfig) -> Any:
    fig, (ax1, ax2) = new_figure(2)
    h = result.history
    steps = np.arange(1, cfg.steps + 1)
    ax1.plot(steps, h["hypergradient_val_loss"], label="hypergradient (per-feature)")
    ax1.plot(steps, np.minimum.accumulate(h["grid_val_loss"]), label="grid search, best so far")
    order = np.minimum.accumulate(h["random_val_loss"])
    ax1.plot(steps, order, label="random search, best so far")
    ax1.set_xlabel("inner solves")
    ax1.set_ylabel("validation cross-entropy")
    ax1.set_title("Search progress")
    ax1.legend(fontsize=8)
    lam = result.details["learned_lambda"]
    names = list(lam)
    log_lam = np.log10(list(lam.values()))
    noise = np.array([n.startswith("noise_") for n in names])
    idx = np.arange(len(names))
    ax2.scatter(idx[~noise], log_lam[~noise], s=10, label="breast-cancer features")
    if noise.any():
        ax2.scatter(idx[noise], log_lam[noise], s=10, color="tab:red", label="noise features")
    ax2.axhline(
        math.log10(result.summary["grid_best_lambda"]),
        color="tab:orange",
        ls="--",
        label="grid search's shared λ",
    )
    if len(names) <= 40:
        ax2.set_xticks(idx, names, rotation=90, fontsize=5)
    else:
        ax2.set_xlabel("feature")
    ax2.set_ylabel("log10 λⱼ (learned)")
    ax2.set_title("Learned per-feature weight decay")
    ax2.legend(fontsize=7, loc="lower left", framealpha=0.9)
    fig.tight_layout()
    return fig
