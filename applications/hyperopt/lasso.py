r"""The Lasso strength by hypergradient descent through the proximal-gradient fixed point,
against scikit-learn's ``LassoCV``.

Inner problem (diabetes; standardised features, targets centred on the training mean) in
scikit-learn's own scaling::

    w*(α) = argmin_w  1/(2n) ‖y − Xw‖² + α ‖w‖₁

It is not differentiable, but its solution is the fixed point of one proximal-gradient step
``w = prox_{ηα‖·‖₁}(w − η ∇f(w))`` (soft-thresholding), and ``bl.proximal_gradient`` turns
that fixed point into an optimality condition the implicit function theorem can
differentiate (Bertrand et al., "Implicit differentiation of Lasso-type models", ICML 2020).
The inner solver is FISTA followed by an exact solve on the detected support.

Outer problem: validation MSE, minimised over ``log α ∈ [log(10⁻⁴ α_max), log α_max]`` by
sign-based steps (Rprop: the validation curve is very flat near its minimum, where the
hypergradient is tiny). ``LassoCV`` gets the same data (train ∪ validation) and picks ``α``
by 5-fold cross-validation on its grid (100 strengths in ``[10⁻³ α_max, α_max]``).
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
    ProgressBar,
    Result,
    load_split,
    mse,
    new_figure,
    single_threaded,
)

__all__ = ["LassoConfig", "lasso_fista", "run_lasso"]


@dataclasses.dataclass
class LassoConfig:
    """Settings of :func:`run_lasso`.

    Attributes:
        n_train, n_val: sizes of the training and validation parts (the rest is test).
        steps: outer steps on ``log α``.
        lr: initial step on ``log α`` (Rprop: ×1.2 while the hypergradient keeps its sign,
            ×0.5 when it flips).
        init_alpha_ratio: initial ``α`` as a fraction of ``α_max = ‖Xᵀy‖∞ / n`` (the
            smallest strength giving ``w* = 0``).
        cv_folds: folds of ``LassoCV``.
        inner_tol: the inner solver's fixed-point residual target.
        seed: seed of the split and of LassoCV's folds.
    """

    n_train: int = 150
    n_val: int = 150
    steps: int = 60
    lr: float = 0.3
    init_alpha_ratio: float = 0.3
    cv_folds: int = 5
    inner_tol: float = 1e-12
    seed: int = 0

    @classmethod
    def quick(cls, seed: int = 0) -> LassoConfig:
        """A configuration that runs in a few seconds."""
        return cls(steps=25, seed=seed)


class Rprop:
    """Sign-based steps with adaptive sizes (Riedmiller & Braun, 1993) on one scalar."""

    def __init__(self, step: float, *, grow: float = 1.2, shrink: float = 0.5) -> None:
        self.size, self.grow, self.shrink, self.sign = step, grow, shrink, 0.0

    def step(self, grad: float) -> float:
        """The decrement for ``grad``: ``sign(grad) · size``, the size adapted first."""
        sign = math.copysign(1.0, grad) if grad != 0 else 0.0
        if sign * self.sign > 0:
            self.size *= self.grow
        elif sign * self.sign < 0:
            self.size *= self.shrink
        self.sign = sign
        return sign * self.size


def smooth_loss(
    w: torch.Tensor, log_alpha: torch.Tensor, X: torch.Tensor, y: torch.Tensor, *_: Any
) -> torch.Tensor:
    """The smooth part ``f(w) = 1/(2n) ‖y − Xw‖²`` (scikit-learn's scaling)."""
    return 0.5 * ((y - X @ w) ** 2).mean()


def lasso_objective(w: torch.Tensor, alpha: float, X: torch.Tensor, y: torch.Tensor) -> float:
    """``1/(2n) ‖y − Xw‖² + α ‖w‖₁``."""
    return float(0.5 * ((y - X @ w) ** 2).mean() + alpha * w.abs().sum())


def lasso_fista(
    w0: torch.Tensor,
    alpha: torch.Tensor | float,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    step: float,
    tol: float = 1e-12,
    maxiter: int = 20_000,
) -> torch.Tensor:
    """Solve the Lasso by FISTA with adaptive restart, then polish on the support.

    FISTA (Beck & Teboulle, 2009; restart as O'Donoghue & Candès, 2015) identifies the
    support and signs; the polish solves ``X_SᵀX_S w_S / n = X_Sᵀy / n − α sign(w_S)``
    exactly and is kept when it is consistent (same signs, zero coordinates still satisfy
    ``|X_jᵀ(y − Xw)| / n ≤ α``). Stops when the proximal-gradient fixed-point residual
    ``‖prox(w − η∇f) − w‖`` is below ``tol`` (relative to ``max(1, ‖w‖)``).
    """
    n = X.shape[0]
    alpha = float(alpha)
    XtX, Xty = X.T @ X / n, X.T @ y / n

    def T(w: torch.Tensor) -> torch.Tensor:
        v = w - step * (XtX @ w - Xty)
        return torch.sign(v) * torch.clamp(v.abs() - step * alpha, min=0)

    def residual(w: torch.Tensor) -> float:
        return float((T(w) - w).norm()) / max(1.0, float(w.norm()))

    w = w0.clone()
    z, t = w.clone(), 1.0
    for k in range(maxiter):
        w_new = T(z)
        if k % 50 == 0 and residual(w_new) <= tol:
            w = w_new
            break
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        if float((z - w_new) @ (w_new - w)) > 0:  # restart the momentum when it hurts
            t_new, z = 1.0, w_new
        else:
            z = w_new + ((t - 1) / t_new) * (w_new - w)
        w, t = w_new, t_new
        if k % 200 == 199:  # try to finish exactly on the current support
            polished = _polish(w, alpha, XtX, Xty)
            if polished is not None and residual(polished) <= tol:
                return polished
    polished = _polish(w, alpha, XtX, Xty)
    if polished is not None and residual(polished) < residual(w):
        return polished
    return w


def _polish(
    w: torch.Tensor, alpha: float, XtX: torch.Tensor, Xty: torch.Tensor
) -> torch.Tensor | None:
    support = w != 0
    if not bool(support.any()):
        return None
    s = torch.sign(w[support])
    A = XtX[support][:, support]
    w_s = torch.linalg.solve(A, Xty[support] - alpha * s)
    if not bool((torch.sign(w_s) == s).all()):
        return None
    out = torch.zeros_like(w)
    out[support] = w_s
    corr = (Xty - XtX @ out).abs()
    if bool((corr[~support] > alpha * (1 + 1e-9)).any()):
        return None
    return out


def outer_loss(
    w: torch.Tensor,
    log_alpha: torch.Tensor,
    X: torch.Tensor,
    y: torch.Tensor,
    X_val: torch.Tensor,
    y_val: torch.Tensor,
) -> torch.Tensor:
    """Validation mean squared error."""
    return ((y_val - X_val @ w) ** 2).mean()


def make_solver(step: float, tol: float = 1e-12) -> bl.ImplicitFunction:
    """The Lasso solver made differentiable in ``log α`` through the proximal-gradient
    fixed point ``F(w, log α, …) = prox_{η α ‖·‖₁}(w − η ∇f(w)) − w``."""
    optimality = bl.proximal_gradient(
        smooth_loss,
        bl.prox_lasso,
        step=step,
        prox_hyper=lambda log_alpha, *_: log_alpha.exp(),
    )

    @bl.custom_root(optimality, solver=bl.GMRES(tol=1e-10, maxiter=200), argnums=0)
    def solve(
        w0: torch.Tensor, log_alpha: torch.Tensor, X: torch.Tensor, y: torch.Tensor, *_: Any
    ) -> torch.Tensor:
        return lasso_fista(w0, log_alpha.exp(), X, y, step=step, tol=tol)

    return solve


@single_threaded()
def run_lasso(
    config: LassoConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> Result:
    """Tune the Lasso strength by implicit hypergradients; compare with ``LassoCV``.

    Args:
        config: settings (default :class:`LassoConfig`).
        out_dir: where to write ``results.json`` and ``figure.png`` (nothing written if None).
        progress: show a progress bar.

    Returns:
        A :class:`~applications.hyperopt._common.Result` with one row per method: the chosen
        ``α``, the number of non-zero coefficients, validation / test MSE of the model fitted
        on the training part, and test MSE after refitting on train ∪ validation.
    """
    from sklearn.linear_model import Lasso, LassoCV
    from sklearn.model_selection import KFold

    cfg = config or LassoConfig()
    start = time.perf_counter()
    data = load_split(
        "diabetes", n_train=cfg.n_train, n_val=cfg.n_val, seed=cfg.seed
    ).centred_targets()[0]
    X, y, Xv, yv = data.X_train, data.y_train, data.X_val, data.y_val
    n, d = X.shape
    step = 1.0 / float(torch.linalg.eigvalsh(X.T @ X / n).max())
    solve = make_solver(step, cfg.inner_tol)
    alpha_max = float((X.T @ y).abs().max()) / n
    w0 = torch.zeros(d, dtype=DTYPE)

    # 1. hypergradient descent on log α.
    log_alpha = torch.tensor(
        math.log(cfg.init_alpha_ratio * alpha_max), dtype=DTYPE, requires_grad=True
    )
    rprop = Rprop(cfg.lr)
    bounds = (math.log(alpha_max * 1e-4), math.log(alpha_max))
    w = w0
    hist_alpha: list[float] = []
    hist_val: list[float] = []
    best = (math.inf, float(log_alpha.detach()))
    bar = ProgressBar(cfg.steps, desc="lasso", enabled=progress)
    for _ in range(cfg.steps):
        w = solve(w.detach(), log_alpha, X, y, Xv, yv)
        loss = outer_loss(w, log_alpha, X, y, Xv, yv)
        (grad,) = torch.autograd.grad(loss, log_alpha)
        value = float(loss.detach())
        hist_alpha.append(math.exp(float(log_alpha.detach())))
        hist_val.append(value)
        if value < best[0]:
            best = (value, float(log_alpha.detach()))
        with torch.no_grad():
            log_alpha.sub_(rprop.step(float(grad))).clamp_(*bounds)
        bar.update(val_mse=value, alpha=hist_alpha[-1])
    bar.close()
    alpha_hg = math.exp(best[1])

    # 2. LassoCV on train ∪ validation (the data the hypergradient run saw).
    X_all = torch.cat([X, Xv]).numpy()
    y_all = torch.cat([y, yv]).numpy()
    cv = LassoCV(
        cv=KFold(cfg.cv_folds, shuffle=True, random_state=cfg.seed), max_iter=100_000, tol=1e-10
    )
    cv.fit(X_all, y_all)
    alpha_cv = float(cv.alpha_)

    # 3. the same evaluation for both strengths.
    def row(method: str, alpha: float) -> dict[str, Any]:
        w_a = lasso_fista(w0, alpha, X, y, step=step, tol=cfg.inner_tol)
        refit = Lasso(alpha=alpha, max_iter=100_000, tol=1e-10).fit(X_all, y_all)
        test_refit = float(np.mean((data.y_test.numpy() - refit.predict(data.X_test.numpy())) ** 2))
        return {
            "method": method,
            "alpha": alpha,
            "nonzeros": int((w_a != 0).sum()),
            "val_mse": mse(w_a, Xv, yv),
            "test_mse": mse(w_a, data.X_test, data.y_test),
            "test_mse_refit": test_refit,
        }

    rows = [row("hypergradient (implicit)", alpha_hg), row("LassoCV (5-fold)", alpha_cv)]
    # The inner solver against scikit-learn at the chosen α (same objective, same scaling).
    ref = Lasso(alpha=alpha_hg, fit_intercept=False, max_iter=100_000, tol=1e-12).fit(
        X.numpy(), y.numpy()
    )
    w_hg = lasso_fista(w0, alpha_hg, X, y, step=step, tol=cfg.inner_tol)
    sk_gap = float(np.abs(w_hg.numpy() - ref.coef_).max())

    # Validation curve on a grid, for the figure (not used by either method).
    grid = np.geomspace(alpha_max * 1e-4, alpha_max, 60)
    curve, w_c = [], w0
    for a in grid[::-1]:
        w_c = lasso_fista(w_c, float(a), X, y, step=step, tol=1e-10)
        curve.append(mse(w_c, Xv, yv))
    result = Result(
        name="lasso",
        config=dataclasses.asdict(cfg),
        rows=rows,
        summary={
            "alpha_hypergradient": alpha_hg,
            "alpha_lassocv": alpha_cv,
            "alpha_max": alpha_max,
            "lassocv_cv_mse": float(cv.mse_path_.mean(axis=1).min()),
            "max_abs_diff_vs_sklearn_lasso": sk_gap,
        },
        history={"alpha": hist_alpha, "val_mse": hist_val},
        details={
            "grid_alpha": grid[::-1].tolist(),
            "grid_val_mse": curve,
            "step": step,
            "split": data.sizes(),
            "coef_hypergradient": dict(zip(data.feature_names, w_hg.tolist(), strict=True)),
        },
    )
    result.seconds = time.perf_counter() - start
    if out_dir is not None:
        result.save(out_dir, _figure(result))
    return result


def _figure(result: Result) -> Any:
    fig, (ax1, ax2) = new_figure(2)
    det, s = result.details, result.summary
    ax1.plot(det["grid_alpha"], det["grid_val_mse"], color="0.6", label="validation MSE (grid)")
    ax1.plot(
        result.history["alpha"],
        result.history["val_mse"],
        "o-",
        ms=3,
        label="hypergradient iterates",
    )
    ax1.axvline(s["alpha_hypergradient"], color="tab:blue", ls="--", label="hypergradient α")
    ax1.axvline(s["alpha_lassocv"], color="tab:orange", ls="--", label="LassoCV α")
    ax1.set_xscale("log")
    low = min(det["grid_val_mse"])
    ax1.set_ylim(0.98 * low, 1.25 * low)  # the interesting part: near the minimum
    ax1.set_xlabel("α")
    ax1.set_ylabel("validation MSE")
    ax1.set_title("Lasso strength")
    ax1.legend(fontsize=7)
    ax2.plot(np.arange(1, len(result.history["alpha"]) + 1), result.history["alpha"])
    ax2.axhline(s["alpha_lassocv"], color="tab:orange", ls="--", label="LassoCV α")
    ax2.set_yscale("log")
    ax2.set_xlabel("outer step")
    ax2.set_ylabel("α")
    ax2.set_title("Hypergradient descent on log α")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig
