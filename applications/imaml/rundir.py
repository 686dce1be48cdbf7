"""A run directory's files, written and read so that runs survive crashes, races and damage.

What this module guarantees (``docs/reliability.md`` says how each is tested):

* **Atomic writes.** Every file is written to ``.<name>.<pid>.tmp`` beside it, flushed to disk and
  renamed over the old one, so a crash or a full disk leaves the previous file intact. A failed
  write removes its temporary file; temporary files of killed writers are removed by the next
  run that owns the directory.
* **No code execution on load.** Checkpoints are read with ``torch.load(weights_only=True)``:
  tensors, numbers, strings, lists and dicts only. Anything else is refused, naming the file,
  before any of it is run.
* **One writer per run directory.** :class:`RunLock` holds an exclusive ``fcntl.flock`` on
  ``.lock`` for the whole run; a second run is told the PID of the holder. The kernel drops the
  lock when its holder dies, even by ``SIGKILL``, so a killed run never blocks the next one.
* **Damaged inputs are named.** A truncated, empty or foreign checkpoint, a checkpoint with
  missing or misshapen entries, or a broken metrics line raises one :class:`RunError` whose
  message names the file, what is wrong and the fix. A torn *final* metrics line (a write cut
  short by a kill) is dropped, since the checkpoint never depends on it.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import stat
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked (documented in docs/reliability.md)
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CHECKPOINT",
    "FORMAT_VERSION",
    "LOCK",
    "METRICS",
    "RUN_FILES",
    "CheckpointError",
    "CheckpointWriteError",
    "RunDirectoryBusy",
    "RunError",
    "RunExists",
    "RunLock",
    "check_learner_state",
    "load_checkpoint",
    "preflight",
    "read_metrics",
    "remove_stale_temp_files",
    "save_checkpoint",
    "write_atomic",
    "write_text_atomic",
]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
RESULTS = "results.json"
CURVE = "curve.png"
LOCK = ".lock"
#: The files that make a directory "hold a run" (a fresh ``train`` refuses to replace them).
RUN_FILES = (CHECKPOINT, CONFIG, METRICS, RESULTS, CURVE)
#: Version of the checkpoint layout written by :func:`save_checkpoint` and read back here.
FORMAT_VERSION = 1
_TEMP = re.compile(
    r"^\.(?:" + "|".join(re.escape(n) for n in (*RUN_FILES, "write-probe")) + r")\.\d+\.tmp$"
)
_FIX_DAMAGED = "restore it from a copy, or start the run again with --overwrite"


class RunError(Exception):
    """A run directory or one of its files cannot be used as asked.

    The message is one line naming the file or directory, what is wrong and the fix.
    """


class CheckpointError(RunError):
    """A checkpoint is unreadable, of another format, or does not fit the model."""


class CheckpointWriteError(RunError):
    """A checkpoint could not be written; the previous one is intact."""


class RunDirectoryBusy(RunError):
    """Another process holds the run directory's lock."""


class RunExists(RunError):
    """A fresh run was asked for in a directory that already holds one."""


# --- locking -----------------------------------------------------------------------------


class RunLock:
    """Exclusive ownership of a run directory for as long as the ``with`` block runs.

    The lock is an ``fcntl.flock`` on ``out_dir/.lock``, which holds the owner's PID so that a
    refused run can say who holds it. The file is left in place on release: deleting it would let
    a third process lock a new file while a second still holds the old one.
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.path = Path(out_dir) / LOCK
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunError(
                f"cannot create the lock file {self.path}: {err.strerror}; make "
                f"{self.path.parent} writable or choose another --out-dir"
            ) from err
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise RunDirectoryBusy(
                f"run directory {self.path.parent} is in use by process {holder} (lock file "
                f"{self.path}); wait for that run to finish or stop it, or choose another "
                "--out-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # no stale PID for the next reader
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


def _read_pid(fd: int) -> str:
    """The PID the lock's holder wrote (it may still be writing it: retry briefly)."""
    for _ in range(20):
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "(PID not yet written)"


# --- writing -----------------------------------------------------------------------------


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, rename it to ``path``.

    On any exception (a full disk, a ``KeyboardInterrupt``) the temporary file is removed and
    ``path`` keeps its previous content; the exception propagates.
    """
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the directory itself became unwritable; the original error matters more
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_atomic` for a text file (UTF-8)."""
    write_atomic(path, lambda f: f.write(text.encode()))


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> None:
    """Write a checkpoint atomically: a crash or a full disk leaves the previous one intact.

    Raises:
        CheckpointWriteError: the write failed (the message names the path, the cause and what
            to do); no temporary file is left behind.
    """
    try:
        write_atomic(path, lambda f: torch.save(dict(payload), f))
    except (OSError, RuntimeError) as err:  # RuntimeError: torch's writer reports some so
        cause = getattr(err, "strerror", None) or _first_line(err)
        if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            hint = "free some space"
        elif isinstance(err, OSError):
            hint = "make it writable"
        else:
            hint = "free some space or make it writable"
        raise CheckpointWriteError(
            f"could not write the checkpoint {path}: {cause}; the previous checkpoint is intact. "
            f"To fix: {hint} in {path.parent}, then continue with --resume"
        ) from err


