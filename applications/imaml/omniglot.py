"""Omniglot (Lake, Salakhutdinov & Tenenbaum, 2015): reader, decoded cache, splits.

**Where the files come from.** The standard archives ``images_background.zip`` (30 alphabets,
964 characters), ``images_evaluation.zip`` (20 alphabets, 659 characters) and ``all_runs.zip`` (the
20 one-shot runs of the 2015 paper), or their extracted folders, are looked up in

1. the ``data_dir`` argument (CLI ``--data-dir``), if given; otherwise
2. ``$BILEVEL_OMNIGLOT_DIR``, if set, then
3. ``<cache>/omniglot`` with ``<cache>`` = ``$BILEVEL_CACHE_DIR`` or ``~/.cache/bilevel``.

Missing archives are downloaded from the canonical public source (the ``python/`` folder of the
``brendenlake/omniglot`` GitHub repository) into ``data_dir`` or ``<cache>/omniglot`` (temporary
file + rename), unless ``download=False`` or ``$BILEVEL_OFFLINE`` is set. When that is impossible,
one ``FileNotFoundError`` lists what is missing, where it was looked for and how to provide it.

**Decoding.** Each 105×105 one-bit PNG is converted to 8-bit grey, resized to ``image_size``
(28 by default) with LANCZOS, and inverted so that ink is bright: as floats (``/ 255``) strokes are
1 and the background 0. The result is stored once as a ``uint8`` tensor ``[C, 20, 1, S, S]`` in
``<cache>/omniglot/decoded-<archive>-<S>px-<key>.pt``; the key hashes the archive's listing (member
names, sizes, CRCs), the size and the decoder version, so a different source or size never reuses a
stale file. Later loads read that file (well under 2 s).

**Protocols.** :func:`paper_split`: the iMAML/MAML protocol; all 1623 characters, sorted by their
global id (``NNNN`` in ``NNNN_DD.png``), permuted with a fixed seed; the first 1200 are meta-train
(of which the last ``val_classes`` form a validation split) and the other 423 meta-test, disjoint.
:func:`load_omniglot_archive` gives Lake et al.'s background / evaluation split. The 20 one-shot
classification runs of ``all_runs.zip`` (people: 4.5% error) are read by
:mod:`applications.imaml.one_shot`, with the archive lookup and decoding of this module.
"""

from __future__ import annotations

import io
import os
import re
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ._cache import (
    CACHE_ENV,
    OFFLINE_ENV,
    DataFileError,
    atomic_write,
    cache_root,
    default_workers,
    load_cache_file,
    offline,
    parallel_map,
    save_cache_file,
    stable_digest,
)
from .tasks import check_positive_int

__all__ = [
    "ARCHIVES",
    "OMNIGLOT_ENV",
    "OMNIGLOT_URLS",
    "PAPER_META_TEST",
    "PAPER_META_TRAIN",
    "PAPER_SPLIT_SEED",
    "OmniglotCharacters",
    "decode_png",
    "list_archive",
    "load_omniglot",
    "load_omniglot_archive",
    "load_omniglot_paper_split",
    "locate_omniglot",
    "paper_split",
]

#: Environment variable naming the directory that holds the Omniglot archives.
OMNIGLOT_ENV = "BILEVEL_OMNIGLOT_DIR"
#: Lake et al.'s two image archives, by split name.
ARCHIVES = {"background": "images_background", "evaluation": "images_evaluation"}
_BASE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
#: Canonical public download locations, by archive stem.
OMNIGLOT_URLS = {
    "images_background": _BASE_URL + "images_background.zip",
    "images_evaluation": _BASE_URL + "images_evaluation.zip",
    "all_runs": _BASE_URL + "one-shot-classification/all_runs.zip",
}
#: Default seed of the paper-protocol class permutation (``numpy.random.RandomState``).
PAPER_SPLIT_SEED = 0
#: Meta-train / meta-test class counts of the iMAML (and MAML) Omniglot protocol.
PAPER_META_TRAIN, PAPER_META_TEST = 1200, 423
_NUM_CHARACTERS = 1623
_DECODER_VERSION = 1
_DOWNLOAD_TIMEOUT_S = 60.0
_PNG = re.compile(r"(?:^|/)([^/]+)/(character\d+)/(\d+)_(\d+)\.png$")


# --------------------------------------------------------------------------- decoding


