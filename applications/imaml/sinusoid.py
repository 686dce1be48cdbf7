"""Sinusoid regression tasks, the toy problem of MAML (Finn, Abbeel & Levine, 2017).

A task is ``y = A · sin(x − φ)`` with amplitude ``A ~ U[0.1, 5]``, phase ``φ ~ U[0, π]`` and inputs
``x ~ U[−5, 5]``; the support set has ``K`` points and the query set ``Q`` points of the same task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .tasks import SeededSampler, TaskBatch, check_int, check_positive_int

__all__ = ["SinusoidSampler", "SinusoidTaskBatch", "sinusoid"]


def sinusoid(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
    """``amplitude · sin(x − phase)``; ``amplitude`` and ``phase`` ``[B]`` broadcast over ``x``
    ``[B, ..., 1]``."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    return amplitude.reshape(shape) * torch.sin(x - phase.reshape(shape))


@dataclass
class SinusoidTaskBatch(TaskBatch):
    """A :class:`~applications.imaml.tasks.TaskBatch` of regression tasks: ``support_x`` and
    ``support_y`` ``[B, K, 1]``, ``query_x`` and ``query_y`` ``[B, Q, 1]``, plus each task's
    ``amplitude`` and ``phase`` ``[B]`` (for plotting the true function with :func:`sinusoid`)."""

    amplitude: Tensor
    phase: Tensor


def _interval(name: str, value: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (low, high) of numbers, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"{name} must be a finite interval with low <= high, got {value!r}")
    return lo, hi


class SinusoidSampler(SeededSampler):
    """Seeded sampler of sinusoid regression tasks (same protocol as
    :class:`~applications.imaml.tasks.TaskSampler`: ``sample``, ``state_dict``,
    ``load_state_dict``).

    Args:
        shots: support points per task ``K``.
        queries: query points per task ``Q``.
        amplitude: interval of the uniform amplitude.
        phase: interval of the uniform phase.
        x_range: interval of the uniform inputs.
        seed: seed of the sampler's CPU ``torch.Generator``.
        dtype: floating dtype of the tensors.
    """

    def __init__(
        self,
        shots: int,
        queries: int,
        *,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.shots = check_positive_int("shots", shots)
        self.queries = check_positive_int("queries", queries)
        self.amplitude = _interval("amplitude", amplitude)
        self.phase = _interval("phase", phase)
        self.x_range = _interval("x_range", x_range)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.seed = check_int("seed", seed)
        self.dtype = dtype
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.seed)
        self._tasks_drawn = 0

    def __repr__(self) -> str:
        return (
            f"SinusoidSampler(shots={self.shots}, queries={self.queries}, "
            f"amplitude={self.amplitude}, phase={self.phase}, x_range={self.x_range}, "
            f"seed={self.seed})"
        )

    def _uniform(self, interval: tuple[float, float], *shape: int) -> Tensor:
        lo, hi = interval
        u = torch.rand(*shape, generator=self._generator, dtype=torch.float64)
        return (lo + (hi - lo) * u).to(self.dtype)

    def sample(self, batch_size: int) -> SinusoidTaskBatch:
        """Draw ``batch_size`` tasks."""
        b = check_positive_int("batch_size", batch_size)
        amplitude = self._uniform(self.amplitude, b)
        phase = self._uniform(self.phase, b)
        x = self._uniform(self.x_range, b, self.shots + self.queries, 1)
        y = sinusoid(x, amplitude, phase)
        self._tasks_drawn += b
        k = self.shots
        return SinusoidTaskBatch(
            support_x=x[:, :k].contiguous(),
            support_y=y[:, :k].contiguous(),
            query_x=x[:, k:].contiguous(),
            query_y=y[:, k:].contiguous(),
            amplitude=amplitude,
            phase=phase,
        )

    def _config(self) -> dict[str, Any]:
        return {
            "shots": self.shots,
            "queries": self.queries,
            "amplitude": list(self.amplitude),
            "phase": list(self.phase),
            "x_range": list(self.x_range),
            "dtype": str(self.dtype),
        }
