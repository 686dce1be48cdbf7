"""Shared plumbing of the data layer: the cache directory, atomic writes, cache keys.

Decoded datasets are stored as ``torch.save`` files of plain tensors, strings and numbers, written
to a temporary file in the destination directory and renamed into place, so a crash or a
concurrent writer can never leave a half-written cache file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CACHE_ENV",
    "OFFLINE_ENV",
    "DataFileError",
    "atomic_write",
    "cache_root",
    "default_workers",
    "load_cache_file",
    "offline",
    "parallel_map",
    "save_cache_file",
    "stable_digest",
]

#: Environment variable naming the cache directory (default ``~/.cache/bilevel``).
CACHE_ENV = "BILEVEL_CACHE_DIR"
#: Environment variable that forbids downloads when set to ``1``, ``true``, ``yes`` or ``on``.
OFFLINE_ENV = "BILEVEL_OFFLINE"


class DataFileError(ValueError):
    """A data file (an archive, a member of it, an image) is damaged or not what it claims.

    The message is one line naming the file (and the member), what is wrong and the fix. A
    ``ValueError``, so callers that handled bad data before keep working.
    """


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``cache_dir``, else ``$BILEVEL_CACHE_DIR``, else ``~/.cache/bilevel``.

    The directory is not created here; writers create it when they need it.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/bilevel").expanduser()


def offline() -> bool:
    """Whether ``$BILEVEL_OFFLINE`` forbids network access."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def stable_digest(*parts: Any) -> str:
    """Hex SHA-256 of a JSON rendering of ``parts`` (for cache keys)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    The rename is atomic on POSIX and Windows (``os.replace``); on any error the temporary
    file is removed and the error propagates.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_cache_file(path: Path, payload: dict[str, Any]) -> bool:
    """Atomically ``torch.save`` ``payload`` to ``path``; warn (not fail) if it is unwritable.

    Returns:
        Whether the file was written.
    """
    try:
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    except OSError as err:
        warnings.warn(
            f"could not write the dataset cache {path} ({err}); the data will be decoded again "
            f"next time. Set {CACHE_ENV} to a writable directory to enable caching.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def load_cache_file(path: Path) -> dict[str, Any] | None:
    """Load a cache file written by :func:`save_cache_file`; ``None`` if absent or unreadable."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated or foreign file: rebuild it
        return None
    return payload if isinstance(payload, dict) else None


def default_workers() -> int:
    """Worker processes for decoding / rendering: the usable CPUs, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def parallel_map(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int) -> list[Any]:
    """``[fn(job) for job in jobs]``, in worker processes when ``workers > 1``.

    Uses the ``fork`` start method where available: the workers need only PIL and numpy and
    start in milliseconds instead of re-importing torch.
    """
    if workers <= 1 or len(jobs) <= 1:
        return [fn(job) for job in jobs]
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
        return list(pool.map(fn, jobs))
