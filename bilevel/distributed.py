"""Collectives on trees for data-parallel bilevel training under ``torch.distributed``.

A data-parallel meta-step splits the tasks of one meta-batch across processes: each process
solves its tasks' inner problems and backward linear systems locally, and only the resulting
meta-gradient (a tree of tensors shaped like the meta-parameters) crosses the network. This
module is that last step and nothing else, so it works with any launcher (``torchrun``, SLURM,
``torch.multiprocessing``) and any training loop:

* ``all_reduce_tree`` reduces a tree (``dict`` / ``list`` / ``tuple`` of tensors) across
  the processes with **one collective per (device, dtype)**: the leaves are packed into one
  flat buffer per dtype, reduced, and unpacked. A 20-leaf conv4 meta-gradient costs one
  ``all_reduce``, not twenty.
* ``broadcast_tree`` sends rank ``src``'s tree to every process (e.g. the initial
  meta-parameters).
* ``shard`` is the contiguous slice of ``n`` items that one rank owns, so that every rank
  can draw the *same* meta-batch from one seeded stream and take its own part of it.
* ``init_from_env`` joins the process group a launcher (``torchrun``) describes in the
  environment, with the backend ``default_backend`` picks (``gloo`` for CPU tensors, plus
  ``nccl`` for CUDA tensors where CUDA is available) and a timeout on every collective.

Without an initialised process group, or with a group of one process, every function here is a
**documented no-op** (the tree is returned as given, ``shard`` returns ``slice(0, n)``): the
same script runs under ``python`` and under ``torchrun``. The collectives are not recorded by
autograd (their results carry no gradient history) and do not run under ``torch.func``
transforms; call them on concrete tensors, between meta-gradient and optimiser step.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .tree import Tree

__all__ = [
    "DEFAULT_TIMEOUT",
    "ENV_VARS",
    "OPS",
    "all_reduce_tree",
    "broadcast_tree",
    "default_backend",
    "init_from_env",
    "is_distributed",
    "rank",
    "shard",
    "world_size",
]

#: Reductions accepted by ``all_reduce_tree``.
OPS = ("sum", "mean", "max", "min")

#: Seconds ``init_from_env`` lets a collective wait for the other processes by default.
DEFAULT_TIMEOUT = 600.0

#: The launcher's variables ``init_from_env`` reads (``torchrun`` sets them all).
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def default_backend() -> str:
    """The backend for a process group of this machine's tensors.

    Returns:
        ``"cpu:gloo,cuda:nccl"`` where CUDA and NCCL are available (CPU tensors and the object
        collectives go through ``gloo``, CUDA tensors through ``nccl``), else ``"gloo"``.
    """
    import torch.distributed as dist

    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(
            f"${name}={value!r} is not an integer; launch with torchrun (it sets "
            f"{', '.join(ENV_VARS)})"
        ) from None


def init_from_env(timeout: float = DEFAULT_TIMEOUT, backend: str | None = None) -> bool:
    """Join the default process group that the launcher's environment describes.

    Reads ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (``torchrun`` sets
    them on every node, ``--nnodes`` / ``--rdzv-endpoint`` included) and initialises the
    default group from ``env://``. Without ``WORLD_SIZE`` (a plain ``python`` run) nothing is
    initialised, so one script runs both ways; with a group already initialised nothing
    changes.

    Args:
        timeout: seconds any collective of the group waits for the other processes before it
            raises (a dead or stuck process then ends the job instead of hanging it).
        backend: the ``torch.distributed`` backend; default ``default_backend``.

    Returns:
        Whether a process group is initialised now (False only without ``WORLD_SIZE``).

    Raises:
        ValueError: ``timeout`` is not positive, or a launcher variable is missing or not an
            integer (the message names it and the launcher to use).
        RuntimeError: ``torch.distributed`` is missing from this build, or the rendezvous
            failed (``torch.distributed``'s own error).
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ:
        return False
    world = _env_int("WORLD_SIZE")
    rank = _env_int("RANK")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world} but {', '.join('$' + v for v in missing)} not set; launch with "
            "torchrun --nproc_per_node=N (it sets them), or set them to rank 0's address and a "
            "free port"
        )
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; install one that has")
    dist.init_process_group(
        backend=backend or default_backend(),
        timeout=datetime.timedelta(seconds=timeout),
        rank=rank,
        world_size=world,
    )
    return True


def _group_size(group: Any = None) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def is_distributed(group: Any = None) -> bool:
    """Whether a process group with more than one process is initialised.

    Args:
        group: the process group (default: the default group).

    Returns:
        ``True`` when ``group`` holds more than one process; ``False`` without an initialised
        process group or with a group of one.
    """
    return _group_size(group) > 1


