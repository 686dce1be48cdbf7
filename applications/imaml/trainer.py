"""Training and evaluation runs: configuration, checkpoints, metrics, learning curves.

A run lives in one output directory, owned by one process at a time::

    out_dir/
      .lock              exclusive flock of the running process (holds its PID)
      config.json        the resolved configuration
      checkpoint.pt      latest checkpoint (written atomically: temp file + fsync + os.replace)
      metrics.jsonl      one JSON object per line: {"kind": "train" | "val" | "test", "step", ...}
      curve.png          learning curve (training meta-accuracy, validation accuracy)
      results.json       final test accuracy, both adaptation modes, mean ± 95% CI

A checkpoint holds the meta-parameters, the Adam state, the task sampler's random state and
torch's global RNG state (tensors and plain data only, read with ``weights_only=True``), so
``--resume`` continues exactly: a run interrupted after any checkpoint and resumed produces the
same parameters as an uninterrupted run. :mod:`applications.imaml.rundir` implements the file
handling and states its guarantees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from .._flags import Range, range_errors
from .datasets import dataset_splits, task_sampler
from .distributed import RankFailure, Team, shard_batch
from .inner import GradientDescent, NewtonCG
from .learners import MetaLearner, build_meta_learner, confidence_interval
from .models import build_model
from .rundir import (
    CHECKPOINT,
    CONFIG,
    FORMAT_VERSION,
    METRICS,
    RESULTS,
    RUN_FILES,
    CheckpointError,
    RunError,
    RunExists,
    RunLock,
    check_learner_state,
    load_checkpoint,
    preflight,
    read_metrics,
    remove_stale_temp_files,
    save_checkpoint,
    write_atomic,
    write_text_atomic,
)

__all__ = [
    "CONFIG_RANGES",
    "Config",
    "build_learner",
    "config_from_checkpoint",
    "evaluate_learner",
    "lake_runs_error",
    "load_checkpoint",
    "restore_learner",
    "train",
]

TEST_SEED = 20191  # fixed: every model is tested on the same 600 tasks
VAL_SEED = 4242


@dataclasses.dataclass
class Config:
    """Every setting of a run (the CLI's presets fill these; flags override them)."""

    method: str = "imaml"  # imaml | maml | fomaml
    dataset: str = "omniglot"  # omniglot | omniglot-lake | glyphs | sinusoid
    # omniglot-lake: share of meta-training tasks whose classes come from one alphabet
    alphabet_tasks: float = 0.0
    data_dir: str | None = None
    ways: int = 5
    shots: int = 1
    queries: int = 1  # query examples per class during meta-training
    eval_queries: int = 5  # query examples per class for validation / test tasks
    meta_batch: int = 32
    meta_lr: float = 1e-3
    lr_schedule: str = "constant"  # constant | cosine (over `steps`)
    steps: int = 20000  # meta-steps
    time_limit: float | None = None  # minutes of training; stops early (then tests)
    inner: str = "gd"  # gd | newton-cg
    inner_steps: int = 16
    inner_lr: float = 0.1
    safeguard: bool = True  # monotone inner GD (reject + halve on increase)
    inner_clip: float | None = None
    newton_cg_steps: int = 5
    newton_damping: float = 1.0
    lam: float = 2.0
    cg_steps: int = 5
    cg_ridge: float = 0.0
    max_meta_grad_norm: float | None = None
    zero_head: bool = False
    hidden: int = 64  # conv4 filters (64 in the paper; smaller only for fast tests)
    batched: bool = True  # vmap across the tasks of a meta-batch
    compile: bool = False  # torch.compile the vmapped meta-batch (slow first step)
    # Tasks per vmapped call (None: a process's whole meta-batch or shard in one). The batched
    # kernels' float rounding depends on it: N processes whose shards are whole chunks give the
    # result of one process bit for bit (docs/distributed.md).
    vmap_chunk: int | None = None
    val_every: int = 500
    val_tasks: int = 100
    test_tasks: int = 600
    eval_batch: int = 25
    log_every: int = 10
    ckpt_every: int = 100
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def range_errors(self) -> list[str]:
        """``"--flag must be ..., got ..."`` for every setting outside :data:`CONFIG_RANGES`."""
        values = {_flag(k): v for k, v in self.to_dict().items()}
        return range_errors(values, {_flag(k): r for k, r in CONFIG_RANGES.items()})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


#: Allowed values of every numeric setting: the single table behind the CLI's flag checks (at
#: parse time), the check of presets and the check of a configuration read from a checkpoint.
#: A value outside it is never meaningful (``max_meta_grad_norm < 0`` turns the outer step into
#: ascent, ``inner_clip < 0`` reverses the inner descent, ``hidden = 0`` has no layers).
CONFIG_RANGES: dict[str, Range] = {
    "alphabet_tasks": Range(0, 1),
    "ways": Range(1),
    "shots": Range(1),
    "queries": Range(1),
    "eval_queries": Range(1),
    "meta_batch": Range(1),
    "meta_lr": Range(0, low_open=True),
    "steps": Range(1),
    "time_limit": Range(0, low_open=True),  # None: no limit
    "inner_steps": Range(0),
    "inner_lr": Range(0, low_open=True),
    "inner_clip": Range(0, low_open=True),  # None: no clipping
    "newton_cg_steps": Range(1),
    "newton_damping": Range(0),
    "lam": Range(0, low_open=True),
    "cg_steps": Range(1),
    "cg_ridge": Range(0),
    "max_meta_grad_norm": Range(0, low_open=True),  # None: no clipping
    "hidden": Range(1),
    "val_every": Range(0),  # 0: never
    "val_tasks": Range(1),
    "test_tasks": Range(0),  # 0: no final test
    "eval_batch": Range(1),
    "vmap_chunk": Range(1),  # None: the whole meta-batch (or shard) per vmapped call
    "log_every": Range(1),
    "ckpt_every": Range(0),  # 0: only at the end
    "seed": Range(0, 2**32 - 1),
    "threads": Range(1),  # None: torch's default
}


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


# --- construction ------------------------------------------------------------------------


def make_sampler(
    cfg: Config, split: str | None, *, queries: int, seed: int, training: bool = False
) -> Any:
    """The sampler of ``cfg``'s tasks (:func:`~applications.imaml.datasets.task_sampler`);
    ``training`` applies ``cfg.alphabet_tasks`` (evaluation tasks stay random)."""
    return task_sampler(
        cfg.dataset,
        split,
        ways=cfg.ways,
        shots=cfg.shots,
        queries=queries,
        seed=seed,
        data_dir=cfg.data_dir,
        device=cfg.device,
        alphabet_tasks=cfg.alphabet_tasks if training else 0.0,
    )


def build_learner(cfg: Config) -> MetaLearner:
    """The meta-learner a configuration describes, freshly initialised (seeded)."""
    regression = cfg.dataset == "sinusoid"
    model = build_model(
        "mlp" if regression else "conv4",
        ways=cfg.ways,
        seed=cfg.seed,
        zero_head=cfg.zero_head,
        hidden=cfg.hidden,
    )
    if cfg.inner == "gd":
        inner: Any = GradientDescent(
            cfg.inner_steps, cfg.inner_lr, safeguard=cfg.safeguard, max_grad_norm=cfg.inner_clip
        )
    elif cfg.inner == "newton-cg":
        inner = NewtonCG(
            steps=cfg.inner_steps,
            cg_steps=cfg.newton_cg_steps,
            lr=cfg.inner_lr,
            damping=cfg.newton_damping,
            safeguard=cfg.safeguard,
        )
    else:
        raise ValueError(f"unknown inner solver {cfg.inner!r}; expected 'gd' or 'newton-cg'")
    return build_meta_learner(
        cfg.method,
        model,
        task="regression" if regression else "classification",
        inner=inner,
        lam=cfg.lam,
        cg_steps=cfg.cg_steps,
        cg_ridge=cfg.cg_ridge,
        meta_lr=cfg.meta_lr,
        batched=cfg.batched,
        compile=cfg.compile,
        max_meta_grad_norm=cfg.max_meta_grad_norm,
        device=cfg.device,
    )


def _lr_at(cfg: Config, step: int) -> float:
    if cfg.lr_schedule == "constant":
        return cfg.meta_lr
    if cfg.lr_schedule == "cosine":
        return cfg.meta_lr * 0.5 * (1.0 + math.cos(math.pi * min(step / max(cfg.steps, 1), 1.0)))
    raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; expected 'constant' or 'cosine'")


# --- evaluation --------------------------------------------------------------------------


def describe_result(mode: str, result: Mapping[str, Any], *, regression: bool) -> str:
    """One line for an :func:`evaluate_learner` entry: ``accuracy (prox adaptation, 600 tasks):
    92.85 ± 0.59%`` or ``MSE (...): 0.4452 ± 0.0569``, naming any excluded non-finite tasks."""
    head = f"({mode} adaptation, {result['tasks']} tasks)"
    if regression:
        text = f"MSE {head}: {result['metric']:.4f} ± {result['ci95']:.4f}"
    else:
        text = f"accuracy {head}: {100 * result['metric']:.2f} ± {100 * result['ci95']:.2f}%"
    bad = result.get("nonfinite_tasks", 0)
    if bad:
        text += f"; {bad} task(s) whose adaptation diverged to non-finite values excluded"
    return text


def evaluate_learner(
    learner: MetaLearner,
    sampler: Any,
    num_tasks: int,
    *,
    batch: int = 25,
    modes: tuple[str, ...] = ("prox", "gd"),
    team: Team | None = None,
    chunk: int | None = None,
) -> dict[str, dict[str, float]]:
    """Mean ± 95% CI of the query metric over ``num_tasks`` tasks, per adaptation mode.

    The same tasks are used for every mode (drawn once). With a distributed ``team`` every rank
    draws the same tasks, evaluates its shard of each batch, and the per-task values are
    gathered exactly (see :func:`_evaluate_batch`), so every rank returns what one process
    would. ``chunk`` (``Config.vmap_chunk``): at most this many tasks per vmapped call, and the
    ranks' shards made of whole chunks, as for the meta-gradient.
    """
    batches = []
    remaining = num_tasks
    while remaining > 0:
        batches.append(sampler.sample(min(batch, remaining)))
        remaining -= batches[-1].support_x.shape[0]
    out = {}
    for mode in modes:
        losses, metrics = [], []
        for b in batches:
            loss, metric = _evaluate_batch(learner, b, mode, team, chunk)
            losses.append(loss)
            metrics.append(metric)
        loss_all, metric_all = torch.cat(losses).cpu(), torch.cat(metrics).cpu()
        # A task whose adaptation diverged (plain GD without the safeguard can) has no
        # meaningful metric: it is excluded from the mean and counted, never averaged in as NaN.
        ok = torch.isfinite(loss_all) & torch.isfinite(metric_all)
        mean, half = confidence_interval(metric_all[ok])
        out[mode] = {
            "metric": mean,
            "ci95": half,
            "loss": float(loss_all[ok].mean()) if ok.any() else float("nan"),
            "tasks": num_tasks,
            "nonfinite_tasks": int((~ok).sum()),
        }
    return out


def _evaluate_chunked(
    learner: MetaLearner, batch: Any, mode: str, chunk: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``learner.evaluate`` on at most ``chunk`` tasks per call (all at once without it)."""
    n = int(batch.support_x.shape[0])
    if chunk is None or chunk >= n or not learner.batched:
        return learner.evaluate(batch, mode)
    outs = [
        learner.evaluate(shard_batch(batch, slice(i, min(i + chunk, n))), mode)
        for i in range(0, n, chunk)
    ]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def _evaluate_batch(
    learner: MetaLearner, batch: Any, mode: str, team: Team | None, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task query loss and metric of ``batch``, split across the ranks of ``team``.

    Each rank evaluates its contiguous shard (whole chunks of ``chunk`` tasks) and writes it
    into zeros of the batch's length; the all-reduced sum is then the per-task vector itself,
    exactly (``x + 0 = x``, NaN stays NaN), in task order.
    """
    if team is None or not team.distributed:
        return _evaluate_chunked(learner, batch, mode, chunk)
    n = int(batch.support_x.shape[0])
    part = team.part(n, chunk)
    ref = next(iter(learner.params.values()))
    loss = torch.zeros(n, dtype=ref.dtype, device=ref.device)
    metric = torch.zeros(n, dtype=ref.dtype, device=ref.device)
    if part.stop > part.start:
        shard_loss, shard_metric = _evaluate_chunked(learner, shard_batch(batch, part), mode, chunk)
        loss[part], metric[part] = shard_loss, shard_metric
    loss, metric = team.reduce_sum((loss, metric), f"gathering the {mode} evaluation")
    return loss, metric


def lake_runs_error(
    learner: MetaLearner,
    data_dir: str | None = None,
    modes: tuple[str, ...] = ("prox", "gd"),
) -> dict[str, float]:
    """Error rate (in ``[0, 1]``) on the 20 one-shot runs of Lake et al. (2015), per mode.

    Each run is one 20-way 1-shot task with one test image per class; a 20-way model adapts
    to the run's 20 training images and classifies its 20 test images. People make 4.5%.
    """
    from .one_shot import load_one_shot_runs, one_shot_error_rate, one_shot_task_batch

    runs = load_one_shot_runs(data_dir=data_dir)
    batch = one_shot_task_batch(runs)
    device = _device(learner)
    out = {}
    with torch.no_grad():
        ways = learner.model(learner.params, batch.support_x[0].to(device)).shape[-1]
        if ways != batch.support_x.shape[1]:
            raise ValueError(
                f"Lake's one-shot runs are {batch.support_x.shape[1]}-way; this model has "
                f"{ways} outputs (train it with --ways 20)"
            )
        for mode in modes:
            preds = []
            for i in range(batch.support_x.shape[0]):
                phi = learner.adapt(
                    learner.params,
                    batch.support_x[i].to(device),
                    batch.support_y[i].to(device),
                    mode,
                )
                preds.append(learner.model(phi, batch.query_x[i].to(device)).argmax(-1).cpu())
            out[mode] = one_shot_error_rate(torch.stack(preds), runs)
    return out


def _device(learner: MetaLearner) -> torch.device:
    return next(iter(learner.params.values())).device


# --- checkpoints -------------------------------------------------------------------------


def config_from_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str]) -> Config:
    """The :class:`Config` saved in a checkpoint, checked as strictly as the CLI's flags.

    Unknown settings (a newer format), settings of the wrong type and values outside
    :data:`CONFIG_RANGES` are refused, naming the checkpoint: a configuration that cannot have
    been written by ``train`` would otherwise fail later, deep inside model construction.
    """
    path = Path(path)
    saved = state["config"]
    kinds = {f.name: f.type for f in dataclasses.fields(Config)}
    unknown = sorted(set(saved) - set(kinds))
    if unknown:
        raise CheckpointError(
            f"{path}: unknown settings {unknown} in the saved config (written by a newer "
            "version?); evaluate or resume it with the code that wrote it"
        )
    for name, value in saved.items():
        if not _has_kind(value, str(kinds[name])):
            raise CheckpointError(
                f"{path}: saved setting {name}={value!r} is not of type {kinds[name]}; "
                "restore the file from a copy, or start the run again with --overwrite"
            )
    cfg = Config.from_dict({**Config().to_dict(), **saved})
    errors = cfg.range_errors()
    if errors:
        raise CheckpointError(
            f"{path}: saved config out of range ({'; '.join(errors)}); restore the file from a "
            "copy, or start the run again with --overwrite"
        )
    return cfg