def decode_png(data: bytes, image_size: int = 28) -> np.ndarray:
    """Decode one Omniglot PNG to a ``uint8`` ``[S, S]`` array with ink = 255 (LANCZOS resize)."""
    with Image.open(io.BytesIO(data)) as im:
        grey = im.convert("L")  # one-bit -> 0/255 first: PIL resizes mode "1" with NEAREST only
    if grey.size != (image_size, image_size):
        grey = grey.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return 255 - np.asarray(grey, dtype=np.uint8)


def _fix(source: Path) -> str:
    """How to repair a damaged archive or folder: fetch it again (the canonical URL if known)."""
    if source.is_file():
        url = OMNIGLOT_URLS.get(source.stem)
        where = f" from {url}" if url else ""
        return f"download {source.name} again{where}, or delete it to let the loader download it"
    return f"extract the archive into {source} again"


def _open_zip(source: Path) -> zipfile.ZipFile | None:
    """The archive ``source`` opened for reading (``None`` for a folder), or one clear error.

    A truncated download or a file that is not a zip raises :class:`DataFileError` naming it,
    instead of ``BadZipFile: File is not a zip file`` from deep inside the loader.
    """
    if not source.is_file():
        return None
    try:
        return zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise DataFileError(
            f"{source} is not a readable zip archive ({err}; truncated or damaged); {_fix(source)}"
        ) from None


_MEMBER_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    OSError,
    EOFError,
    KeyError,
    ValueError,
    SyntaxError,
)


def _read_member(source: Path, zf: zipfile.ZipFile | None, name: str) -> bytes:
    try:
        if zf is not None:
            return zf.read(name)
        return (source / name).read_bytes()
    except _MEMBER_ERRORS as err:  # a bad CRC-32, a broken deflate stream, an unreadable file
        raise DataFileError(
            f"{source}: member {name} is damaged ({type(err).__name__}: {err}); {_fix(source)}"
        ) from None


def _decode_member(source: Path, zf: zipfile.ZipFile | None, name: str, size: int) -> np.ndarray:
    """One image of ``source`` decoded, or a :class:`DataFileError` naming the member."""
    data = _read_member(source, zf, name)
    try:
        return decode_png(data, size)
    except _MEMBER_ERRORS as err:  # PIL: UnidentifiedImageError (an OSError), truncated PNGs
        raise DataFileError(
            f"{source}: member {name} is not a readable PNG image ({type(err).__name__}: {err}); "
            f"{_fix(source)}"
        ) from None


def _decode_chunk(args: tuple[str, list[str], int]) -> np.ndarray:
    """Worker: decode ``names`` from a zip or folder ``source`` into ``[n, S, S]`` uint8."""
    source_str, names, size = args
    source = Path(source_str)
    out = np.empty((len(names), size, size), dtype=np.uint8)
    zf = _open_zip(source)
    try:
        for i, name in enumerate(names):
            out[i] = _decode_member(source, zf, name, size)
    finally:
        if zf is not None:
            zf.close()
    return out


def _decode_all(source: Path, names: list[str], size: int, workers: int) -> np.ndarray:
    if len(names) < 2000:
        workers = 1
    chunks = np.array_split(np.arange(len(names)), workers * 4 if workers > 1 else 1)
    jobs = [(str(source), [names[i] for i in c], size) for c in chunks if len(c)]
    return np.concatenate(parallel_map(_decode_chunk, jobs, workers), axis=0)


# --------------------------------------------------------------------------- locating


def _archive_path(directory: Path, stem: str) -> Path | None:
    """``directory/stem.zip`` or the extracted ``directory/stem/`` folder, if present."""
    zip_path = directory / f"{stem}.zip"
    if zip_path.is_file():
        return zip_path
    folder = directory / stem
    if folder.is_dir() and any(folder.iterdir()):
        return folder
    return None


