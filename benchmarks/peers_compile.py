"""bilevel compiled against the peers harness's figures, on the harness's own problems.

Issue 15's targets: bilevel's compiled vmap path (decorator, inner loop and CG in one graph)
at or below jitted JAXopt per iMAML task, and the ridge hypergradient at or below JAXopt's.
The problems are the peers harness's own (``../shared/peers/bilevel_imaml.py`` and
``bilevel_ridge.py``, imported, not copied).

**imaml** (``--section imaml``): a synthetic 5-way task with
5 support and 15 query examples per class, the MLP 64-128-128-5 with tanh, T inner GD steps
at lr 0.1 on ``CE + λ/2 ‖φ − θ‖²`` (λ = 0.5) and exactly 5 CG steps for
``λ (H + λI)⁻¹ ∇_φ CE_query``. For each T it measures, interleaved in one process after
warm-up (median of ``--repeats`` batches of ``--tasks`` tasks):

* ``vmap`` — ``torch.func.vmap(torch.func.grad(meta_loss))`` eagerly, the harness's mode;
* ``compile`` — the same function through ``torch.compile(..., fullgraph=True)``;

and checks both against the harness's plain-torch CG reference at the same inner solution.

**ridge** (``--section ridge``): the hypergradient of ``½‖X_v w* − y_v‖²/n_v`` in
``θ = log λ`` for ridge regression, n = 2000, d = 500, float64, w* by an exact solve inside
``custom_root``: the harness's eager adaptive CG (``tol=1e-10``, backward timed alone, as the
harness does), the same CG in fixed-K mode with the adaptive run's iteration count, and
``torch.compile(torch.func.grad(...), fullgraph=True)`` of the whole hypergradient with that
fixed-K CG (forward solve included; the compiled forward alone is timed too, so the backward
is their difference). Each is checked against the closed form.

The peers' figures (JAXopt jitted, TorchOpt, higher) are quoted from the harness README with
its date; they were not re-measured here.

Usage::

    python benchmarks/peers_compile.py --section imaml [--steps 10,100] [--tasks 10]
        [--repeats 5] [--threads 2] [--peers ../shared/peers]
    python benchmarks/peers_compile.py --section ridge [--repeats 20]

Results: ``benchmarks/results/peers_compile_<section>.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bilevel as bl  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# The harness README's side-by-side table (2-core CPU, 2026-12-02, medians), ms per task.
PEERS_README = {
    "source": "../shared/peers/README.md, 'Side-by-side figures' (one run, 2026-12-02)",
    "jaxopt_jit_ms_per_task": {"10": 3.1, "100": 7.7, "1000": 65.0},
    "torchopt_ms_per_task": {"10": 28.0, "100": 148.0, "1000": 1348.0},
    "bilevel_vmap_ms_per_task_then": {"10": 8.4, "100": 43.6, "1000": 425.0},
    "jaxopt_jit_ridge_2000x500_backward_ms": 15.7,
    "torchopt_ridge_2000x500_backward_ms": 22.0,
    "bilevel_ridge_2000x500_backward_ms_then": "18.3-21.4",
}


def _harness(peers: Path, name: str = "bilevel_imaml") -> Any:
    path = peers / f"{name}.py"
    if not path.is_file():
        raise SystemExit(f"--peers: {path} not found (the peers harness defines the problem)")
    spec = importlib.util.spec_from_file_location(f"peers_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dynamo looks traced functions' modules up by name
    spec.loader.exec_module(module)
    return module


def _build(h: Any, steps: int, lam: float, alpha: float, cg_iters: int) -> Callable[..., Any]:
    """``vmap(grad(meta_loss))`` over a stacked batch, through ``bl.custom_root``."""

    def inner_obj(phi: tuple, theta: tuple, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        prox = sum(((p - t) ** 2).sum() for p, t in zip(phi, theta, strict=True))
        return F.cross_entropy(h.mlp(phi, xs), ys) + lam / 2 * prox

    @bl.custom_root(bl.stationarity(inner_obj), solver=bl.CG(tol=0, maxiter=cg_iters))
    def inner_solve(phi0: tuple, theta: tuple, xs: torch.Tensor, ys: torch.Tensor) -> tuple:
        g = torch.func.grad(inner_obj)
        phi = tuple(p.detach() for p in phi0)
        th = tuple(t.detach() for t in theta)
        for _ in range(steps):
            phi = tuple(p - alpha * gi for p, gi in zip(phi, g(phi, th, xs, ys), strict=True))
        return phi

    def meta_loss(theta: tuple, xs: Any, ys: Any, xq: Any, yq: Any) -> torch.Tensor:
        return F.cross_entropy(h.mlp(inner_solve(theta, theta, xs, ys), xq), yq)

    return torch.func.vmap(torch.func.grad(meta_loss), in_dims=(None, 0, 0, 0, 0))


def _measure(h: Any, steps: int, args: argparse.Namespace) -> dict[str, Any]:
    theta0 = h.init_theta()
    tasks = [h.make_task(1000 + i) for i in range(args.tasks + 1)]
    batch = tuple(torch.stack(z) for z in zip(*tasks[1:], strict=True))
    eager = _build(h, steps, args.lam, args.alpha, args.cg_iters)
    compiled = torch.compile(_build(h, steps, args.lam, args.alpha, args.cg_iters), fullgraph=True)

    t0 = time.perf_counter()
    eager(theta0, *batch)
    eager_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled(theta0, *batch)
    compile_first = time.perf_counter() - t0

    times: dict[str, list[float]] = {"vmap": [], "compile": []}
    outputs: dict[str, Any] = {}
    for _ in range(args.repeats):
        for name, fn in (("vmap", eager), ("compile", compiled)):
            t0 = time.perf_counter()
            outputs[name] = fn(theta0, *batch)
            times[name].append(time.perf_counter() - t0)

    # The harness's check: plain-torch CG-5 at the same inner solution, per task.
    g = torch.func.grad(
        lambda phi, theta, xs, ys: (
            F.cross_entropy(h.mlp(phi, xs), ys)
            + args.lam / 2 * sum(((p - t) ** 2).sum() for p, t in zip(phi, theta, strict=True))
        )
    )
    rel: dict[str, list[float]] = {"vmap": [], "compile": []}
    for i, (xs, ys, xq, yq) in enumerate(tasks[1:]):
        phi = tuple(t.clone() for t in theta0)
        for _ in range(steps):
            grads = g(phi, theta0, xs, ys)
            phi = tuple(p - args.alpha * gi for p, gi in zip(phi, grads, strict=True))
        ref = h.flat(h.ref_metagrad(phi, theta0, xs, ys, xq, yq, args.lam, args.cg_iters))
        for name in rel:
            mine = h.flat([m[i] for m in outputs[name]])
            rel[name].append(float((mine - ref).norm() / ref.norm()))

    per_task = {k: statistics.median(v) / args.tasks for k, v in times.items()}
    return {
        "inner_steps": steps,
        "ms_per_task": {k: round(1e3 * v, 3) for k, v in per_task.items()},
        "compile_over_vmap": round(per_task["compile"] / per_task["vmap"], 3),
        "first_call_seconds": {"vmap": round(eager_first, 2), "compile": round(compile_first, 2)},
        "median_rel_diff_vs_plain_torch_cg": {k: statistics.median(v) for k, v in rel.items()},
        "max_rel_diff_vs_plain_torch_cg": {k: max(v) for k, v in rel.items()},
        "jaxopt_jit_ms_per_task": PEERS_README["jaxopt_jit_ms_per_task"].get(str(steps)),
    }


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def _ridge(args: argparse.Namespace) -> dict[str, Any]:
    r = _harness(args.peers, "bilevel_ridge")
    n, d, nv = 2000, 500, 1000
    X, y, Xv, yv, theta0 = r.make_problem(n, d, nv, 0)
    _, g_ref = r.closed_form(X, y, Xv, yv, theta0)
    w0 = torch.zeros(d, dtype=torch.float64)

    def optimality(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return X.T @ (X @ w - y) / n + torch.exp(theta) * w

    def outer(w: torch.Tensor) -> torch.Tensor:
        res = Xv @ w - yv
        return 0.5 * (res @ res) / nv

    def decorated(solver: bl.LinearSolver) -> bl.ImplicitFunction:
        @bl.custom_root(optimality, solver=solver, symmetric=True)
        def inner_solve(w_init: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
            h = X.T @ X / n + torch.diag(torch.exp(theta))
            return torch.linalg.solve(h, X.T @ y / n)

        return inner_solve

    def backward_only(solve: bl.ImplicitFunction) -> Callable[[], tuple[torch.Tensor, float]]:
        def run() -> tuple[torch.Tensor, float]:
            theta = theta0.clone().requires_grad_(True)
            w = solve(w0, theta)
            t0 = time.perf_counter()
            (g,) = torch.autograd.grad(outer(w), theta)
            return g, time.perf_counter() - t0

        return run

    def rel(g: torch.Tensor) -> float:
        return float((g - g_ref).norm() / g_ref.norm())

    rows: dict[str, Any] = {}
    adaptive = decorated(bl.CG(tol=1e-10, maxiter=1000))
    run = backward_only(adaptive)
    run()  # warm-up (and the once-per-function probes)
    results = [run() for _ in range(args.repeats)]
    info = adaptive.latest_info
    assert info is not None
    k = int(info.iterations)
    rows["eager_adaptive_cg"] = {
        "backward_ms": 1e3 * statistics.median(t for _, t in results),
        "iterations": k,
        "rel_err": rel(results[-1][0]),
    }
    fixed = decorated(bl.CG(tol=0, maxiter=k))
    run = backward_only(fixed)
    run()
    results = [run() for _ in range(args.repeats)]
    rows["eager_fixed_k_cg"] = {
        "backward_ms": 1e3 * statistics.median(t for _, t in results),
        "iterations": k,
        "rel_err": rel(results[-1][0]),
    }
    compiled_solve = decorated(bl.CG(tol=0, maxiter=k))
    hypergradient = torch.compile(
        torch.func.grad(lambda theta: outer(compiled_solve(w0, theta))), fullgraph=True
    )
    # The forward alone is the undecorated inner solve (a plain compiled call of the decorator
    # runs eagerly behind a graph break; inside torch.func.grad it is one graph).
    forward = torch.compile(lambda theta: compiled_solve.__wrapped__(w0, theta), fullgraph=True)
    t0 = time.perf_counter()
    hypergradient(theta0)
    first = time.perf_counter() - t0
    forward(theta0)
    g, total = _median_time(lambda: hypergradient(theta0), args.repeats)
    _, fwd = _median_time(lambda: forward(theta0), args.repeats)
    rows["compiled_fixed_k_cg"] = {
        "total_ms": 1e3 * total,
        "forward_ms": 1e3 * fwd,
        "backward_ms": 1e3 * (total - fwd),
        "iterations": k,
        "rel_err": rel(g),
        "first_call_seconds": round(first, 2),
    }
    for name, row in rows.items():
        extra = f"  (total {row['total_ms']:.2f} ms)" if "total_ms" in row else ""
        print(
            f"ridge 2000x500 {name:20s} backward {row['backward_ms']:7.2f} ms{extra}  "
            f"CG {row['iterations']} its  rel err {row['rel_err']:.1e}",
            flush=True,
        )
    print(
        f"JAXopt jit (harness README): {PEERS_README['jaxopt_jit_ridge_2000x500_backward_ms']} ms"
    )
    return {"n": n, "d": d, "n_val": nv, "dtype": "float64", "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--steps", default="10,100")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cg-iters", type=int, default=5)
    parser.add_argument("--lam", type=float, default=0.5)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", type=Path, default=ROOT.parent / "shared" / "peers")
    parser.add_argument("--section", choices=("imaml", "ridge"), default="imaml")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "peers_readme": PEERS_README,
    }
    if args.section == "ridge":
        out.update(_ridge(args))
    else:
        h = _harness(args.peers)
        rows = []
        for steps in (int(s) for s in args.steps.split(",")):
            row = _measure(h, steps, args)
            rows.append(row)
            ms, first = row["ms_per_task"], row["first_call_seconds"]["compile"]
            print(
                f"T={steps:5d}  vmap {ms['vmap']:8.2f} ms/task  compiled {ms['compile']:8.2f} "
                f"ms/task  (×{row['compile_over_vmap']:.2f}; first compile {first:.0f} s)  "
                f"JAXopt jit {row['jaxopt_jit_ms_per_task']} ms/task",
                flush=True,
            )
        out["rows"] = rows
    path = args.out or RESULTS / f"peers_compile_{args.section}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
