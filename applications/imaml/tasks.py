"""Few-shot tasks: the :class:`TaskBatch` interface and the seeded N-way K-shot sampler
:class:`TaskSampler`.

The datasets the sampler draws from are loaded by
:func:`applications.imaml.datasets.load_dataset` (the readers import this module, never the
other way round).

Image datasets are tensors ``[C, M, 1, H, W]``: ``C`` classes, ``M`` instances per class. They are
stored as ``uint8`` (0 = background, 255 = ink); the sampler returns ``float32`` in ``[0, 1]`` with
strokes = 1.

Example:
    >>> from applications.imaml.datasets import load_dataset
    >>> from applications.imaml.tasks import TaskSampler
    >>> images = load_dataset("glyphs", "train")                        # doctest: +SKIP
    >>> sampler = TaskSampler(images, ways=5, shots=1, queries=15, seed=0)  # doctest: +SKIP
    >>> batch = sampler.sample(16)                                      # doctest: +SKIP
    >>> batch.support_x.shape, batch.query_y.shape                      # doctest: +SKIP
    (torch.Size([16, 5, 1, 28, 28]), torch.Size([16, 75]))
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "TaskBatch",
    "TaskSampler",
    "check_int",
    "check_positive_int",
]


@dataclass
class TaskBatch:
    """A batch of ``B`` few-shot tasks.

    Classification (:class:`TaskSampler`): ``support_x`` ``[B, N*K, 1, H, W]`` float32 in
    ``[0, 1]``, ``support_y`` ``[B, N*K]`` int64 with labels ``0..N-1``, ``query_x``
    ``[B, N*Q, 1, H, W]``, ``query_y`` ``[B, N*Q]``. Examples are grouped by label: support
    example ``i`` has label ``i // K`` and query example ``j`` has label ``j // Q``; which class
    gets which label is random.

    Regression (:class:`~applications.imaml.sinusoid.SinusoidSampler`): ``x`` and ``y`` tensors
    ``[B, K, 1]`` and ``[B, Q, 1]``.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> TaskBatch:
        """Return a copy with every tensor field moved to ``device``."""
        changes = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **changes)

    @property
    def batch_size(self) -> int:
        """Number of tasks ``B``."""
        return int(self.support_x.shape[0])

    def task(self, index: int) -> TaskBatch:
        """Task ``index`` as a batch of one (tensors keep their leading batch dimension)."""
        changes = {
            f.name: getattr(self, f.name)[index : index + 1]
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **changes)


