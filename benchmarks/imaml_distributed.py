"""Data-parallel iMAML meta-steps: 1 vs 2 gloo processes on this CPU, and 8 GPUs on paper.

Printed as a table and written to ``benchmarks/results/imaml_distributed.json``:

1. **Meta-steps per second** of the ``demo`` recipe (cpu-quick on the embedded glyphs: conv4
   with 32 filters, 5-way 1-shot, 5 queries per class, meta-batch 8, 5 inner GD steps, 2 CG
   steps, vmap across the tasks) with 1 process and with 2 processes, the machine's threads
   split evenly (``--threads`` for one process, ``--threads / 2`` for each of two). Each
   process is a fresh ``spawn``-ed child that joins a ``gloo`` group through ``env://`` as
   ``torchrun``'s children do and runs the trainer's meta-step: draw the whole meta-batch from
   the seeded stream, keep its shard, ``MetaLearner.step(shard, reduce=...)`` with the
   meta-gradient sums all-reduced by ``bl.distributed.all_reduce_tree``. One warm-up step,
   then the median of ``--steps`` timed steps (rank 0's clock; all ranks leave every step
   together, at the all-reduce). A third row, 1 process with ``--threads / 2`` threads, is the
   reference at equal threads per process: on a shared machine, one process's extra threads
   may buy nothing (other jobs hold the cores), which the first row then shows.
2. **Communication share** of a meta-step: the time rank 0 spends inside the all-reduce over
   the step's time. It includes waiting for the slower rank (the shards are equal, so the wait
   is the ranks' jitter); the **transfer alone** is measured too, as the median time of
   ``all_reduce_tree`` on the same tree right after a barrier.
3. **Payload**: the bytes one all-reduce moves per process (the float64 meta-gradient sums,
   one float64 buffer and one int64 buffer: two collectives per meta-step).
4. **8 GPUs on paper** from the measured payload: a ring all-reduce moves ``2(N−1)/N × bytes``
   per GPU in ``2(N−1)`` steps, so ``t = 2(N−1)/N × bytes / B + 2(N−1) × α`` with the
   bandwidth ``B`` and per-step latency ``α`` stated in :data:`LINKS`; the share of a meta-step
   follows for a per-GPU compute time per task that is an assumption too (stated, not
   measured here: this machine has no GPU).

The machine's load average is recorded: on a shared 2-core machine wall times inflate with
other jobs.

Usage::

    python benchmarks/imaml_distributed.py             # about a minute
    python benchmarks/imaml_distributed.py --steps 10  # more timed meta-steps
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "imaml_distributed.json"

#: Interconnects of the on-paper estimate: (name, bandwidth in GB/s per GPU for the ring,
#: per-step latency in µs). Assumptions, not measurements: NCCL's bus bandwidth on 8 GPUs over
#: NVLink/NVSwitch is of the order of 100-400 GB/s, PCIe 4.0 x16 about 20 GB/s, and a 100 Gb/s
#: network (several nodes) about 10 GB/s; ~5-20 µs per ring step for small messages.
LINKS = (("NVLink", 150.0, 10.0), ("PCIe 4.0", 20.0, 10.0), ("100 Gb/s network", 10.0, 20.0))

#: Assumed GPU compute of one task's meta-gradient in the demo recipe (ms): an assumption to
#: put the all-reduce in proportion, stated with the result; this machine has no GPU.
GPU_MS_PER_TASK = 5.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(threads: int) -> Any:
    from applications.imaml.cli import PRESETS
    from applications.imaml.trainer import Config

    return Config.from_dict({**Config().to_dict(), **PRESETS["demo"], "threads": threads})


def _worker(rank: int, world: int, port: int, threads: int, steps: int, out: str) -> None:
    """One process: ``steps + 1`` meta-steps of the demo recipe, timed; reports to ``out``."""
    report: dict[str, Any] = {"rank": rank}
    try:
        if world > 1:
            os.environ.update(
                RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        torch.set_num_threads(threads)
        import bilevel as bl
        from applications.imaml.distributed import team_from_env
        from applications.imaml.trainer import build_learner, make_sampler

        team = team_from_env(120.0)
        cfg = _config(threads)
        torch.manual_seed(cfg.seed)
        sampler = make_sampler(cfg, "train", queries=cfg.queries, seed=cfg.seed)
        learner = build_learner(cfg)
        inside = [0.0]
        payload: list[Any] = []

        def reduce(sums: Any) -> Any:
            if not payload:
                payload.append(sums)
            t0 = time.perf_counter()
            red = team.reduce_sum(sums, "the meta-gradient all-reduce")
            inside[0] += time.perf_counter() - t0
            return red

        step_s, comm_s = [], []
        for i in range(steps + 1):
            inside[0] = 0.0
            t0 = time.perf_counter()
            shard = team.shard(sampler.sample(cfg.meta_batch), cfg.vmap_chunk)
            stats = learner.step(shard, reduce=reduce if team.distributed else None)
            float(stats["loss"])  # the step is done
            if i:  # the first step is the warm-up
                step_s.append(time.perf_counter() - t0)
                comm_s.append(inside[0])
        leaves = torch.utils._pytree.tree_leaves(payload[0]) if payload else []
        if not leaves:  # one process: the tree the all-reduce would move
            shard = sampler.sample(cfg.meta_batch)
            leaves = torch.utils._pytree.tree_leaves(learner.meta_gradient_sums(shard))
        report["payload_bytes"] = sum(t.numel() * t.element_size() for t in leaves)
        report["collectives"] = len({t.dtype for t in leaves})
        if team.distributed:
            transfer = []
            for _ in range(20):
                torch.distributed.barrier()
                t0 = time.perf_counter()
                bl.distributed.all_reduce_tree(payload[0], op="sum")
                transfer.append(time.perf_counter() - t0)
            report["transfer_s"] = statistics.median(transfer)
        report["step_s"] = step_s
        report["comm_s"] = comm_s
        report["theta_sum"] = float(sum(float(v.double().sum()) for v in learner.params.values()))
        team.close()
    except BaseException as err:
        report.update(error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


def measure(world: int, threads: int, steps: int, tmp: Path) -> dict[str, Any]:
    """Meta-steps of ``world`` spawned processes with ``threads`` each; rank 0's timings."""
    out = tmp / f"world{world}-threads{threads}"
    out.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, threads, steps, str(out)))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    for rep in reports:
        if "error" in rep:
            raise RuntimeError(f"rank {rep['rank']}: {rep['error']}\n{rep['traceback']}")
    r0 = reports[0]
    step = statistics.median(r0["step_s"])
    comm = statistics.median(r0["comm_s"])
    row = {
        "processes": world,
        "threads_per_process": threads,
        "seconds_per_meta_step": round(step, 4),
        "meta_steps_per_second": round(1.0 / step, 3),
        "all_reduce_seconds": round(comm, 5),
        "communication_share": round(comm / step, 4),
        "payload_bytes": r0["payload_bytes"],
        "collectives_per_meta_step": r0["collectives"] if world > 1 else 0,
        "theta_sum": r0["theta_sum"],
    }
    if "transfer_s" in r0:
        row["transfer_seconds"] = round(r0["transfer_s"], 6)
        row["transfer_share"] = round(r0["transfer_s"] / step, 5)
    return row


