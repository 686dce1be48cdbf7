"""The processes of one data-parallel run: who they are, how they agree and how they fail.

``torchrun --standalone --nproc_per_node=N -m applications.imaml train ...`` starts ``N``
copies of the trainer; :func:`team_from_env` turns the launcher's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) into a :class:`Team` and
initialises the default process group. Without those variables (a plain ``python -m``) the
team is one process and nothing here talks to anyone.

What the team promises the trainer:

* **One meta-batch, split.** Every rank draws the *same* meta-batch from the same seeded task
  stream and keeps the contiguous shard :meth:`Team.shard` gives it (``bl.distributed.shard``),
  so the tasks, and their order, do not depend on the number of processes.
* **One outer step.** :meth:`Team.reduce_sum` adds the ranks' meta-gradient sums with one
  ``all_reduce`` per dtype (``bl.distributed.all_reduce_tree``); every rank then takes the same
  Adam step. :meth:`Team.check_in_sync` verifies, before each checkpoint, that the ranks'
  meta-parameters are still bit-for-bit equal.
* **Agreement before acting.** :meth:`Team.agree` collects every rank's error (a busy run
  directory on rank 0, unreadable data on another node) so that all ranks stop together with
  the same message instead of the healthy ones waiting for the timeout.
* **Clear failure.** A collective that fails because another process died, or that times out
  because one stopped answering, raises :class:`RankFailure` naming this rank, the operation and
  the timeout; the trainer adds where the last (intact) checkpoint is.

Backend: :func:`bilevel.distributed.default_backend`, ``gloo`` for CPU tensors and ``nccl``
for CUDA tensors where CUDA is available (``"cpu:gloo,cuda:nccl"``), so the choice follows
the device of the run without being known before the configuration is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import torch

import bilevel as bl

from .rundir import RunError

__all__ = [
    "DEFAULT_TIMEOUT",
    "ENV_VARS",
    "RankFailure",
    "Team",
    "shard_batch",
    "team_from_env",
]

#: Seconds a collective may wait for the other ranks before the run stops with a
#: :class:`RankFailure` (``--dist-timeout``). Long enough for rank 0 to write a checkpoint and
#: run a validation while the others wait at the next collective.
DEFAULT_TIMEOUT = bl.distributed.DEFAULT_TIMEOUT

#: The launcher's variables read by :func:`team_from_env` (``torchrun`` sets them all).
ENV_VARS = bl.distributed.ENV_VARS


class RankFailure(RunError):
    """A collective failed: another process of the job died or did not answer in time."""


def shard_batch(batch: Any, part: slice) -> Any:
    """The tasks ``part`` of a task batch (every tensor field sliced along its first axis)."""
    changes = {
        f.name: getattr(batch, f.name)[part]
        for f in dataclasses.fields(batch)
        if isinstance(getattr(batch, f.name), torch.Tensor)
    }
    return dataclasses.replace(batch, **changes)


@dataclasses.dataclass
class Team:
    """This process's place in the run: rank, number of processes, backend, timeout.

    ``Team()`` is the one-process team: every method is then a local no-op, so the trainer has
    one code path.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run directory and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    # -- failure --------------------------------------------------------------------------

    @contextlib.contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Turn a failed or timed-out collective inside the block into a :class:`RankFailure`."""
        try:
            yield
        except RuntimeError as err:  # DistBackendError, gloo/NCCL errors, store timeouts
            if not self.distributed or isinstance(err, RunError):
                raise
            cause = _first_line(err)
            kind = (
                "did not answer in time"
                if "timeout" in cause.lower() or "timed out" in cause.lower()
                else "died or closed its connection"
            )
            raise RankFailure(
                f"{self.describe()}: {what} failed: another process of this job {kind} "
                f"(timeout {self.timeout:g} s; {cause})"
            ) from err

    # -- work split -----------------------------------------------------------------------

    def part(self, n: int, chunk: int | None = None) -> slice:
        """This rank's contiguous shard of ``n`` items, made of whole chunks of ``chunk``.

        Without ``chunk`` the items themselves are shared out (:func:`bilevel.distributed.shard`).
        With it, the ``⌈n / chunk⌉`` chunks ``[0, chunk), [chunk, 2·chunk), …`` are, so that
        every vmapped call of a rank computes exactly the tasks (and as many) that one process
        computing all ``n`` in chunks of ``chunk`` does; ranks beyond the number of chunks get
        an empty slice.
        """
        if chunk is None:
            return bl.distributed.shard(n, rank=self.rank, world_size=self.world_size)
        if chunk < 1:
            raise ValueError(f"chunk must be a positive number of items, got {chunk!r}")
        chunks = bl.distributed.shard(-(-n // chunk), rank=self.rank, world_size=self.world_size)
        return slice(min(chunks.start * chunk, n), min(chunks.stop * chunk, n))

    def shard(self, batch: Any, chunk: int | None = None) -> Any:
        """This rank's tasks (whole chunks of ``chunk``) of a meta-batch every rank drew alike."""
        if not self.distributed:
            return batch
        return shard_batch(batch, self.part(int(batch.support_x.shape[0]), chunk))

    # -- collectives ----------------------------------------------------------------------

    def reduce_sum(self, tree: Any, what: str = "an all-reduce") -> Any:
        """``bl.distributed.all_reduce_tree(tree, "sum")``, failing with a :class:`RankFailure`."""
        if not self.distributed:
            return tree
        with self.collective(what):
            return bl.distributed.all_reduce_tree(tree, op="sum")

    def broadcast(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj`` on every rank (pickled by ``torch.distributed``: peers trust rank 0).

        Used only for plain data rank 0 has already validated (a configuration, a checkpoint
        read with ``weights_only=True``).
        """
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        with self.collective(what):
            torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_tree(self, tree: Any, what: str) -> Any:
        if not self.distributed:
            return tree
        with self.collective(what):
            return bl.distributed.broadcast_tree(tree, src=0)

    def agree(self, error: BaseException | None, what: str) -> None:
        """Stop every rank if any rank failed ``what``; the failing rank re-raises its own error.

        Every rank calls it at the same point with its exception (or ``None``). A rank that
        failed raises ``error`` itself; the others raise a :class:`RunError` quoting the first
        failure, so the job ends at once with one reason instead of a timeout.
        """
        if not self.distributed:
            if error is not None:
                raise error
            return
        mine = None if error is None else f"{type(error).__name__}: {error}"
        gathered: list[Any] = [None] * self.world_size
        with self.collective(what):
            torch.distributed.all_gather_object(gathered, mine)
        if error is not None:
            raise error
        for rank, message in enumerate(gathered):
            if message is not None:
                raise RunError(
                    f"{self.describe()}: stopping because rank {rank} failed {what}: {message}"
                )

    def any(self, flag: bool, what: str) -> bool:
        """Whether ``flag`` is true on any rank (one tiny collective)."""
        if not self.distributed:
            return flag
        with self.collective(what):
            t = bl.distributed.all_reduce_tree(torch.tensor([int(flag)]), op="max")
        return bool(t.item())

    def check_in_sync(self, params: dict[str, torch.Tensor], what: str) -> None:
        """Raise unless every rank holds bit-for-bit the same meta-parameters.

        One ``all_reduce`` (max) of ``(θ, −θ)``: all ranks agree exactly when the maximum of θ
        equals minus the maximum of −θ, element by element (NaNs compare equal).
        """
        if not self.distributed:
            return
        both = {"hi": params, "lo": {k: -v for k, v in params.items()}}
        with self.collective(what):
            red = bl.distributed.all_reduce_tree(both, op="max")
        for k, hi in red["hi"].items():
            lo = -red["lo"][k]
            if not torch.allclose(hi, lo, rtol=0.0, atol=0.0, equal_nan=True):
                gap = float((hi - lo).abs().nan_to_num(0.0).max())
                raise RunError(
                    f"{self.describe()}: {what}: the ranks' meta-parameter {k!r} differs (by up "
                    f"to {gap:.3g}); every rank must take the same outer step. Check that all "
                    "ranks run the same code and torch version, then --resume from the last "
                    "checkpoint"
                )

    def close(self) -> None:
        """Leave the process group (after a normal end only: a broken group may not answer)."""
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def team_from_env(timeout: float = DEFAULT_TIMEOUT) -> Team:
    """The team the launcher started this process in, with its process group initialised.

    Reads ``WORLD_SIZE``: absent or ``1`` gives the one-process :class:`Team` (no process
    group). Otherwise :func:`bilevel.distributed.init_from_env` joins the default group
    (``env://``: ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``; backend ``gloo``, plus ``nccl``
    for CUDA tensors where CUDA is available) with a ``timeout``-second limit on every
    collective, unless the caller initialised one already.

    Args:
        timeout: seconds a collective waits for the other ranks (``--dist-timeout``).

    Returns:
        This process's :class:`Team`.

    Raises:
        ValueError: ``timeout`` is not positive.
        RunError: a launcher variable is missing or not an integer, or the rendezvous failed
            (the message names the variables and the launcher to use).
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        try:
            if "WORLD_SIZE" not in os.environ or _world_from_env() == 1:
                return Team(timeout=timeout)
            bl.distributed.init_from_env(timeout)
        except ValueError as err:  # a launcher variable: missing or not an integer
            raise RunError(str(err)) from err
        except RuntimeError as err:
            raise RunError(
                f"rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}: could not "
                f"join the process group at {os.environ.get('MASTER_ADDR')}:"
                f"{os.environ.get('MASTER_PORT')} ({_first_line(err)}); check that every rank "
                "was started with the same rendezvous settings"
            ) from err
    world = dist.get_world_size()
    if world == 1:
        return Team(timeout=timeout)
    return Team(
        rank=dist.get_rank(),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend=str(dist.get_backend()),
        timeout=timeout,
    )


def _world_from_env() -> int:
    """``$WORLD_SIZE`` as an integer; a bad value is a ``ValueError`` naming the launcher."""
    value = os.environ["WORLD_SIZE"]
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"$WORLD_SIZE={value!r} is not an integer; launch with torchrun (it sets "
            f"{', '.join(ENV_VARS)})"
        ) from None
