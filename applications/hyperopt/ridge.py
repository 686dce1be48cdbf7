r"""Ridge regression with one L2 strength per feature: the implicit hypergradient against
its closed form, then hypergradient descent.

Inner problem (diabetes; standardised features, targets centred on the training mean)::

    w*(θ) = argmin_w  1/(2n) ‖y − Xw‖² + ½ Σⱼ exp(θⱼ) wⱼ²  =  (XᵀX/n + diag(λ))⁻¹ Xᵀy/n

Outer problem: validation mean squared error ``L(θ) = 1/m ‖y_val − X_val w*(θ)‖²``.

Closed form of the hypergradient: with ``A = XᵀX/n + diag(λ)`` and ``g = ∇_w L``,
``∂w*/∂λⱼ = −A⁻¹ eⱼ wⱼ``, so ``∂L/∂θⱼ = −λⱼ wⱼ (A⁻¹g)ⱼ``. The library computes the same
quantity without knowing any of this: from the inner loss alone (``bl.stationarity``), an
inner solver it never looks inside, and conjugate gradients on Hessian-vector products.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import bilevel as bl

from ._common import (
    DTYPE,
    Adam,
    ProgressBar,
    Result,
    load_split,
    markdown_table,
    mse,
    new_figure,
    single_threaded,
)

__all__ = ["RidgeConfig", "closed_form_hypergradient", "run_ridge"]


@dataclasses.dataclass
class RidgeConfig:
    """Settings of :func:`run_ridge`.

    Attributes:
        n_train, n_val: sizes of the training and validation parts (the rest is test).
        steps: outer steps (= inner solves) of hypergradient descent and of the baselines.
        lr: Adam step size on ``θ = log λ``.
        init_log_lam: initial ``θⱼ``.
        log_lam_min, log_lam_max: box for ``θ`` and range of the grid-search baseline.
        seed: seed of the data split and of the point ``θ ~ init_log_lam + N(0, I)`` where
            the hypergradient is compared with its closed form.
    """

    n_train: int = 150
    n_val: int = 150
    steps: int = 100
    lr: float = 0.1
    init_log_lam: float = math.log(0.1)
    log_lam_min: float = math.log(1e-6)
    log_lam_max: float = math.log(1e3)
    seed: int = 0

    @classmethod
    def quick(cls, seed: int = 0) -> RidgeConfig:
        """A configuration that runs in a couple of seconds."""
        return cls(steps=40, seed=seed)


def inner_loss(
    w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor, *_: Any
) -> torch.Tensor:
    """``1/(2n) ‖y − Xw‖² + ½ Σⱼ exp(θⱼ) wⱼ²``."""
    return 0.5 * ((y - X @ w) ** 2).mean() + 0.5 * (log_lam.exp() * w**2).sum()


def outer_loss(
    w: torch.Tensor,
    log_lam: torch.Tensor,
    X: torch.Tensor,
    y: torch.Tensor,
    X_val: torch.Tensor,
    y_val: torch.Tensor,
) -> torch.Tensor:
    """Validation mean squared error."""
    return ((y_val - X_val @ w) ** 2).mean()


@bl.custom_root(bl.stationarity(inner_loss), solver=bl.CG(tol=1e-13, maxiter=2000))
def solve_ridge(
    w0: torch.Tensor,
    log_lam: torch.Tensor,
    X: torch.Tensor,
    y: torch.Tensor,
    X_val: torch.Tensor,
    y_val: torch.Tensor,
) -> torch.Tensor:
    """Closed-form inner solution (a Cholesky solve); ``w0`` is not needed."""
    n = X.shape[0]
    A = X.T @ X / n + torch.diag(log_lam.exp())
    return torch.linalg.solve(A, X.T @ y / n)


def closed_form_hypergradient(
    log_lam: torch.Tensor,
    X: torch.Tensor,
    y: torch.Tensor,
    X_val: torch.Tensor,
    y_val: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation MSE and its gradient in ``θ = log λ`` by the hand-derived formula."""
    n, m = X.shape[0], X_val.shape[0]
    lam = log_lam.exp()
    A = X.T @ X / n + torch.diag(lam)
    w = torch.linalg.solve(A, X.T @ y / n)
    residual = X_val @ w - y_val
    g = 2.0 * X_val.T @ residual / m
    return (residual**2).mean(), -lam * w * torch.linalg.solve(A, g)


