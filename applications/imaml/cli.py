"""Command line: ``python -m applications.imaml train|evaluate`` (console script ``bilevel-imaml``).

Examples::

    # the README's main job: embedded glyph dataset, no download, a few minutes on a laptop CPU
    python -m applications.imaml train --preset demo --out-dir runs/demo

    # tuned 5-way 1-shot Omniglot recipe for a 2-core CPU (< 60 minutes)
    python -m applications.imaml train --preset cpu-quick --data-dir /path/to/omniglot \\
        --out-dir runs/cpu-quick

    # Lake et al.'s protocol: 20-way 1-shot on the background alphabets, then the error rate
    # on their 20 one-shot runs (people: 4.5%)
    python -m applications.imaml train --preset lake-20w1s --data-dir /path/to/omniglot

    # the paper's hyperparameters, literally (needs a GPU and many hours)
    python -m applications.imaml train --preset paper-5w1s --device cuda --out-dir runs/p5w1s

    # continue an interrupted run exactly where it stopped
    python -m applications.imaml train --out-dir runs/cpu-quick --resume

    # re-run a preset into the directory of an earlier run, replacing it
    python -m applications.imaml train --preset demo --overwrite

    # test a checkpoint on 600 tasks, both adaptation modes
    python -m applications.imaml evaluate runs/cpu-quick

    # data-parallel meta-batches: 2 processes on this machine (gloo on CPU, NCCL on CUDA);
    # same result as one process, see docs/distributed.md (multi-node: --nnodes, --rdzv-*)
    torchrun --standalone --nproc_per_node=2 -m applications.imaml train --preset demo \\
        --out-dir runs/demo-2p
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._flags import Range, number, range_errors
from .distributed import Team
from .trainer import CONFIG_RANGES, Config

__all__ = ["FLAG_RANGES", "PRESETS", "RESUME_MAY_CHANGE", "build_parser", "main", "resume_config"]

_PAPER = {
    "method": "imaml",
    "dataset": "omniglot",
    "queries": 1,
    "meta_batch": 32,
    "meta_lr": 1e-3,
    "inner": "gd",
    "inner_lr": 0.1,
    "lam": 2.0,
    "cg_steps": 5,
    "cg_ridge": 0.0,
    "steps": 20000,
}

_CPU_QUICK: dict[str, Any] = {
    "method": "imaml",
    "dataset": "omniglot",
    "ways": 5,
    "shots": 1,
    "queries": 5,
    "eval_queries": 5,
    "meta_batch": 16,
    "meta_lr": 2e-3,
    "lr_schedule": "cosine",
    "steps": 3000,
    "time_limit": 55.0,
    "inner": "gd",
    "inner_steps": 5,
    "inner_lr": 0.3,
    "lam": 0.5,
    "cg_steps": 2,
    "cg_ridge": 2.0,
    "max_meta_grad_norm": 10.0,
    "zero_head": True,
    "val_every": 250,
    "val_tasks": 100,
    "ckpt_every": 50,
    # torch's default (one thread per physical core): the batched kernels use both cores of
    # the 2-core reference machine (0.81 vs 1.37 s per meta-step with one thread).
    "threads": None,
}

# The cpu-quick recipe at scale (see the cpu-long preset).
_CPU_LONG: dict[str, Any] = {
    **_CPU_QUICK,
    "steps": 14000,
    "time_limit": 150.0,
    "compile": True,
    "val_every": 1000,
    "ckpt_every": 200,
}

#: Named configurations. The ``paper-*`` presets are the paper's hyperparameters taken
#: literally (16 inner GD steps at lr 0.1 for 5-way, 25 for 20-way; λ = 2; 5 CG steps;
#: meta-batch 32; Adam 1e-3); they keep the app's guards (monotone inner GD, fixed-K CG that
#: skips negative curvature, non-finite tasks zeroed), which change nothing on a well-behaved
#: task. ``cpu-quick`` is the recipe tuned for a 2-core CPU, ``demo`` the embedded-data job,
#: ``sinusoid`` MAML's 10-shot regression toy problem (1-40-40-1 MLP, 20 inner GD steps).
PRESETS: dict[str, dict[str, Any]] = {
    "paper-5w1s": {**_PAPER, "ways": 5, "shots": 1, "inner_steps": 16},
    "paper-5w5s": {**_PAPER, "ways": 5, "shots": 5, "inner_steps": 16},
    "paper-20w1s": {**_PAPER, "ways": 20, "shots": 1, "inner_steps": 25},
    "paper-20w5s": {**_PAPER, "ways": 20, "shots": 5, "inner_steps": 25},
    "cpu-quick": _CPU_QUICK,
    # The cpu-quick recipe at scale: 14,000 meta-steps (224,000 tasks, about 1/3 of the
    # paper's 20,000 x 32) with the cosine over all of them, compiled (2.1x per meta-step in
    # the cpu-quick comparison), sized for 150 minutes on the 2-core machine. Validation is
    # sparser than in cpu-quick so that it costs under 5% of the run.
    "cpu-long": _CPU_LONG,
    # cpu-long with twice the inner adaptation (10 monotone GD steps), the lever the cpu-long
    # plateau pointed to: 0.54 s/meta-step compiled under torchrun with 2 processes x 1 thread
    # on the 2-core machine, so 10,500 meta-steps fit the same budget.
    "cpu-long-10": {**_CPU_LONG, "inner_steps": 10, "steps": 10500, "time_limit": 135.0},
    # The Hessian-free variant (the paper's iMAML-HF row) on the cpu-long footing: 2 damped
    # Newton steps of 3 truncated-CG iterations each (2 gradients and 6 Hessian-vector
    # products per task) at step 1 with backtracking, compiled, sized for two hours on one of
    # the 2 cores (1.25 s/meta-step measured with the other core busy).
    "cpu-hf": {
        **_CPU_QUICK,
        "inner": "newton-cg",
        "inner_steps": 2,
        "newton_cg_steps": 3,
        "inner_lr": 1.0,
        "newton_damping": 1.0,
        "steps": 5000,
        "time_limit": 115.0,
        "compile": True,
        "val_every": 1000,
        "ckpt_every": 200,
    },
    # The cpu-quick recipe on the embedded glyphs, sized to finish in minutes.
    "demo": {
        **_CPU_QUICK,
        "dataset": "glyphs",
        "meta_batch": 8,
        "meta_lr": 3e-3,
        "steps": 200,
        "time_limit": 3.5,
        "val_every": 100,
        "val_tasks": 50,
        "test_tasks": 200,
    },
    # The cpu-quick recipe on Lake et al.'s protocol: 20-way 1-shot, meta-trained on the 964
    # background characters, tested on the evaluation alphabets and Lake's 20 one-shot runs.
    "lake-20w1s": {
        **_CPU_QUICK,
        "dataset": "omniglot-lake",
        "ways": 20,
        "queries": 2,
        "meta_batch": 8,
        "steps": 2000,
        "time_limit": 40.0,
        "val_every": 0,
    },
    "sinusoid": {
        "method": "imaml",
        "dataset": "sinusoid",
        "shots": 10,
        "queries": 10,
        "eval_queries": 10,
        "meta_batch": 25,
        "meta_lr": 1e-3,
        "lr_schedule": "cosine",
        "steps": 10000,
        "inner": "gd",
        "inner_steps": 20,
        "inner_lr": 0.05,
        "lam": 1.0,
        "cg_steps": 5,
        "cg_ridge": 1.0,
        "max_meta_grad_norm": 10.0,
        "val_every": 2000,
        "val_tasks": 200,
        "test_tasks": 600,
        "ckpt_every": 500,
        "threads": 1,
    },
}
PRESETS["glyphs-quick"] = PRESETS["demo"]

# flag name -> (Config field, type, help)
_OVERRIDES: list[tuple[str, str, Any, str]] = [
    ("--method", "method", str, "imaml | maml | fomaml"),
    ("--ways", "ways", int, "classes per task N"),
    (
        "--alphabet-tasks",
        "alphabet_tasks",
        float,
        "omniglot-lake: share of meta-training tasks drawn within one alphabet, as Lake's runs are",
    ),
    ("--shots", "shots", int, "support examples per class K"),
    ("--queries", "queries", int, "query examples per class during meta-training"),
    ("--eval-queries", "eval_queries", int, "query examples per class for val/test tasks"),
    ("--meta-batch", "meta_batch", int, "tasks per meta-step"),
    ("--meta-lr", "meta_lr", float, "outer Adam learning rate"),
    ("--lr-schedule", "lr_schedule", str, "constant | cosine"),
    ("--time-limit", "time_limit", float, "minutes of training before testing"),
    ("--inner", "inner", str, "inner solver: gd | newton-cg"),
    ("--inner-steps", "inner_steps", int, "inner GD (or Newton) steps"),
    ("--inner-lr", "inner_lr", float, "inner step size"),
    ("--inner-clip", "inner_clip", float, "clip each inner gradient to this norm"),
    ("--newton-cg-steps", "newton_cg_steps", int, "CG steps per Newton step (newton-cg)"),
    ("--newton-damping", "newton_damping", float, "damping of the Newton system (newton-cg)"),
    ("--lam", "lam", float, "proximal strength λ"),
    ("--cg-steps", "cg_steps", int, "fixed-K CG steps of the meta-gradient solve"),
    ("--cg-ridge", "cg_ridge", float, "ridge ρ: the backward solve uses H + (λ+ρ)I"),
    ("--max-meta-grad-norm", "max_meta_grad_norm", float, "clip the meta-gradient norm"),
    ("--val-every", "val_every", int, "meta-steps between validations (0: never)"),
    ("--val-tasks", "val_tasks", int, "tasks per validation"),
    ("--test-tasks", "test_tasks", int, "tasks of the final test (0: skip)"),
    ("--eval-batch", "eval_batch", int, "tasks per evaluation batch"),
    ("--log-every", "log_every", int, "meta-steps between metric lines"),
    ("--ckpt-every", "ckpt_every", int, "meta-steps between checkpoints"),
    ("--threads", "threads", int, "torch CPU threads"),
    ("--hidden", "hidden", int, "conv4 filters per layer (64 in the paper)"),
    (
        "--vmap-chunk",
        "vmap_chunk",
        int,
        "tasks per vmapped call (default: all); under torchrun, with K <= meta-batch/N, "
        "N processes give one process's result bit for bit",
    ),
]
#: ``evaluate`` flags that change how each task adapts from θ (not the checkpoint's θ itself).
_EVAL_ADAPTATION: list[tuple[str, type, str]] = [
    ("--inner-steps", int, "adapt with this many inner steps (default: the run's)"),
    ("--inner-lr", float, "inner step size for adaptation (default: the run's)"),
    ("--lam", float, "proximal strength λ of prox adaptation (default: the run's)"),
]
_BOOL_OVERRIDES: list[tuple[str, str, str]] = [
    ("safeguard", "safeguard", "monotone inner GD (reject and halve on increase)"),
    ("zero-head", "zero_head", "initialise the linear head at zero"),
    ("vmap", "batched", "vmap across the tasks of a meta-batch (else a per-task loop)"),
    ("compile", "compile", "torch.compile the vmapped meta-batch (minutes to compile)"),
]


#: Allowed range of every numeric flag of ``train`` and ``evaluate``: the settings' table
#: (:data:`~applications.imaml.trainer.CONFIG_RANGES`) under its flag names, plus the two flags
#: that are not settings. Checked right after parsing, before anything is loaded or trained.
FLAG_RANGES: dict[str, Range] = {
    **{"--" + name.replace("_", "-"): r for name, r in CONFIG_RANGES.items()},
    "--tasks": Range(1),  # evaluate: tasks to test on
    "--stop-after": Range(1),  # train (hidden): simulate an interruption
    "--dist-timeout": Range(0, low_open=True),  # train under torchrun: seconds per collective
}

#: Settings a resumed run may change, with why: they do not change the meta-gradient of any
#: step (``steps`` only under the constant learning rate; the cosine schedule depends on it).
RESUME_MAY_CHANGE: dict[str, str] = {
    "threads": "CPU threads",
    "compile": "compiled and eager meta-batches compute the same meta-gradient",
    "vmap_chunk": "the same meta-gradients, computed a chunk of tasks per vmapped call",
    "device": "where the meta-gradient is computed",
    "data_dir": "where the same data is read from",
    "time_limit": "when the run stops",
    "steps": "when the run stops (constant learning rate only)",
}


def _nonempty(what: str) -> Any:
    """An argparse ``type=`` refusing ``''``, which would silently mean the current directory."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{what} must not be empty")
        return text

    parse.__name__ = what
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m applications.imaml",
        description="iMAML few-shot learning with implicit meta-gradients (bilevel).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="meta-train, validate, checkpoint, test")
    tr.add_argument("--preset", choices=sorted(PRESETS), default=None, help="named recipe")
    tr.add_argument(
        "--dataset", choices=["omniglot", "omniglot-lake", "glyphs", "sinusoid"], default=None
    )
    tr.add_argument(
        "--data-dir",
        type=_nonempty("directory"),
        default=None,
        help="Omniglot directory (or $BILEVEL_OMNIGLOT_DIR)",
    )
    tr.add_argument(
        "--out-dir",
        type=_nonempty("directory"),
        default=None,
        help="run directory (default runs/<preset>)",
    )
    tr.add_argument("--steps", type=number(int), default=None, help="meta-steps")
    tr.add_argument("--seed", type=number(int), default=None)
    tr.add_argument("--device", default=None, help="cpu | cuda | cuda:0 ...")
    again = tr.add_mutually_exclusive_group()
    again.add_argument(
        "--resume", action="store_true", help="continue the run in out-dir exactly where it stopped"
    )
    again.add_argument(
        "--overwrite", action="store_true", help="replace the run that out-dir already holds"
    )
    tr.add_argument("--stop-after", type=number(int), default=None, help=argparse.SUPPRESS)
    tr.add_argument(
        "--dist-timeout",
        type=number(float),
        default=None,
        help="under torchrun: seconds a rank waits for the others at a collective before the "
        "run stops with an error (default 600)",
    )
    tr.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    for flag, _field, kind, text in _OVERRIDES:
        tr.add_argument(flag, type=kind if kind is str else number(kind), default=None, help=text)
    for flag, _field, text in _BOOL_OVERRIDES:
        tr.add_argument(
            f"--{flag}", dest=flag.replace("-", "_"), action="store_true", default=None, help=text
        )
        tr.add_argument(
            f"--no-{flag}",
            dest=flag.replace("-", "_"),
            action="store_false",
            help=argparse.SUPPRESS,
        )

    ev = sub.add_parser("evaluate", help="test a checkpoint")
    ev.add_argument("checkpoint", help="run directory or checkpoint file")
    ev.add_argument("--dataset", choices=["omniglot", "omniglot-lake", "glyphs"], default=None)
    ev.add_argument("--data-dir", type=_nonempty("directory"), default=None)
    ev.add_argument("--split", default=None, help="split to test on (default: the test split)")
    ev.add_argument("--tasks", type=number(int), default=600)
    ev.add_argument("--eval-queries", type=number(int), default=None)
    ev.add_argument("--modes", default="prox,gd", help="comma-separated: prox,gd")
    # Evaluation-time adaptation: the inner problem is solved from θ at test time too, and how
    # far it is solved is a choice of its own. Choose it on --split val, never on the test split.
    for flag, kind, what in _EVAL_ADAPTATION:
        ev.add_argument(flag, type=number(kind), default=None, help=what)
    ev.add_argument(
        "--lake-runs",
        action="store_true",
        help="also Lake et al.'s 20 one-shot runs (20-way 1-shot models)",
    )
    ev.add_argument("--device", default=None)
    ev.add_argument("--threads", type=number(int), default=None)
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser


