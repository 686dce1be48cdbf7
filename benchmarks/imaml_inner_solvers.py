"""How well inner solvers adapt from one meta-trained initialisation: support and query accuracy.

    python benchmarks/imaml_inner_solvers.py /work/runs/cpu-hf/checkpoint.pt \\
        --data-dir /path/to/omniglot --tasks 64 --out benchmarks/results/imaml_inner_solvers.json

Loads the meta-parameters θ of a 5-way Omniglot checkpoint and adapts the same tasks from θ
with the proximal objective ``L̂(φ) + λ/2‖φ − θ‖²`` (λ from the checkpoint) by several inner
solvers: the GD recipe and Hessian-free Newton–CG with more or fewer Newton and CG steps and
damping. A solver that does not fit the support set from θ cannot give a good query accuracy;
this separates "the inner solver under-fits" from "the meta-training did not converge".
Tasks come from the validation split (held-out meta-train classes), never the test split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

# run as a script from anywhere: the app lives at the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from applications.imaml.inner import GradientDescent, InnerSolver, NewtonCG
from applications.imaml.rundir import load_checkpoint
from applications.imaml.trainer import (
    build_learner,
    config_from_checkpoint,
    make_sampler,
    restore_learner,
)

#: (label, solver): the GD recipe of cpu-quick/cpu-long, then Newton-CG variants.
SOLVERS: list[tuple[str, InnerSolver]] = [
    ("GD, 5 steps at lr 0.3 (cpu-long)", GradientDescent(5, 0.3)),
    ("Newton-CG 2 x 3, damping 1 (cpu-hf)", NewtonCG(2, 3, 1.0, 1.0)),
    ("Newton-CG 2 x 3, damping 3", NewtonCG(2, 3, 1.0, 3.0)),
    ("Newton-CG 2 x 3, damping 1, lr 4", NewtonCG(2, 3, 4.0, 1.0, backtracks=5)),
    ("Newton-CG 3 x 3, damping 1", NewtonCG(3, 3, 1.0, 1.0)),
    ("Newton-CG 2 x 10, damping 1", NewtonCG(2, 10, 1.0, 1.0)),
    ("Newton-CG 5 x 5, damping 1", NewtonCG(5, 5, 1.0, 1.0)),
]


def measure(checkpoint: Path, data_dir: str | None, tasks: int, seed: int) -> dict[str, Any]:
    """Support/query accuracy of each of :data:`SOLVERS` on ``tasks`` validation tasks.

    Args:
        checkpoint: a ``checkpoint.pt`` of a 5-way (or any N-way) Omniglot run.
        data_dir: the Omniglot directory (default: the one the run used).
        tasks: how many validation tasks to adapt.
        seed: the task sampler's seed.

    Returns:
        ``{"checkpoint", "step", "lam", "tasks", "solvers": [{label, support_acc, query_acc,
        seconds}]}``.
    """
    state = load_checkpoint(checkpoint)
    cfg = config_from_checkpoint(state, checkpoint)
    if data_dir is not None:
        cfg.data_dir = data_dir
    learner = build_learner(cfg)
    restore_learner(learner, state, checkpoint)
    batch = make_sampler(cfg, "val", queries=cfg.eval_queries, seed=seed).sample(tasks)
    theta = learner.params
    rows = []
    for label, solver in SOLVERS:
        t0 = time.perf_counter()
        support = query = 0.0
        with torch.no_grad():
            for i in range(batch.batch_size):
                xs, ys = batch.support_x[i], batch.support_y[i]
                phi = solver(lambda p, xs=xs, ys=ys: learner.loss(p, xs, ys), theta, theta, cfg.lam)
                support += (learner.model(phi, xs).argmax(-1) == ys).float().mean().item()
                logits = learner.model(phi, batch.query_x[i])
                query += (logits.argmax(-1) == batch.query_y[i]).float().mean().item()
        rows.append(
            {
                "solver": label,
                "support_acc": round(support / tasks, 4),
                "query_acc": round(query / tasks, 4),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(
            f"{label:40s} support {rows[-1]['support_acc']:.3f}  query {rows[-1]['query_acc']:.3f}"
        )
    return {
        "checkpoint": str(checkpoint),
        "step": state.get("step"),
        "lam": cfg.lam,
        "tasks": tasks,
        "solvers": rows,
    }


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="JSON to write")
    args = ap.parse_args(argv)
    if args.tasks < 1:
        ap.error(f"--tasks must be >= 1, got {args.tasks}")
    torch.set_num_threads(args.threads)
    result = measure(args.checkpoint, args.data_dir, args.tasks, args.seed)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
