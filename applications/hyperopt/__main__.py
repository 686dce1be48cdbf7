"""Command line: ``python -m applications.hyperopt <name> [--quick] [--seed N] [--out-dir DIR]``.

``--seeds 0-5`` runs one independent run per seed instead and prints their mean ± std; under
``torchrun --nproc_per_node=N`` the seeds are split across the processes and rank 0 gathers
the table (:mod:`applications.hyperopt.seeds`).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .._flags import Range, number, range_errors
from . import EXAMPLES

#: Allowed range of every numeric flag, checked right after parsing. Seeds must be accepted by
#: every random generator the examples use (NumPy, torch, scikit-learn's ``random_state``).
RANGES: dict[str, Range] = {"--seed": Range(0, 2**32 - 1)}


def _directory(text: str) -> Path:
    """``--out-dir``: a non-empty path (``''`` would silently mean the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (give a directory)")
    return Path(text)


def _seeds(text: str) -> list[int]:
    """``--seeds``: see :func:`applications.hyperopt.seeds.parse_seeds`."""
    from .seeds import parse_seeds

    try:
        seeds = parse_seeds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--seeds: ")) from None
    errors = range_errors({"--seeds": max(seeds)}, {"--seeds": RANGES["--seed"]})
    if errors:
        raise argparse.ArgumentTypeError(errors[0].removeprefix("--seeds "))
    return seeds


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the command line."""
    names = "\n".join(f"  {k:<15} {v[2]}" for k, v in EXAMPLES.items())
    parser = argparse.ArgumentParser(
        prog="python -m applications.hyperopt",
        description="Hyperparameter optimisation with implicit hypergradients (bilevel).",
        epilog=f"examples:\n{names}\n\nOutputs: <out-dir>/results.json and <out-dir>/figure.png.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=[*EXAMPLES, "all"], help="which example to run")
    parser.add_argument(
        "--out-dir",
        type=_directory,
        default=None,
        help="output directory (default: runs/hyperopt/<name>)",
    )
    parser.add_argument(
        "--seed",
        type=number(int),
        default=0,
        help=f"seed of the data split, {RANGES['--seed'].text()} (default 0)",
    )
    parser.add_argument(
        "--seeds",
        type=_seeds,
        default=None,
        help="independent runs, e.g. 0-5 or 0,3,7: mean ± std over them; split across the "
        "processes under torchrun, rank 0 gathers the table (replaces --seed)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small configuration that runs in seconds"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--json", action="store_true", help="print the summary as JSON instead of a table"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one example (or all of them) and print its results table."""
    parser = build_parser()
    args = parser.parse_args(argv)
    errors = range_errors({"--seed": args.seed}, RANGES)
    if errors:
        parser.error("; ".join(errors))
    names = list(EXAMPLES) if args.name == "all" else [args.name]
    if args.seeds is not None:
        return _main_seeds(args, names)
    for name in names:
        config_cls, run, description = EXAMPLES[name]
        config = config_cls.quick(seed=args.seed) if args.quick else config_cls(seed=args.seed)
        if args.out_dir is None:
            out_dir = Path("runs") / "hyperopt" / name
        else:
            out_dir = args.out_dir / name if len(names) > 1 else args.out_dir
        kwargs = {"out_dir": out_dir, "progress": not args.no_progress}
        if "verbose" in inspect.signature(run).parameters:
            kwargs["verbose"] = not args.json
        if not args.json:
            print(f"== {name}: {description}")
        result = run(config, **kwargs)
        if args.json:
            print(json.dumps({"name": name, "rows": result.rows, "files": result.files}))
        else:
            print(result.table())
            print(
                f"({result.seconds:.1f} s; wrote {result.files['json']}, "
                f"{result.files['figure']})\n"
            )
    return 0


def _main_seeds(args: argparse.Namespace, names: list[str]) -> int:
    """``--seeds``: every example once per seed, the seeds split across torchrun's processes."""
    import bilevel as bl

    from .seeds import run_seeds, seeds_table

    bl.distributed.init_from_env()
    for name in names:
        if args.out_dir is None:
            out_dir = Path("runs") / "hyperopt" / f"{name}-seeds"
        else:
            out_dir = args.out_dir / name if len(names) > 1 else args.out_dir
        summary = run_seeds(
            name, args.seeds, quick=args.quick, out_dir=out_dir, progress=not args.no_progress
        )
        if summary is None:  # not rank 0: rank 0 reports
            continue
        if args.json:
            print(json.dumps({k: summary[k] for k in ("name", "seeds", "processes", "table")}))
        else:
            seconds = sum(r["seconds"] for r in summary["runs"])
            print(
                f"== {name}: seeds {', '.join(map(str, summary['seeds']))} "
                f"({summary['processes']} process{'es' if summary['processes'] > 1 else ''})"
            )
            print(seeds_table(summary))
            print(f"({seconds:.1f} s of runs; wrote {summary['file']})\n")
    if bl.distributed.is_distributed():
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
