"""Choose how far test tasks adapt from θ on held-out classes, then test once with that choice.

    python benchmarks/imaml_adaptation_steps.py /work/runs/cpu-long-10 --steps 5,10,20,40 \\
        --val-tasks 300 --out benchmarks/results/imaml_cpu_long10_adaptation.json

A meta-trained θ is used by adapting each task from it with the inner solver; how many inner
steps that adaptation runs is a choice separate from how θ was trained (the implicit
meta-gradient assumes the inner problem solved, which a few training-time steps only
approximate). For each adaptation mode (λ-prox and plain GD) this evaluates every candidate
number of inner steps on tasks of the *validation* split (meta-training classes held out from
training), keeps the best (ties go to fewer steps), and only then evaluates the test split,
once per mode, with the chosen number. The test split is never used to choose.

Everything goes through ``python -m applications.imaml evaluate --json`` with
``--inner-steps``, so the numbers are the CLI's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any

# run as a script from anywhere: the app lives at the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from applications.imaml.cli import main as imaml_main

MODES = ("prox", "gd")


def _evaluate(
    run: Path, split: str, tasks: int, mode: str, steps: int | None, extra: list[str]
) -> dict:
    """One ``evaluate --json`` call (``steps=None``: the run's own adaptation), parsed."""
    argv = ["evaluate", str(run), "--split", split, "--tasks", str(tasks), "--modes", mode]
    if steps is not None:
        argv += ["--inner-steps", str(steps)]
    argv += ["--json", *extra]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = imaml_main(argv)
    if status != 0:
        raise RuntimeError(f"evaluate exited with {status}: {' '.join(argv)}")
    return json.loads(out.getvalue())


def sweep(
    run: Path,
    candidates: list[int],
    *,
    val_tasks: int,
    test_tasks: int,
    modes: tuple[str, ...] = MODES,
    extra: list[str] | None = None,
) -> dict[str, Any]:
    """Validation accuracy of each candidate, the choice per mode, and its test accuracy.

    Args:
        run: a run directory or checkpoint file of a classification run.
        candidates: numbers of inner adaptation steps to compare.
        val_tasks: validation tasks per candidate (the same tasks for every candidate).
        test_tasks: test tasks for the chosen number (the trainer's 600 by default).
        modes: adaptation modes, a subset of ``("prox", "gd")``.
        extra: further ``evaluate`` flags (``--data-dir``, ``--threads``, ...).

    Returns:
        ``{"checkpoint", "meta_steps", "validation": {mode: [{steps, metric, ci95, ...}]},
        "chosen": {mode: steps}, "test": {mode: {steps, metric, ci95, ...}},
        "trained_adaptation": {inner, inner_steps, inner_lr, lam}}``.
    """
    if not candidates or any(k < 0 for k in candidates):
        raise ValueError(f"candidates must be non-negative step counts, got {candidates!r}")
    extra = list(extra or [])
    result: dict[str, Any] = {"checkpoint": str(run), "validation": {}, "chosen": {}, "test": {}}
    for mode in modes:
        rows = []
        for k in sorted(set(candidates)):
            res = _evaluate(run, "val", val_tasks, mode, k, extra)
            result.setdefault("meta_steps", res["meta_steps"])
            rows.append({"steps": k, **res["test"][mode]})
            print(f"val  {mode:4s} {k:4d} steps: {100 * rows[-1]['metric']:.2f}%", flush=True)
        result["validation"][mode] = rows
        best = max(rows, key=lambda r: (r["metric"], -r["steps"]))
        result["chosen"][mode] = best["steps"]
        test = _evaluate(run, "test", test_tasks, mode, best["steps"], extra)
        result["test"][mode] = {"steps": best["steps"], **test["test"][mode]}
        print(
            f"test {mode:4s} {best['steps']:4d} steps: {100 * test['test'][mode]['metric']:.2f} "
            f"± {100 * test['test'][mode]['ci95']:.2f}%",
            flush=True,
        )
    trained = _evaluate(run, "val", 1, modes[0], None, extra)["adaptation"]
    result["trained_adaptation"] = {k: v for k, v in trained.items() if k != "overridden"}
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="run directory or checkpoint file")
    ap.add_argument("--steps", default="5,10,20,40", help="comma-separated candidates")
    ap.add_argument("--val-tasks", type=int, default=300)
    ap.add_argument("--test-tasks", type=int, default=600)
    ap.add_argument("--modes", default="prox,gd")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="JSON to write")
    args = ap.parse_args(argv)
    try:
        candidates = [int(k) for k in args.steps.split(",") if k.strip()]
    except ValueError:
        ap.error(f"--steps must be comma-separated integers, got {args.steps!r}")
    if not candidates or min(candidates) < 0:
        ap.error(f"--steps must be non-negative integers, got {args.steps!r}")
    for flag, value in (("--val-tasks", args.val_tasks), ("--test-tasks", args.test_tasks)):
        if value < 1:
            ap.error(f"{flag} must be >= 1, got {value}")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes must be a comma-separated subset of prox,gd; got {args.modes!r}")
    extra = []
    if args.data_dir is not None:
        extra += ["--data-dir", args.data_dir]
    if args.threads is not None:
        extra += ["--threads", str(args.threads)]
    result = sweep(
        args.run,
        candidates,
        val_tasks=args.val_tasks,
        test_tasks=args.test_tasks,
        modes=modes,
        extra=extra,
    )
    result["command"] = "python benchmarks/imaml_adaptation_steps.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