def remove_stale_temp_files(out_dir: Path) -> list[Path]:
    """Remove the temporary files of writers that were killed mid-write; return them.

    Call only while holding the :class:`RunLock`: then no live writer can own one of them.
    """
    removed = []
    for p in sorted(out_dir.iterdir()):
        if _TEMP.match(p.name) and p.is_file():
            p.unlink()
            removed.append(p)
    return removed


def preflight(out_dir: Path, checkpoint_bytes: int) -> None:
    """Fail before training starts if no checkpoint could be written to ``out_dir``.

    Checks that a file can be created there, that the disk has room for a checkpoint beside the
    previous one (the rename replaces it only after the new one is complete), and that an
    existing checkpoint is not write-protected (a protected file is kept, not replaced).

    Args:
        out_dir: the run directory.
        checkpoint_bytes: estimated size of one checkpoint.
    """
    ckpt = out_dir / CHECKPOINT
    if ckpt.exists() and not ckpt.stat().st_mode & stat.S_IWUSR:
        raise RunError(
            f"{ckpt} is read-only, so this run would replace a protected checkpoint; make it "
            f"writable (chmod u+w {ckpt}) or choose another --out-dir"
        )
    probe = out_dir / f".write-probe.{os.getpid()}.tmp"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise RunError(
            f"cannot write to the run directory {out_dir}: {err.strerror or err}; make it "
            "writable or choose another --out-dir"
        ) from err
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    need = 2 * checkpoint_bytes + (1 << 20)  # new + previous checkpoint, metrics headroom
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise RunError(
            f"not enough free space in {out_dir} for checkpoints: about {need / 1e6:.1f} MB "
            f"needed, {free / 1e6:.1f} MB free; free some space or choose another --out-dir"
        )


# --- reading -----------------------------------------------------------------------------


