"""Record a finished iMAML run directory as a results JSON (and its curve) for the docs.

    python benchmarks/record_imaml_run.py /work/runs/cpu-hf \\
        --command "python -m applications.imaml train --preset cpu-hf ..." \\
        --out benchmarks/results/imaml_cpu_hf.json --curve docs/img/imaml_cpu_hf_curve.png

Reads what the trainer wrote (``config.json``, ``metrics.jsonl``, ``results.json``,
``curve.png``) and adds what the results page quotes: the validation curve, the training
query accuracy over the last 100 logged meta-steps, the count of non-finite tasks, the largest
meta-gradient norm, and for Lake's one-shot runs the binomial 95% half-width over their 400
test images. Nothing is re-computed from the model.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

#: Test images in Lake et al.'s 20 one-shot runs (20 runs x 20 classes x 1 image).
LAKE_TEST_IMAGES = 400


def summarise(run_dir: Path) -> dict[str, Any]:
    """The results-page summary of the finished run in ``run_dir``.

    Args:
        run_dir: a run directory the trainer completed (it holds ``results.json``).

    Returns:
        A JSON-ready dict: the trainer's summary plus the validation curve and training
        statistics read from ``metrics.jsonl``.
    """
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise FileNotFoundError(
            f"{results_path} is missing: the run has not finished its test (resume it with "
            "`python -m applications.imaml train --resume --out-dir RUN`)"
        )
    summary: dict[str, Any] = json.loads(results_path.read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r.get("kind") == "train"]
    summary["validation"] = [
        {"step": r["step"], **{m: round(r[m]["metric"], 4) for m in ("prox", "gd") if m in r}}
        for r in lines
        if r.get("kind") == "val"
    ]
    summary["nonfinite_tasks_total"] = sum(int(r.get("nonfinite_tasks", 0)) for r in train)
    norms = [r["grad_norm"] for r in train if r.get("grad_norm") is not None]
    summary["max_meta_grad_norm_seen"] = max(norms) if norms else None
    last = [r["metric"] for r in train if r["step"] > train[-1]["step"] - 100] if train else []
    summary["train_query_accuracy_last_100_steps"] = sum(last) / len(last) if last else None
    if "lake_one_shot" in summary:
        summary["lake_one_shot_test_images"] = LAKE_TEST_IMAGES
        summary["lake_one_shot_ci95_half_width"] = {
            mode: 1.96 * math.sqrt(err * (1 - err) / LAKE_TEST_IMAGES)
            for mode, err in summary["lake_one_shot"].items()
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--command", required=True, help="the command that made the run")
    ap.add_argument("--out", type=Path, required=True, help="results JSON to write")
    ap.add_argument("--curve", type=Path, default=None, help="where to copy curve.png")
    ap.add_argument("--note", default=None, help="machine or run note to keep with the numbers")
    args = ap.parse_args(argv)
    try:
        summary = summarise(args.run_dir)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {"command": args.command, "run_directory": str(args.run_dir), **summary}
    if args.note:
        summary["machine_note"] = args.note
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    if args.curve is not None:
        shutil.copyfile(args.run_dir / "curve.png", args.curve)
    print(json.dumps({k: summary[k] for k in summary if k != "config"}, indent=1)[:4000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
