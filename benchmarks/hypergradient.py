"""Cost of one implicit hypergradient against its floor, the HVP choice, and implicit vs unrolled.

Problem: ridge regression with one L2 strength per feature, float64, ``n = 4d`` training and
``2d`` validation rows, ``d ∈ {500, 2000}``::

    inner  w*(λ) = argmin ½‖Xw − y‖² + ½ Σⱼ λⱼ wⱼ²       F(w, λ) = Xᵀ(Xw − y) + λ ⊙ w
    outer  L(λ)  = ½‖X_v w*(λ) − y_v‖²

Sections:

(a) **Implicit backward vs the floor.** With ``v = ∇_w L`` given, the backward of
    ``w* = custom_root(F)(...)`` solves ``H u = v`` by ``k`` CG iterations and returns
    ``−Bᵀu``. Its floor is ``k`` raw Hessian-vector products ``Xᵀ(Xp) + λ ⊙ p`` plus one VJP of
    ``F`` in λ (``u ⊙ w``). Timed for a hand-written gradient ``F`` and for
    ``bl.stationarity(loss)``; ``bl.CG`` on the raw product is shown too (CG's own vector
    work). Target: implicit ≤ 1.3 × floor. Also the adaptive solve to ``tol = 1e-10``.
(b) **The Hessian-vector product.** One product of ``bl.stationarity(loss)``'s Jacobian by
    forward-over-reverse (``torch.func.jvp`` of the gradient), reverse-over-reverse built
    fresh per product, a VJP through a graph built once and reused (``torch.func.vjp``, what
    ``bilevel.implicit`` does; and plain ``torch.autograd`` with ``create_graph``), and
    ``torch.func.linearize``; the raw product for scale.
(c) **Implicit vs unrolled through T gradient steps**, ``T ∈ {10, 100, 1000}`` (``T ≤ 250``
    at ``d = 2000``, where unrolling 1000 steps takes minutes): the whole
    hypergradient (inner loop + backward) by ``custom_root`` over
    ``bl.inner.gradient_descent`` versus backpropagation through the same loop built with
    ``create_graph=True``. Time, the relative error against the closed form, and peak memory:
    each configuration runs once in a fresh subprocess, which reports its peak resident set
    size (``ru_maxrss``) above the level reached after setup — the growth caused by the
    hypergradient alone, allocator included.

Timing: single-threaded BLAS (set ``OMP_NUM_THREADS`` to override), CPU time of the calling
thread (``time.thread_time``: other processes on a shared machine do not inflate it),
variants of one table interleaved in every repeat, median over repeats, two warm-up calls.

Usage::

    python benchmarks/hypergradient.py [--quick] [--out benchmarks/results/hypergradient.json]
"""

# ruff: noqa: E402  (BLAS thread variables must be set before numpy and torch load)
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from _peak_memory import high_water_bytes, reset_high_water, rss_bytes

import bilevel as bl

F64 = torch.float64


# --- the problem ------------------------------------------------------------------------------


