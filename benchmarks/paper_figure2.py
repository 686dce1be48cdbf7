"""The iMAML paper's Figure 2, reproduced: meta-gradient accuracy, and memory / time vs steps.

Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients" (NeurIPS 2019),
Figure 2: (a) the error of the computed meta-gradient on a synthetic problem whose exact
meta-gradient is known, against the number of inner GD steps (MAML, FOMAML) or CG steps
(iMAML); (b) memory and compute time of the meta-gradient against the number of inner steps on
20-way 5-shot Omniglot with the conv4 network. Two parts, printed as tables, written to
``benchmarks/results/paper_figure2.json`` and drawn in ``docs/img/paper_figure2.png``.

(a) **Accuracy.** One linear-regression task in float64 (``d`` weights, ``n_s < d`` support and
    ``n_q`` query points, the app's MSE loss ``L̂(φ) = ‖X_s φ − y_s‖²/n_s``, so
    ``H = ∇²L̂ = 2X_sᵀX_s/n_s`` is positive semi-definite with ``d − n_s`` zero eigenvalues).
    The reference for **every** method is the paper's exact meta-gradient (its "exact-solve
    error", Definition 3): the gradient in θ of ``L(φ*(θ))`` where ``φ*`` solves the proximal
    inner problem ``min_φ L̂(φ) + λ/2‖φ − θ‖²`` exactly. In closed form::

        φ* = (H + λI)⁻¹(2X_sᵀy_s/n_s + λθ)        g* = λ(H + λI)⁻¹∇L(φ*)

    (``torch.linalg.solve``). The methods, each with its own count on the x-axis:

    * **MAML, K GD steps**: K steps of GD at lr ``α = 1/(λ_max(H) + λ)`` on the *same proximal*
      inner objective from ``φ₀ = θ``, differentiated through the unrolled loop
      (``torch.func.grad``). Its Jacobian is ``(I − αM)^K + λM⁻¹(I − (I − αM)^K)``,
      ``M = H + λI``, so it tends to g* as K grows. (The app's ``MAML`` runs GD on ``L̂``
      alone, with no proximal term, so its meta-gradient tends to a different limit; it is
      checked against its own closed form ``(I − αH)^K∇L(φ_K)`` in the JSON, not plotted.)
    * **FOMAML, K GD steps**: the same φ_K, with ``dφ/dθ ≈ I``: ``∇L(φ_K)``. Its error cannot
      vanish: the limit ``∇L(φ*)`` differs from g* by ``HM⁻¹∇L(φ*)``.
    * **iMAML, k CG steps**: the app's ``IMAML`` (fixed-K MINRES backward solve, the app's
      choice) and the paper's fixed-K CG (``bl.custom_root`` with ``bl.CG(tol=0, maxiter=k)``),
      with the inner problem solved to rounding by ``--exact-inner-steps`` GD steps, so the
      error is the backward solve's alone.
    * **iMAML, K inner GD steps, exact backward**: ``bl.custom_root`` with ``bl.Dense`` over K
      inner GD steps from θ: the error of an inexactly solved inner problem (the paper's
      Theorem 1 has both terms).

    Errors are relative, ``‖g − g*‖ / ‖g*‖``.

(b) **Memory and time.** One task's meta-gradient, conv4 (64 filters), 20-way 5-shot, 1 query
    per class (the ``paper-20w5s`` preset: inner lr 0.1, λ = 2, 5 CG steps), float32, on a real
    Omniglot meta-training task (``--data-dir``, default ``$BILEVEL_OMNIGLOT_DIR``; random
    images when absent). Second-order MAML, FOMAML and iMAML (plain inner GD,
    ``safeguard=False``, as MAML's; 5 fixed-K MINRES steps) each at ``--memory-steps`` inner
    steps. iMAML is measured through ``IMAML.task_meta_grad`` (``bl.implicit_grad`` through
    the app's ``bl.custom_root`` solve; autograd for one eager task), the app's one entry
    point, which training runs. The method is the one of
    ``benchmarks/imaml_memory.py``: every row runs in a **fresh subprocess**; a warm-up
    meta-gradient on a 5-way 1-shot task with one inner step loads the kernels; then the
    kernel's high-water mark of the resident set is reset to the current RSS (``5`` written to
    ``/proc/self/clear_refs``, Linux ≥ 4.0) and ``peak = VmHWM after − RSS before`` of the
    measured call (``VmHWM`` from ``/proc/self/status`` is the address space's high-water
    mark, the one the reset lowers; the RSS is read from ``/proc/self/statm``), so it
    counts every byte the call touches —
    tensors, autograd graph, allocator slack — and nothing that happened before it. (Not
    ``ru_maxrss``: it is the larger of that mark and one the reset cannot lower, which
    ``exec`` carries over from the launching process — after ``subprocess``'s vfork, the
    parent's own peak, hundreds of MB once it has loaded Omniglot, which hid every iMAML and
    FOMAML row of an earlier run. Without the reset, the high-water mark left by importing
    torch and loading the data would hide every call that needs less; where the reset is
    refused the row says so, ``high_water_reset: false``, and its peak is only an upper
    bound.) Memory freed earlier
    but kept by the C allocator can be reused without raising the RSS, so the number can
    understate a call's live bytes slightly; the warm-up is kept small for that reason. Time
    is the median wall time of ``--repeats`` further calls in the same process (the first
    call, which also creates the kernels for the 20-way shapes, is recorded separately), at
    ``--threads``; the process CPU time of the same calls is recorded and plotted, since other
    jobs on a shared machine inflate wall times far more than CPU time.

Usage::

    python benchmarks/paper_figure2.py            # full: about 5 minutes on 2 cores
    python benchmarks/paper_figure2.py --quick    # smoke run in seconds (small problem, 5-way)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad
from torch.nn import functional as F

import bilevel as bl

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from _peak_memory import high_water_bytes, reset_high_water, rss_bytes

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "paper_figure2.json"
FIGURE = ROOT / "docs" / "img" / "paper_figure2.png"

Params = dict[str, Tensor]

# --- (a) accuracy on a problem with a closed-form meta-gradient ---------------------------


@dataclasses.dataclass
class Problem:
    """One linear-regression task and the point θ where its meta-gradient is taken (float64).

    ``φ`` and θ are ``[1, d]`` (the weight of ``nn.Linear(d, 1, bias=False)``), as the app's
    meta-learners hold them.
    """

    xs: Tensor  # [n_s, d]
    ys: Tensor  # [n_s, 1]
    xq: Tensor  # [n_q, d]
    yq: Tensor  # [n_q, 1]
    theta: Tensor  # [1, d]
    lam: float

    @property
    def dim(self) -> int:
        return self.xs.shape[1]

    def hessian(self) -> Tensor:
        """``H = ∇²L̂ = 2X_sᵀX_s/n_s`` (the support loss is the app's MSE)."""
        return 2.0 * self.xs.T @ self.xs / self.xs.shape[0]

    def support_grad(self, phi: Tensor) -> Tensor:
        """``∇L̂(φ) = 2X_sᵀ(X_s φ − y_s)/n_s`` as a ``[d]`` vector (``phi``: ``[d]``)."""
        return 2.0 * self.xs.T @ (self.xs @ phi - self.ys[:, 0]) / self.xs.shape[0]

    def query_grad(self, phi: Tensor) -> Tensor:
        """``∇L(φ) = 2X_qᵀ(X_q φ − y_q)/n_q`` as a ``[d]`` vector."""
        return 2.0 * self.xq.T @ (self.xq @ phi - self.yq[:, 0]) / self.xq.shape[0]

    def inner_lr(self) -> float:
        """``1/(λ_max(H) + λ)``: the GD step of both MAML and iMAML's inner loop."""
        return 1.0 / (float(torch.linalg.eigvalsh(self.hessian()).max()) + self.lam)


def make_problem(
    dim: int = 100, n_support: int = 50, n_query: int = 50, lam: float = 2.0, seed: int = 0
) -> Problem:
    """Few-shot linear regression: fewer support points than weights, so ``H`` is singular."""
    g = torch.Generator().manual_seed(seed)
    kw: dict[str, Any] = {"generator": g, "dtype": torch.float64}
    w_task = torch.randn(dim, **kw)
    xs, xq = torch.randn(n_support, dim, **kw), torch.randn(n_query, dim, **kw)
    ys = (xs @ w_task + 0.1 * torch.randn(n_support, **kw))[:, None]
    yq = (xq @ w_task + 0.1 * torch.randn(n_query, **kw))[:, None]
    theta = 0.5 * torch.randn(1, dim, **kw)
    return Problem(xs, ys, xq, yq, theta, lam)


def exact_inner_solution(p: Problem) -> Tensor:
    """``φ* = (H + λI)⁻¹(2X_sᵀy_s/n_s + λθ)``, the exact proximal solution, ``[d]``."""
    m = p.hessian() + p.lam * torch.eye(p.dim, dtype=p.xs.dtype)
    rhs = 2.0 * p.xs.T @ p.ys[:, 0] / p.xs.shape[0] + p.lam * p.theta[0]
    return torch.linalg.solve(m, rhs)


def exact_meta_gradient(p: Problem) -> Tensor:
    """The paper's exact meta-gradient ``g* = λ(H + λI)⁻¹∇L(φ*)``, ``[d]``."""
    m = p.hessian() + p.lam * torch.eye(p.dim, dtype=p.xs.dtype)
    return p.lam * torch.linalg.solve(m, p.query_grad(exact_inner_solution(p)))


def maml_closed_form(p: Problem, steps: int, lr: float, proximal: bool = True) -> Tensor:
    """Closed-form K-step MAML meta-gradient (``[d]``), GD from ``φ₀ = θ``.

    ``proximal=True``: GD on ``L̂ + λ/2‖φ − θ‖²``: ``J_{k+1} = (I − αM)J_k + αλI`` from
    ``J_0 = I``, so ``J_K = (I − αM)^K + λM⁻¹(I − (I − αM)^K)`` with ``M = H + λI``.
    ``proximal=False`` (the app's ``MAML``): GD on ``L̂``, Jacobian ``(I − αH)^K``. Both are
    symmetric, so the meta-gradient is ``J ∇L(φ_K)``.
    """
    eye = torch.eye(p.dim, dtype=p.xs.dtype)
    theta = p.theta[0]
    phi = theta.clone()
    lam = p.lam if proximal else 0.0
    for _ in range(steps):
        phi = phi - lr * (p.support_grad(phi) + lam * (phi - theta))
    m = p.hessian() + lam * eye
    power = torch.linalg.matrix_power(eye - lr * m, steps)
    jac = power + lam * torch.linalg.solve(m, eye - power) if proximal else power
    return jac @ p.query_grad(phi)


def _linear_model(dim: int):
    from applications.imaml.models import FunctionalModel

    return FunctionalModel(nn.Linear(dim, 1, bias=False))


def _params(p: Problem) -> Params:
    return {"weight": p.theta.clone()}


def _task(p: Problem) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return p.xs, p.ys, p.xq, p.yq


def _mse(model, phi: Params, x: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(model(phi, x), y)


def maml_prox_meta_gradient(p: Problem, steps: int, lr: float, first_order: bool) -> Tensor:
    """MAML / FOMAML on the proximal inner objective, by autograd through the unrolled loop.

    The app's ``MAML`` has no proximal term (its inner loop is GD on ``L̂``), so this loop is
    written here: ``φ ← φ − α(∇L̂(φ) + λ(φ − θ))`` from ``φ₀ = θ``; ``first_order`` detaches
    each step's gradient, as the app's FOMAML does, leaving ``dφ_K/dθ = I``.
    """
    model = _linear_model(p.dim)
    xs, ys, xq, yq = _task(p)

    def outer(theta: Params) -> Tensor:
        def inner(phi: Params) -> Tensor:
            sq = sum(torch.sum((phi[k] - theta[k]) ** 2) for k in phi)
            return _mse(model, phi, xs, ys) + 0.5 * p.lam * sq

        grad_inner = grad(inner)
        phi = theta
        for _ in range(steps):
            g = grad_inner(phi)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            phi = {k: phi[k] - lr * g[k] for k in phi}
        return _mse(model, phi, xq, yq)

    return grad(outer)(_params(p))["weight"][0]


def app_maml_meta_gradient(p: Problem, steps: int, lr: float, first_order: bool) -> Tensor:
    """The app's ``MAML`` / ``FOMAML`` (GD on ``L̂`` alone), for the own-objective check."""
    from applications.imaml.meta import FOMAML, MAML

    cls = FOMAML if first_order else MAML
    learner = cls(
        _linear_model(p.dim),
        steps=steps,
        lr=lr,
        task="regression",
        batched=False,
        dtype=torch.float64,
        params=_params(p),
    )
    grads, _, _ = learner.task_meta_grad(learner.params, *_task(p))
    return grads["weight"][0]


def imaml_app_meta_gradient(p: Problem, cg_steps: int, inner_steps: int, lr: float) -> Tensor:
    """The app's ``IMAML``: ``inner_steps`` GD steps, ``cg_steps`` fixed-K MINRES steps."""
    from applications.imaml.meta import IMAML, GradientDescent

    learner = IMAML(
        _linear_model(p.dim),
        lam=p.lam,
        cg_steps=cg_steps,
        inner=GradientDescent(inner_steps, lr, safeguard=False),
        task="regression",
        batched=False,
        dtype=torch.float64,
        params=_params(p),
    )
    grads, _, _ = learner.task_meta_grad(learner.params, *_task(p))
    return grads["weight"][0]


def imaml_bl_meta_gradient(
    p: Problem, solver: bl.LinearSolver, inner_steps: int, lr: float
) -> Tensor:
    """iMAML written directly with ``bl.custom_root`` and any backward ``solver``.

    Inner: ``inner_steps`` GD steps on ``L̂ + λ/2‖φ − θ‖²`` from θ (the app's
    ``GradientDescent``); optimality ``bl.stationarity`` of that objective.
    """
    from applications.imaml.meta import GradientDescent

    model = _linear_model(p.dim)
    xs, ys, xq, yq = _task(p)
    gd = GradientDescent(inner_steps, lr, safeguard=False)

    def objective(phi: Params, theta: Params, xs: Tensor, ys: Tensor) -> Tensor:
        sq = sum(torch.sum((phi[k] - theta[k]) ** 2) for k in phi)
        return _mse(model, phi, xs, ys) + 0.5 * p.lam * sq

    def inner_solve(phi0: Params, theta: Params, xs: Tensor, ys: Tensor) -> Params:
        return gd(lambda phi: _mse(model, phi, xs, ys), phi0, theta, p.lam)

    solve = bl.custom_root(bl.stationarity(objective), solver=solver, argnums=0)(inner_solve)

    def outer(theta: Params) -> Tensor:
        return _mse(model, solve(theta, theta, xs, ys), xq, yq)

    return grad(outer)(_params(p))["weight"][0]


def exact_inner_steps(p: Problem, tol: float = 1e-17) -> int:
    """GD steps at ``1/(λ_max + λ)`` after which ``‖φ_K − φ*‖ ≤ tol·‖φ₀ − φ*‖`` (the rate of
    GD on ``M = H + λI`` is ``1 − λ_min(M)/λ_max(M)``)."""
    eig = torch.linalg.eigvalsh(p.hessian() + p.lam * torch.eye(p.dim, dtype=p.xs.dtype))
    rate = 1.0 - float(eig.min() / eig.max())
    return int(torch.tensor(tol).log() / torch.tensor(rate).log()) + 1


def run_accuracy(
    p: Problem, gd_steps: list[int], cg_steps: list[int], verbose: bool = True
) -> dict[str, Any]:
    lr = p.inner_lr()
    exact = exact_meta_gradient(p)
    scale = float(exact.norm())

    def rel(g: Tensor) -> float:
        return float((g - exact).norm()) / scale

    n_exact = exact_inner_steps(p)
    eig = torch.linalg.eigvalsh(p.hessian())
    rows_gd, rows_cg = [], []
    for k in gd_steps:
        maml = maml_prox_meta_gradient(p, k, lr, first_order=False)
        fomaml = maml_prox_meta_gradient(p, k, lr, first_order=True)
        imaml_inexact = imaml_bl_meta_gradient(p, bl.Dense(), k, lr)
        app_maml = app_maml_meta_gradient(p, k, lr, first_order=False)
        app_fomaml = app_maml_meta_gradient(p, k, lr, first_order=True)
        own = maml_closed_form(p, k, lr, proximal=False)
        phi_k = p.theta[0].clone()
        for _ in range(k):  # the app's inner loop: GD on L̂ alone
            phi_k = phi_k - lr * p.support_grad(phi_k)
        row = {
            "steps": k,
            "maml": rel(maml),
            "fomaml": rel(fomaml),
            "imaml_k_inner_steps_exact_backward": rel(imaml_inexact),
            # cross-check of the unrolled autograd against the closed-form Jacobian
            "maml_vs_closed_form": float((maml - maml_closed_form(p, k, lr)).norm()) / scale,
            # the app's MAML / FOMAML (GD on L̂ alone) against the exact gradient of their own
            # K-step objective
            "app_maml_vs_own_closed_form": float((app_maml - own).norm()) / float(own.norm()),
            "app_fomaml_vs_own_closed_form": float((app_fomaml - p.query_grad(phi_k)).norm())
            / float(p.query_grad(phi_k).norm()),
            "app_maml_vs_exact": rel(app_maml),
        }
        rows_gd.append(row)
        if verbose:
            print(
                f"K = {k:4d} GD steps: MAML {row['maml']:.2e}  FOMAML {row['fomaml']:.2e}  "
                f"iMAML (K inner, exact backward) {row['imaml_k_inner_steps_exact_backward']:.2e}",
                flush=True,
            )
    for k in cg_steps:
        app = imaml_app_meta_gradient(p, k, n_exact, lr)
        cg = imaml_bl_meta_gradient(p, bl.CG(tol=0, maxiter=k), n_exact, lr)
        row = {"cg_steps": k, "imaml_app_minres": rel(app), "imaml_bl_cg": rel(cg)}
        rows_cg.append(row)
        if verbose:
            print(
                f"k = {k:4d} CG steps: iMAML app (MINRES) {row['imaml_app_minres']:.2e}  "
                f"iMAML bl.CG {row['imaml_bl_cg']:.2e}",
                flush=True,
            )
    return {
        "problem": {
            "dim": p.dim,
            "n_support": p.xs.shape[0],
            "n_query": p.xq.shape[0],
            "lam": p.lam,
            "inner_lr": lr,
            "hessian_eigenvalues": {
                "max": float(eig.max()),
                "min_nonzero": float(eig[eig > 1e-9 * eig.max()].min()),
                "zero": int((eig <= 1e-9 * eig.max()).sum()),
            },
            "exact_inner_steps": n_exact,
            "exact_meta_gradient_norm": scale,
            "dtype": "float64",
        },
        "error": "relative: ||g - g*|| / ||g*||, g* the exact proximal (implicit) meta-gradient",
        "gd_steps": rows_gd,
        "cg_steps": rows_cg,
    }


# --- (b) memory and time on 20-way 5-shot conv4 --------------------------------------------

#: Every method through the app's ``task_meta_grad`` (for ``imaml``: ``bl.implicit_grad``
#: through ``bl.custom_root``, what training runs).
METHODS = ("imaml", "maml", "fomaml")


def _learner(method: str, steps: int, ways: int):
    from applications.imaml.meta import GradientDescent, build_meta_learner
    from applications.imaml.models import build_model

    model = build_model("conv4", ways=ways)
    inner = GradientDescent(steps, 0.1, safeguard=False)
    return build_meta_learner(method, model, lam=2.0, cg_steps=5, inner=inner)


def _meta_grad(learner, *task: Tensor) -> tuple[Params, Tensor, Tensor]:
    return learner.task_meta_grad(learner.params, *task)


def measure_one(method: str, steps: int, task_file: str, threads: int, repeats: int) -> dict:
    """Runs inside a fresh subprocess: peak RSS increase and time of one task's meta-gradient."""
    torch.set_num_threads(threads)
    task = torch.load(task_file)
    xs, ys, xq, yq = task["support_x"], task["support_y"], task["query_x"], task["query_y"]
    ways = int(ys.max()) + 1
    # Warm-up on a smaller task (5 ways, 1 shot: a lower peak than the measured call).
    first = torch.tensor([int((ys == c).nonzero()[0]) for c in range(min(ways, 5))])
    warm_x, warm_y = xs[first], ys[first]
    warm = _learner(method, 1, ways)
    _meta_grad(warm, warm_x, warm_y, warm_x, warm_y)
    del warm
    learner = _learner(method, steps, ways)
    gc.collect()
    peak_unreset = high_water_bytes()
    reset = reset_high_water()
    before = rss_bytes()
    peak_before = high_water_bytes()
    t0, c0 = time.perf_counter(), time.process_time()
    grads, loss, _ = _meta_grad(learner, xs, ys, xq, yq)
    first_seconds, first_cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = high_water_bytes()
    assert all(torch.isfinite(g).all() for g in grads.values())
    del grads
    times, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        _meta_grad(learner, xs, ys, xq, yq)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {
        "method": method,
        "inner_steps": steps,
        "peak_increase_mb": (max(peak, peak_before) - before) / 2**20,
        # the high-water mark before the call, relative to its RSS: ~0 after a reset
        "high_water_before_mb": (peak_before - before) / 2**20,
        "high_water_reset": reset,
        "high_water_before_reset_mb": (peak_unreset - before) / 2**20,
        "seconds": statistics.median(times) if times else first_seconds,
        "cpu_seconds": statistics.median(cpus) if cpus else first_cpu,
        "first_call_seconds": first_seconds,
        "all_seconds": times,
        "all_cpu_seconds": cpus,
        "query_loss": float(loss),
    }


def _subprocess(args: list[str]) -> dict:
    # The child measures this checkout's code, installed or not.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, __file__, *args],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def sample_task(ways: int, shots: int, data_dir: str | None, seed: int = 0) -> tuple[dict, str]:
    """One meta-training task (real Omniglot when ``data_dir`` has it, else random images)."""
    if data_dir:
        from applications.imaml.datasets import load_dataset
        from applications.imaml.tasks import TaskSampler

        images = load_dataset("omniglot", "train", data_dir=data_dir, download=False)
        batch = TaskSampler(images, ways=ways, shots=shots, queries=1, rotate=True, seed=seed)
        b = batch.sample(1)
        source = "omniglot (paper split, meta-train)"
    else:
        g = torch.Generator().manual_seed(seed)
        b = SimpleNamespace(
            support_x=torch.rand(1, ways * shots, 1, 28, 28, generator=g),
            support_y=torch.arange(ways).repeat_interleave(shots)[None],
            query_x=torch.rand(1, ways, 1, 28, 28, generator=g),
            query_y=torch.arange(ways)[None],
        )
        source = "random images (no Omniglot found)"
    keys = ("support_x", "support_y", "query_x", "query_y")
    task = {k: getattr(b, k)[0].contiguous() for k in keys}
    return task, source


def run_memory(args: argparse.Namespace) -> dict[str, Any]:
    task, source = sample_task(args.ways, args.shots, args.data_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        task_file = str(Path(tmp) / "task.pt")
        torch.save(task, task_file)
        for method in METHODS:
            for steps in args.memory_steps:
                if method == "maml" and steps > args.maml_max_steps:
                    continue
                if args.in_process:
                    row = measure_one(method, steps, task_file, args.threads, args.repeats)
                else:
                    argv = ["--_one", method, str(steps), task_file]
                    argv += ["--threads", str(args.threads), "--repeats", str(args.repeats)]
                    row = _subprocess(argv)
                row["load_average"] = os.getloadavg()
                rows.append(row)
                print(
                    f"{method:14s} {steps:3d} inner steps: peak +{row['peak_increase_mb']:8.1f} "
                    f"MB  {row['cpu_seconds']:7.3f} s CPU, {row['seconds']:7.3f} s wall",
                    flush=True,
                )
    isolation = (
        "all rows in this process (--in-process: a smoke test, the memory column is not "
        "comparable between rows)"
        if args.in_process
        else "fresh subprocess per row"
    )
    return {
        "task": f"{args.ways}-way {args.shots}-shot, 1 query per class",
        "images": source,
        "model": "conv4, 64 filters, float32",
        "inner_lr": 0.1,
        "lam": 2.0,
        "cg_steps": 5,
        "threads": args.threads,
        "repeats": args.repeats,
        "method": f"{isolation}; peak = VmHWM after - RSS before the call, the high-water "
        "mark reset just before it (/proc/self/clear_refs); "
        "time = median wall and process CPU time of the repeats after the measured call (the "
        "measured call without repeats)",
        "rows": rows,
    }


# --- figure and main ------------------------------------------------------------------------


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    acc, mem = result["accuracy"], result["memory"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    ax = axes[0]
    floor = 1e-17  # plot exact zeros at the bottom of the log axis
    gd = acc["gd_steps"]
    ks = [r["steps"] for r in gd]
    for key, label, style, color in (
        ("maml", "MAML (K GD steps)", "o-", "C0"),
        ("fomaml", "FOMAML (K GD steps)", "s-", "C1"),
        ("imaml_k_inner_steps_exact_backward", "iMAML (K inner GD steps, exact solve)", "x:", "C2"),
    ):
        ax.semilogy(ks, [max(r[key], floor) for r in gd], style, color=color, label=label, ms=4)
    cg = acc["cg_steps"]
    kc = [r["cg_steps"] for r in cg]
    for key, label, style, color in (
        ("imaml_bl_cg", "iMAML (k CG steps, bl.CG)", "^-", "C3"),
        ("imaml_app_minres", "iMAML, app (k MINRES steps)", "v--", "C4"),
    ):
        ax.semilogy(kc, [max(r[key], floor) for r in cg], style, color=color, label=label, ms=4)
    ax.set_xscale("log")
    ax.set_xlabel("iterations: inner GD steps (MAML, FOMAML) or CG steps (iMAML)")
    ax.set_ylabel("‖g − g*‖ / ‖g*‖")
    pr = acc["problem"]
    ax.set_title(
        f"(a) meta-gradient error, linear regression\n"
        f"d = {pr['dim']}, {pr['n_support']} support points, λ = {pr['lam']:g}, float64",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)

    for ax, key, ylabel, title in (
        (axes[1], "peak_increase_mb", "peak memory increase (MB)", "(b) memory"),
        (axes[2], "cpu_seconds", "CPU seconds per task meta-gradient", "(c) compute time"),
    ):
        for method, label, style, color in (
            ("maml", "MAML (second order)", "o-", "C0"),
            ("fomaml", "FOMAML", "s-", "C1"),
            ("imaml", "iMAML (5 MINRES steps)", "^-", "C3"),
        ):
            rows = [r for r in mem["rows"] if r["method"] == method]
            xs, ys = [r["inner_steps"] for r in rows], [r[key] for r in rows]
            if key == "peak_increase_mb":  # log axis: MAML's GBs and the others' MBs both show
                ys = [max(y, 0.1) for y in ys]
            ax.plot(xs, ys, style, color=color, label=label, ms=5)
        if key == "peak_increase_mb":
            ax.set_yscale("log")
        ax.set_xlabel("inner GD steps")
        ax.set_ylabel(ylabel)
        ax.set_title(
            f"{title}, one {mem['task'].split(',')[0]} task\n"
            f"conv4, 5 MINRES steps for iMAML, CPU, {mem['threads']} thread(s)",
            fontsize=10,
        )
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_tables(result: dict[str, Any]) -> None:
    acc, mem = result["accuracy"], result["memory"]
    print("\n| K GD steps | MAML | FOMAML | iMAML, K inner steps, exact backward |")
    print("|---:|---:|---:|---:|")
    for r in acc["gd_steps"]:
        print(
            f"| {r['steps']} | {r['maml']:.2e} | {r['fomaml']:.2e} "
            f"| {r['imaml_k_inner_steps_exact_backward']:.2e} |"
        )
    print("\n| k CG steps | iMAML, bl.CG | iMAML, app (MINRES) |")
    print("|---:|---:|---:|")
    for r in acc["cg_steps"]:
        print(f"| {r['cg_steps']} | {r['imaml_bl_cg']:.2e} | {r['imaml_app_minres']:.2e} |")
    print("\n| method | inner steps | peak memory increase (MB) | CPU time (s) | wall time (s) |")
    print("|---|---:|---:|---:|---:|")
    for r in mem["rows"]:
        print(
            f"| {r['method']} | {r['inner_steps']} | {r['peak_increase_mb']:.1f} "
            f"| {r['cpu_seconds']:.3f} | {r['seconds']:.3f} |"
        )


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: d = 20, 5-way 1-shot random images, steps {1, 2}, rows in-process",
    )
    parser.add_argument("--dim", type=int, default=100)
    parser.add_argument("--n-support", type=int, default=50)
    parser.add_argument("--lam", type=float, default=2.0)
    parser.add_argument(
        "--gd-steps", type=_int_list, default=[1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200]
    )
    parser.add_argument("--cg-steps", type=_int_list, default=[1, 2, 3, 5, 7, 10, 15, 20, 30, 40])
    parser.add_argument("--memory-steps", type=_int_list, default=[1, 5, 10, 20, 40])
    parser.add_argument("--maml-max-steps", type=int, default=40)
    parser.add_argument("--ways", type=int, default=20)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument(
        "--data-dir",
        default=None,
        help="Omniglot directory (default $BILEVEL_OMNIGLOT_DIR; --quick: random images)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure the memory rows in this process (implied by --quick; not isolated)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--png", type=Path, default=FIGURE)
    parser.add_argument("--_one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args._one:
        method, steps, task_file = args._one
        print(json.dumps(measure_one(method, int(steps), task_file, args.threads, args.repeats)))
        return None
    if args.quick:
        args.dim, args.n_support = 20, 10
        args.gd_steps, args.cg_steps = [1, 5, 20], [1, 5, 10]
        args.memory_steps, args.ways, args.shots, args.repeats = [1, 2], 5, 1, 0
        args.in_process = True

    elif args.data_dir is None:
        args.data_dir = os.environ.get("BILEVEL_OMNIGLOT_DIR")
    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _source_revision() -> dict[str, Any]:
    """The commit of the checkout whose ``bilevel`` and app were measured, and whether their
    files differed from it."""
    import applications.imaml.meta

    def git(*cmd: str) -> str | None:
        try:
            out = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True)
        except OSError:
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--", "bilevel", "applications")
    return {
        "commit": git("rev-parse", "HEAD"),
        "library_and_app_modified": None if status is None else bool(status),
        "bilevel": str(Path(bl.__file__).parent),
        "app": str(Path(applications.imaml.meta.__file__).parent),
    }


def _run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    problem = make_problem(args.dim, args.n_support, args.n_support, args.lam)
    accuracy = run_accuracy(problem, args.gd_steps, args.cg_steps)
    accuracy_seconds = time.perf_counter() - t0
    memory = run_memory(args)
    result = {
        "benchmark": "paper_figure2",
        "command": " ".join(["python benchmarks/paper_figure2.py", *args.argv]),
        "quick": args.quick,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "source": _source_revision(),
        "accuracy": accuracy,
        "memory": memory,
        "seconds": {"accuracy": accuracy_seconds, "total": time.perf_counter() - t0},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.png)
    print_tables(result)
    print(
        f"\n{result['seconds']['total']:.0f} s; load average {os.getloadavg()}; "
        f"written {args.output} and {args.png}"
    )
    return result


if __name__ == "__main__":
    main()
