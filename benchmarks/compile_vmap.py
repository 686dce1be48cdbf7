"""Compiled against eager for the same ``custom_root``-decorated function under ``vmap``.

Issue 15 made ``bl.custom_root`` traceable by ``torch.compile`` inside ``torch.func``
transforms. Before it, a user who compiled had to leave the decorator and write the rule by
hand: x* without gradient, the outer gradient, then ``bl.root_vjp`` (the iMAML app's former
``traceable_task_meta_grad``). This measures, interleaved in one process after warm-up so
that machine load affects every variant alike (median of ``--repeats``):

* **ridge** — ``vmap(grad(outer))`` over 16 hyperparameter vectors of ridge regression
  (float64, n = 2000, d = 500; x* in closed form by Cholesky, backward fixed-K CG with
  ``--cg`` steps): eager ``custom_root``, compiled ``custom_root`` and compiled
  hand-written ``root_vjp`` path, each checked against the closed-form hypergradient
  ``−diag(w) (XᵀX + diag λ)⁻¹ ∇_w L_val``.
* **imaml** — the meta-gradient of a meta-batch of 16 conv4 tasks (5-way 1-shot, 16 GD steps
  at lr 0.1, λ = 2, 5 MINRES steps: the paper's recipe): eager vmap, ``IMAML(compile=True)``
  (the decorated solve compiled whole) and the compiled ``root_vjp`` path, each compared
  with the eager vmap's meta-gradient. Compiling the conv4 meta-batch takes minutes per
  variant on two cores (recorded as ``first_call_seconds``).

Usage::

    python benchmarks/compile_vmap.py [--sections ridge imaml] [--repeats 7]
        [--threads 2] [--out benchmarks/results/compile_vmap.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bilevel as bl  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "compile_vmap.json"


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _interleave(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(_timed(fn)[1])
    return {name: statistics.median(ts) for name, ts in times.items()}


def _rel(a: Any, b: Any) -> float:
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    num = sum(float((x - y).double().square().sum()) for x, y in zip(la, lb, strict=True))
    den = sum(float(y.double().square().sum()) for y in lb)
    return (num / max(den, 1e-300)) ** 0.5


# -- ridge ------------------------------------------------------------------------------------


def ridge(repeats: int, cg_steps: int, batch: int = 16, n: int = 2000, d: int = 500) -> dict:
    g = torch.Generator().manual_seed(0)
    dt = torch.float64
    X = torch.randn(n, d, generator=g, dtype=dt) / n**0.5
    y = torch.randn(n, generator=g, dtype=dt)
    Xv = torch.randn(n, d, generator=g, dtype=dt) / n**0.5
    yv = torch.randn(n, generator=g, dtype=dt)
    log_lam = -0.7 + 0.3 * torch.randn(batch, d, generator=g, dtype=dt)

    def inner_loss(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (lam * w * w).sum()

    def closed_form(x0: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        L = torch.linalg.cholesky(X.T @ X + torch.diag(lam))
        return torch.cholesky_solve((X.T @ y).unsqueeze(-1), L).squeeze(-1)

    F = bl.stationarity(inner_loss)
    solver = bl.CG(tol=0, maxiter=cg_steps)
    solve = bl.custom_root(F, solver=solver, symmetric=True)(closed_form)

    def val_loss(w: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((Xv @ w - yv) ** 2).sum()

    def outer(ll: torch.Tensor) -> torch.Tensor:
        lam = ll.exp()
        return val_loss(solve(torch.zeros(d, dtype=dt), lam))

    def outer_root_vjp(ll: torch.Tensor) -> torch.Tensor:
        # The pre-issue-15 compiled path: the rule written by hand around root_vjp.
        lam = ll.exp()
        w = closed_form(None, lam).detach()
        (cot_lam,) = bl.root_vjp(F, w, (lam,), torch.func.grad(val_loss)(w), solver=solver)
        return cot_lam * lam  # chain rule through λ = exp(log λ)

    eager = torch.func.vmap(torch.func.grad(outer))
    compiled = torch.compile(eager, fullgraph=True, dynamic=False)
    compiled_rvjp = torch.compile(torch.func.vmap(outer_root_vjp), fullgraph=True, dynamic=False)

    # Reference, per vector: −λ ⊙ w ⊙ (XᵀX + diag λ)⁻¹ ∇L_val(w)  (d/dlogλ), from dense solves.
    ref = []
    for ll in log_lam:
        lam = ll.exp()
        A = X.T @ X + torch.diag(lam)
        w = torch.linalg.solve(A, X.T @ y)
        ref.append(-lam * w * torch.linalg.solve(A, Xv.T @ (Xv @ w - yv)))
    reference = torch.stack(ref)

    rows: dict[str, Any] = {}
    variants = {
        "eager custom_root": lambda: eager(log_lam),
        "compiled custom_root": lambda: compiled(log_lam),
        "compiled root_vjp (old path)": lambda: compiled_rvjp(log_lam),
    }
    for name, fn in variants.items():
        out, first = _timed(fn)
        rows[name] = {"first_call_seconds": first, "rel_error_vs_closed_form": _rel(out, reference)}
    for name, t in _interleave(variants, repeats).items():
        rows[name]["seconds"] = t
    return {
        "problem": f"ridge n={n} d={d} float64, {batch} hyperparameter vectors, CG fixed-K "
        f"{cg_steps}",
        "rows": rows,
    }


# -- iMAML --------------------------------------------------------------------------------------


def _batch(b: int, n: int = 5, k: int = 1, q: int = 1, seed: int = 0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        support_x=torch.rand(b, n * k, 1, 28, 28, generator=g),
        support_y=torch.arange(n).repeat_interleave(k).expand(b, -1).contiguous(),
        query_x=torch.rand(b, n * q, 1, 28, 28, generator=g),
        query_y=torch.arange(n).repeat_interleave(q).expand(b, -1).contiguous(),
    )


def imaml(repeats: int, tasks: int = 16) -> dict:
    from applications.imaml.meta import IMAML, GradientDescent
    from applications.imaml.models import build_model

    def learner(compile: bool) -> IMAML:
        torch.manual_seed(0)
        return IMAML(
            build_model("conv4", ways=5),
            lam=2.0,
            cg_steps=5,
            inner=GradientDescent(16, 0.1, safeguard=False),
            batched=True,
            compile=compile,
        )

    eager, compiled = learner(False), learner(True)
    theta = eager.params
    batch = _batch(tasks)
    data = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)

    def task_root_vjp(th: dict, xs: Any, ys: Any, xq: Any, yq: Any) -> Any:
        # The removed traceable_task_meta_grad: x* detached, outer gradient, then root_vjp.
        phi = {k: v.detach() for k, v in eager._inner_solve(th, th, xs, ys).items()}
        cot, (loss, metric) = torch.func.grad(eager.query_loss, has_aux=True)(phi, xq, yq)
        meta_grad, _, _ = bl.root_vjp(
            eager.optimality_fn, phi, (th, xs, ys), cot, solver=eager.cg, argnums=0
        )
        return meta_grad, loss, metric

    rvjp = torch.compile(
        torch.func.vmap(task_root_vjp, in_dims=(None, 0, 0, 0, 0)), fullgraph=True, dynamic=False
    )
    reference = eager._batched_meta_grad()(theta, *data)[0]
    variants = {
        "eager vmap custom_root": lambda: eager._batched_meta_grad()(theta, *data)[0],
        "compiled custom_root (IMAML(compile=True))": lambda: compiled._batched_meta_grad()(
            theta, *data
        )[0],
        "compiled root_vjp (old path)": lambda: rvjp(theta, *data)[0],
    }
    rows: dict[str, Any] = {}
    for name, fn in variants.items():
        out, first = _timed(fn)
        rows[name] = {"first_call_seconds": first, "rel_diff_vs_eager": _rel(out, reference)}
        print(f"  {name}: first call {first:.1f} s", flush=True)
    for name, t in _interleave(variants, repeats).items():
        rows[name]["seconds"] = t
    return {
        "problem": f"iMAML meta-gradient, {tasks} conv4 tasks 5-way 1-shot, 16 GD steps lr 0.1, "
        "λ=2, MINRES fixed-K 5",
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["ridge", "imaml"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cg", type=int, default=20, help="CG steps of the ridge backward")
    parser.add_argument("--out", type=Path, default=RESULTS)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    result: dict[str, Any] = {
        "benchmark": "compile_vmap",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": options.threads,
        "load_average_start": os.getloadavg()[0],
        "command": "python benchmarks/compile_vmap.py " + " ".join(sys.argv[1:]),
    }
    sections = {
        "ridge": lambda: ridge(options.repeats, options.cg),
        "imaml": lambda: imaml(options.repeats),
    }
    for name in options.sections:
        print(f"[{name}]", flush=True)
        result[name] = sections[name]()
        base = result[name]["rows"]
        eager_key = next(k for k in base if k.startswith("eager"))
        print(f"{'variant':45} {'s/call':>9} {'vs eager':>9} {'first call s':>13} {'error':>9}")
        for key, row in base.items():
            err = row.get("rel_error_vs_closed_form", row.get("rel_diff_vs_eager"))
            speed = base[eager_key]["seconds"] / row["seconds"]
            row["speedup_vs_eager"] = speed
            print(
                f"{key:45} {row['seconds']:9.4f} {speed:8.2f}x "
                f"{row['first_call_seconds']:13.1f} {err:9.2e}"
            )
    result["load_average_end"] = os.getloadavg()[0]
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {options.out}")


if __name__ == "__main__":
    main()