def _r2(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> float:
    return 1.0 - mse(w, X, y) / float(((y - y.mean()) ** 2).mean())


@single_threaded()
def run_ridge(
    config: RidgeConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> Result:
    """Check the implicit hypergradient against the closed form, then optimise ``θ``.

    Args:
        config: settings (default :class:`RidgeConfig`).
        out_dir: where to write ``results.json`` and ``figure.png`` (nothing written if None).
        progress: show a progress bar.
        verbose: print the hypergradient check table.

    Returns:
        A :class:`~applications.hyperopt._common.Result`; ``summary["check_rel_error"]`` is
        the relative error of the implicit hypergradient against the closed form.
    """
    cfg = config or RidgeConfig()
    start = time.perf_counter()
    data = load_split(
        "diabetes", n_train=cfg.n_train, n_val=cfg.n_val, seed=cfg.seed
    ).centred_targets()[0]
    names = data.feature_names
    d = data.n_features
    args = (data.X_train, data.y_train, data.X_val, data.y_val)
    w0 = torch.zeros(d, dtype=DTYPE)

    # 1. the check: implicit hypergradient vs closed form at a random θ.
    gen = torch.Generator().manual_seed(cfg.seed)
    theta_check = cfg.init_log_lam + torch.randn(d, generator=gen, dtype=DTYPE)
    value, (grad, *_) = bl.implicit_grad(solve_ridge, outer_loss, argnums=0)(w0, theta_check, *args)
    value_cf, grad_cf = closed_form_hypergradient(theta_check, *args)
    rel_error = float((grad - grad_cf).norm() / grad_cf.norm())
    per_feature = [
        {
            "feature": n,
            "implicit": float(a),
            "closed_form": float(b),
            "rel_error": float(abs(a - b) / max(abs(float(b)), 1e-300)),
        }
        for n, a, b in zip(names, grad.tolist(), grad_cf.tolist(), strict=True)
    ]
    if verbose:
        print(f"hypergradient at a random θ: relative error {rel_error:.2e} (float64)")
        print(markdown_table(per_feature[:12]))
        if d > 12:
            print(f"... ({d - 12} more features)")

    # 2. hypergradient descent (Adam on θ), against grid search over one shared λ.
    bar = ProgressBar(2 * cfg.steps, desc="ridge", enabled=progress)
    theta = torch.full((d,), cfg.init_log_lam, dtype=DTYPE, requires_grad=True)
    opt = Adam(theta, lr=cfg.lr, bounds=(cfg.log_lam_min, cfg.log_lam_max))
    hist: list[float] = []
    best = (math.inf, theta.detach().clone())
    for _ in range(cfg.steps):
        w = solve_ridge(w0, theta, *args)
        loss = outer_loss(w, theta, *args)
        (g,) = torch.autograd.grad(loss, theta)
        hist.append(float(loss.detach()))
        if hist[-1] < best[0]:
            best = (hist[-1], theta.detach().clone())
        with torch.no_grad():
            theta.copy_(opt.step(g))
        bar.update(val_mse=hist[-1])
    w_hg = solve_ridge(w0, best[1], *args)

    grid = np.linspace(cfg.log_lam_min, cfg.log_lam_max, cfg.steps)
    grid_val = []
    for t in grid:
        grid_val.append(mse(solve_ridge(w0, torch.full((d,), t, dtype=DTYPE), *args), *args[2:]))
        bar.update()
    bar.close()
    i = int(np.argmin(grid_val))
    w_grid = solve_ridge(w0, torch.full((d,), float(grid[i]), dtype=DTYPE), *args)
    w_init = solve_ridge(w0, torch.full((d,), cfg.init_log_lam, dtype=DTYPE), *args)

    def row(method: str, w: torch.Tensor) -> dict[str, Any]:
        return {
            "method": method,
            "val_mse": mse(w, data.X_val, data.y_val),
            "test_mse": mse(w, data.X_test, data.y_test),
            "test_r2": _r2(w, data.X_test, data.y_test),
            "inner_solves": cfg.steps,
        }

    rows = [
        row("hypergradient (per-feature)", w_hg),
        row("grid search (shared)", w_grid),
    ]
    result = Result(
        name="ridge",
        config=dataclasses.asdict(cfg),
        rows=rows,
        summary={
            "check_rel_error": rel_error,
            "check_value_abs_error": abs(float(value) - float(value_cf)),
            "initial": row("initial (shared)", w_init),
            "grid_best_lambda": math.exp(grid[i]),
        },
        history={
            "hypergradient_val_mse": hist,
            "grid_log_lambda": grid.tolist(),
            "grid_val_mse": grid_val,
        },
        details={
            "check": per_feature,
            "learned_lambda": dict(zip(names, best[1].exp().tolist(), strict=True)),
            "split": data.sizes(),
            "n_features": d,
        },
    )
    result.seconds = time.perf_counter() - start
    if out_dir is not None:
        result.save(out_dir, _figure(result))
    return result


def _figure(result: Result) -> Any:
    fig, (ax1, ax2) = new_figure(2)
    check = result.details["check"]
    cf = np.array([c["closed_form"] for c in check])
    ours = np.array([c["implicit"] for c in check])
    lim = max(np.abs(cf).max(), 1e-12) * 1.1
    ax1.plot([-lim, lim], [-lim, lim], color="0.7", lw=1)
    ax1.scatter(cf, ours, s=12)
    ax1.set_xlabel("closed-form ∂L/∂θⱼ")
    ax1.set_ylabel("implicit ∂L/∂θⱼ (bilevel)")
    ax1.set_title(f"Hypergradient check (rel. err {result.summary['check_rel_error']:.1e})")
    h = result.history
    ax2.plot(
        np.arange(1, len(h["hypergradient_val_mse"]) + 1),
        h["hypergradient_val_mse"],
        label="hypergradient (per-feature)",
    )
    ax2.plot(
        np.arange(1, len(h["grid_val_mse"]) + 1),
        np.minimum.accumulate(h["grid_val_mse"]),
        label="grid search (shared), best so far",
    )
    ax2.set_xlabel("inner solves")
    ax2.set_ylabel("validation MSE")
    ax2.set_title("Search progress")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig
