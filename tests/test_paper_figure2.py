"""``benchmarks/paper_figure2.py``: its closed forms and the methods it plots, against
references written here (central finite differences of explicit loops, dense products), and
its ``--quick`` mode.

The problems are quadratic in θ (linear regression, exact or K-step GD inner loops), so central
differences are exact up to rounding: they are an independent reference, not an approximation.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "paper_figure2.py"


@pytest.fixture(scope="module")
def fig():
    spec = importlib.util.spec_from_file_location("paper_figure2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def problem(fig):
    return fig.make_problem(dim=8, n_support=4, n_query=6, lam=1.5, seed=3)


def _mse(x, w, y):
    r = x @ w - y[:, 0]
    return float((r @ r) / x.shape[0])


def _central_differences(f, theta: torch.Tensor, h: float = 1e-3) -> torch.Tensor:
    out = torch.empty_like(theta)
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = h
        out[i] = (f(theta + e) - f(theta - e)) / (2 * h)
    return out


def _gd_loop(p, theta: torch.Tensor, steps: int, lr: float, lam: float) -> torch.Tensor:
    """K steps of GD on ‖X_s φ − y_s‖²/n + λ/2‖φ − θ‖² from θ, written out (no autograd)."""
    n = p.xs.shape[0]
    phi = theta.clone()
    for _ in range(steps):
        g = 2.0 * p.xs.T @ (p.xs @ phi - p.ys[:, 0]) / n + lam * (phi - theta)
        phi = phi - lr * g
    return phi


def test_exact_meta_gradient_matches_finite_differences(fig, problem):
    p = problem
    n = p.xs.shape[0]

    def outer(theta):  # L(φ*(θ)), φ* from the normal equations of the proximal problem
        a = 2.0 * p.xs.T @ p.xs / n + p.lam * torch.eye(p.dim, dtype=torch.float64)
        phi = torch.linalg.solve(a, 2.0 * p.xs.T @ p.ys[:, 0] / n + p.lam * theta)
        return _mse(p.xq, phi, p.yq)

    reference = _central_differences(outer, p.theta[0])
    torch.testing.assert_close(fig.exact_meta_gradient(p), reference, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("steps", [1, 3, 12])
def test_maml_on_the_proximal_objective_matches_finite_differences(fig, problem, steps):
    p = problem
    lr = p.inner_lr()

    def outer(theta):
        return _mse(p.xq, _gd_loop(p, theta, steps, lr, p.lam), p.yq)

    reference = _central_differences(outer, p.theta[0])
    for computed in (
        fig.maml_prox_meta_gradient(p, steps, lr, first_order=False),  # autograd, unrolled
        fig.maml_closed_form(p, steps, lr, proximal=True),  # the script's closed form
    ):
        torch.testing.assert_close(computed, reference, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("steps", [1, 4, 9])
def test_app_maml_matches_the_product_formula(fig, problem, steps):
    """The app's MAML (GD on L̂ alone): ∇_θ L(φ_K) = ∏ₖ(I − αH) ∇L(φ_K), the product formed
    one factor at a time here; FOMAML is ∇L(φ_K)."""
    p = problem
    lr = p.inner_lr()
    n = p.xs.shape[0]
    hessian = 2.0 * p.xs.T @ p.xs / n
    product = torch.eye(p.dim, dtype=torch.float64)
    for _ in range(steps):
        product = (torch.eye(p.dim, dtype=torch.float64) - lr * hessian) @ product
    phi = _gd_loop(p, p.theta[0], steps, lr, 0.0)
    query_grad = 2.0 * p.xq.T @ (p.xq @ phi - p.yq[:, 0]) / p.xq.shape[0]
    torch.testing.assert_close(
        fig.app_maml_meta_gradient(p, steps, lr, first_order=False),
        product @ query_grad,
        rtol=1e-9,
        atol=1e-11,
    )
    torch.testing.assert_close(
        fig.maml_closed_form(p, steps, lr, proximal=False), product @ query_grad
    )
    torch.testing.assert_close(
        fig.app_maml_meta_gradient(p, steps, lr, first_order=True), query_grad
    )


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_imaml_k_step_meta_gradients_match_dense_krylov_solutions(fig, k):
    """The k-step backward solves, against their definitions as dense problems on the Krylov
    subspace K_k = span{b, Mb, …, M^(k-1) b} (M = H + λI, b = ∇L(φ*), x₀ = 0): k CG steps
    give the x ∈ K_k with the least M-norm error (a Galerkin solve), k MINRES steps (the app's
    ``IMAML.task_meta_grad``) the x ∈ K_k with the least residual (a least-squares solve);
    the meta-gradient is λx."""
    import bilevel as bl

    p = fig.make_problem(dim=12, n_support=6, n_query=6, lam=2.0, seed=1)
    n = p.xs.shape[0]
    m = 2.0 * p.xs.T @ p.xs / n + p.lam * torch.eye(p.dim, dtype=torch.float64)
    phi = torch.linalg.solve(m, 2.0 * p.xs.T @ p.ys[:, 0] / n + p.lam * p.theta[0])
    b = 2.0 * p.xq.T @ (p.xq @ phi - p.yq[:, 0]) / p.xq.shape[0]
    basis, _ = torch.linalg.qr(
        torch.stack([torch.linalg.matrix_power(m, i) @ b for i in range(k)], 1)
    )
    cg = p.lam * basis @ torch.linalg.solve(basis.T @ m @ basis, basis.T @ b)
    minres = p.lam * basis @ torch.linalg.lstsq(m @ basis, b[:, None]).solution[:, 0]
    assert float((cg - minres).norm()) > 1e-6 * float(cg.norm())  # two different iterates
    lr, steps = p.inner_lr(), fig.exact_inner_steps(p)
    torch.testing.assert_close(
        fig.imaml_app_meta_gradient(p, k, steps, lr), minres, rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        fig.imaml_bl_meta_gradient(p, bl.CG(tol=0, maxiter=k), steps, lr),
        cg,
        rtol=1e-10,
        atol=1e-12,
    )


def test_imaml_error_decays_to_rounding_with_cg_steps(fig):
    # H has rank 6, so H + λI has 7 distinct eigenvalues: CG and MINRES are exact at k = 7.
    p = fig.make_problem(dim=12, n_support=6, n_query=6, lam=2.0, seed=1)
    result = fig.run_accuracy(p, gd_steps=[1, 10, 60], cg_steps=[1, 2, 3, 5, 7], verbose=False)
    for key in ("imaml_bl_cg", "imaml_app_minres"):
        errors = [r[key] for r in result["cg_steps"]]
        assert all(b < a for a, b in itertools.pairwise(errors)), (key, errors)
        assert errors[0] > 1e-2 and errors[-1] < 1e-10, (key, errors)
    gd = result["gd_steps"]
    maml, fomaml = [r["maml"] for r in gd], [r["fomaml"] for r in gd]
    assert maml[0] > maml[1] > maml[2] and maml[2] < 1e-6  # MAML → g* as K grows
    assert min(fomaml) > 0.05  # FOMAML's ∇L(φ_K) → ∇L(φ*) ≠ g*: the error stays
    assert all(r["maml_vs_closed_form"] < 1e-12 for r in gd)
    assert all(r["app_maml_vs_own_closed_form"] < 1e-12 for r in gd)


def test_quick_mode_runs(fig, tmp_path, capsys):
    out, png = tmp_path / "figure2.json", tmp_path / "figure2.png"
    result = fig.main(["--quick", "--output", str(out), "--png", str(png)])
    assert png.stat().st_size > 10_000
    written = json.loads(out.read_text())
    assert written["quick"] and len(written["memory"]["rows"]) == len(result["memory"]["rows"])
    methods = {(r["method"], r["inner_steps"]) for r in written["memory"]["rows"]}
    assert methods == {(m, k) for m in fig.METHODS for k in (1, 2)}
    assert written["accuracy"]["cg_steps"][-1]["imaml_bl_cg"] < 1e-4
    assert "| method | inner steps |" in capsys.readouterr().out


def _isolated_row(fig, method: str, steps: int, task_file: Path) -> dict:
    """One memory row in a fresh subprocess (the full run's path), reported as a JSON line."""
    path = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
    argv = [sys.executable, str(SCRIPT), "--_one", method, str(steps), str(task_file)]
    out = subprocess.run(
        [*argv, "--repeats", "0"],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
    )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["method"] == method and row["inner_steps"] == steps and row["seconds"] > 0
    # After the reset the high-water mark sits at the RSS: nothing before the call counts.
    assert not row["high_water_reset"] or abs(row["high_water_before_mb"]) < 2.0, row
    return row


def test_imaml_memory_is_flat_in_inner_steps_while_maml_grows(fig, tmp_path):
    """Figure 2(b)'s claim on a small conv4 task (5-way 1-shot, random images): from 2 to 32
    inner steps the peak resident-set increase of iMAML's meta-gradient stays put, while
    unrolled MAML's grows with the steps (it records every step's activations)."""
    task, _ = fig.sample_task(5, 1, None)
    task_file = tmp_path / "task.pt"
    torch.save(task, task_file)
    # A launching process with a high peak, as the full run's after loading Omniglot: a child
    # started by vfork + exec inherits that peak in ``ru_maxrss``, which no reset lowers.
    ballast = torch.ones(100_000_000)  # 400 MB
    del ballast
    peak = {
        (m, k): _isolated_row(fig, m, k, task_file)["peak_increase_mb"]
        for m in ("imaml", "maml")
        for k in (2, 32)
    }
    # iMAML never records the inner loop: 16x the steps, at most a few MB more.
    assert peak["imaml", 32] < 1.2 * peak["imaml", 2] + 8.0, peak
    # MAML at 32 steps keeps ~32 steps' activations (~7 MB each here): far above both.
    assert peak["maml", 32] > 3.0 * peak["maml", 2], peak
    assert peak["maml", 32] > peak["imaml", 32] + 100.0, peak