def _download(url: str, dest: Path, timeout: float = _DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch ``url`` into ``dest`` atomically and check that it is a readable zip."""

    def write(tmp: Path) -> None:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            while block := response.read(1 << 20):
                f.write(block)
        with zipfile.ZipFile(tmp) as zf:  # raises BadZipFile on an HTML error page etc.
            if not zf.namelist():
                raise zipfile.BadZipFile(f"{url} gave an empty archive")

    atomic_write(dest, write)


def locate_omniglot(
    stems: Sequence[str] = ("images_background", "images_evaluation"),
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool | None = None,
) -> dict[str, Path]:
    """Find (or download) Omniglot archives; return ``{stem: path to zip or extracted folder}``.

    Args:
        stems: archive names without ``.zip``: ``"images_background"``, ``"images_evaluation"``,
            ``"all_runs"``.
        data_dir: directory to search (only this one when given; downloads go there too).
        cache_dir: cache directory (see module docstring).
        download: allow downloading missing archives; default: yes unless ``$BILEVEL_OFFLINE``.

    Raises:
        FileNotFoundError: one error for all archives that are neither found nor downloadable.
    """
    for stem in stems:
        if stem not in OMNIGLOT_URLS:
            raise ValueError(f"unknown Omniglot archive {stem!r}; expected one of {OMNIGLOT_URLS}")
    cache = cache_root(cache_dir) / "omniglot"
    searched: list[tuple[Path, str]] = []
    if data_dir is not None:
        searched.append((Path(data_dir).expanduser(), "data_dir argument"))
        target = searched[0][0]
    else:
        env = os.environ.get(OMNIGLOT_ENV)
        if env:
            searched.append((Path(env).expanduser(), f"${OMNIGLOT_ENV}"))
        searched.append((cache, f"cache directory (${CACHE_ENV} or ~/.cache/bilevel)"))
        target = cache

    found: dict[str, Path] = {}
    for stem in stems:
        for directory, _ in searched:
            path = _archive_path(directory, stem)
            if path is not None:
                found[stem] = path
                break
    missing = [s for s in stems if s not in found]
    if not missing:
        return found

    allowed = (not offline()) if download is None else bool(download)
    failure = ""
    if allowed:
        errors: list[tuple[str, Exception]] = []
        for stem in missing:
            if errors and isinstance(errors[-1][1], urllib.error.URLError):
                break  # the network is down: do not wait for another timeout
            dest = target / f"{stem}.zip"
            try:
                _download(OMNIGLOT_URLS[stem], dest)
                found[stem] = dest
            except (OSError, zipfile.BadZipFile, ValueError) as err:  # URLError is an OSError
                errors.append((OMNIGLOT_URLS[stem], err))
        missing = [s for s in stems if s not in found]
        if not missing:
            return found
        failure = "Downloading failed (offline?):\n  " + "\n  ".join(
            f"{url}: {err}" for url, err in errors
        )
    else:
        why = "download=False" if download is False else f"${OFFLINE_ENV} is set"
        failure = f"Downloading is disabled ({why})."
    looked = "\n  ".join(f"{d}  ({how})" for d, how in searched)
    files = ", ".join(f"{s}.zip" for s in missing)
    raise FileNotFoundError(
        f"Omniglot data not found: {files}.\n"
        f"Looked in:\n  {looked}\n"
        f"{failure}\n"
        f"To fix: put {files} (or their extracted folders) in one directory and set "
        f"{OMNIGLOT_ENV}=/that/directory (or pass data_dir= / --data-dir), or copy them into "
        f"{target}. Sources: " + ", ".join(OMNIGLOT_URLS[s] for s in missing)
    )


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class _Character:
    global_id: int
    alphabet: str
    character: str
    members: tuple[str, ...]  # sorted by drawer


def _members(source: Path) -> list[tuple[str, int, int]]:
    """``(name, file size, crc)`` of every file in a zip or below a folder."""
    zf = _open_zip(source)
    if zf is not None:
        with zf:
            return [(i.filename, i.file_size, i.CRC) for i in zf.infolist() if not i.is_dir()]
    out = []
    for root, _, files in os.walk(source):
        for f in files:
            p = Path(root) / f
            out.append((p.relative_to(source).as_posix(), p.stat().st_size, 0))
    return out


def _characters(members: list[tuple[str, int, int]]) -> list[_Character]:
    groups: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
    for name, _, _ in members:
        m = _PNG.search(name)
        if m is None:
            continue
        alphabet, character, gid, drawer = m.groups()
        groups.setdefault((alphabet, character), []).append((int(gid), int(drawer), name))
    chars = []
    for (alphabet, character), items in groups.items():
        gids = {g for g, _, _ in items}
        if len(gids) != 1:
            raise ValueError(f"{alphabet}/{character} mixes character ids {sorted(gids)}")
        items.sort()
        chars.append(_Character(items[0][0], alphabet, character, tuple(n for _, _, n in items)))
    chars.sort(key=lambda c: c.global_id)
    return chars


def _fingerprint(source: Path) -> list[Any]:
    """Identity of a source for the cache key, cheap to compute.

    A zip: its resolved path, size and modification time (no listing needed, so a cached load
    never reads the archive). An extracted folder: the sorted names and sizes of its PNGs.
    """
    if source.is_file():
        st = source.stat()
        return ["zip", str(source.resolve()), st.st_size, st.st_mtime_ns]
    return ["dir", sorted((n, size) for n, size, _ in _members(source) if _PNG.search(n))]


def list_archive(source: str | os.PathLike[str]) -> dict[str, Any]:
    """List an Omniglot image archive (zip or folder) without decoding anything.

    Returns:
        ``{"global_ids": [...], "alphabets": [...], "characters": [...], "drawings": [...]}``,
        one entry per character, sorted by global id (``drawings``: PNG count per character).
    """
    chars = _characters(_members(Path(source)))
    return {
        "global_ids": [c.global_id for c in chars],
        "alphabets": [c.alphabet for c in chars],
        "characters": [c.character for c in chars],
        "drawings": [len(c.members) for c in chars],
    }


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class OmniglotCharacters:
    """Decoded Omniglot characters, sorted by global id.

    Attributes:
        images: ``uint8`` ``[C, 20, 1, S, S]``, 255 = ink; drawings sorted by drawer.
        global_ids: ``int64`` ``[C]``, Omniglot's character ids (1..1623).
        alphabets: alphabet folder name of each character.
        characters: character folder name (``characterNN``) of each character.
    """

    images: Tensor
    global_ids: Tensor
    alphabets: tuple[str, ...]
    characters: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def select(self, index: Sequence[int] | np.ndarray | Tensor) -> OmniglotCharacters:
        """The characters at positions ``index`` (in that order)."""
        idx = torch.as_tensor(np.asarray(index), dtype=torch.int64)
        pos = idx.tolist()
        return OmniglotCharacters(
            images=self.images[idx],
            global_ids=self.global_ids[idx],
            alphabets=tuple(self.alphabets[i] for i in pos),
            characters=tuple(self.characters[i] for i in pos),
        )

    @staticmethod
    def concat(parts: Sequence[OmniglotCharacters]) -> OmniglotCharacters:
        """Concatenate and re-sort by global id."""
        images = torch.cat([p.images for p in parts])
        gids = torch.cat([p.global_ids for p in parts])
        alphabets = tuple(a for p in parts for a in p.alphabets)
        characters = tuple(c for p in parts for c in p.characters)
        order = torch.argsort(gids, stable=True)
        return OmniglotCharacters(images, gids, alphabets, characters).select(order)


def load_omniglot_archive(
    split: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool | None = None,
    image_size: int = 28,
    alphabets: Sequence[str] | None = None,
    workers: int | None = None,
) -> OmniglotCharacters:
    """Decode (once, then from the cache) Lake et al.'s ``"background"`` or ``"evaluation"`` split.

    Args:
        split: ``"background"`` (964 characters) or ``"evaluation"`` (659).
        data_dir, cache_dir, download: see :func:`locate_omniglot`.
        image_size: output side ``S`` (LANCZOS from 105).
        alphabets: keep only these alphabets (folder names), e.g. for quick tests; the cache key
            includes the selection.
        workers: decoding processes (default: the usable CPUs, at most 8; 1 = in process).

    Returns:
        :class:`OmniglotCharacters` sorted by global id.
    """
    if split not in ARCHIVES:
        raise ValueError(f"unknown Omniglot split {split!r}; expected one of {sorted(ARCHIVES)}")
    image_size = check_positive_int("image_size", image_size)
    stem = ARCHIVES[split]
    source = locate_omniglot((stem,), data_dir=data_dir, cache_dir=cache_dir, download=download)[
        stem
    ]
    selection = None if alphabets is None else sorted(set(alphabets))
    key = stable_digest(_DECODER_VERSION, image_size, _fingerprint(source), selection)[:16]
    suffix = "" if alphabets is None else "-subset"
    cache_file = (
        cache_root(cache_dir) / "omniglot" / f"decoded-{stem}{suffix}-{image_size}px-{key}.pt"
    )
    payload = load_cache_file(cache_file)
    if payload is None or payload.get("key") != key:
        chars = _characters(_members(source))
        if alphabets is not None:
            unknown = set(alphabets) - {c.alphabet for c in chars}
            if unknown:
                raise ValueError(f"alphabets not in {source}: {sorted(unknown)}")
            chars = [c for c in chars if c.alphabet in set(alphabets)]
        if not chars:
            raise ValueError(f"no Omniglot character images found in {source}")
        counts = {len(c.members) for c in chars}
        if len(counts) != 1:
            bad = next(c for c in chars if len(c.members) != len(chars[0].members))
            raise DataFileError(
                f"characters in {source} have different numbers of drawings {sorted(counts)} "
                f"(e.g. {bad.alphabet}/{bad.character}: {len(bad.members)}); the archive is "
                f"incomplete: {_fix(source)}"
            )
        per_char = counts.pop()
        names = [n for c in chars for n in c.members]
        n_workers = default_workers() if workers is None else max(1, int(workers))
        flat = _decode_all(source, names, image_size, n_workers)
        images = torch.from_numpy(flat).reshape(len(chars), per_char, 1, image_size, image_size)
        payload = {
            "key": key,
            "images": images,
            "global_ids": torch.tensor([c.global_id for c in chars], dtype=torch.int64),
            "alphabets": [c.alphabet for c in chars],
            "characters": [c.character for c in chars],
        }
        save_cache_file(cache_file, payload)
    return OmniglotCharacters(
        images=payload["images"],
        global_ids=payload["global_ids"],
        alphabets=tuple(payload["alphabets"]),
        characters=tuple(payload["characters"]),
    )


def load_omniglot(
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool | None = None,
    image_size: int = 28,
    workers: int | None = None,
) -> OmniglotCharacters:
    """All 1623 characters (background + evaluation), sorted by global id."""
    kwargs = {
        "data_dir": data_dir,
        "cache_dir": cache_dir,
        "download": download,
        "image_size": image_size,
        "workers": workers,
    }
    # Locate both first so that one error reports every missing archive.
    locate_omniglot(
        tuple(ARCHIVES.values()), data_dir=data_dir, cache_dir=cache_dir, download=download
    )
    return OmniglotCharacters.concat([load_omniglot_archive(s, **kwargs) for s in ARCHIVES])


def paper_split(
    num_classes: int = _NUM_CHARACTERS,
    *,
    seed: int = PAPER_SPLIT_SEED,
    meta_train: int = PAPER_META_TRAIN,
    val_classes: int = 100,
) -> dict[str, np.ndarray]:
    """Class indices of the iMAML/MAML protocol: permute, first ``meta_train`` train, rest test.

    The permutation is ``numpy.random.RandomState(seed).permutation(num_classes)`` (a frozen
    stream: the same on every numpy version). The last ``val_classes`` of the meta-train part form
    the validation split (0 allowed). Each split's indices are returned sorted.

    Returns:
        ``{"train": ..., "val": ..., "test": ...}``: disjoint int64 index arrays into the
        characters sorted by global id; ``train + val`` has ``meta_train`` classes.
    """
    num_classes = check_positive_int("num_classes", num_classes)
    meta_train = check_positive_int("meta_train", meta_train)
    if meta_train >= num_classes:
        raise ValueError(f"meta_train={meta_train} leaves no meta-test classes of {num_classes}")
    if isinstance(val_classes, bool) or not 0 <= int(val_classes) < meta_train:
        raise ValueError(f"val_classes must be in [0, meta_train={meta_train}), got {val_classes}")
    perm = np.random.RandomState(seed).permutation(num_classes).astype(np.int64)
    train_all, test = perm[:meta_train], perm[meta_train:]
    n_train = meta_train - int(val_classes)
    return {
        "train": np.sort(train_all[:n_train]),
        "val": np.sort(train_all[n_train:]),
        "test": np.sort(test),
    }


def load_omniglot_paper_split(
    split: str,
    *,
    seed: int = PAPER_SPLIT_SEED,
    val_classes: int = 100,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool | None = None,
    image_size: int = 28,
) -> Tensor:
    """Images ``[C, 20, 1, S, S]`` (uint8) of one split of :func:`paper_split`.

    ``"train"`` has ``1200 - val_classes`` classes, ``"val"`` ``val_classes`` and ``"test"`` 423.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train', 'val' or 'test'")
    data = load_omniglot(
        data_dir=data_dir, cache_dir=cache_dir, download=download, image_size=image_size
    )
    if len(data) != _NUM_CHARACTERS:
        raise ValueError(f"expected {_NUM_CHARACTERS} Omniglot characters, found {len(data)}")
    index = paper_split(len(data), seed=seed, val_classes=val_classes)[split]
    return data.images[torch.from_numpy(index)]