def _checkpoint_file(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    return path / CHECKPOINT if path.is_dir() else path


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint (a run directory or the file), refusing anything but plain data.

    Raises:
        FileNotFoundError: there is no checkpoint at ``path``.
        CheckpointError: the file is empty, truncated, not a checkpoint, holds objects other
            than tensors and plain data (never executed), or lacks an entry of the format.
    """
    path = _checkpoint_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint; {_FIX_DAMAGED}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a torch checkpoint (no zip archive: truncated, or a text or foreign "
            f"file); {_FIX_DAMAGED}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _unpickler_detail(err)
        if "Unsupported global" in detail:
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain data ({detail}); refused "
                "without running them (unpickling them could execute code). Only load checkpoints "
                "written by this trainer; if you trust the file, re-save its tensors with "
                "torch.save"
            ) from None
        raise CheckpointError(
            f"{path} is damaged ({detail}); refused without running it; {_FIX_DAMAGED}"
        ) from None
    except Exception as err:  # a damaged archive: miniz, zip and EOF errors of all kinds
        raise CheckpointError(f"{path} is damaged ({_first_line(err)}); {_FIX_DAMAGED}") from None
    _check_layout(state, path)
    return state


def _unpickler_detail(err: BaseException) -> str:
    """The weights-only unpickler's own reason (``Unsupported global: GLOBAL exec ...``), shortened.

    torch wraps it in a long message about ``weights_only``; the reason is the useful part.
    """
    text = str(err)
    marker = "WeightsUnpickler error:"
    tail = text[text.index(marker) + len(marker) :] if marker in text else text
    reason = next((line.strip() for line in tail.splitlines() if line.strip()), "unreadable")
    return reason.split(" was not an allowed global")[0]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


#: entry -> (type, what it is), the checkpoint layout of FORMAT_VERSION.
_LAYOUT: dict[str, tuple[type | tuple[type, ...], str]] = {
    "version": (int, "format version"),
    "config": (dict, "run configuration"),
    "step": (int, "meta-step count"),
    "learner": (dict, "meta-parameters and Adam state"),
    "sampler": (dict, "task sampler state"),
    "torch_rng": (torch.Tensor, "torch RNG state"),
    "elapsed": ((int, float), "training seconds"),
}


def _check_layout(state: Any, path: Path) -> None:
    """Every entry of the format present with its type; the version one this code reads."""
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} holds a {type(state).__name__}, not a checkpoint dict; {_FIX_DAMAGED}"
        )
    version = state.get("version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}; this code reads version "
            f"{FORMAT_VERSION}. Evaluate or resume it with the version of the code that wrote it"
        )
    missing = [k for k in _LAYOUT if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks the entries {missing} of a checkpoint; {_FIX_DAMAGED}")
    for key, (kind, what) in _LAYOUT.items():
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(
                f"{path}: entry {key!r} ({what}) is a {type(value).__name__}; {_FIX_DAMAGED}"
            )
    if state["step"] < 0:
        raise CheckpointError(f"{path}: negative meta-step count {state['step']}; {_FIX_DAMAGED}")
    learner = state["learner"]
    if not isinstance(learner.get("params"), dict) or not isinstance(
        learner.get("optimizer"), dict
    ):
        raise CheckpointError(
            f"{path}: entry 'learner' lacks its 'params' or 'optimizer' dict; {_FIX_DAMAGED}"
        )


def check_learner_state(
    learner_state: Mapping[str, Any], params: Mapping[str, torch.Tensor], path: Path
) -> None:
    """Strict fit of a checkpoint's ``learner`` entry to a model's parameters ``params``.

    Every parameter must be present, none extra, each with the model's shape and dtype, and the
    Adam state must have one entry per parameter with moment tensors of that shape. Loading
    copies tensors with ``copy_``, which would silently broadcast a wrong shape and leave a
    missing parameter at its random initialisation, so both are refused here.
    """
    saved = learner_state["params"]
    fix = "it was written for another model: pass its own config, or retrain"
    missing = sorted(set(params) - set(saved))
    extra = sorted(set(saved) - set(params))
    if missing or extra:
        parts = ([f"lacks parameters {missing}"] if missing else []) + (
            [f"has unknown parameters {extra}"] if extra else []
        )
        raise CheckpointError(f"{path} {' and '.join(parts)} of this model; {fix}")
    for name, ref in params.items():
        got = saved[name]
        if not isinstance(got, torch.Tensor):
            raise CheckpointError(f"{path}: parameter {name!r} is not a tensor; {_FIX_DAMAGED}")
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise CheckpointError(
                f"{path}: parameter {name!r} has shape {tuple(got.shape)} ({got.dtype}), the "
                f"model built from its config has {tuple(ref.shape)} ({ref.dtype}); {fix}"
            )
    _check_adam_state(learner_state["optimizer"], list(params.values()), path)


def _check_adam_state(opt: Mapping[str, Any], params: list[torch.Tensor], path: Path) -> None:
    groups, state = opt.get("param_groups"), opt.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: the optimizer state lacks 'param_groups' or 'state'; {_FIX_DAMAGED}"
        )
    indices = [i for g in groups if isinstance(g, dict) for i in g.get("params", [])]
    if sorted(indices) != list(range(len(params))):
        raise CheckpointError(
            f"{path}: the optimizer state covers {len(indices)} parameters, the model has "
            f"{len(params)}; {_FIX_DAMAGED}"
        )
    for index, entry in state.items():
        if (
            not isinstance(index, int)
            or not 0 <= index < len(params)
            or not isinstance(entry, dict)
        ):
            raise CheckpointError(
                f"{path}: the optimizer state has an entry for parameter {index!r}, which the "
                f"model does not have; {_FIX_DAMAGED}"
            )
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            moment = entry.get(key)
            if moment is not None and (
                not isinstance(moment, torch.Tensor) or moment.shape != params[index].shape
            ):
                raise CheckpointError(
                    f"{path}: Adam's {key} of parameter {index} does not have the parameter's "
                    f"shape {tuple(params[index].shape)}; {_FIX_DAMAGED}"
                )


def read_metrics(path: Path, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (``[]`` if absent).

    A torn final line, left by a process killed while appending it, is dropped (with a note to
    ``warn``): nothing depends on it, and the resumed run writes that interval again. A broken
    line anywhere else means the file was edited or damaged, and is refused with its line number.
    """
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline, else the unterminated last line
    out = []
    for number, raw in enumerate(lines, start=1):
        if raw.strip():
            out.append(_metrics_record(raw, path, number))
    if tail.strip():
        try:
            out.append(_metrics_record(tail, path, len(lines) + 1))
        except RunError:
            if warn is not None:
                warn(
                    f"{path}: dropped a torn final line {len(lines) + 1} (a write was "
                    "interrupted); the run's checkpoint is unaffected"
                )
    return out


def _metrics_record(raw: bytes, path: Path, number: int) -> dict[str, Any]:
    try:
        record = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        why = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
        raise RunError(
            f"{path}, line {number}: not a JSON record ({why}); delete that line (the checkpoint "
            "does not depend on this file) and run again"
        ) from None
    if not isinstance(record, dict):
        raise RunError(
            f"{path}, line {number}: a {type(record).__name__}, not a JSON object; delete that "
            "line (the checkpoint does not depend on this file) and run again"
        )
    return record