def _has_kind(value: Any, annotation: str) -> bool:
    """Whether ``value`` fits a field annotation such as ``"int"`` or ``"float | None"``."""
    for name in (part.strip() for part in annotation.split("|")):
        if name == "None" and value is None:
            return True
        if name == "bool" and isinstance(value, bool):
            return True
        if name == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if name == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if name == "str" and isinstance(value, str):
            return True
    return False


def restore_learner(learner: MetaLearner, state: Mapping[str, Any], path: Path) -> None:
    """Load a checkpoint's meta-parameters and Adam state after a strict name/shape check."""
    check_learner_state(state["learner"], learner.params, path)
    try:
        learner.load_state_dict(state["learner"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{path}: the optimizer state does not fit this model ({err}); restore the file "
            "from a copy, or start the run again with --overwrite"
        ) from None


def _restore_streams(sampler: Any, state: Mapping[str, Any], path: Path) -> None:
    """Restore the task sampler's stream and torch's global RNG, naming the file on failure."""
    try:
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{path}: the sampler or RNG state does not fit this run ({err}); restore the file "
            "from a copy, or start the run again with --overwrite"
        ) from None


def _checkpoint_bytes(learner: MetaLearner) -> int:
    """Size of one checkpoint: parameters and Adam's two moments, plus small state."""
    params = sum(v.numel() * v.element_size() for v in learner.params.values())
    return 3 * params + (64 << 10)