def check_int(name: str, value: Any) -> int:
    """Return ``value`` as an ``int`` (Python or numpy integer) or raise a ``TypeError`` naming
    ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an ``int`` or raise a ``TypeError`` / ``ValueError`` naming ``name``."""
    value = check_int(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


class SeededSampler:
    """Shared resume logic of the task samplers: one ``torch.Generator`` drives every draw.

    Subclasses set ``self._generator`` and ``self._tasks_drawn`` and implement ``_config()``
    (the settings that must match for a saved state to be meaningful).
    """

    _generator: torch.Generator
    _tasks_drawn: int

    def _config(self) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The sampler's random state (and configuration, checked on load)."""
        return {
            "generator": self._generator.get_state().clone(),
            "tasks_drawn": self._tasks_drawn,
            "config": self._config(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next ``sample`` continues that stream."""
        name = type(self).__name__
        if not isinstance(state, dict) or "generator" not in state:
            raise ValueError(f"state must be a dict produced by {name}.state_dict()")
        config = state.get("config")
        if config is not None and config != self._config():
            raise ValueError(
                f"state was saved by a sampler with config {config}, "
                f"this sampler has {self._config()}"
            )
        self._generator.set_state(state["generator"].clone())
        self._tasks_drawn = int(state.get("tasks_drawn", 0))

    @property
    def tasks_drawn(self) -> int:
        """Number of tasks drawn since construction (restored by :meth:`load_state_dict`)."""
        return self._tasks_drawn


class TaskSampler(SeededSampler):
    """Seeded N-way K-shot sampler with Q queries per class.

    Every task draws ``ways`` distinct classes, then ``shots + queries`` distinct instances of each
    (support and query never share an instance). With ``rotate=True`` each class of a task is
    rotated by ``k · 90°`` with ``k`` uniform in ``{0, 1, 2, 3}`` (drawn per class and per task), so
    rotations act as new classes, as in the iMAML/MAML Omniglot protocol.

    The random stream is a CPU ``torch.Generator``; :meth:`state_dict` / :meth:`load_state_dict`
    capture it, so a resumed run draws exactly the tasks an uninterrupted run would. With
    ``rotate=True`` the sampler keeps the four quarter turns of ``images`` (4× its memory: 75 MB
    for Omniglot's 1200 meta-train classes in ``uint8``) so that a batch is one gather.

    Args:
        images: ``[C, M, 1, H, W]`` tensor, ``uint8`` (255 = ink, scaled to ``[0, 1]``) or float
            (used as is). It may live on any device; tasks are gathered on that device.
        ways: classes per task ``N`` (``1 ≤ N ≤ C``).
        shots: support examples per class ``K``.
        queries: query examples per class ``Q`` (``K + Q ≤ M``).
        rotate: rotate each class of a task by a random multiple of 90° (needs ``H == W``).
        seed: seed of the sampler's random stream.
        groups: ``int64`` ``[C]``, a group id per class (Omniglot: its alphabet), or ``None``.
        group_tasks: probability that a task draws all its classes from one group (chosen
            with probability proportional to its size, among the groups with at least ``ways``
            classes); the other tasks draw from all classes. Lake et al.'s one-shot runs are
            20-way tasks within one alphabet, harder than tasks across alphabets: this lets
            meta-training see that structure. ``0`` (default) draws exactly the stream of a
            sampler without groups.
    """

    def __init__(
        self,
        images: Tensor,
        ways: int,
        shots: int,
        queries: int,
        *,
        rotate: bool = True,
        seed: int = 0,
        groups: Tensor | None = None,
        group_tasks: float = 0.0,
    ) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 5 or images.shape[2] != 1:
            raise ValueError(
                f"images must have shape [classes, instances, 1, H, W], got {tuple(images.shape)}"
            )
        if not (images.dtype == torch.uint8 or images.is_floating_point()):
            raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
        self.ways = check_positive_int("ways", ways)
        self.shots = check_positive_int("shots", shots)
        self.queries = check_positive_int("queries", queries)
        seed = check_int("seed", seed)
        num_classes, num_instances = int(images.shape[0]), int(images.shape[1])
        if self.ways > num_classes:
            raise ValueError(f"ways={self.ways} exceeds the {num_classes} classes available")
        if self.shots + self.queries > num_instances:
            raise ValueError(
                f"shots + queries = {self.shots} + {self.queries} exceeds the "
                f"{num_instances} instances per class"
            )
        if rotate and images.shape[-1] != images.shape[-2]:
            raise ValueError(
                f"rotate=True needs square images, got {images.shape[-2]}×{images.shape[-1]}"
            )
        if isinstance(group_tasks, bool) or not isinstance(group_tasks, int | float):
            raise TypeError(f"group_tasks must be a number in [0, 1], got {group_tasks!r}")
        if not 0.0 <= group_tasks <= 1.0:
            raise ValueError(f"group_tasks must be in [0, 1], got {group_tasks!r}")
        self.group_tasks = float(group_tasks)
        self._members: list[Tensor] = []
        if groups is not None:
            groups = torch.as_tensor(groups, dtype=torch.int64).cpu()
            if groups.shape != (num_classes,):
                raise ValueError(
                    f"groups must hold one id per class ({num_classes}), got shape "
                    f"{tuple(groups.shape)}"
                )
            members = [torch.nonzero(groups == g).flatten() for g in torch.unique(groups)]
            self._members = [m for m in members if m.numel() >= self.ways]
        if self.group_tasks > 0 and not self._members:
            raise ValueError(
                f"group_tasks={group_tasks} needs groups= with at least one group of "
                f"ways={self.ways} or more classes"
            )
        self.images = images
        self.rotate = bool(rotate)
        # [R, C, M, 1, H, W]: the four quarter turns of every image (R = 4), or just the images
        # (R = 1), so that sampling is a single gather.
        if self.rotate:
            self._source = torch.stack([torch.rot90(images, t, dims=(-2, -1)) for t in range(4)])
        else:
            self._source = images.unsqueeze(0)
        self.seed = seed
        self.num_classes = num_classes
        self.num_instances = num_instances
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)
        self._tasks_drawn = 0

    def __repr__(self) -> str:
        return (
            f"TaskSampler(classes={self.num_classes}, instances={self.num_instances}, "
            f"ways={self.ways}, shots={self.shots}, queries={self.queries}, "
            f"rotate={self.rotate}, seed={self.seed})"
        )

    def sample_indices(self, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
        """Draw the indices of ``batch_size`` tasks without gathering images.

        Returns:
            ``classes`` ``[B, N]`` (distinct per task), ``instances`` ``[B, N, K+Q]`` (distinct per
            class; the first ``K`` are the support set) and ``rotations`` ``[B, N]`` in ``0..3``
            (multiples of 90°, all zero when ``rotate=False``). All int64 on the CPU.
        """
        batch_size = check_positive_int("batch_size", batch_size)
        g = self._generator
        n, per_class = self.ways, self.shots + self.queries
        # argsort of i.i.d. uniforms = uniformly random permutations, one per row.
        classes = torch.rand(batch_size, self.num_classes, generator=g).argsort(dim=1)[:, :n]
        if self.group_tasks > 0:
            classes = self._group_classes(classes, g)
        instances = torch.rand(batch_size, n, self.num_instances, generator=g).argsort(dim=2)
        instances = instances[:, :, :per_class]
        if self.rotate:
            rotations = torch.randint(0, 4, (batch_size, n), generator=g)
        else:
            rotations = torch.zeros(batch_size, n, dtype=torch.int64)
        self._tasks_drawn += batch_size
        return classes, instances, rotations

    def _group_classes(self, classes: Tensor, g: torch.Generator) -> Tensor:
        """Replace the classes of the within-group tasks (drawn with ``group_tasks``)."""
        within = torch.rand(classes.shape[0], generator=g) < self.group_tasks
        sizes = torch.tensor([float(m.numel()) for m in self._members])
        chosen = torch.multinomial(sizes, classes.shape[0], replacement=True, generator=g)
        classes = classes.clone()
        for row in torch.nonzero(within).flatten().tolist():
            members = self._members[int(chosen[row])]
            pick = torch.rand(members.numel(), generator=g).argsort()[: self.ways]
            classes[row] = members[pick]
        return classes

    def sample(self, batch_size: int) -> TaskBatch:
        """Draw ``batch_size`` tasks (see :class:`TaskBatch` for shapes and label layout)."""
        classes, instances, rotations = self.sample_indices(batch_size)
        b, n, k, q = classes.shape[0], self.ways, self.shots, self.queries
        device = self._source.device
        c = classes.to(device)[:, :, None]
        r = rotations.to(device)[:, :, None]
        inst = instances.to(device)
        shape = self._source.shape[-3:]
        # One gather per set, straight into the final layout; rotations are pre-computed.
        support = self._source[r, c, inst[:, :, :k]].reshape(b, n * k, *shape)
        query = self._source[r, c, inst[:, :, k:]].reshape(b, n * q, *shape)
        if support.dtype == torch.uint8:
            support = support.to(torch.float32).div_(255.0)
            query = query.to(torch.float32).div_(255.0)
        labels = torch.arange(n, device=device)
        return TaskBatch(
            support_x=support,
            support_y=labels.repeat_interleave(k).expand(b, n * k).contiguous(),
            query_x=query,
            query_y=labels.repeat_interleave(q).expand(b, n * q).contiguous(),
        )

    def _config(self) -> dict[str, Any]:
        return {
            "classes": self.num_classes,
            "instances": self.num_instances,
            "ways": self.ways,
            "shots": self.shots,
            "queries": self.queries,
            "rotate": self.rotate,
            # Only when used: states saved before within-group tasks existed stay loadable.
            **({"group_tasks": self.group_tasks} if self.group_tasks > 0 else {}),
        }
