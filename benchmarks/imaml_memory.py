"""iMAML memory and throughput: implicit meta-gradients vs unrolled MAML, vmap vs loop.

Two measurements, printed as tables and written to ``benchmarks/results/imaml_memory.json``:

1. **Memory and time of one task's meta-gradient** against the number of inner GD steps
   (10, 100, 1000) for iMAML (``bl.custom_root``: the inner loop is never recorded, the
   backward is 5 fixed-K CG steps) and second-order MAML (differentiates through the unrolled
   loop). Conv4 (64 filters), 5-way 1-shot, 5 queries per class, float32.

   Method: every configuration runs in a **fresh subprocess** (so allocator caches and earlier
   peaks cannot leak between rows). Inside it, one warm-up meta-gradient with 2 inner steps
   loads every kernel; then the high-water mark of the resident set is reset and
   ``peak = VmHWM after − RSS before`` of the measured call (``benchmarks/_peak_memory.py``
   says why not ``ru_maxrss``: it carries the launching process's peak). This counts every
   byte the call touches (tensors, autograd graph, allocator slack), not only tensors that
   torch reports. Time is the wall time of that call.

2. **Throughput of a meta-batch of 16 tasks** (5-way 1-shot, 16 GD steps at lr 0.1, λ = 2,
   5 CG steps: the paper's recipe with the harness's meta-batch 16 and 1 query per class) with
   ``torch.func.vmap`` across the tasks versus a per-task Python loop, and the vmapped
   meta-batch compiled whole (``IMAML(compile=True)``: ``torch.compile`` of the same
   ``custom_root``-decorated solve): seconds per meta-step (median of ``--repeats`` after a
   warm-up), wall and process CPU time, at ``--threads``. Each row runs with an empty
   compiler cache, so the compiled row's first meta-step (recorded) is a cold compilation.
   For the vmap row the meta-step is also split into its parts, timed through the public
   API (a timing subclass of the inner solver and of ``bl.CG``): the inner solve (16 GD
   steps), the CG solve's matrix-vector products (Hessian-vector products through the
   linearisation), CG's own vector work, and the rest (linearising ``F``, ``−Bᵀu``, the
   query forward/backward).

The machine's load average is recorded with the results: on a shared machine wall times
inflate with other jobs, CPU time much less so.

Usage::

    python benchmarks/imaml_memory.py                 # full (a few minutes)
    python benchmarks/imaml_memory.py --quick         # steps {10, 100}, 2 repeats
    python benchmarks/imaml_memory.py --throughput-only --threads 2   # merge into the JSON
    python benchmarks/imaml_memory.py --throughput-only --modes compiled   # one row
"""

from __future__ import annotations

import argparse
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from _peak_memory import high_water_bytes, reset_high_water, rss_bytes

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "imaml_memory.json"


