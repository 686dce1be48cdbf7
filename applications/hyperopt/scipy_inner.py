r"""Solver-agnostic hypergradients: the inner problem is solved by SciPy on NumPy arrays — a
black box autograd never sees — and the hypergradient is still exact.

Inner problem (diabetes; standardised features and targets; ``w`` weights, ``b`` bias): robust
regression with the pseudo-Huber loss and one L2 strength per feature, which has no closed
form::

    w*(θ) = argmin_{w,b}  1/n Σᵢ δ² (√(1 + (rᵢ/δ)²) − 1) + ½ Σⱼ exp(θⱼ) wⱼ²,   rᵢ = yᵢ − xᵢᵀw − b

The solver is ``scipy.optimize.minimize(method="L-BFGS-B")`` on a NumPy objective with a
hand-written NumPy gradient. ``bl.custom_root`` only needs the optimality condition — the
gradient of a *torch* version of the same loss — to differentiate ``w*(θ)``; how the root
was found is irrelevant. The example checks the hypergradient of the validation MSE against
central finite differences (each a pair of extra inner solves), shows that two other inner
solvers give the same hypergradient, and then uses SciPy on the outer level too: L-BFGS-B on
``θ`` with the implicit hypergradient as ``jac``.
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
    markdown_table,
    new_figure,
    single_threaded,
)

__all__ = ["ScipyInnerConfig", "numpy_inner_solver", "run_scipy_inner"]


@dataclasses.dataclass
class ScipyInnerConfig:
    """Settings of :func:`run_scipy_inner`.

    Attributes:
        n_train, n_val: sizes of the training and validation parts (the rest is test).
        delta: the pseudo-Huber threshold (targets are standardised).
        init_log_lam: initial ``θⱼ``.
        log_lam_min, log_lam_max: box of the outer L-BFGS-B and range of the grid baseline.
        inner_gtol: L-BFGS-B's ``gtol`` for the inner problem.
        fd_eps: step of the central finite differences. Their inner solves are polished by
            three Newton steps: L-BFGS-B compares function values in its line search, so on
            its own it stops about ``1e-8`` from the solution, which ``/ (2 fd_eps)`` would
            turn into a visible finite-difference error.
        outer_iters: iteration budget of the outer L-BFGS-B.
        seed: seed of the data split and of the check point.
    """

    n_train: int = 150
    n_val: int = 150
    delta: float = 1.0
    init_log_lam: float = math.log(0.1)
    log_lam_min: float = math.log(1e-6)
    log_lam_max: float = math.log(1e3)
    inner_gtol: float = 1e-12
    fd_eps: float = 1e-4
    outer_iters: int = 40
    seed: int = 0

    @classmethod
    def quick(cls, seed: int = 0) -> ScipyInnerConfig:
        """A configuration that runs in a few seconds."""
        return cls(outer_iters=15, seed=seed)


# --- the inner problem, twice: NumPy for the black-box solver, torch for the condition ------


def _numpy_objective(
    p: np.ndarray, lam: np.ndarray, X: np.ndarray, y: np.ndarray, delta: float
) -> tuple[float, np.ndarray]:
    w, b = p[:-1], p[-1]
    r = y - X @ w - b
    s = np.sqrt(1.0 + (r / delta) ** 2)
    value = float(np.mean(delta**2 * (s - 1.0)) + 0.5 * np.sum(lam * w * w))
    dr = -(r / s) / len(y)  # d value / d r, per example, times ∂r/∂(w, b) below
    grad = np.concatenate([X.T @ dr + lam * w, [dr.sum()]])
    return value, grad


def numpy_inner_solver(
    p0: np.ndarray, lam: np.ndarray, X: np.ndarray, y: np.ndarray, *, delta: float, gtol: float
) -> np.ndarray:
    """Pseudo-Huber ridge regression by ``scipy.optimize.minimize(method="L-BFGS-B")``."""
    from scipy.optimize import minimize

    res = minimize(
        _numpy_objective,
        p0,
        args=(lam, X, y, delta),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 10_000, "gtol": gtol, "ftol": 1e-15, "maxcor": 20},
    )
    return res.x


def inner_loss(
    p: torch.Tensor,
    log_lam: torch.Tensor,
    X: torch.Tensor,
    y: torch.Tensor,
    delta: torch.Tensor,
    *_: Any,
) -> torch.Tensor:
    """The same objective in torch: only its gradient (the optimality condition) is used."""
    r = y - X @ p[:-1] - p[-1]
    return (delta**2 * (torch.sqrt(1 + (r / delta) ** 2) - 1)).mean() + 0.5 * (
        log_lam.exp() * p[:-1] ** 2
    ).sum()


def outer_loss(
    p: torch.Tensor,
    log_lam: torch.Tensor,
    X: torch.Tensor,
    y: torch.Tensor,
    delta: torch.Tensor,
    X_val: torch.Tensor,
    y_val: torch.Tensor,
) -> torch.Tensor:
    """Validation MSE (standardised targets)."""
    return ((y_val - X_val @ p[:-1] - p[-1]) ** 2).mean()


def make_solvers(cfg: ScipyInnerConfig) -> dict[str, bl.ImplicitFunction]:
    """Three interchangeable inner solvers made differentiable by the same condition."""
    F = bl.stationarity(inner_loss)
    backward = bl.CG(tol=1e-12, maxiter=200)

    @bl.custom_root(F, solver=backward, argnums=0)
    def scipy_numpy(
        p0: torch.Tensor,
        log_lam: torch.Tensor,
        X: torch.Tensor,
        y: torch.Tensor,
        delta: torch.Tensor,
        *_: Any,
    ) -> torch.Tensor:
        # Everything below is NumPy / SciPy: autograd never sees an operation of it.
        p = numpy_inner_solver(
            p0.numpy(),
            log_lam.exp().numpy(),
            X.numpy(),
            y.numpy(),
            delta=float(delta),
            gtol=cfg.inner_gtol,
        )
        return torch.from_numpy(p)

    bridge = bl.inner.scipy_minimize(
        inner_loss, "BFGS", options={"gtol": cfg.inner_gtol, "maxiter": 10_000}
    )
    torch_lbfgs = bl.inner.lbfgs(inner_loss, tolerance_grad=cfg.inner_gtol, max_iter=5000)
    return {
        "scipy L-BFGS-B on NumPy (black box)": scipy_numpy,
        "bl.inner.scipy_minimize (BFGS)": bl.custom_root(F, solver=backward, argnums=0)(bridge),
        "bl.inner.lbfgs (torch L-BFGS)": bl.custom_root(F, solver=backward, argnums=0)(torch_lbfgs),
    }


@single_threaded()
def run_scipy_inner(
    config: ScipyInnerConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> Result:
    """Exact hypergradients through a SciPy inner solver; SciPy on the outer level too.

    Args:
        config: settings (default :class:`ScipyInnerConfig`).
        out_dir: where to write ``results.json`` and ``figure.png`` (nothing written if None).
        progress: show a progress bar.
        verbose: print the finite-difference check table.

    Returns:
        A :class:`~applications.hyperopt._common.Result`. ``summary["fd_rel_error"]`` is the
        relative error of the implicit hypergradient (SciPy inner solver) against central
        finite differences; ``summary["solver_rel_spread"]`` the largest relative difference
        between the hypergradients obtained with the three inner solvers.
    """
    from scipy.optimize import minimize

    cfg = config or ScipyInnerConfig()
    start = time.perf_counter()
    data, y_var = load_split(
        "diabetes", n_train=cfg.n_train, n_val=cfg.n_val, seed=cfg.seed
    ).centred_targets(scale=True)
    d = data.n_features
    delta = torch.tensor(cfg.delta, dtype=DTYPE)
    args = (data.X_train, data.y_train, delta, data.X_val, data.y_val)
    p0 = torch.zeros(d + 1, dtype=DTYPE)
    solvers = make_solvers(cfg)
    black_box = solvers["scipy L-BFGS-B on NumPy (black box)"]
    bar = ProgressBar(
        2 * d + len(solvers) + cfg.outer_iters * 3, desc="scipy_inner", enabled=progress
    )

    def value_and_grad(solve: bl.ImplicitFunction, theta: torch.Tensor) -> tuple[float, Any]:
        theta = theta.detach().requires_grad_(True)
        loss = outer_loss(solve(p0, theta, *args), theta, *args)
        (g,) = torch.autograd.grad(loss, theta)
        bar.update()
        return float(loss.detach()), g

    def value_only(theta: torch.Tensor, *, polish: bool = False) -> float:
        with torch.no_grad():
            p = black_box(p0, theta, *args)
        if polish:  # Newton steps: the inner solution to machine precision
            for _ in range(3):
                g = torch.func.grad(inner_loss)(p, theta, *args)
                p = p - torch.linalg.solve(torch.func.hessian(inner_loss)(p, theta, *args), g)
        v = float(outer_loss(p, theta, *args))
        bar.update()
        return v

    # 1. hypergradient check at a random θ: implicit (three inner solvers) vs finite differences.
    gen = torch.Generator().manual_seed(cfg.seed)
    theta_c = cfg.init_log_lam + torch.randn(d, generator=gen, dtype=DTYPE)
    grads = {name: value_and_grad(s, theta_c)[1] for name, s in solvers.items()}
    g_ref = grads["scipy L-BFGS-B on NumPy (black box)"]
    eye = torch.eye(d, dtype=DTYPE)
    fd = torch.tensor(
        [
            (
                value_only(theta_c + cfg.fd_eps * e, polish=True)
                - value_only(theta_c - cfg.fd_eps * e, polish=True)
            )
            / (2 * cfg.fd_eps)
            for e in eye
        ],
        dtype=DTYPE,
    )
    fd_rel = float((g_ref - fd).norm() / fd.norm())
    spread = max(float((g - g_ref).norm() / g_ref.norm()) for g in grads.values())
    check_rows = [
        {
            "feature": name,
            "implicit (SciPy inner)": float(a),
            "finite differences": float(b),
            "rel_error": abs(float(a) - float(b)) / max(abs(float(b)), 1e-300),
        }
        for name, a, b in zip(data.feature_names, g_ref.tolist(), fd.tolist(), strict=True)
    ]
    solver_rows = [
        {
            "inner solver": name,
            "rel. difference to the NumPy/SciPy one": float((g - g_ref).norm() / g_ref.norm()),
            "rel. error vs finite differences": float((g - fd).norm() / fd.norm()),
        }
        for name, g in grads.items()
    ]
    if verbose:
        print(f"hypergradient vs central finite differences: relative error {fd_rel:.2e}")
        print(markdown_table(check_rows))
        print(markdown_table(solver_rows))

    # 2. SciPy on the outer level as well: L-BFGS-B on θ with the implicit hypergradient.
    trace: list[float] = []

    def fun(theta_np: np.ndarray) -> tuple[float, np.ndarray]:
        v, g = value_and_grad(black_box, torch.from_numpy(theta_np.copy()))
        trace.append(v)
        return v, g.numpy()

    outer = minimize(
        fun,
        np.full(d, cfg.init_log_lam),
        jac=True,
        method="L-BFGS-B",
        bounds=[(cfg.log_lam_min, cfg.log_lam_max)] * d,
        options={"maxiter": cfg.outer_iters, "maxfun": 3 * cfg.outer_iters},
    )
    n_solves = len(trace)
    theta_hg = torch.from_numpy(outer.x)

    # Baseline: grid search over one shared strength with as many inner solves.
    grid = np.linspace(cfg.log_lam_min, cfg.log_lam_max, n_solves)
    grid_val = [value_only(torch.full((d,), float(t), dtype=DTYPE)) for t in grid]
    bar.close()
    i = int(np.argmin(grid_val))

    def row(method: str, theta: torch.Tensor) -> dict[str, Any]:
        p = black_box(p0, theta, *args).detach()

        def mse(X: torch.Tensor, y: torch.Tensor) -> float:
            return float(((y - X @ p[:-1] - p[-1]) ** 2).mean()) * y_var  # original units

        return {
            "method": method,
            "val_mse": mse(data.X_val, data.y_val),
            "test_mse": mse(data.X_test, data.y_test),
            "inner_solves": n_solves,
        }

    rows = [
        row("L-BFGS-B on θ, implicit hypergradient", theta_hg),
        row("grid search (shared λ)", torch.full((d,), float(grid[i]), dtype=DTYPE)),
    ]
    result = Result(
        name="scipy_inner",
        config=dataclasses.asdict(cfg),
        rows=rows,
        summary={
            "fd_rel_error": fd_rel,
            "solver_rel_spread": spread,
            "outer_message": str(outer.message),
            "initial": row("initial", torch.full((d,), cfg.init_log_lam, dtype=DTYPE)),
        },
        history={
            "outer_val_mse": [v * y_var for v in trace],
            "grid_val_mse": [v * y_var for v in grid_val],
        },
        details={
            "check": check_rows,
            "solvers": solver_rows,
            "learned_lambda": dict(zip(data.feature_names, theta_hg.exp().tolist(), strict=True)),
            "split": data.sizes(),
        },
    )
    result.seconds = time.perf_counter() - start
    if out_dir is not None:
        result.save(out_dir, _figure(result))
    return result


def _figure(result: Result) -> Any:
    fig, (ax1, ax2) = new_figure(2)
    check = result.details["check"]
    names = [c["feature"] for c in check]
    x = np.arange(len(names))
    ax1.bar(x - 0.2, [c["implicit (SciPy inner)"] for c in check], 0.4, label="implicit")
    ax1.bar(x + 0.2, [c["finite differences"] for c in check], 0.4, label="finite differences")
    ax1.set_xticks(x, names, fontsize=7, rotation=45)
    ax1.set_ylabel("∂ validation MSE / ∂θⱼ")
    ax1.set_title(f"SciPy inner solver: rel. err {result.summary['fd_rel_error']:.1e}")
    ax1.legend(fontsize=8)
    h = result.history
    ax2.plot(
        np.arange(1, len(h["outer_val_mse"]) + 1),
        np.minimum.accumulate(h["outer_val_mse"]),
        label="outer L-BFGS-B (per-feature), best so far",
    )
    ax2.plot(
        np.arange(1, len(h["grid_val_mse"]) + 1),
        np.minimum.accumulate(h["grid_val_mse"]),
        label="grid search (shared), best so far",
    )
    ax2.set_xlabel("inner solves")
    ax2.set_ylabel("validation MSE")
    ax2.set_title("SciPy at both levels")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig
