"""Command line: ``python -m applications.hyperopt <name> [--quick] [--seed N] [--out-dir DIR]``."""

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


if __name__ == "__main__":
    sys.exit(main())