def _batch(b: int, n: int = 5, k: int = 1, q: int = 1, seed: int = 0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(n).repeat_interleave(k).expand(b, -1).contiguous()
    yq = torch.arange(n).repeat_interleave(q).expand(b, -1).contiguous()
    return SimpleNamespace(
        support_x=torch.rand(b, n * k, 1, 28, 28, generator=g),
        support_y=ys,
        query_x=torch.rand(b, n * q, 1, 28, 28, generator=g),
        query_y=yq,
    )


def _learner(method: str, steps: int, *, batched: bool = False, compile: bool = False):
    from applications.imaml.meta import IMAML, MAML, GradientDescent
    from applications.imaml.models import build_model

    model = build_model("conv4", ways=5)
    if method == "imaml":
        return IMAML(
            model,
            lam=2.0,
            cg_steps=5,
            inner=GradientDescent(steps, 0.1, safeguard=False),
            batched=batched,
            compile=compile,
        )
    return MAML(model, steps=steps, lr=0.1, batched=batched)


def measure_one(method: str, steps: int, threads: int) -> dict:
    """Runs inside a fresh subprocess: peak RSS increase and time of one task's meta-gradient."""
    torch.set_num_threads(threads)
    batch = _batch(1, q=5)
    task = (batch.support_x[0], batch.support_y[0], batch.query_x[0], batch.query_y[0])
    warm = _learner(method, 2)
    warm.task_meta_grad(warm.params, *task)
    learner = _learner(method, steps)
    reset = reset_high_water()
    before = rss_bytes()
    peak_before = high_water_bytes()
    t0 = time.perf_counter()
    grads, loss, _ = learner.task_meta_grad(learner.params, *task)
    seconds = time.perf_counter() - t0
    peak = high_water_bytes()
    assert all(torch.isfinite(g).all() for g in grads.values())
    return {
        "method": method,
        "inner_steps": steps,
        "peak_increase_mb": (max(peak, peak_before) - before) / 2**20,
        # the high-water mark before the call, relative to its RSS: ~0 after a reset
        "high_water_before_mb": (peak_before - before) / 2**20,
        "high_water_reset": reset,
        "seconds": seconds,
        "query_loss": float(loss),
    }


class _Clock:
    """Wall seconds spent in the inner solve, in CG's products and in CG as a whole."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.inner = self.matvec = self.cg = 0.0

    def timed_matvec(self, matvec):
        def wrapped(v):
            t0 = time.perf_counter()
            out = matvec(v)
            self.matvec += time.perf_counter() - t0
            return out

        return wrapped


def _instrument(learner, clock: _Clock) -> None:
    """Swap in timing subclasses of the inner solver and of ``bl.CG`` (public API only)."""
    import bilevel as bl
    from applications.imaml.meta import GradientDescent

    class TimedCG(bl.CG):
        def __call__(self, matvec, b, x0=None, rmatvec=None):
            t0 = time.perf_counter()
            out = super().__call__(clock.timed_matvec(matvec), b, x0=x0, rmatvec=rmatvec)
            clock.cg += time.perf_counter() - t0
            return out

    class TimedGD(GradientDescent):
        def __call__(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = super().__call__(*args, **kwargs)
            clock.inner += time.perf_counter() - t0
            return out

    old = learner.inner
    learner.inner = TimedGD(old.steps, old.lr, safeguard=old.safeguard)
    learner.cg = TimedCG(tol=0, maxiter=learner.cg_steps, ridge=learner.cg_ridge)
    learner.solve = bl.custom_root(learner.optimality_fn, solver=learner.cg)(learner._inner_solve)


#: Rows of the meta-batch table: how the 16 tasks are batched.
MODES = ("vmap", "loop", "compiled")


def measure_throughput(mode: str, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    compiled = mode == "compiled"
    batched = mode != "loop"
    learner = _learner("imaml", 16, batched=batched, compile=compiled)
    clock = _Clock()
    if batched and not compiled:  # the timing subclasses cannot be traced by the compiler
        _instrument(learner, clock)
    batch = _batch(16)
    t0 = time.perf_counter()
    learner.meta_gradient(batch)  # warm-up (and, compiled, the compilation)
    warmup = time.perf_counter() - t0
    walls, cpus, parts = [], [], []
    for _ in range(repeats):
        clock.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        grads, _ = learner.meta_gradient(batch)
        float(next(iter(grads.values())).sum())  # make sure the work is done
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        parts.append((clock.inner, clock.matvec, clock.cg - clock.matvec))
    row = {
        "mode": mode,
        "tasks": 16,
        "seconds_per_meta_step": statistics.median(walls),
        "cpu_seconds_per_meta_step": statistics.median(cpus),
        "all_wall": walls,
    }
    if compiled:
        row["first_meta_step_seconds"] = warmup  # compilation, from an empty cache
        row.update(_same_process_ratio(learner, batch, repeats))
    elif batched:
        best = min(range(repeats), key=lambda i: walls[i])
        inner, matvec, cg_rest = parts[best]
        row["breakdown_of_fastest"] = {
            "wall": walls[best],
            "inner_solve_16_gd_steps": inner,
            "cg_matvecs_5_hvps": matvec,
            "cg_vector_work": cg_rest,
            "rest": walls[best] - inner - matvec - cg_rest,
        }
    return row


def _same_process_ratio(compiled, batch, repeats: int) -> dict:
    """Compiled against eager vmap, interleaved in one process: a ratio that the machine's
    load, which moves wall times by 20-30% between runs here, affects equally."""
    eager = _learner("imaml", 16, batched=True)
    eager.params = compiled.params
    eager.meta_gradient(batch)  # warm-up
    times: dict[str, list[float]] = {"compiled": [], "eager": []}
    for _ in range(repeats):
        for name, learner in (("compiled", compiled), ("eager", eager)):
            t0 = time.perf_counter()
            grads, _ = learner.meta_gradient(batch)
            float(next(iter(grads.values())).sum())
            times[name].append(time.perf_counter() - t0)
    c, e = statistics.median(times["compiled"]), statistics.median(times["eager"])
    return {
        "interleaved_with_eager_vmap": {"compiled": c, "eager_vmap": e, "speedup": e / c},
    }


def _subprocess(args: list[str], **env: str) -> dict:
    # The child measures this checkout's code, installed or not (and whatever an editable
    # install elsewhere points at).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, __file__, *args],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path, **env},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _throughput_rows(threads: int, repeats: int, modes: tuple[str, ...] = MODES) -> list[dict]:
    rows = []
    for mode in modes:
        argv = ["--_throughput", mode, "--threads", str(threads), "--repeats", str(repeats)]
        with tempfile.TemporaryDirectory() as cache:
            # An empty compiler cache: the first meta-step's time is a cold compilation.
            row = _subprocess(argv, TORCHINDUCTOR_CACHE_DIR=cache)
        row["threads"] = threads
        row["load_average"] = os.getloadavg()
        rows.append(row)
        print(
            f"meta-batch 16, {mode:8s}, {threads} thread(s): "
            f"{row['seconds_per_meta_step']:.3f} s/meta-step wall, "
            f"{row['cpu_seconds_per_meta_step']:.3f} s CPU",
            flush=True,
        )
        if "first_meta_step_seconds" in row:
            pair = row["interleaved_with_eager_vmap"]
            print(
                f"  first meta-step (compiling): {row['first_meta_step_seconds']:.0f} s; "
                f"interleaved in one process: compiled {pair['compiled']:.3f} s vs eager vmap "
                f"{pair['eager_vmap']:.3f} s ({pair['speedup']:.2f}x)",
                flush=True,
            )
        if "breakdown_of_fastest" in row:
            parts = row["breakdown_of_fastest"]
            print(
                "  fastest step {wall:.3f} s = inner {inner_solve_16_gd_steps:.3f} + "
                "CG products {cg_matvecs_5_hvps:.3f} + CG vectors {cg_vector_work:.3f} + "
                "rest {rest:.3f}".format(**parts),
                flush=True,
            )
    return rows


def _merge_throughput(args: argparse.Namespace, repeats: int) -> None:
    """Replace the rows measured at ``args.threads`` in an existing results file."""
    result = json.loads(args.output.read_text()) if args.output.exists() else {}
    kept = [
        r
        for r in result.get("throughput", [])
        if r.get("threads") != args.threads or r.get("mode") not in args.modes
    ]
    result["throughput"] = kept + _throughput_rows(args.threads, repeats, args.modes)
    result.setdefault("benchmark", "imaml_memory")
    result["torch"] = torch.__version__
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"merged into {args.output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="steps {10, 100}, 2 repeats")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--maml-max-steps", type=int, default=1000)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument(
        "--throughput-only",
        action="store_true",
        help="measure only the meta-batch rows (--modes) at --threads; merge into --output",
    )
    parser.add_argument(
        "--modes",
        type=lambda text: tuple(text.split(",")),
        default=MODES,
        help=f"meta-batch rows to measure, comma-separated subset of {','.join(MODES)}",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_throughput", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        print(json.dumps(measure_one(args._one[0], int(args._one[1]), args.threads)))
        return
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"--modes: unknown {sorted(unknown)}; choose from {', '.join(MODES)}")
    if args._throughput:
        print(json.dumps(measure_throughput(args._throughput, args.repeats, args.threads)))
        return

    steps_list = [10, 100] if args.quick else [10, 100, 1000]
    repeats = 2 if args.quick else args.repeats
    if args.throughput_only:
        _merge_throughput(args, repeats)
        return
    rows = []
    for method in ("imaml", "maml"):
        for steps in steps_list:
            if method == "maml" and steps > args.maml_max_steps:
                continue
            row = _subprocess(["--_one", method, str(steps), "--threads", str(args.threads)])
            rows.append(row)
            print(
                f"{method:6s} inner steps {steps:5d}: peak +{row['peak_increase_mb']:8.1f} MB"
                f"  {row['seconds']:7.2f} s",
                flush=True,
            )
    previous: dict = {}
    if args.skip_throughput:  # keep the recorded throughput rows (measured separately)
        previous = json.loads(args.output.read_text()) if args.output.exists() else {}
        throughput = previous.get("throughput", [])
    else:
        throughput = _throughput_rows(args.threads, repeats, args.modes)

    def growth(method: str) -> float | None:
        r = {x["inner_steps"]: x["peak_increase_mb"] for x in rows if x["method"] == method}
        lo, hi = min(r, default=None), max(r, default=None)
        if lo is None or lo == hi:
            return None
        return (r[hi] - r[lo]) / max(r[lo], 1e-9)

    result = {
        "benchmark": "imaml_memory",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "load_average": os.getloadavg(),
        "method": "fresh subprocess per row; VmHWM reset, peak = VmHWM after - RSS before the call",
        "memory": rows,
        "memory_growth_first_to_last": {"imaml": growth("imaml"), "maml": growth("maml")},
        "throughput": throughput,
    }
    if args.skip_throughput and "commands" in previous:
        result["commands"] = previous["commands"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")

    print("\n| method | inner steps | peak memory increase (MB) | time (s) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {r['inner_steps']} | {r['peak_increase_mb']:.1f} "
            f"| {r['seconds']:.2f} |"
        )
    if throughput:
        print("\n| meta-batch of 16 | s/meta-step (wall) | s/meta-step (CPU) |")
        print("|---|---:|---:|")
        for r in throughput:
            print(
                f"| {r['mode']} | {r['seconds_per_meta_step']:.3f} "
                f"| {r['cpu_seconds_per_meta_step']:.3f} |"
            )
    print(f"\nload average {os.getloadavg()}; written {args.output}")


if __name__ == "__main__":
    main()