def world_size(group: Any = None) -> int:
    """Number of processes in ``group``.

    Args:
        group: the process group (default: the default group).

    Returns:
        The group's size; 1 without an initialised process group.
    """
    return _group_size(group)


def _group_rank(group: Any = None) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def rank(group: Any = None) -> int:
    """This process's rank in ``group``.

    Args:
        group: the process group (default: the default group).

    Returns:
        The rank, in ``[0, world_size(group))``; 0 without an initialised process group.
    """
    return _group_rank(group)


def shard(n: int, *, rank: int | None = None, world_size: int | None = None) -> slice:
    """The contiguous part of ``range(n)`` owned by ``rank`` out of ``world_size`` processes.

    Shard ``r`` is ``[⌊r·n/w⌋, ⌊(r+1)·n/w⌋)``: sizes differ by at most one, concatenating the
    shards in rank order gives ``range(n)`` back, and a rank gets an empty slice when
    ``n < world_size``.

    Args:
        n: the number of items (tasks, seeds) to share out.
        rank: the rank whose shard to return (default: this process's, 0 without a group).
        world_size: the number of processes (default: the default group's, 1 without one).

    Returns:
        ``slice(⌊rank·n/w⌋, ⌊(rank+1)·n/w⌋)``; ``slice(0, n)`` for one process.

    Raises:
        ValueError: ``n < 0``, ``world_size < 1`` or ``rank`` outside ``[0, world_size)``.
    """
    r = _group_rank() if rank is None else rank
    w = _group_size() if world_size is None else world_size
    if n < 0:
        raise ValueError(f"shard: n must be >= 0, got {n}")
    if w < 1:
        raise ValueError(f"shard: world_size must be >= 1, got {w}")
    if not 0 <= r < w:
        raise ValueError(f"shard: rank must be in [0, {w}) for world_size={w}, got {r}")
    return slice(r * n // w, (r + 1) * n // w)


def _leaves_with_names(tree: Tree, name: str) -> tuple[list[torch.Tensor], Any, list[str]]:
    """Leaves, structure and a readable path per leaf (``tree['grads']['w']``) for errors."""
    if isinstance(tree, torch.Tensor):
        leaves, spec = pytree.tree_flatten(tree)
        return leaves, spec, [name]
    with_path, spec = pytree.tree_flatten_with_path(tree)
    names = [name + pytree.keystr(path) for path, _ in with_path]
    leaves = [leaf for _, leaf in with_path]
    for leaf, leaf_name in zip(leaves, names, strict=True):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{leaf_name} is a {type(leaf).__name__}; {name} must be a tensor or a tree "
                "(dict / list / tuple) of tensors. Convert it with torch.as_tensor"
            )
    return leaves, spec, names


def _wire_dtype(leaf: torch.Tensor, op: str, leaf_name: str) -> torch.dtype:
    """The dtype a leaf travels in: its own, complex as its real pair, bool as uint8."""
    if leaf.dtype == torch.bool:
        if op in ("max", "min"):
            return torch.uint8  # max = logical or, min = logical and
        raise TypeError(
            f"{leaf_name} is a bool tensor; op={op!r} is not defined on bools. Use op='max' "
            "(any) or op='min' (all), or convert it with .long() to count"
        )
    if op == "mean" and not (leaf.is_floating_point() or leaf.is_complex()):
        raise TypeError(
            f"{leaf_name} has dtype {leaf.dtype}; op='mean' needs floating-point or complex "
            "leaves (an integer mean would be truncated). Use op='sum' and divide by "
            "world_size() yourself, or convert the leaf to floating point"
        )
    if leaf.is_complex():
        if op in ("max", "min"):
            raise TypeError(f"{leaf_name} is complex; op={op!r} needs real leaves")
        return leaf.real.dtype
    return leaf.dtype