def make_problem(d: int, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    n, nv = 4 * d, 2 * d
    X = torch.randn(n, d, generator=g, dtype=F64) / n**0.5
    w_true = torch.randn(d, generator=g, dtype=F64)
    y = X @ w_true + 0.1 * torch.randn(n, generator=g, dtype=F64)
    Xv = torch.randn(nv, d, generator=g, dtype=F64) / nv**0.5
    yv = Xv @ w_true + 0.1 * torch.randn(nv, generator=g, dtype=F64)
    lam = 0.05 + 0.1 * torch.rand(d, generator=g, dtype=F64)
    H = X.T @ X + torch.diag(lam)
    w = torch.linalg.solve(H, X.T @ y)
    v = Xv.T @ (Xv @ w - yv)
    reference = -torch.linalg.solve(H, v) * w
    lipschitz = float(torch.linalg.eigvalsh(H).max())
    return dict(X=X, y=y, Xv=Xv, yv=yv, lam=lam, w=w, v=v, ref=reference, L=lipschitz, d=d)


def inner_loss(w: torch.Tensor, lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor):
    return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (lam * w * w).sum()


def gradient(w: torch.Tensor, lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor):
    return X.T @ (X @ w - y) + lam * w


# --- timing -----------------------------------------------------------------------------------


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median CPU milliseconds of each function, the functions interleaved in every repeat."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.thread_time()
            fn()
            samples[name].append((time.thread_time() - start) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- (a) implicit backward vs the floor ----------------------------------------------------


def section_a(p: dict[str, Any], k: int, repeats: int) -> dict[str, Any]:
    X, y, lam, w, v = p["X"], p["y"], p["lam"], p["w"], p["v"]

    def raw_hvp(q: torch.Tensor) -> torch.Tensor:
        return X.T @ (X @ q) + lam * q

    def floor() -> torch.Tensor:
        q = v
        for _ in range(k):
            q = raw_hvp(q)
        return -(q * w)  # one VJP of F in λ: −Bᵀu = −u ⊙ w

    def floor_cg() -> torch.Tensor:
        u, _ = bl.CG(tol=0, maxiter=k)(raw_hvp, v)
        return -(u * w)

    w_leaf = w.clone().requires_grad_(True)
    F_graph = gradient(w_leaf, lam, X, y)

    def floor_autograd() -> torch.Tensor:  # the same products, replayed by the autograd engine
        q = v
        for _ in range(k):
            q = torch.autograd.grad(F_graph, w_leaf, q, retain_graph=True)[0]
        return -(q * w)

    def implicit(F: Callable[..., Any], solver: bl.LinearSolver) -> Callable[[], torch.Tensor]:
        solve = bl.custom_root(F, solver=solver, symmetric=True, on_failure="ignore")(
            lambda x0, *args: w  # the inner solve is excluded: x* is known
        )
        lam_ = lam.clone().requires_grad_(True)

        def run() -> torch.Tensor:
            w_star = solve(None, lam_, X, y)
            return torch.autograd.grad(w_star, lam_, v)[0]

        run.solve = solve  # type: ignore[attr-defined]
        return run

    stationarity = bl.stationarity(inner_loss)
    fixed = {
        "floor": floor,
        "floor, products by autograd (reused graph)": floor_autograd,
        "bl.CG on the raw product": floor_cg,
        "implicit, hand-written F": implicit(gradient, bl.CG(tol=0, maxiter=k)),
        "implicit, bl.stationarity": implicit(stationarity, bl.CG(tol=0, maxiter=k)),
    }
    ms = time_interleaved(fixed, repeats)
    floor_ms = ms["floor"]
    rows = [
        {"variant": name, "ms": t, "x_floor": t / floor_ms, "iterations": k}
        for name, t in ms.items()
    ]

    # adaptive CG to a relative tolerance of 1e-10 (the setting of the peer comparison)
    adaptive = {
        "implicit, hand-written F": implicit(gradient, bl.CG(tol=1e-10, maxiter=500)),
        "implicit, bl.stationarity": implicit(stationarity, bl.CG(tol=1e-10, maxiter=500)),
    }
    errors = {name: rel_err(fn(), p["ref"]) for name, fn in adaptive.items()}
    iterations = {name: int(fn.solve.latest_info.iterations) for name, fn in adaptive.items()}
    it = max(iterations.values())

    def floor_adaptive() -> torch.Tensor:
        q = v
        for _ in range(it):
            q = raw_hvp(q)
        return -(q * w)

    ms_adaptive = time_interleaved({"floor": floor_adaptive, **adaptive}, repeats)
    for name, t in ms_adaptive.items():
        rows.append(
            {
                "variant": f"{name} (tol 1e-10)" if name != "floor" else "floor (tol 1e-10)",
                "ms": t,
                "x_floor": t / ms_adaptive["floor"],
                "iterations": iterations.get(name, it),
                "rel_err": errors.get(name),
            }
        )
    return {"d": p["d"], "n": 4 * p["d"], "k": k, "rows": rows}


# --- (b) the Hessian-vector product -----------------------------------------------------------


def section_b(p: dict[str, Any], repeats: int) -> dict[str, Any]:
    X, y, lam, w, v = p["X"], p["y"], p["lam"], p["w"], p["v"]
    F = bl.stationarity(inner_loss)

    def fx(x: torch.Tensor) -> torch.Tensor:
        return F(x, lam, X, y)

    _, reused_vjp = torch.func.vjp(fx, w)
    w_leaf = w.clone().requires_grad_(True)
    g_graph = torch.autograd.grad(inner_loss(w_leaf, lam, X, y), w_leaf, create_graph=True)[0]
    _, linearized = torch.func.linearize(fx, w)
    variants = {
        "raw product Xᵀ(Xv) + λ⊙v": lambda: X.T @ (X @ v) + lam * v,
        "forward-over-reverse (func.jvp of grad)": lambda: torch.func.jvp(fx, (w,), (v,))[1],
        "reverse-over-reverse, fresh graph": lambda: torch.func.vjp(fx, w)[1](v)[0],
        "VJP through a reused graph (func.vjp)": lambda: reused_vjp(v)[0],
        "VJP through a reused graph (autograd)": lambda: torch.autograd.grad(
            g_graph, w_leaf, v, retain_graph=True
        )[0],
        "func.linearize (reused)": lambda: linearized(v),
        "build the reused func.vjp graph (once per solve)": lambda: torch.func.vjp(fx, w),
    }
    reference = X.T @ (X @ v) + lam * v
    for name, fn in variants.items():
        if not name.startswith("build"):
            assert rel_err(fn(), reference) < 1e-12, name
    ms = time_interleaved(variants, repeats)
    products = {k: t for k, t in ms.items() if not k.startswith(("raw", "build"))}
    fastest = min(products, key=products.get)
    return {
        "d": p["d"],
        "n": 4 * p["d"],
        "rows": [{"variant": name, "ms": t} for name, t in ms.items()],
        "fastest": fastest,
        "library": "VJP through a reused graph: autograd outside torch.func transforms, "
        "func.vjp inside them",
    }


# --- (c) implicit vs unrolled -----------------------------------------------------------------


def hypergradient(p: dict[str, Any], mode: str, steps: int) -> torch.Tensor:
    loss, lam = outer_graph(p, mode, steps)
    return torch.autograd.grad(loss, lam)[0]


def outer_graph(p: dict[str, Any], mode: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The outer loss at ``x*(λ)`` (implicit) or at the T-th iterate (unrolled), and λ."""
    X, y, Xv, yv = p["X"], p["y"], p["Xv"], p["yv"]
    lr = 1.0 / p["L"]
    lam = p["lam"].clone().requires_grad_(True)
    w = torch.zeros(p["d"], dtype=F64)
    if mode == "implicit":
        inner = bl.inner.gradient_descent(inner_loss, steps=steps, lr=lr)
        solve = bl.custom_root(
            bl.stationarity(inner_loss), solver=bl.CG(tol=1e-10, maxiter=200), on_failure="ignore"
        )(inner)
        w = solve(w, lam, X, y)
    else:  # unrolled: backpropagate through every step, as higher / hypertorch do
        w.requires_grad_(True)
        for _ in range(steps):
            g = torch.autograd.grad(inner_loss(w, lam, X, y), w, create_graph=True)[0]
            w = w - lr * g
    return 0.5 * ((Xv @ w - yv) ** 2).sum(), lam


class _SavedTensors:
    """Track the tensors autograd saves for backward, to weigh the graph alive at a moment."""

    def __init__(self) -> None:
        self.saved: list[weakref.ref] = []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.saved.append(weakref.ref(t))
        return t

    def alive_bytes(self) -> int:
        """Bytes of the distinct storages saved by graphs that are still alive."""
        storages = {}
        for ref in self.saved:
            t = ref()
            if t is not None:
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())


def memory_worker(d: int, mode: str, steps: int) -> None:
    """Run one hypergradient in this fresh process; print its memory growth as JSON.

    ``peak_mb``: the peak resident set size during the run above the RSS just before it
    (VmHWM reset through ``/proc/self/clear_refs``; ``ru_maxrss`` where that is missing).
    ``graph_mb``: the tensors saved by the autograd graph alive just before the outer
    backward pass (the graph the hypergradient differentiates), problem data included once
    (``X`` is saved by the first product that uses it).
    """
    p = make_problem(d)
    hypergradient(make_problem(8), mode, 2)  # load lazy modules before the baseline
    saved = _SavedTensors()
    reset_high_water()
    before = rss_bytes() / 1024
    start = time.thread_time()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        loss, lam = outer_graph(p, mode, steps)
    graph_bytes = saved.alive_bytes()
    grad = torch.autograd.grad(loss, lam)[0]
    seconds = time.thread_time() - start
    peak = high_water_bytes() / 1024
    print(
        json.dumps(
            {
                "peak_mb": (peak - before) / 1024,
                "graph_mb": graph_bytes / 2**20,
                "cold_ms": seconds * 1e3,
                "rel_err": rel_err(grad, p["ref"]),
            }
        )
    )


def section_c(p: dict[str, Any], steps_list: list[int], repeats: int) -> dict[str, Any]:
    rows = []
    for steps in steps_list:
        fns = {
            mode: (lambda m=mode, t=steps: hypergradient(p, m, t))
            for mode in ("implicit", "unrolled")
        }
        ms = time_interleaved(fns, repeats, warmup=1)
        for mode in ("implicit", "unrolled"):
            out = subprocess.run(
                [sys.executable, __file__, "--memory-worker", str(p["d"]), mode, str(steps)],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
            worker = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(
                {
                    "T": steps,
                    "mode": mode,
                    "ms": ms[mode],
                    "peak_mb": worker["peak_mb"],
                    "graph_mb": worker["graph_mb"],
                    "rel_err": worker["rel_err"],
                }
            )
    return {"d": p["d"], "n": 4 * p["d"], "rows": rows}


# --- report -------------------------------------------------------------------------------------


def print_tables(results: dict[str, Any]) -> None:
    for a in results["a"]:
        print(
            f"\n(a) implicit backward vs floor — ridge d={a['d']}, n={a['n']}, float64, k={a['k']}"
        )
        print(f"{'variant':48s} {'iters':>5s} {'ms':>9s} {'× floor':>8s} {'rel err':>9s}")
        for r in a["rows"]:
            err = "" if r.get("rel_err") is None else f"{r['rel_err']:.1e}"
            print(
                f"{r['variant']:48s} {r['iterations']:5d} {r['ms']:9.2f} {r['x_floor']:8.2f} "
                f"{err:>9s}"
            )
    for b in results["b"]:
        print(f"\n(b) one Hessian-vector product — d={b['d']}, n={b['n']}")
        for r in b["rows"]:
            print(f"{r['variant']:52s} {r['ms']:9.3f} ms")
        print(f"fastest product: {b['fastest']}; bilevel uses: {b['library']}")
    for c in results["c"]:
        print(f"\n(c) implicit vs unrolled through T GD steps — d={c['d']}, n={c['n']}")
        print(f"{'T':>5s} {'mode':9s} {'ms':>10s} {'peak MB':>9s} {'graph MB':>9s} {'rel err':>9s}")
        for r in c["rows"]:
            print(
                f"{r['T']:5d} {r['mode']:9s} {r['ms']:10.1f} {r['peak_mb']:9.1f} "
                f"{r['graph_mb']:9.1f} {r['rel_err']:9.1e}"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="d=500 only, fewer repeats")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--k", type=int, default=20, help="CG iterations in (a)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hypergradient.json"))
    parser.add_argument("--memory-worker", nargs=3, metavar=("D", "MODE", "T"), default=None)
    args = parser.parse_args(argv)
    if args.memory_worker:
        d, mode, steps = args.memory_worker
        memory_worker(int(d), mode, int(steps))
        return

    sizes = args.sizes or ([500] if args.quick else [500, 2000])
    repeats = args.repeats or (5 if args.quick else 15)
    steps_list = [10, 100] if args.quick else [10, 100, 1000]
    max_unrolled_work = 500 * 1000  # d × T: unrolled T=1000 at d=2000 takes minutes
    results: dict[str, Any] = {
        "config": {
            "sizes": sizes,
            "k": args.k,
            "repeats": repeats,
            "T": steps_list,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "clock": "time.thread_time (CPU time of the calling thread), median",
        },
        "a": [],
        "b": [],
        "c": [],
    }
    for d in sizes:
        p = make_problem(d)
        results["a"].append(section_a(p, args.k, repeats))
        results["b"].append(section_b(p, repeats))
        c_repeats = max(3, repeats // 3)
        steps_d = [t for t in steps_list if d * t <= max_unrolled_work]
        results["c"].append(section_c(p, steps_d, c_repeats))
    print_tables(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
