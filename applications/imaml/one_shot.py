"""Lake et al.'s 20 one-shot classification runs (``all_runs.zip``): reader, task batch, score.

Lake, Salakhutdinov & Tenenbaum (2015) give 20 within-alphabet 20-way one-shot runs drawn from
the evaluation alphabets: per run, 20 training images (one per class), 20 test images and the
class of each test image; people make 4.5% errors. This module owns :class:`OneShotRun`,
:func:`load_one_shot_runs` (the archive is found, downloaded and decoded by
:mod:`applications.imaml.omniglot`), :func:`one_shot_task_batch`, which stacks the runs as a
:class:`~applications.imaml.tasks.TaskBatch`, and :func:`one_shot_error_rate`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .omniglot import _decode_member, _members, _open_zip, _read_member, locate_omniglot
from .tasks import TaskBatch, check_positive_int

__all__ = ["OneShotRun", "load_one_shot_runs", "one_shot_error_rate", "one_shot_task_batch"]

_RUNS = "all_runs"


@dataclass(frozen=True)
class OneShotRun:
    """One of Lake et al.'s 20-way one-shot classification runs.

    Attributes:
        run: run number (1..20).
        training: ``float32`` ``[20, 1, S, S]`` in ``[0, 1]`` (ink = 1), one image per class,
            ordered ``class01..class20``.
        test: ``float32`` ``[20, 1, S, S]``, ordered ``item01..item20``.
        labels: ``int64`` ``[20]``: the index into ``training`` of each test item's class.
    """

    run: int
    training: Tensor
    test: Tensor
    labels: Tensor


_RUN_LABEL = re.compile(r"(?:^|/)run(\d+)/class_labels\.txt$")
_RUN_ITEM = re.compile(r"test/item(\d+)\.png$")
_RUN_CLASS = re.compile(r"training/class(\d+)\.png$")


def load_one_shot_runs(
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool | None = None,
    image_size: int = 28,
) -> list[OneShotRun]:
    """Read the 20 one-shot runs of ``all_runs.zip`` (or its extracted folder), sorted by run.

    Images are decoded like the archives (LANCZOS to ``image_size``, ink = 1). ``class_labels.txt``
    lines ``runXX/test/itemII.png runXX/training/classCC.png`` give ``labels[II-1] = CC-1``.
    """
    image_size = check_positive_int("image_size", image_size)
    source = locate_omniglot((_RUNS,), data_dir=data_dir, cache_dir=cache_dir, download=download)[
        _RUNS
    ]
    names = [m[0] for m in _members(source)]
    zf = _open_zip(source)
    try:
        runs = []
        for label_file in sorted(n for n in names if _RUN_LABEL.search(n)):
            match = _RUN_LABEL.search(label_file)
            assert match is not None
            run = int(match.group(1))
            prefix = label_file[: -len("class_labels.txt")]
            text = _read_member(source, zf, label_file).decode(errors="replace")
            pairs = [line.split() for line in text.splitlines() if line.strip()]
            labels = {}
            for pair in pairs:
                if len(pair) != 2:
                    raise ValueError(f"{label_file}: malformed line {' '.join(pair)!r}")
                item, cls = _RUN_ITEM.search(pair[0]), _RUN_CLASS.search(pair[1])
                if item is None or cls is None:
                    raise ValueError(f"{label_file}: malformed line {' '.join(pair)!r}")
                labels[int(item.group(1))] = int(cls.group(1))
            n = len(labels)
            train_names = [f"{prefix}training/class{i:02d}.png" for i in range(1, n + 1)]
            test_names = [f"{prefix}test/item{i:02d}.png" for i in range(1, n + 1)]
            if sorted(labels) != list(range(1, n + 1)) or not set(labels.values()) <= set(
                range(1, n + 1)
            ):
                raise ValueError(f"{label_file}: items/classes are not numbered 1..{n}")

            def decode(members: list[str]) -> Tensor:
                arr = np.stack([_decode_member(source, zf, m, image_size) for m in members])
                return torch.from_numpy(arr).unsqueeze(1).float().div_(255.0)

            runs.append(
                OneShotRun(
                    run=run,
                    training=decode(train_names),
                    test=decode(test_names),
                    labels=torch.tensor([labels[i] - 1 for i in range(1, n + 1)]),
                )
            )
    finally:
        if zf is not None:
            zf.close()
    if not runs:
        raise ValueError(f"no runNN/class_labels.txt found in {source}")
    return sorted(runs, key=lambda r: r.run)


def one_shot_task_batch(runs: Sequence[OneShotRun]) -> TaskBatch:
    """Stack runs as a :class:`TaskBatch`: support = the 20 training images with labels
    ``0..19``, query = the 20 test items with their correct labels (20-way 1-shot, 1 query each).
    """
    if not runs:
        raise ValueError("runs must not be empty")
    support_x = torch.stack([r.training for r in runs])
    b, n = support_x.shape[:2]
    return TaskBatch(
        support_x=support_x,
        support_y=torch.arange(n).expand(b, n).contiguous(),
        query_x=torch.stack([r.test for r in runs]),
        query_y=torch.stack([r.labels for r in runs]),
    )


def one_shot_error_rate(predictions: Tensor, runs: Sequence[OneShotRun]) -> float:
    """Error rate (fraction in ``[0, 1]``) of ``predictions`` ``[R, 20]`` (training-image index
    per test item) over the runs; Lake et al. report 4.5% for people."""
    target = torch.stack([r.labels for r in runs])
    predictions = torch.as_tensor(predictions)
    if predictions.shape != target.shape:
        raise ValueError(
            f"predictions must have shape {tuple(target.shape)}, got {tuple(predictions.shape)}"
        )
    return float((predictions.cpu().long() != target).float().mean())