# --- training ----------------------------------------------------------------------------


def plot_curve(
    metrics_path: Path, png_path: Path, title: str = "", ylabel: str = "accuracy"
) -> None:
    """Learning curve: the training query metric (after adaptation) and validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    if train:
        ax.plot(
            [r["step"] for r in train],
            [r["metric"] for r in train],
            lw=0.8,
            alpha=0.6,
            label="meta-train (query, running)",
        )
    for mode, style in (("prox", "o-"), ("gd", "s--")):
        pts = [(r["step"], r[mode]["metric"]) for r in val if mode in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, ms=3, label=f"validation ({mode} adaptation)")
    ax.set_xlabel("meta-step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.lines:  # a run shorter than one log interval has nothing to label
        ax.legend(fontsize=8, loc="lower right" if ylabel == "accuracy" else "upper right")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    try:
        write_atomic(png_path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def train(
    cfg: Config,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    team: Team | None = None,
) -> dict[str, Any]:
    """Meta-train, validate periodically, checkpoint, then test on ``cfg.test_tasks`` tasks.

    The run owns ``out_dir`` (an exclusive lock) from start to end; see
    :mod:`applications.imaml.rundir` for what is guaranteed about its files.

    Args:
        cfg: the run's configuration.
        out_dir: output directory (created).
        resume: continue from ``out_dir/checkpoint.pt``.
        overwrite: replace the run that ``out_dir`` holds (without it, a fresh run into a
            directory holding one is refused: re-running a preset must not erase its results).
        stop_after: stop (after checkpointing) once this many meta-steps are done in total,
            without testing — simulates an interrupted run (used by the resume test).
        progress: show a tqdm progress bar.
        log: where to print human-readable lines.
        team: the processes of a data-parallel run (:func:`~applications.imaml.distributed.
            team_from_env`); default one process. Every rank calls ``train`` with the same
            arguments; each draws the same meta-batches and computes its shard of them, the
            meta-gradient sums are all-reduced, and every rank takes the same outer step. Only
            rank 0 touches ``out_dir`` (lock, checkpoints, metrics, results) and prints.

    Returns:
        A summary dict (also written to ``results.json`` when the run completes), the same on
        every rank.

    Raises:
        RunError: the directory is in use by another run, holds a run (without ``resume`` or
            ``overwrite``), cannot take a checkpoint, or its checkpoint is unusable; the
            message names the file and the fix. Nothing is trained then. Under a distributed
            team every rank raises (the others name the rank that failed), and a process that
            dies or stops answering ends the others with a
            :class:`~applications.imaml.distributed.RankFailure` naming the last checkpoint.
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue a run or replace it")
    errors = cfg.range_errors()
    if errors:
        raise ValueError("; ".join(errors))
    team = Team() if team is None else team
    if not team.is_main:
        progress, log = False, _silent
    out = Path(out_dir)
    with _own_run_dir(out, team, resume=resume, overwrite=overwrite, log=log):
        return _train_locked(
            cfg, out, team, resume=resume, stop_after=stop_after, progress=progress, log=log
        )


