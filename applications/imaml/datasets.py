"""Dataset dispatch of the iMAML application: a dataset name becomes images or a task sampler.

This module sits above the readers (:mod:`~applications.imaml.omniglot`,
:mod:`~applications.imaml.glyphs`, :mod:`~applications.imaml.sinusoid`) and
:mod:`~applications.imaml.tasks`: it owns the names of the datasets and their splits
(:data:`DATASETS`, :func:`dataset_splits`), :func:`load_dataset`, the single entry point for the
image datasets, and :func:`task_sampler`, which picks the sampler a dataset needs.

Example:
    >>> from applications.imaml.datasets import load_dataset
    >>> from applications.imaml.tasks import TaskSampler
    >>> images = load_dataset("glyphs", "train")                        # doctest: +SKIP
    >>> sampler = TaskSampler(images, ways=5, shots=1, queries=15, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from .sinusoid import SinusoidSampler
from .tasks import TaskSampler, check_positive_int

__all__ = ["DATASETS", "dataset_splits", "load_dataset", "task_sampler"]

#: Dataset names accepted by :func:`load_dataset`, with their splits.
DATASETS: dict[str, tuple[str, ...]] = {
    "omniglot": ("train", "val", "test"),
    "omniglot-lake": ("background", "evaluation"),
    "glyphs": ("train", "val", "test"),
}


def dataset_splits(dataset: str) -> tuple[str, str | None, str]:
    """``(train, val, test)`` split names of ``dataset`` (``val`` is ``None`` for
    ``"omniglot-lake"``, whose background / evaluation split has no validation part)."""
    if dataset == "omniglot-lake":
        return "background", None, "evaluation"
    return "train", "val", "test"


def task_sampler(
    dataset: str,
    split: str | None,
    *,
    ways: int,
    shots: int,
    queries: int,
    seed: int,
    data_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    alphabet_tasks: float = 0.0,
) -> Any:
    """The seeded sampler of ``dataset``'s tasks: a
    :class:`~applications.imaml.sinusoid.SinusoidSampler` for ``"sinusoid"`` (``split`` and
    ``ways`` unused), else a :class:`~applications.imaml.tasks.TaskSampler` over
    :func:`load_dataset` ``(dataset, split)`` moved to ``device``. With ``alphabet_tasks > 0``
    (``"omniglot-lake"`` only) that share of the tasks draws its classes from one alphabet,
    as Lake et al.'s one-shot runs do."""
    if dataset == "sinusoid":
        return SinusoidSampler(shots, queries, seed=seed)
    assert split is not None
    if alphabet_tasks > 0:
        if dataset != "omniglot-lake":
            raise ValueError(
                f"alphabet_tasks applies to dataset 'omniglot-lake' (tasks within one "
                f"alphabet, like Lake et al.'s runs), not {dataset!r}"
            )
        from . import omniglot

        chars = omniglot.load_omniglot_archive(split, data_dir=data_dir)
        names = sorted(set(chars.alphabets))
        groups = torch.tensor([names.index(a) for a in chars.alphabets], dtype=torch.int64)
        return TaskSampler(
            chars.images.to(device),
            ways,
            shots,
            queries,
            seed=seed,
            groups=groups,
            group_tasks=alphabet_tasks,
        )
    images = load_dataset(dataset, split, data_dir=data_dir).to(device)
    return TaskSampler(images, ways, shots, queries, seed=seed)


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int | None = None,
    val_classes: int | None = None,
    download: bool | None = None,
    image_size: int = 28,
) -> Tensor:
    """Load one split of a few-shot image dataset as a ``uint8`` tensor ``[C, M, 1, S, S]``.

    Args:
        name: ``"omniglot"`` (iMAML paper protocol: 1623 characters permuted with a fixed seed,
            1200 meta-train / 423 meta-test, a validation carve-out from the meta-train classes;
            splits ``"train"``, ``"val"``, ``"test"``), ``"omniglot-lake"`` (Lake et al.'s
            background / evaluation alphabets; splits ``"background"``, ``"evaluation"``) or
            ``"glyphs"`` (the embedded font-glyph dataset, no download; splits ``"train"``,
            ``"val"``, ``"test"``).
        split: split name, see ``name``.
        data_dir: Omniglot directory (zips or extracted folders); default ``$BILEVEL_OMNIGLOT_DIR``,
            then the cache directory. Ignored by ``"glyphs"``.
        cache_dir: cache directory; default ``$BILEVEL_CACHE_DIR``, else ``~/.cache/bilevel``.
        seed: class-split seed (``"omniglot"``: the permutation of the 1623 characters, default
            :data:`~applications.imaml.omniglot.PAPER_SPLIT_SEED`; ``"glyphs"``: the split and the
            rendering, default 0). Not accepted by ``"omniglot-lake"`` (its split is fixed).
        val_classes: validation classes carved out of the meta-train classes (``"omniglot"``:
            default 100 of the 1200; ``"glyphs"``: default 10% of the classes); 0 allowed.
        download: allow downloading Omniglot when it is not found (default: yes unless
            ``$BILEVEL_OFFLINE`` is set).
        image_size: side of the square images (28 in the papers).

    Returns:
        ``uint8`` tensor ``[C, M, 1, image_size, image_size]``; 255 = ink. ``M`` is 20 for all.

    Raises:
        ValueError: unknown ``name`` or ``split``, or an invalid option.
        FileNotFoundError: Omniglot is not found and cannot be downloaded.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset name {name!r}; expected one of {sorted(DATASETS)}")
    if split not in DATASETS[name]:
        raise ValueError(
            f"unknown split {split!r} for dataset {name!r}; expected one of {DATASETS[name]}"
        )
    image_size = check_positive_int("image_size", image_size)
    if name == "glyphs":
        # The readers are imported when a dataset is loaded (omniglot needs PIL, glyphs
        # fontTools and PIL), not when the trainer is.
        from .glyphs import load_glyphs

        kwargs: dict[str, Any] = {"cache_dir": cache_dir, "image_size": image_size}
        if seed is not None:
            kwargs["seed"] = seed
        if val_classes is not None:
            kwargs["val_classes"] = val_classes
        return load_glyphs(split, **kwargs)

    from . import omniglot

    common: dict[str, Any] = {
        "data_dir": data_dir,
        "cache_dir": cache_dir,
        "download": download,
        "image_size": image_size,
    }
    if name == "omniglot-lake":
        if seed is not None or val_classes is not None:
            raise ValueError(
                "seed and val_classes do not apply to 'omniglot-lake' (Lake et al.'s "
                "background/evaluation split is fixed)"
            )
        return omniglot.load_omniglot_archive(split, **common).images
    kwargs = {}
    if seed is not None:
        kwargs["seed"] = seed
    if val_classes is not None:
        kwargs["val_classes"] = val_classes
    return omniglot.load_omniglot_paper_split(split, **kwargs, **common)
