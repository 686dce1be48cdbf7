"""The hyperparameter-optimisation examples (applications/hyperopt) in their quick settings.

Each example asserts its outcome, not only that it runs: learned hyperparameters beat the
baseline they are compared with on held-out data, and hypergradients match an independent
reference (closed form or finite differences).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from applications.hyperopt import (
    EXAMPLES,
    HyperCleaningConfig,
    LassoConfig,
    RidgeConfig,
    ScipyInnerConfig,
    WeightDecayConfig,
    run_hyper_cleaning,
    run_lasso,
    run_ridge,
    run_scipy_inner,
    run_weight_decay,
)
from applications.hyperopt import weight_decay as wd
from applications.hyperopt.__main__ import main
from applications.hyperopt._common import DTYPE, load_split
from applications.hyperopt.hyper_cleaning import corrupt_labels
from applications.hyperopt.lasso import lasso_fista
from applications.hyperopt.lasso import make_solver as make_lasso_solver

# --- weight decay -------------------------------------------------------------------------


def _beats_shared(result, factor: float) -> None:
    hg = result.row("hypergradient (per-feature)")
    for baseline in ("grid search (shared)", "random search (shared)"):
        base = result.row(baseline)
        assert hg["inner_solves"] == base["inner_solves"]
        assert hg["val_loss"] < base["val_loss"]
        assert hg["test_loss"] < factor * base["test_loss"]
        assert hg["test_acc"] > base["test_acc"]


def test_weight_decay_beats_shared_strength_on_test():
    result = run_weight_decay(WeightDecayConfig.quick(seed=0), progress=False)
    assert len(result.details["learned_lambda"]) == 30
    _beats_shared(result, factor=0.95)


def test_weight_decay_silences_noise_features():
    cfg = dataclasses.replace(WeightDecayConfig.quick(seed=0), n_noise=100)
    result = run_weight_decay(cfg, progress=False)
    _beats_shared(result, factor=0.8)
    d = result.details
    assert d["median_log10_lambda_noise"] > d["median_log10_lambda_real"] + 0.5


def test_weight_decay_hypergradient_matches_finite_differences():
    data = load_split("breast_cancer", n_train=80, n_val=60, seed=1, stratify=True)
    args = (data.X_train, data.y_train.to(DTYPE), data.X_val, data.y_val.to(DTYPE))
    gen = torch.Generator().manual_seed(0)
    theta = (math.log(0.05) + torch.randn(30, generator=gen, dtype=DTYPE)).requires_grad_(True)
    p = wd.solve_inner(torch.zeros(31, dtype=DTYPE), theta, *args)
    (grad,) = torch.autograd.grad(wd.outer_loss(p, theta, *args), theta)

    def val(t: torch.Tensor) -> float:
        q = wd.logistic_newton(torch.zeros(31, dtype=DTYPE), t.exp(), args[0], args[1], tol=1e-13)
        return float(wd.outer_loss(q, t, *args))

    direction = torch.randn(30, generator=gen, dtype=DTYPE)
    eps = 1e-5
    fd = (val(theta.detach() + eps * direction) - val(theta.detach() - eps * direction)) / (2 * eps)
    assert float(grad @ direction) == pytest.approx(fd, rel=1e-6)


# --- ridge --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ridge_result():
    return run_ridge(RidgeConfig.quick(seed=0), progress=False)


def test_ridge_hypergradient_equals_closed_form(ridge_result):
    assert ridge_result.summary["check_rel_error"] <= 1e-6
    assert ridge_result.summary["check_value_abs_error"] <= 1e-8
    assert all(row["rel_error"] <= 1e-6 for row in ridge_result.details["check"])


def test_ridge_beats_shared_strength_on_test(ridge_result):
    hg = ridge_result.row("hypergradient (per-feature)")
    grid = ridge_result.row("grid search (shared)")
    assert hg["val_mse"] < grid["val_mse"]
    assert hg["test_mse"] < grid["test_mse"]


def test_ridge_is_deterministic(ridge_result):
    again = run_ridge(RidgeConfig.quick(seed=0), progress=False)
    assert again.rows == ridge_result.rows
    assert again.history == ridge_result.history


# --- hyper-cleaning -----------------------------------------------------------------------


def test_corrupt_labels_changes_exactly_the_requested_fraction():
    y = torch.arange(200) % 10
    noisy, mask = corrupt_labels(y, 0.4, seed=3)
    assert int(mask.sum()) == 80
    assert bool((noisy[mask] != y[mask]).all())
    assert bool((noisy[~mask] == y[~mask]).all())
    assert int(noisy.min()) >= 0 and int(noisy.max()) <= 9


@pytest.fixture(scope="module")
def cleaning_result():
    return run_hyper_cleaning(HyperCleaningConfig.quick(seed=0), progress=False)


def test_hyper_cleaning_flags_corrupted_examples(cleaning_result):
    s = cleaning_result.summary
    assert s["chance_precision"] == pytest.approx(0.4, abs=0.01)
    assert s["precision"] >= 0.75  # chance: 0.4
    assert s["recall"] >= 0.75


def test_hyper_cleaning_beats_training_on_the_corrupted_set(cleaning_result):
    acc = cleaning_result.summary["test_acc"]
    uniform = acc["corrupted set, uniform weights"]
    learned = acc["hyper-cleaning (learned weights)"]
    oracle = acc["oracle (clean examples only)"]
    assert learned > uniform + 0.1
    assert learned > oracle - 0.05


# --- lasso --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lasso_result():
    return run_lasso(LassoConfig.quick(seed=0), progress=False)


def test_lasso_inner_solver_matches_sklearn_scaling(lasso_result):
    assert lasso_result.summary["max_abs_diff_vs_sklearn_lasso"] <= 1e-6


def test_lasso_is_competitive_with_lassocv(lasso_result):
    hg = lasso_result.row("hypergradient (implicit)")
    cv = lasso_result.row("LassoCV (5-fold)")
    # The hypergradient run minimises the validation error directly...
    assert hg["val_mse"] <= cv["val_mse"] + 1e-6
    # ... and generalises about as well as cross-validation.
    assert hg["test_mse"] <= 1.1 * cv["test_mse"]
    assert hg["test_mse_refit"] <= 1.1 * cv["test_mse_refit"]
    assert 1e-2 < hg["alpha"] / cv["alpha"] < 1e2


def test_lasso_hypergradient_matches_finite_differences():
    cfg = LassoConfig.quick(seed=0)
    data = load_split("diabetes", n_train=cfg.n_train, n_val=cfg.n_val, seed=0)
    X, Xv = data.X_train, data.X_val
    y, yv = data.y_train - data.y_train.mean(), data.y_val - data.y_train.mean()
    n = X.shape[0]
    step = 1.0 / float(torch.linalg.eigvalsh(X.T @ X / n).max())
    solve = make_lasso_solver(step)
    w0 = torch.zeros(X.shape[1], dtype=DTYPE)

    def val(log_alpha: float) -> float:
        w = lasso_fista(w0, math.exp(log_alpha), X, y, step=step)
        return float(((yv - Xv @ w) ** 2).mean())

    for alpha in (0.3, 2.0):
        log_alpha = torch.tensor(math.log(alpha), dtype=DTYPE, requires_grad=True)
        w = solve(w0, log_alpha, X, y, Xv, yv)
        (grad,) = torch.autograd.grad(((yv - Xv @ w) ** 2).mean(), log_alpha)
        eps = 1e-6
        fd = (val(math.log(alpha) + eps) - val(math.log(alpha) - eps)) / (2 * eps)
        assert float(grad) == pytest.approx(fd, rel=1e-5)


# --- scipy inner solver -------------------------------------------------------------------


@pytest.fixture(scope="module")
def scipy_result():
    return run_scipy_inner(ScipyInnerConfig.quick(seed=0), progress=False)


def test_scipy_inner_hypergradient_matches_finite_differences(scipy_result):
    assert scipy_result.summary["fd_rel_error"] <= 1e-5
    assert all(row["rel_error"] <= 1e-4 for row in scipy_result.details["check"])


def test_scipy_inner_hypergradient_does_not_depend_on_the_inner_solver(scipy_result):
    assert scipy_result.summary["solver_rel_spread"] <= 1e-5
    assert len(scipy_result.details["solvers"]) == 3


def test_scipy_inner_outer_lbfgs_beats_shared_strength(scipy_result):
    hg = scipy_result.row("L-BFGS-B on θ, implicit hypergradient")
    grid = scipy_result.row("grid search (shared λ)")
    assert hg["val_mse"] < grid["val_mse"]
    assert hg["test_mse"] < grid["test_mse"]


# --- command line -------------------------------------------------------------------------


def test_cli_writes_figure_and_json(tmp_path, capsys):
    out = tmp_path / "ridge"
    assert main(["ridge", "--quick", "--seed", "1", "--out-dir", str(out), "--no-progress"]) == 0
    png, js = out / "figure.png", out / "results.json"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert data["name"] == "ridge"
    assert data["config"]["seed"] == 1
    assert {r["method"] for r in data["rows"]} == {
        "hypergradient (per-feature)",
        "grid search (shared)",
    }
    printed = capsys.readouterr().out
    assert "relative error" in printed and "| method |" in printed


def test_cli_help_lists_every_example(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in EXAMPLES)
    assert "--out-dir" in text and "--quick" in text and "--seed" in text
