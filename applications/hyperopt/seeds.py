"""Independent seeds of one example, spread over the processes of a ``torchrun`` job.

The "seeds 0-5" lines of ``docs/hyperopt.md`` are six independent runs of one example (each
seed draws its own data split, noise features and random-search points). They need no
communication while they run, so they scale over processes and machines with the launcher
the iMAML app uses::

    torchrun --standalone --nproc_per_node=2 -m applications.hyperopt weight_decay \\
        --seeds 0-5 --out-dir runs/hyperopt/weight_decay-seeds

Rank ``r`` of ``N`` runs the contiguous share ``bl.distributed.shard(len(seeds))`` of the
seeds; rank 0 then gathers every run's table rows (``torch.distributed.gather_object``), writes
``results.json`` with one entry per seed and the mean and standard deviation of every column
over the seeds, and prints the table. The examples run torch and BLAS on one thread, so a run
gives the same numbers in whichever process it lands: the table does not depend on the
number of processes. Without ``torchrun`` (a plain ``python -m``) the same function runs every
seed in this process.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bilevel as bl

from ._common import markdown_table, to_jsonable

__all__ = ["aggregate_rows", "parse_seeds", "run_seeds", "seeds_table"]


def parse_seeds(text: str) -> list[int]:
    """The seeds of ``--seeds``: ``"0-5"`` (inclusive range), ``"0,3,7"``, or a mix.

    Args:
        text: comma-separated seeds or inclusive ranges ``a-b``.

    Returns:
        The seeds in the order given, each once.

    Raises:
        ValueError: an item that is not a non-negative integer or range, a range that runs
            backwards, or no seed at all; the message quotes the item.
    """
    seeds: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        lo, sep, hi = item.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(
                f"--seeds: {item!r} is not a seed or a range; write e.g. '0-5' or '0,3,7'"
            ) from None
        if first < 0 or last < first:
            raise ValueError(
                f"--seeds: {item!r} must be a non-negative seed or a range a-b with a <= b"
            )
        seeds += [s for s in range(first, last + 1) if s not in seeds]
    if not seeds:
        raise ValueError(f"--seeds: {text!r} names no seed; write e.g. '0-5' or '0,3,7'")
    return seeds


def aggregate_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over the seeds of every numeric column, per method.

    Args:
        runs: one entry per seed, each with ``"rows"``: the example's table rows (dicts with a
            ``"method"`` entry and numeric columns).

    Returns:
        One row per method (in the order of the first run) with ``"<column> mean"`` and
        ``"<column> std"`` (sample standard deviation, 0 for a single seed) and ``"seeds"``.
    """
    methods = [r["method"] for r in runs[0]["rows"]]
    out = []
    for method in methods:
        per_seed = [next(r for r in run["rows"] if r["method"] == method) for run in runs]
        row: dict[str, Any] = {"method": method}
        for key in per_seed[0]:
            raw = [r.get(key) for r in per_seed]
            numeric = [isinstance(v, int | float) and not isinstance(v, bool) for v in raw]
            if key == "method" or not any(numeric):
                continue
            # A non-finite value was written as None (JSON): it turns the column's mean NaN.
            values = [float(v) if ok else math.nan for v, ok in zip(raw, numeric, strict=True)]
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
            row[f"{key} mean"] = mean
            row[f"{key} std"] = math.sqrt(var)
        row["seeds"] = len(per_seed)
        out.append(row)
    return out


def run_seeds(
    name: str,
    seeds: Sequence[int],
    *,
    quick: bool = False,
    out_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any] | None:
    """Run example ``name`` once per seed, the seeds split across the processes of the job.

    Every process of the job calls it with the same arguments (under ``torchrun`` the default
    process group is joined first, see :func:`bilevel.distributed.init_from_env`).

    Args:
        name: an example of :data:`applications.hyperopt.EXAMPLES`.
        seeds: the seeds, one independent run each.
        quick: use each example's ``quick()`` configuration.
        out_dir: where rank 0 writes ``results.json`` (nothing written if None).
        progress: show each run's progress bar.

    Returns:
        On rank 0 (and without a process group): ``{"name", "quick", "seeds", "processes",
        "runs", "table"}`` with one entry per seed in ``runs`` (its ``seed``, the ``rank`` that
        ran it, ``seconds`` and table ``rows``) and the aggregate of :func:`aggregate_rows` in
        ``table``. On the other ranks: None.

    Raises:
        ValueError: unknown ``name`` or an empty ``seeds``.
    """
    from . import EXAMPLES

    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; choose one of {sorted(EXAMPLES)}")
    if not seeds:
        raise ValueError("seeds must name at least one seed, e.g. [0, 1, 2]")
    config_cls, run, _ = EXAMPLES[name]
    rank, world = bl.distributed.rank(), bl.distributed.world_size()
    mine = []
    for seed in list(seeds)[bl.distributed.shard(len(seeds))]:
        config = config_cls.quick(seed=seed) if quick else config_cls(seed=seed)
        t0 = time.perf_counter()
        result = run(config, progress=progress)
        mine.append(
            {
                "seed": seed,
                "rank": rank,
                "seconds": time.perf_counter() - t0,
                "rows": to_jsonable(result.rows),
            }
        )
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if rank != 0:
            return None
        assert gathered is not None
        runs = [entry for part in gathered for entry in part]  # rank order = seed order
    else:
        runs = mine
    summary = {
        "name": name,
        "quick": quick,
        "seeds": list(seeds),
        "processes": world,
        "runs": runs,
        "table": aggregate_rows(runs),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        summary["file"] = str(out / "results.json")
    return summary


def seeds_table(summary: dict[str, Any]) -> str:
    """The aggregate table of :func:`run_seeds` in markdown: ``mean ± std`` per column."""
    rows = []
    for row in summary["table"]:
        cells: dict[str, Any] = {"method": row["method"]}
        for key in row:
            if key.endswith(" mean"):
                column = key[: -len(" mean")]
                cells[column] = f"{row[key]:.4f} ± {row[column + ' std']:.4f}"
        rows.append(cells)
    return markdown_table(rows)