def _buckets(
    leaves: list[torch.Tensor], op: str, names: list[str]
) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Leaf indices grouped by (device, wire dtype), in leaf order (one collective each)."""
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, leaf in enumerate(leaves):
        key = (leaf.device, _wire_dtype(leaf, op, names[i]))
        buckets.setdefault(key, []).append(i)
    return buckets


def _pack(leaf: torch.Tensor, wire: torch.dtype) -> torch.Tensor:
    if leaf.is_complex():
        return torch.view_as_real(leaf.resolve_conj()).reshape(-1)
    return leaf.reshape(-1).to(wire)


def _unpack(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.is_complex():
        # view_as_complex needs an even storage offset; a chunk after an odd-length float
        # leaf of the same bucket has an odd one, so the complex leaf gets its own storage.
        pairs = flat.reshape(*like.shape, 2)
        if pairs.storage_offset() % 2:
            pairs = pairs.clone()
        return torch.view_as_complex(pairs)
    return flat.reshape(like.shape).to(like.dtype)


def all_reduce_tree(tree: Tree, op: str = "mean", *, group: Any = None) -> Tree:
    """Reduce every leaf of ``tree`` element-wise across the processes of ``group``.

    Every process must call it with a tree of the same structure, shapes and dtypes (the usual
    ``torch.distributed`` contract; a mismatch is not detected and gives wrong values or a
    hang until the group's timeout). The leaves are packed into one flat buffer per
    (device, dtype) and reduced with one ``torch.distributed.all_reduce`` each; ``mean`` is a
    sum divided by the group size (the ``AVG`` op exists only on NCCL). Complex leaves travel
    as their real and imaginary parts, bool leaves as ``uint8``.

    Args:
        tree: a tensor or a nested ``dict`` / ``list`` / ``tuple`` of tensors. Leaves must live
            where the backend reduces them (CPU for ``gloo``, CUDA for ``nccl``).
        op: ``"mean"`` (floating-point and complex leaves), ``"sum"``, ``"max"`` or ``"min"``
            (real leaves; on bools ``max`` is logical *or*, ``min`` logical *and*).
        group: the process group (default: the default group).

    Returns:
        A new tree of the same structure, dtypes and devices holding the reduced values,
        identical on every process; the input is not modified. Leaves may be views of one
        shared buffer and carry no autograd history. Without an initialised process group, or
        with a group of one process, ``tree`` itself is returned unchanged (no copy, no
        collective), after the same argument checks.

    Raises:
        ValueError: unknown ``op``.
        TypeError: a leaf that is not a tensor, ``op="mean"`` on an integer or bool leaf, a
            bool leaf with ``op="sum"``, or ``max`` / ``min`` on a complex leaf; the message
            names the leaf.
    """
    if op not in OPS:
        raise ValueError(f"all_reduce_tree: op must be one of {OPS}, got {op!r}")
    leaves, spec, names = _leaves_with_names(tree, "tree")
    buckets = _buckets(leaves, op, names)
    size = _group_size(group)
    if size == 1 or not leaves:
        return tree
    import torch.distributed as dist

    reduce_op = {
        "sum": dist.ReduceOp.SUM,
        "mean": dist.ReduceOp.SUM,
        "max": dist.ReduceOp.MAX,
        "min": dist.ReduceOp.MIN,
    }[op]
    out: list[torch.Tensor | None] = [None] * len(leaves)
    with torch.no_grad():
        for (_device, wire), indices in buckets.items():
            parts = [_pack(leaves[i].detach(), wire) for i in indices]
            # torch.cat copies even a single part: the input tree is never reduced in place.
            flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
            dist.all_reduce(flat, op=reduce_op, group=group)
            if op == "mean":
                flat.div_(size)
            chunks = flat.split([p.numel() for p in parts])
            for i, chunk in zip(indices, chunks, strict=True):
                out[i] = _unpack(chunk, leaves[i])
    return pytree.tree_unflatten(out, spec)


def broadcast_tree(tree: Tree, src: int = 0, *, group: Any = None) -> Tree:
    """Every process receives rank ``src``'s values of ``tree`` (one collective per dtype).

    Every process passes a tree of the same structure, shapes and dtypes (its values are
    ignored except on ``src``).

    Args:
        tree: a tensor or a nested ``dict`` / ``list`` / ``tuple`` of tensors, on the device
            the backend sends from (CPU for ``gloo``, CUDA for ``nccl``).
        src: the global rank whose values everyone receives, as in
            ``torch.distributed.broadcast``.
        group: the process group (default: the default group).

    Returns:
        A new tree holding ``src``'s values (no autograd history); without an initialised
        process group, or with one process, ``tree`` itself.

    Raises:
        TypeError: a leaf that is not a tensor (the message names it).
    """
    leaves, spec, names = _leaves_with_names(tree, "tree")
    if _group_size(group) == 1 or not leaves:
        return tree
    import torch.distributed as dist

    out: list[torch.Tensor | None] = [None] * len(leaves)
    with torch.no_grad():
        # "sum" only decides the wire dtype here (bool -> refused, so map bools by hand).
        buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, leaf in enumerate(leaves):
            wire = torch.uint8 if leaf.dtype == torch.bool else _wire_dtype(leaf, "sum", names[i])
            buckets.setdefault((leaf.device, wire), []).append(i)
        for (_device, wire), indices in buckets.items():
            parts = [_pack(leaves[i].detach(), wire) for i in indices]
            flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
            dist.broadcast(flat, src=src, group=group)
            for i, chunk in zip(indices, flat.split([p.numel() for p in parts]), strict=True):
                out[i] = _unpack(chunk, leaves[i])
    return pytree.tree_unflatten(out, spec)