def _silent(_line: str) -> None:
    """The log of ranks other than 0: one voice per run."""


@contextlib.contextmanager
def _own_run_dir(
    out: Path, team: Team, *, resume: bool, overwrite: bool, log: Callable[[str], None]
) -> Iterator[None]:
    """Rank 0 creates, locks and claims ``out`` for the block; every rank learns the outcome.

    The other ranks never touch the run directory (on several machines it exists only where
    rank 0 runs); they stop with rank 0's reason when it cannot take the directory.
    """
    lock: RunLock | None = None
    error: BaseException | None = None
    if team.is_main:
        try:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise RunError(
                    f"cannot create the run directory {out}: {err.strerror or err}; choose "
                    "another --out-dir"
                ) from err
            lock = RunLock(out)
            lock.__enter__()
            _claim_run_dir(out, resume=resume, overwrite=overwrite, log=log)
        except RunError as err:
            error = err
    try:
        team.agree(error, "to claim the run directory")
        yield
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def _claim_run_dir(out: Path, *, resume: bool, overwrite: bool, log: Callable[[str], None]) -> None:
    """Make ``out`` ready for this run (the lock is held): refuse, replace or continue a run."""
    for stale in remove_stale_temp_files(out):
        log(f"removed {stale}, the temporary file of a write that was interrupted")
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise RunError(
                f"--resume: no checkpoint at {out / CHECKPOINT}; start the run without --resume"
            )
        return
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not overwrite:
        again = (
            "continue it with --resume, replace it with --overwrite"
            if CHECKPOINT in held
            else "it never reached a checkpoint, so replace it with --overwrite"
        )
        raise RunExists(
            f"{out} already holds a run ({', '.join(held)}); {again}, or choose another --out-dir"
        )
    if held:
        preflight(out, 0)  # a write-protected checkpoint is kept, not deleted
        for name in held:
            (out / name).unlink()
        log(f"--overwrite: removed the previous run's {', '.join(held)} from {out}")