def on_paper(payload_bytes: int, meta_batch: int, gpus: int = 8) -> list[dict[str, Any]]:
    """Ring all-reduce time and share of a meta-step on ``gpus`` GPUs, per link in LINKS."""
    rows = []
    compute_s = GPU_MS_PER_TASK * 1e-3 * meta_batch / gpus
    for name, gbps, latency_us in LINKS:
        moved = 2 * (gpus - 1) / gpus * payload_bytes
        t = moved / (gbps * 1e9) + 2 * (gpus - 1) * latency_us * 1e-6
        rows.append(
            {
                "gpus": gpus,
                "link": name,
                "bandwidth_GBps": gbps,
                "latency_us_per_step": latency_us,
                "bytes_moved_per_gpu": round(moved),
                "all_reduce_seconds": t,
                "assumed_compute_seconds": compute_s,
                "communication_share": round(t / (t + compute_s), 4),
                "speedup_vs_1_gpu": round(
                    (GPU_MS_PER_TASK * 1e-3 * meta_batch) / (compute_s + t), 2
                ),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed meta-steps per run")
    parser.add_argument("--threads", type=int, default=2, help="threads of the machine to split")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads < 2 or args.threads % 2:
        parser.error("--threads must be even and >= 2 (split evenly between 2 processes)")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            measure(1, args.threads, args.steps, Path(tmp)),
            measure(2, args.threads // 2, args.steps, Path(tmp)),
            # reference: one process with one process's share of the threads
            measure(1, args.threads // 2, args.steps, Path(tmp)),
        ]
    cfg = _config(args.threads)
    paper = on_paper(rows[1]["payload_bytes"], cfg.meta_batch)
    result = {
        "benchmark": "imaml_distributed",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "recipe": "demo preset (glyphs, conv4 32 filters, 5-way 1-shot, meta-batch 8, vmap)",
        "timed_meta_steps": args.steps,
        "rows": rows,
        "speedup_2_vs_1": round(
            rows[0]["seconds_per_meta_step"] / rows[1]["seconds_per_meta_step"], 3
        ),
        "speedup_2_vs_1_at_equal_threads_per_process": round(
            rows[2]["seconds_per_meta_step"] / rows[1]["seconds_per_meta_step"], 3
        ),
        "same_parameters": rows[0]["theta_sum"] == rows[1]["theta_sum"] == rows[2]["theta_sum"],
        "on_paper_8_gpus": {
            "formula": "t = 2(N-1)/N * bytes / bandwidth + 2(N-1) * latency (ring all-reduce)",
            "assumed_gpu_ms_per_task": GPU_MS_PER_TASK,
            "rows": paper,
        },
        "command": "python benchmarks/imaml_distributed.py " + " ".join(sys.argv[1:]),
    }
    print(
        f"{'processes':>9} {'threads':>7} {'s/step':>8} {'steps/s':>8} {'all-reduce s':>12} "
        f"{'comm share':>10} {'transfer s':>10} {'payload B':>10}"
    )
    for r in rows:
        print(
            f"{r['processes']:>9} {r['threads_per_process']:>7} {r['seconds_per_meta_step']:>8.3f} "
            f"{r['meta_steps_per_second']:>8.3f} {r['all_reduce_seconds']:>12.4f} "
            f"{100 * r['communication_share']:>9.1f}% {r.get('transfer_seconds', 0.0):>10.5f} "
            f"{r['payload_bytes']:>10}"
        )
    print(
        f"speed-up 2 processes vs 1 with all threads: {result['speedup_2_vs_1']}x; vs 1 with "
        f"{args.threads // 2} thread(s): {result['speedup_2_vs_1_at_equal_threads_per_process']}x;"
        f" same θ after the steps in every row: {result['same_parameters']}"
    )

    print(
        f"\non paper, 8 GPUs, ring all-reduce of {rows[1]['payload_bytes']} B "
        f"(assumed {GPU_MS_PER_TASK} ms of GPU compute per task, meta-batch {cfg.meta_batch}):"
    )
    for p in paper:
        print(
            f"  {p['link']:<17} {p['bandwidth_GBps']:>6.0f} GB/s "
            f"{p['latency_us_per_step']:>4.0f} µs/step: "
            f"all-reduce {1e6 * p['all_reduce_seconds']:.0f} µs, share "
            f"{100 * p['communication_share']:.1f}%, speed-up {p['speedup_vs_1_gpu']}x"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
