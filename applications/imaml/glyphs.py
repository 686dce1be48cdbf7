"""Embedded few-shot dataset: font glyphs under random distortions, no download needed.

Classes are Unicode characters that the DejaVu fonts shipped inside matplotlib
(``matplotlib.get_data_path()/fonts/ttf``) actually draw: Latin, IPA, Greek, Cyrillic, Armenian,
Hebrew, Georgian, Tifinagh, N'Ko, Lao, Canadian syllabics, arrows, mathematical operators, technical
and miscellaneous symbols, dingbats. A character becomes a class when

* the regular DejaVu Sans font maps it (checked in the font's ``cmap``, not by drawing a fallback
  box) and at least :data:`MIN_VARIANTS` of the font variants below do;
* it is not a mark, separator or control character, draws visible ink, and is not a nearly solid
  blob;
* it does not look like an already accepted class **under any rotation by a multiple of 90°**
  (``O``/``О``/``Ο`` are one class, and so are ``ᐁ``/``ᐅ``/``ᐃ``/``ᐊ``), so that the sampler's
  random 90° rotations produce genuinely new classes, as on Omniglot.

Each class gets 20 instances (like Omniglot's 20 drawers): a randomly chosen font variant (Sans,
Serif, Mono; regular, bold, oblique) fitted to a 20-pixel box, then a random affine distortion
(rotation ±20°, shear ±0.4, anisotropic scale, translation ±2 px), a smooth elastic warp and a
random stroke weight (thinner / unchanged / thicker), rendered at 2× and area-downsampled to
28×28 ``uint8`` with ink = 255, the same format as :mod:`~applications.imaml.omniglot`.

The distortions were calibrated so that a pixel-space prototype classifier is as weak here as on
Omniglot (5-way 1-shot: 54% vs 52%; 20-way 1-shot: 33% vs 33%), while a small learned embedding
reaches 94% / 83% (Omniglot: 95% / 86%) after a few CPU-minutes; see ``docs/imaml_data.md``.

Everything is determined by ``seed`` (and the installed fonts, Pillow/FreeType and torch, which
enter the cache key). Building takes a few seconds; the result is cached in ``<cache>/glyphs/``
(``$BILEVEL_CACHE_DIR`` or ``~/.cache/bilevel``) and loads in well under a second.
The class split is a seeded permutation: ``test_fraction`` of the classes for meta-test, then
``val_classes`` for validation, the rest for meta-training (pairwise disjoint).
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._cache import (
    cache_root,
    default_workers,
    load_cache_file,
    parallel_map,
    save_cache_file,
    stable_digest,
)
from .tasks import check_int, check_positive_int

__all__ = [
    "BLOCKS",
    "FONT_VARIANTS",
    "MIN_VARIANTS",
    "GlyphDataset",
    "build_glyph_dataset",
    "font_directory",
    "glyph_split",
    "load_glyph_dataset",
    "load_glyphs",
    "select_codepoints",
]

#: Font files (inside matplotlib's data directory) used as "drawers"; the first one defines the
#: canonical shape used to select and de-duplicate classes.
FONT_VARIANTS: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
)
#: A character must be drawn by at least this many of :data:`FONT_VARIANTS`.
MIN_VARIANTS = 3
#: Unicode ranges scanned for classes, in priority order (earlier blocks win de-duplication).
BLOCKS: tuple[tuple[str, int, int], ...] = (
    ("Basic Latin", 0x0021, 0x007E),
    ("Latin-1 Supplement", 0x00A1, 0x00FF),
    ("Greek", 0x0370, 0x03FF),
    ("Cyrillic", 0x0400, 0x052F),
    ("Armenian", 0x0531, 0x058A),
    ("Georgian", 0x10A0, 0x10FF),
    ("Hebrew", 0x05D0, 0x05EA),
    ("Latin Extended-A/B", 0x0100, 0x024F),
    ("IPA Extensions", 0x0250, 0x02AF),
    ("Mathematical Operators", 0x2200, 0x22FF),
    ("Supplemental Mathematical Operators", 0x2A00, 0x2AFF),
    ("Letterlike Symbols", 0x2100, 0x214F),
    ("Arrows", 0x2190, 0x21FF),
    ("Miscellaneous Technical", 0x2300, 0x23FF),
    ("Geometric Shapes", 0x25A0, 0x25FF),
    ("Miscellaneous Symbols", 0x2600, 0x26FF),
    ("Dingbats", 0x2700, 0x27BF),
    ("Tifinagh", 0x2D30, 0x2D7F),
    ("N'Ko", 0x07C0, 0x07FF),
    ("Lao", 0x0E80, 0x0EFF),
    ("Unified Canadian Aboriginal Syllabics", 0x1400, 0x167F),
)

_FORMAT_VERSION = 3
_FONT_SIZE = 48  # pixels per em when drawing, before fitting into the canvas
_SELECT_SIZE = 28  # canvas side used to select and de-duplicate classes
_BOX_FRACTION = 20 / 28  # the glyph's longer side, as a fraction of the canvas side
_MIN_INK_FRACTION = 0.015  # at least this fraction of the canvas pixels > 50% ink
_MAX_FILL = 0.6  # ink fraction of the glyph's bounding box above which it is a blob
_DEDUP_SIDE = 16  # resolution of the de-duplication signature
_DEDUP_DISTANCE = 0.27  # unit-norm L2 distance below which two signatures are "the same glyph"
_ROTATION_DEG = 20.0
_SHEAR = 0.4
_LOG_SCALE = (-0.2, 0.1)
_ANISOTROPY = 0.1
_SHIFT = 0.15  # translation, as a fraction of the half-side
_WARP = 0.03  # std of the elastic displacements (fraction of the half-side)
_WARP_GRID = 4  # the elastic displacements are interpolated from a _WARP_GRID² grid


def font_directory() -> Path:
    """Directory of the DejaVu TrueType fonts bundled with matplotlib."""
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - matplotlib is in the apps extra
        raise ImportError(
            "the embedded glyph dataset renders matplotlib's bundled DejaVu fonts: "
            "pip install matplotlib (or bilevel[apps])"
        ) from err
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    missing = [f for f in FONT_VARIANTS if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"DejaVu fonts missing from {path}: {missing}")
    return path


def _cmaps(directory: Path) -> list[set[int]]:
    from fontTools.ttLib import TTFont  # a dependency of matplotlib

    out = []
    for name in FONT_VARIANTS:
        font = TTFont(directory / name, lazy=True)
        try:
            out.append(set(font.getBestCmap() or {}))
        finally:
            font.close()
    return out


def _render(font: Any, char: str, side: int) -> np.ndarray | None:
    """Draw ``char``, fit its ink bounding box (longer side ``_BOX_FRACTION · side``) centred in a
    ``side × side`` canvas; ``uint8``, ink = 255. ``None`` when nothing is drawn."""
    from PIL import Image, ImageDraw

    big = 3 * _FONT_SIZE
    canvas = Image.new("L", (big, big))
    ImageDraw.Draw(canvas).text((big // 2, big // 2), char, fill=255, font=font, anchor="mm")
    bbox = canvas.getbbox()
    if bbox is None:
        return None
    crop = canvas.crop(bbox)
    w, h = crop.size
    scale = _BOX_FRACTION * side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    out = Image.new("L", (side, side))
    out.paste(
        crop.resize(size, Image.Resampling.LANCZOS), ((side - size[0]) // 2, (side - size[1]) // 2)
    )
    return np.asarray(out, dtype=np.uint8)


def _render_job(job: tuple[str, list[int], int]) -> tuple[np.ndarray, np.ndarray]:
    """Worker: render ``codepoints`` with one font file → ``[n, side, side]``, drawn ``[n]``."""
    from PIL import ImageFont

    font_file, codepoints, side = job
    font = ImageFont.truetype(font_file, _FONT_SIZE)
    out = np.zeros((len(codepoints), side, side), dtype=np.uint8)
    drawn = np.zeros(len(codepoints), dtype=bool)
    for i, cp in enumerate(codepoints):
        img = _render(font, chr(cp), side)
        if img is not None:
            out[i], drawn[i] = img, True
    return out, drawn


def _signature(images: np.ndarray) -> Tensor:
    """Blurred, unit-norm low-resolution signatures ``[n, 4, d]`` under the four rotations."""
    x = torch.from_numpy(images).float().unsqueeze(1) / 255.0
    x = F.interpolate(x, size=(_DEDUP_SIDE, _DEDUP_SIDE), mode="area")
    x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1)), 3, stride=1)
    rots = torch.stack([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)], dim=1).flatten(2)
    return rots / rots.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def select_codepoints(max_classes: int | None = None, *, workers: int | None = None) -> list[int]:
    """The classes of the embedded dataset: codepoints in :data:`BLOCKS` order after the
    existence, ink, blob and rotation-aware duplicate checks (see module docstring)."""
    return _select(max_classes, workers)


def _candidates(cmaps: list[set[int]]) -> list[int]:
    """Codepoints of :data:`BLOCKS` (in order) that the fonts map and that are not marks,
    separators or control characters."""
    out: list[int] = []
    seen: set[int] = set()
    for _, lo, hi in BLOCKS:
        for cp in range(lo, hi + 1):
            if cp in seen or cp not in cmaps[0]:
                continue
            seen.add(cp)
            if unicodedata.category(chr(cp))[0] in "MZC":
                continue
            if sum(cp in cm for cm in cmaps) >= MIN_VARIANTS:
                out.append(cp)
    return out


def _render_many(
    font_file: Path, codepoints: list[int], side: int, workers: int
) -> tuple[np.ndarray, np.ndarray]:
    chunks = [c.tolist() for c in np.array_split(np.array(codepoints, dtype=np.int64), workers)]
    jobs = [(str(font_file), c, side) for c in chunks if c]
    parts = parallel_map(_render_job, jobs, workers)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _select(max_classes: int | None, workers: int | None = None) -> list[int]:
    """Accepted codepoints, in :data:`BLOCKS` order (the first ``max_classes`` of them)."""
    workers = default_workers() if workers is None else max(1, int(workers))
    directory = font_directory()
    if directory not in _SELECTION:  # memoised: the selection only depends on the fonts
        _SELECTION[directory] = _select_all(directory, workers)
    selected = list(_SELECTION[directory])
    # greedy in a fixed order: the first k classes are what a selection capped at k would keep
    return selected if max_classes is None else selected[:max_classes]


_SELECTION: dict[Path, tuple[int, ...]] = {}


def _select_all(directory: Path, workers: int) -> tuple[int, ...]:
    """The greedy selection of every class."""
    candidates = _candidates(_cmaps(directory))
    images, drawn = _render_many(directory / FONT_VARIANTS[0], candidates, _SELECT_SIZE, workers)
    ink = images > 127
    area = ink.sum(axis=(1, 2))
    rows, cols = ink.any(axis=2), ink.any(axis=1)
    height = rows.shape[1] - rows.argmax(axis=1) - rows[:, ::-1].argmax(axis=1)
    width = cols.shape[1] - cols.argmax(axis=1) - cols[:, ::-1].argmax(axis=1)
    blob = (area > _MAX_FILL * height * width) & (np.minimum(height, width) > _SELECT_SIZE // 6)
    ok = drawn & (area >= _MIN_INK_FRACTION * _SELECT_SIZE**2) & ~blob
    codes = [cp for cp, good in zip(candidates, ok, strict=True) if good]
    if not codes:
        raise ValueError("no glyph of the DejaVu fonts passed the selection")
    sig = _signature(images[ok])
    flat = sig.flatten(0, 1)  # [4n, d]
    # Greedy de-duplication: glyph i is kept unless it is within _DEDUP_DISTANCE of a kept glyph
    # under some rotation. For unit vectors, distance² = 2 − 2·cos.
    max_cos = torch.empty(len(codes), len(codes))
    for start in range(0, len(codes), 512):
        cos = sig[start : start + 512, 0] @ flat.T  # [b, 4n]
        max_cos[start : start + 512] = cos.view(cos.shape[0], -1, 4).amax(dim=2)
    close = (2.0 - 2.0 * max_cos).clamp_min(0).sqrt() < _DEDUP_DISTANCE
    close = close.numpy()
    keep: list[int] = []
    for i in range(len(codes)):
        if keep and close[i, keep].any():
            continue
        keep.append(i)
    return tuple(codes[i] for i in keep)


def _variant_renders(
    codepoints: list[int], side: int, directory: Path, workers: int
) -> tuple[np.ndarray, np.ndarray]:
    """``[C, V, side, side]`` uint8 renders and ``[C, V]`` availability of every font variant."""
    cmaps = _cmaps(directory)
    renders = np.zeros((len(codepoints), len(FONT_VARIANTS), side, side), dtype=np.uint8)
    available = np.zeros((len(codepoints), len(FONT_VARIANTS)), dtype=bool)
    jobs, where = [], []
    for v, name in enumerate(FONT_VARIANTS):
        index = [c for c, cp in enumerate(codepoints) if cp in cmaps[v]]
        # split each font's work so that the workers stay balanced
        for part in np.array_split(np.array(index, dtype=np.int64), max(1, workers)):
            if len(part):
                jobs.append((str(directory / name), [codepoints[c] for c in part], side))
                where.append((v, part))
    min_ink = 0.5 * _MIN_INK_FRACTION * side**2
    for (v, part), (images, drawn) in zip(
        where, parallel_map(_render_job, jobs, workers), strict=True
    ):
        good = drawn & ((images > 127).sum(axis=(1, 2)) >= min_ink)
        renders[part[good], v] = images[good]
        available[part[good], v] = True
    if not available[:, 0].all():
        raise ValueError("the regular DejaVu Sans font failed to draw a selected glyph")
    return renders, available


def _dilate(x: Tensor) -> Tensor:
    """3×3 grey dilation (separable max filter)."""
    x = F.max_pool2d(x, (1, 3), stride=1, padding=(0, 1))
    return F.max_pool2d(x, (3, 1), stride=1, padding=(1, 0))


def _distort(
    sources: Tensor, bold: Tensor, rng: np.random.RandomState, chunk: int = 2048
) -> Tensor:
    """Random affine + stroke-weight distortion of ``[n, 2S, 2S]`` uint8 renders → ``[n, S, S]``.

    The affine map (rotation, shear, anisotropic scale, translation) is resampled bilinearly at
    twice the output resolution, then 2×2 area-averaged. Half of the renders from a bold font are
    thinned (3×3 grey erosion at 2×, i.e. half a pixel per side) and half of the others thickened
    (grey dilation), so stroke weights vary without hairlines or blobs.
    """
    n, hi = sources.shape[0], sources.shape[-1]
    angle = np.deg2rad(rng.uniform(-_ROTATION_DEG, _ROTATION_DEG, n))
    shear = rng.uniform(-_SHEAR, _SHEAR, n)
    log_scale = rng.uniform(*_LOG_SCALE, n)
    aniso = rng.uniform(-_ANISOTROPY, _ANISOTROPY, n)
    shift = rng.uniform(-_SHIFT, _SHIFT, (n, 2))
    change = torch.from_numpy(rng.random_sample(n) < 0.5)
    thicken, thin = change & ~bold, change & bold
    # Forward map of glyph coordinates: q -> A q + shift with A = R(angle) · shear · diag(sx, sy).
    sx, sy = np.exp(log_scale + aniso), np.exp(log_scale - aniso)
    cos, sin = np.cos(angle), np.sin(angle)
    a = np.empty((n, 2, 2))
    a[:, 0, 0] = cos * sx
    a[:, 0, 1] = (cos * shear - sin) * sy
    a[:, 1, 0] = sin * sx
    a[:, 1, 1] = (sin * shear + cos) * sy
    inv = torch.from_numpy(np.linalg.inv(a)).float()  # output -> input map, as grid_sample needs
    offset = -(inv @ torch.from_numpy(shift).float().unsqueeze(2)).squeeze(2)  # [n, 2]
    # Smooth elastic warp: random displacements on a coarse grid, interpolated with Gaussian
    # bumps normalised to a partition of unity (a separable [hi, G] basis).
    coarse = torch.from_numpy(rng.normal(0.0, _WARP, (n, 2, _WARP_GRID, _WARP_GRID))).float()
    pos = (torch.arange(hi, dtype=torch.float32) + 0.5) / hi * (_WARP_GRID - 1)
    bumps = torch.exp(-0.5 * (pos[:, None] - torch.arange(_WARP_GRID)[None, :]) ** 2 / 0.5**2)
    basis = bumps / bumps.sum(dim=1, keepdim=True)  # [hi, G]
    coord = (2.0 * torch.arange(hi, dtype=torch.float32) + 1.0) / hi - 1.0  # pixel centres
    cx, cy = coord.view(1, 1, hi), coord.view(1, hi, 1)
    out = torch.empty(n, hi // 2, hi // 2, dtype=torch.uint8)
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        x = sources[sl].unsqueeze(1).float().div_(255.0)
        if bool(thicken[sl].any()):
            x[thicken[sl]] = _dilate(x[thicken[sl]])
        if bool(thin[sl].any()):
            bold_x = x[thin[sl]]
            eroded = -_dilate(-bold_x)
            # never erase a hairline: keep the original where erosion removes most of the ink
            kept = eroded.sum(dim=(1, 2, 3)) >= 0.5 * bold_x.sum(dim=(1, 2, 3))
            x[thin[sl]] = torch.where(kept.view(-1, 1, 1, 1), eroded, bold_x)
        m, o = inv[sl].view(-1, 2, 2, 1, 1), offset[sl].view(-1, 2, 1, 1)
        warp = basis @ coarse[sl] @ basis.T  # [n, 2, hi, hi]
        grid = m[:, :, 0] * cx + m[:, :, 1] * cy + o + warp  # [n, 2, hi, hi] (x, y) components
        y = F.grid_sample(
            x, grid.permute(0, 2, 3, 1), mode="bilinear", padding_mode="zeros", align_corners=False
        )
        y = F.avg_pool2d(y, 2)
        out[sl] = y.squeeze(1).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return out


@dataclass(frozen=True)
class GlyphDataset:
    """The full embedded dataset (all classes, before splitting).

    Attributes:
        images: ``uint8`` ``[C, M, 1, S, S]``, 255 = ink.
        codepoints: ``[C]`` Unicode codepoint of each class.
        variants: ``int64`` ``[C, M]`` index into :data:`FONT_VARIANTS` of each instance.
        seed: the seed it was built with.
    """

    images: Tensor
    codepoints: tuple[int, ...]
    variants: Tensor
    seed: int

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def characters(self) -> str:
        """The classes as one string of characters."""
        return "".join(map(chr, self.codepoints))


def build_glyph_dataset(
    *,
    seed: int = 0,
    instances: int = 20,
    image_size: int = 28,
    max_classes: int | None = None,
    workers: int | None = None,
) -> GlyphDataset:
    """Render the embedded dataset (no caching; see :func:`load_glyph_dataset`).

    Args:
        seed: seed of the instances' font variants and distortions (and of nothing else: the
            classes are fixed by the fonts).
        instances: instances per class ``M``.
        image_size: side ``S`` of the images.
        max_classes: keep only the first classes (in :data:`BLOCKS` order).
        workers: rendering processes (default: the usable CPUs, at most 8; 1 = in process).
    """
    seed = check_int("seed", seed)
    instances = check_positive_int("instances", instances)
    image_size = check_positive_int("image_size", image_size)
    if max_classes is not None:
        max_classes = check_positive_int("max_classes", max_classes)
    directory = font_directory()
    workers = default_workers() if workers is None else max(1, int(workers))
    codepoints = _select(max_classes, workers)
    renders, available = _variant_renders(codepoints, 2 * image_size, directory, workers)
    rng = np.random.RandomState(seed)
    # For each instance pick a font variant uniformly among those that draw the character.
    u = rng.random_sample((len(codepoints), instances))
    counts = available.sum(axis=1)
    rank = np.floor(u * counts[:, None]).astype(np.int64)  # k-th available variant
    order = np.argsort(~available, axis=1, kind="stable")  # available variants first
    variants = np.take_along_axis(order, rank, axis=1)
    flat = renders[np.arange(len(codepoints))[:, None], variants]  # [C, M, 2S, 2S]
    bold = torch.from_numpy(np.array(["Bold" in f for f in FONT_VARIANTS])[variants].reshape(-1))
    sources = torch.from_numpy(flat.reshape(-1, 2 * image_size, 2 * image_size))
    images = _distort(sources, bold, rng)
    return GlyphDataset(
        images=images.reshape(len(codepoints), instances, 1, image_size, image_size),
        codepoints=tuple(codepoints),
        variants=torch.from_numpy(variants),
        seed=seed,
    )


def _cache_key(seed: int, instances: int, image_size: int, max_classes: int | None) -> str:
    import PIL
    from PIL import features

    directory = font_directory()
    fonts = [(f, (directory / f).stat().st_size) for f in FONT_VARIANTS]
    params = [
        _FORMAT_VERSION,
        BLOCKS,
        MIN_VARIANTS,
        _FONT_SIZE,
        _SELECT_SIZE,
        _BOX_FRACTION,
        _MIN_INK_FRACTION,
        _MAX_FILL,
        _DEDUP_SIDE,
        _DEDUP_DISTANCE,
        _ROTATION_DEG,
        _SHEAR,
        _LOG_SCALE,
        _ANISOTROPY,
        _SHIFT,
        _WARP,
        _WARP_GRID,
    ]
    versions = [PIL.__version__, features.version("freetype2"), torch.__version__]
    return stable_digest(params, fonts, versions, seed, instances, image_size, max_classes)[:16]


def load_glyph_dataset(
    *,
    seed: int = 0,
    instances: int = 20,
    image_size: int = 28,
    max_classes: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> GlyphDataset:
    """:func:`build_glyph_dataset`, cached in ``<cache>/glyphs/`` (atomic write)."""
    seed = check_int("seed", seed)
    key = _cache_key(seed, instances, image_size, max_classes)
    path = cache_root(cache_dir) / "glyphs" / f"glyphs-{image_size}px-seed{seed}-{key}.pt"
    payload = load_cache_file(path)
    if payload is not None and payload.get("key") == key:
        return GlyphDataset(
            images=payload["images"],
            codepoints=tuple(payload["codepoints"]),
            variants=payload["variants"],
            seed=seed,
        )
    data = build_glyph_dataset(
        seed=seed, instances=instances, image_size=image_size, max_classes=max_classes
    )
    save_cache_file(
        path,
        {
            "key": key,
            "images": data.images,
            "codepoints": list(data.codepoints),
            "variants": data.variants,
        },
    )
    return data


def glyph_split(
    num_classes: int,
    *,
    seed: int = 0,
    val_classes: int | None = None,
    test_fraction: float = 0.25,
) -> dict[str, np.ndarray]:
    """Disjoint class indices ``{"train", "val", "test"}`` (each sorted).

    A ``RandomState`` permutation (seeded by ``seed``): the first ``round(test_fraction · C)``
    classes are meta-test, the next ``val_classes`` (default ``round(0.1 · C)``; 0 allowed)
    validation, the rest meta-train.
    """
    num_classes = check_positive_int("num_classes", num_classes)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = max(1, round(test_fraction * num_classes))
    n_val = round(0.1 * num_classes) if val_classes is None else int(val_classes)
    if isinstance(val_classes, bool) or n_val < 0 or n_test + n_val >= num_classes:
        raise ValueError(
            f"val_classes must be in [0, {num_classes - n_test}) with {n_test} test classes "
            f"out of {num_classes}, got {val_classes}"
        )
    # A stream separate from the rendering's (seed + a constant offset).
    perm = np.random.RandomState((seed + 0x5EED) % 2**32).permutation(num_classes)
    perm = perm.astype(np.int64)
    return {
        "test": np.sort(perm[:n_test]),
        "val": np.sort(perm[n_test : n_test + n_val]),
        "train": np.sort(perm[n_test + n_val :]),
    }


def load_glyphs(
    split: str,
    *,
    seed: int = 0,
    val_classes: int | None = None,
    test_fraction: float = 0.25,
    image_size: int = 28,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Tensor:
    """One split (``"train"``, ``"val"`` or ``"test"``) of the embedded dataset as ``uint8``
    ``[C, 20, 1, S, S]`` (see :func:`glyph_split` for the split sizes)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train', 'val' or 'test'")
    data = load_glyph_dataset(seed=seed, image_size=image_size, cache_dir=cache_dir)
    index = glyph_split(len(data), seed=seed, val_classes=val_classes, test_fraction=test_fraction)
    return data.images[torch.from_numpy(index[split])]