def _train_locked(
    cfg: Config,
    out: Path,
    team: Team,
    *,
    resume: bool,
    stop_after: int | None,
    progress: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    error: BaseException | None = None
    sampler: Any = None
    try:  # every rank reads the data itself (on several machines: from its own disk)
        sampler = make_sampler(
            cfg, dataset_splits(cfg.dataset)[0], queries=cfg.queries, seed=cfg.seed, training=True
        )
    except Exception as err:
        error = err
    team.agree(error, "to load the meta-training tasks")
    learner = build_learner(cfg)
    ckpt_path = out / CHECKPOINT
    metrics_path = out / METRICS
    if team.is_main:
        try:
            preflight(out, _checkpoint_bytes(learner))
        except RunError as err:
            error = err
    team.agree(error, "the run directory's preflight check")
    if team.distributed and team.is_main and cfg.meta_batch < team.world_size:
        log(
            f"note: {team.world_size} processes share meta-batches of {cfg.meta_batch} tasks: "
            f"{team.world_size - cfg.meta_batch} of them wait idle at every meta-step"
        )
    step, elapsed_before = 0, 0.0
    if resume:
        state: Any = None
        if team.is_main:
            try:
                state = load_checkpoint(ckpt_path)
            except (RunError, FileNotFoundError) as err:
                error = err
        team.agree(error, "to read the checkpoint")
        # Rank 0 read it with weights_only=True; the others receive that plain data.
        state = team.broadcast(state, "sending the checkpoint to every rank")
        restore_learner(learner, state, ckpt_path)
        _restore_streams(sampler, state, ckpt_path)
        step = int(state["step"])
        elapsed_before = float(state["elapsed"])
        if team.is_main:
            # Drop metric lines written after the checkpoint (they will be re-run), and a torn
            # last line of a killed writer.
            kept = [r for r in read_metrics(metrics_path, log) if r.get("step", 0) <= step]
            write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        log(f"resumed from {ckpt_path} at meta-step {step}")
    else:
        if team.is_main:
            write_text_atomic(metrics_path, "")
        # Every rank initialised θ from the same seed; rank 0's copy is the reference anyway.
        for k, v in team.broadcast_tree(learner.params, "sending θ to every rank").items():
            learner.params[k].data.copy_(v)
    if team.is_main:
        write_text_atomic(out / CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n")
    if team.distributed:
        log(
            f"data-parallel run: {team.world_size} processes ({team.backend}), "
            f"{cfg.meta_batch} tasks per meta-step split into contiguous shards"
        )
        if (
            cfg.batched
            and -(-cfg.meta_batch // (cfg.vmap_chunk or cfg.meta_batch)) < team.world_size
        ):
            log(
                "note: each process computes its shard in one vmapped call, whose float32 "
                "rounding depends on how many tasks it holds: this run equals a one-process run "
                "to float rounding, not bit for bit; --vmap-chunk K with K <= "
                f"{max(cfg.meta_batch // team.world_size, 1)} makes it bit for bit "
                "(docs/distributed.md)"
            )
    files = metrics_path.open("a") if team.is_main else contextlib.nullcontext(io.StringIO())
    with files as metrics_file:
        return _loop(
            cfg,
            out,
            learner,
            sampler,
            metrics_file,
            team,
            step=step,
            elapsed_before=elapsed_before,
            stop_after=stop_after,
            progress=progress,
            log=log,
        )


def _resume_hint(out: Path, saved_step: int | None) -> str:
    if saved_step is None:
        return f"no checkpoint was written yet: start the run again with --overwrite ({out})"
    return (
        f"the checkpoint of meta-step {saved_step} in {out} (on rank 0's machine) is intact: "
        "continue with --resume, with any number of processes"
    )


def _loop(
    cfg: Config,
    out: Path,
    learner: MetaLearner,
    sampler: Any,
    metrics_file: IO[str],
    team: Team,
    *,
    step: int,
    elapsed_before: float,
    stop_after: int | None,
    progress: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The training loop, final checkpoint, curve and test of :func:`train` (lock held)."""
    saved = [step if step else None]  # meta-step of the last checkpoint written
    try:
        return _loop_body(
            cfg,
            out,
            learner,
            sampler,
            metrics_file,
            team,
            saved,
            step=step,
            elapsed_before=elapsed_before,
            stop_after=stop_after,
            progress=progress,
            log=log,
        )
    except RankFailure as err:
        raise RankFailure(f"{err}; {_resume_hint(out, saved[0])}") from err


def _loop_body(
    cfg: Config,
    out: Path,
    learner: MetaLearner,
    sampler: Any,
    metrics_file: IO[str],
    team: Team,
    saved: list[int | None],
    *,
    step: int,
    elapsed_before: float,
    stop_after: int | None,
    progress: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    _, val_split, test_split = dataset_splits(cfg.dataset)
    chunk = cfg.vmap_chunk if cfg.batched else None
    ckpt_path = out / CHECKPOINT

    def record(entry: dict[str, Any]) -> None:
        if team.is_main:
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()

    def checkpoint() -> None:
        # Every rank must hold the same θ for rank 0's checkpoint to stand for the run.
        team.check_in_sync(learner.params, f"the check before the checkpoint of meta-step {step}")
        error: BaseException | None = None
        if team.is_main:
            try:
                save_checkpoint(
                    ckpt_path,
                    {
                        "version": FORMAT_VERSION,
                        "config": cfg.to_dict(),
                        "step": step,
                        "learner": learner.state_dict(),
                        "sampler": sampler.state_dict(),
                        "torch_rng": torch.get_rng_state(),
                        "elapsed": elapsed_before + (time.perf_counter() - t_start),
                    },
                )
            except RunError as err:
                error = err
        team.agree(error, f"to write the checkpoint of meta-step {step}")
        saved[0] = step

    def validate() -> dict[str, Any]:
        if val_split is None and cfg.dataset != "sinusoid":
            return {}
        vs = make_sampler(cfg, val_split, queries=cfg.eval_queries, seed=VAL_SEED)
        return evaluate_learner(
            learner, vs, cfg.val_tasks, batch=cfg.eval_batch, team=team, chunk=chunk
        )

    def time_is_up() -> bool:
        if cfg.time_limit is None:
            return False
        over = elapsed_before + time.perf_counter() - t_start >= 60.0 * cfg.time_limit
        # Rank 0's clock decides for everyone: ranks that stopped at different steps would
        # wait for each other until the timeout.
        return team.any(over and team.is_main, "agreeing on the time limit")

    def reduce(sums: Any) -> Any:
        return team.reduce_sum(sums, f"the meta-gradient all-reduce of meta-step {step + 1}")

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.method} {cfg.dataset}", ncols=100)
    t_start = time.perf_counter()
    acc_loss = acc_metric = acc_nonfinite = None
    acc_count = 0
    metric_name = "acc" if cfg.dataset != "sinusoid" else "mse"
    stopped_by_time = False
    try:
        while step < cfg.steps:
            if stop_after is not None and step >= stop_after:
                break
            if time_is_up():
                stopped_by_time = True
                break
            lr = _lr_at(cfg, step)
            for group in learner.optimizer.param_groups:
                group["lr"] = lr
            # Every rank draws the whole meta-batch from the same stream and keeps its shard:
            # the tasks and their order do not depend on the number of processes.
            shard = team.shard(sampler.sample(cfg.meta_batch), chunk)
            stats = learner.step(shard, reduce=reduce if team.distributed else None, chunk=chunk)
            step += 1
            # Accumulate on-device; read back only every log_every steps.
            if acc_loss is None:
                acc_loss, acc_metric = stats["loss"].detach(), stats["metric"].detach()
                acc_nonfinite = stats["nonfinite_tasks"]
            else:
                acc_loss = acc_loss + stats["loss"].detach()
                acc_metric = acc_metric + stats["metric"].detach()
                acc_nonfinite = acc_nonfinite + stats["nonfinite_tasks"]
            acc_count += 1
            if team.is_main and (step % cfg.log_every == 0 or step == cfg.steps):
                entry = {
                    "kind": "train",
                    "step": step,
                    "time": round(elapsed_before + time.perf_counter() - t_start, 2),
                    "loss": float(acc_loss) / acc_count,
                    "metric": float(acc_metric) / acc_count,
                    "nonfinite_tasks": int(acc_nonfinite),
                    "grad_norm": float(stats["grad_norm"]),
                    "lr": lr,
                }
                record(entry)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{entry['loss']:.3f}", **{metric_name: f"{entry['metric']:.3f}"}
                    )
            if step % cfg.log_every == 0 or step == cfg.steps:
                acc_loss = acc_metric = acc_nonfinite = None
                acc_count = 0
            if bar is not None:
                bar.update(1)
            if cfg.val_every and step % cfg.val_every == 0:
                res = validate()
                if res:
                    record({"kind": "val", "step": step, **res})
                    line = ", ".join(
                        f"{m} {r['metric']:.4f} ± {r['ci95']:.4f}"
                        + (f" ({r['nonfinite_tasks']} non-finite)" if r["nonfinite_tasks"] else "")
                        for m, r in res.items()
                    )
                    (bar.write if bar is not None else log)(f"[val @ {step}] {line}")
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                checkpoint()
    finally:
        if bar is not None:
            bar.close()
    checkpoint()
    train_seconds = elapsed_before + time.perf_counter() - t_start
    summary: dict[str, Any] = {
        "config": cfg.to_dict(),
        "meta_steps": step,
        "processes": team.world_size,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_meta_step": round(train_seconds / max(step, 1), 3),
        "stopped_by_time_limit": stopped_by_time,
    }
    if stop_after is not None and step >= stop_after and step < cfg.steps:
        summary["interrupted"] = True
        return summary
    if team.is_main:
        try:
            plot_curve(
                out / METRICS,
                out / "curve.png",
                title=f"{cfg.method} {cfg.dataset}",
                ylabel="accuracy" if metric_name == "acc" else "MSE",
            )
        except Exception as exc:  # plotting must never lose a finished run
            log(f"could not plot the learning curve: {exc}")
    if cfg.test_tasks:
        t0 = time.perf_counter()
        ts = make_sampler(cfg, test_split, queries=cfg.eval_queries, seed=TEST_SEED)
        res = evaluate_learner(
            learner, ts, cfg.test_tasks, batch=cfg.eval_batch, team=team, chunk=chunk
        )
        summary["test"] = res
        summary["test_seconds"] = round(time.perf_counter() - t0, 1)
        record({"kind": "test", "step": step, **res})
        for mode, r in res.items():
            log(f"test {describe_result(mode, r, regression=metric_name == 'mse')}")
        if team.is_main and cfg.dataset == "omniglot-lake" and cfg.ways == 20 and cfg.shots == 1:
            # 20 tasks: rank 0 alone (the others may already have left).
            summary["lake_one_shot"] = lake_runs_error(learner, cfg.data_dir)
            for mode, err in summary["lake_one_shot"].items():
                log(f"Lake et al.'s 20 one-shot runs, {mode}: error rate {100 * err:.2f}%")
    if team.is_main:
        write_text_atomic(out / RESULTS, json.dumps(summary, indent=2) + "\n")
    return summary