def check_flag_ranges(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse, naming the flag, any numeric flag outside :data:`FLAG_RANGES` (exit status 2)."""
    given = {
        flag: getattr(args, flag[2:].replace("-", "_"))
        for flag in FLAG_RANGES
        if hasattr(args, flag[2:].replace("-", "_"))
    }
    errors = range_errors(given, FLAG_RANGES)
    if errors:
        parser.error("; ".join(errors))


def _validate(cfg: Config, parser: argparse.ArgumentParser) -> None:
    """The merged configuration (preset, saved run and flags): ranges and combinations."""

    def fail(msg: str) -> None:
        parser.error(msg)

    errors = cfg.range_errors()
    if errors:
        fail("; ".join(errors))
    if cfg.method not in ("imaml", "maml", "fomaml"):
        fail(f"--method must be imaml, maml or fomaml, got {cfg.method!r}")
    if cfg.inner not in ("gd", "newton-cg"):
        fail(f"--inner must be gd or newton-cg, got {cfg.inner!r}")
    if cfg.lr_schedule not in ("constant", "cosine"):
        fail(f"--lr-schedule must be constant or cosine, got {cfg.lr_schedule!r}")
    if cfg.method != "imaml" and cfg.inner != "gd":
        fail("MAML/FOMAML baselines unroll plain GD: use --inner gd")
    if cfg.compile and not cfg.batched:
        fail("--compile compiles the vmapped meta-batch: drop --no-vmap")
    if cfg.vmap_chunk is not None and not cfg.batched:
        fail("--vmap-chunk splits the vmapped meta-batch: drop --no-vmap")
    if cfg.alphabet_tasks and cfg.dataset != "omniglot-lake":
        fail(
            "--alphabet-tasks draws tasks within one Omniglot alphabet: it needs "
            f"--dataset omniglot-lake, got {cfg.dataset!r}"
        )
    if cfg.dataset == "omniglot-lake" and cfg.val_every:
        cfg.val_every = 0  # no validation split in Lake's background/evaluation protocol
    if cfg.dataset != "sinusoid" and cfg.shots + max(cfg.queries, cfg.eval_queries) > 20:
        fail(
            f"shots + queries must be <= 20 (Omniglot and glyphs have 20 drawings per class), "
            f"got {cfg.shots} + {max(cfg.queries, cfg.eval_queries)}"
        )
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            fail(f"--device {cfg.device}: CUDA is not available in this torch build")


def requested_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a ``train`` command asks for: its preset's, then the flags given."""
    values: dict[str, Any] = {}
    if args.preset is not None:
        values.update(PRESETS[args.preset])
    for name in ("dataset", "data_dir", "steps", "seed", "device"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    for flag, name, _kind, _text in _OVERRIDES:
        v = getattr(args, flag.lstrip("-").replace("-", "_"))
        if v is not None:
            values[name] = v
    for flag, name, _text in _BOOL_OVERRIDES:
        v = getattr(args, flag.replace("-", "_"))
        if v is not None:
            values[name] = v
    return values


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    if args.preset is None and args.dataset is None:
        parser.error("train: give --preset NAME or at least --dataset")
    return Config.from_dict({**Config().to_dict(), **requested_values(args)})


def resume_config(saved: Config, requested: Mapping[str, Any]) -> tuple[Config, list[str]]:
    """The configuration of a resumed run: the saved one, with the harmless changes applied.

    Args:
        saved: the configuration in the checkpoint.
        requested: the settings the command line asks for (preset and flags).

    Returns:
        The configuration to continue with, and one line per change applied.

    Raises:
        ValueError: a requested setting differs from the saved run and would change the
            meta-gradient (another preset, learning rate, seed, ...); the message lists them all.
    """
    cfg = Config.from_dict(saved.to_dict())
    applied, refused = [], []
    for name, value in requested.items():
        old = getattr(saved, name)
        if value == old:
            continue
        flag = "--" + name.replace("_", "-")
        allowed = name in RESUME_MAY_CHANGE and (name != "steps" or saved.lr_schedule == "constant")
        if allowed:
            setattr(cfg, name, value)
            applied.append(f"{flag} {old!r} -> {value!r} ({RESUME_MAY_CHANGE[name]})")
        else:
            why = " (the cosine learning-rate schedule depends on it)" if name == "steps" else ""
            refused.append(f"{flag}: saved {old!r}, requested {value!r}{why}")
    if refused:
        raise ValueError(
            "these settings differ from the saved run and would change its meta-gradient: "
            + "; ".join(refused)
            + ". Drop them to continue the run as saved, or start a new run (another --out-dir, "
            "or --overwrite)"
        )
    return cfg, applied


def _resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Config, list[str]]:
    """The run's configuration from the preset and flags, or from the checkpoint (--resume)."""
    from .trainer import config_from_checkpoint, load_checkpoint

    out_dir = args.out_dir or f"runs/{args.preset or 'run'}"
    if not args.resume:
        return config_from_args(args, parser), []
    ckpt = Path(out_dir) / "checkpoint.pt"
    if not ckpt.is_file():
        parser.error(f"--resume: no checkpoint at {ckpt}")
    saved = config_from_checkpoint(load_checkpoint(ckpt), ckpt)
    try:
        return resume_config(saved, requested_values(args))
    except ValueError as exc:
        parser.error(f"--resume {out_dir}: {exc}")


def _resolve_on_rank0(
    args: argparse.Namespace, parser: argparse.ArgumentParser, team: Team
) -> tuple[Config, list[str]]:
    """:func:`_resolve` on rank 0, sent to every rank, so that only rank 0 reads the run
    directory (on several machines it exists only there). A refusal on rank 0 (bad settings:
    exit status 2; an unusable checkpoint: 1) ends every rank with the same status; rank 0
    alone prints why."""
    from .rundir import RunError

    outcome: Any = None
    pending: BaseException | None = None
    if team.is_main:
        try:
            cfg, applied = _resolve(args, parser)
            outcome = ("config", cfg.to_dict(), applied)
        except SystemExit as exc:
            outcome, pending = ("exit", exc.code), exc
        except RunError as exc:
            outcome, pending = ("error", str(exc)), exc
    outcome = team.broadcast(outcome, "sending the configuration to every rank")
    if pending is not None:
        raise pending
    if outcome[0] == "exit":
        raise SystemExit(outcome[1])
    if outcome[0] == "error":
        raise RunError(f"{team.describe()}: stopping because rank 0 refused the run: {outcome[1]}")
    return Config.from_dict(outcome[1]), outcome[2]


def _place(cfg: Config, team: Team, parser: argparse.ArgumentParser) -> None:
    """Give each rank of a CUDA run its own GPU: ``--device cuda`` means ``cuda:LOCAL_RANK``."""
    if not (team.distributed and cfg.device.startswith("cuda")):
        return
    if cfg.device != "cuda":
        parser.error(
            f"--device {cfg.device}: with several processes every rank uses cuda:LOCAL_RANK; "
            "pass --device cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)"
        )
    import torch

    cfg.device = f"cuda:{team.local_rank}"
    torch.cuda.set_device(team.local_rank)


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .distributed import DEFAULT_TIMEOUT, team_from_env
    from .trainer import train

    out_dir = args.out_dir or f"runs/{args.preset or 'run'}"
    team = team_from_env(DEFAULT_TIMEOUT if args.dist_timeout is None else args.dist_timeout)
    cfg, applied = _resolve_on_rank0(args, parser, team)
    if team.is_main:
        for line in applied:
            print(f"resume: {line}; allowed, it does not change the meta-gradient")
    _validate(cfg, parser)
    _place(cfg, team, parser)
    summary = train(
        cfg,
        out_dir,
        resume=args.resume,
        overwrite=args.overwrite,
        stop_after=args.stop_after,
        progress=not args.no_progress,
        team=team,
    )
    if team.is_main:
        print(
            f"run directory: {out_dir}  ({summary['meta_steps']} meta-steps, "
            f"{summary['seconds_per_meta_step']} s/meta-step"
            + (f", {team.world_size} processes)" if team.distributed else ")")
        )
    team.close()
    return 0


def _evaluate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from .rundir import CHECKPOINT
    from .trainer import (
        TEST_SEED,
        build_learner,
        config_from_checkpoint,
        describe_result,
        evaluate_learner,
        lake_runs_error,
        load_checkpoint,
        make_sampler,
        restore_learner,
    )

    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
        parser.error(
            "evaluate runs in one process; start it with python -m applications.imaml "
            "evaluate, not torchrun (train --test-tasks N tests across the processes)"
        )
    try:
        state = load_checkpoint(args.checkpoint)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    path = Path(args.checkpoint)
    path = path / CHECKPOINT if path.is_dir() else path
    cfg = config_from_checkpoint(state, path)
    for name in ("dataset", "data_dir", "eval_queries", "device", "threads"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    names = (flag[2:].replace("-", "_") for flag, _, _ in _EVAL_ADAPTATION)
    adaptation = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    for name, value in adaptation.items():
        setattr(cfg, name, value)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    bad = [m for m in modes if m not in ("prox", "gd")]
    if bad or not modes:
        parser.error(f"--modes must be a comma-separated subset of prox,gd; got {args.modes!r}")
    learner = build_learner(cfg)
    restore_learner(learner, state, path)
    split = args.split or ("evaluation" if cfg.dataset == "omniglot-lake" else "test")
    sampler = make_sampler(cfg, split, queries=cfg.eval_queries, seed=TEST_SEED)
    lake = None
    if args.lake_runs:  # first: a model of the wrong width fails before the long evaluation
        try:
            lake = lake_runs_error(learner, cfg.data_dir, modes)
        except ValueError as exc:
            parser.error(f"--lake-runs: {exc}")
    res: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "meta_steps": state["step"],
        "dataset": cfg.dataset,
        "split": split,
        # What adaptation the numbers below used, and which of it differs from the run's.
        "adaptation": {
            "inner": cfg.inner,
            "inner_steps": cfg.inner_steps,
            "inner_lr": cfg.inner_lr,
            "lam": cfg.lam,
            "overridden": sorted(adaptation),
        },
        "test": evaluate_learner(learner, sampler, args.tasks, batch=cfg.eval_batch, modes=modes),
    }
    if lake is not None:
        res["lake_one_shot"] = lake
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        regression = cfg.dataset == "sinusoid"
        if adaptation:
            given = ", ".join(f"{k} = {v}" for k, v in sorted(adaptation.items()))
            print(f"adaptation overridden for this evaluation: {given}")
        for mode, r in res["test"].items():
            print(f"{cfg.dataset}/{split}: {describe_result(mode, r, regression=regression)}")
        for mode, err in res.get("lake_one_shot", {}).items():
            print(
                f"Lake et al. 20 one-shot runs ({mode} adaptation): error rate {100 * err:.2f}%"
                " (people: 4.5%)"
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command; bad flags exit with status 2, unusable files or directories with 1.

    A file or directory problem (a damaged checkpoint or archive, a run directory in use or
    already holding a run, a full disk) is reported as one line naming it and the fix.
    """
    from ._cache import DataFileError
    from .rundir import RunError

    parser = build_parser()
    args = parser.parse_args(argv)
    check_flag_ranges(args, parser)
    try:
        if args.command == "train":
            return _train(args, parser)
        return _evaluate(args, parser)
    except (RunError, DataFileError) as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
