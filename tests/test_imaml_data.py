"""Data layer of the iMAML application: Omniglot, the embedded glyphs, sinusoids, the task sampler.

Tests on the real Omniglot archives need ``BILEVEL_OMNIGLOT_DIR`` (CI: ``../shared/data/omniglot``)
and are skipped with a reason otherwise. Everything writes to temporary cache directories.
"""

from __future__ import annotations

import io
import math
import os
import time
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from applications.imaml import glyphs, omniglot, one_shot
from applications.imaml._cache import CACHE_ENV, OFFLINE_ENV
from applications.imaml.datasets import load_dataset
from applications.imaml.sinusoid import SinusoidSampler, SinusoidTaskBatch, sinusoid
from applications.imaml.tasks import TaskBatch, TaskSampler

REPO = Path(__file__).resolve().parents[1]


def _omniglot_dir() -> Path | None:
    env = os.environ.get(omniglot.OMNIGLOT_ENV)
    if not env:
        return None
    for base in (Path.cwd(), REPO):
        path = (base / env).expanduser()
        if (path / "images_background.zip").is_file() or (path / "images_background").is_dir():
            return path.resolve()
    return None


OMNIGLOT_DIR = _omniglot_dir()
needs_omniglot = pytest.mark.skipif(
    OMNIGLOT_DIR is None,
    reason=(
        f"real Omniglot not available: set {omniglot.OMNIGLOT_ENV} to the directory holding "
        "images_background.zip, images_evaluation.zip and all_runs.zip "
        "(CI: ../shared/data/omniglot)"
    ),
)


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the user's cache, and none touches the network by accident."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "default-cache"))
    monkeypatch.setenv(OFFLINE_ENV, "1")


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache shared by the tests that need the full decoded data (decoded once per session)."""
    return tmp_path_factory.mktemp("bilevel-cache")


@pytest.fixture(scope="session")
def glyph_data(session_cache: Path) -> glyphs.GlyphDataset:
    return glyphs.load_glyph_dataset(cache_dir=session_cache)


# ----------------------------------------------------------------------------- Omniglot


@needs_omniglot
def test_archive_listing_counts() -> None:
    background = omniglot.list_archive(OMNIGLOT_DIR / "images_background.zip")
    evaluation = omniglot.list_archive(OMNIGLOT_DIR / "images_evaluation.zip")
    assert len(background["global_ids"]) == 964
    assert len(evaluation["global_ids"]) == 659
    assert len(set(background["alphabets"])) == 30
    assert len(set(evaluation["alphabets"])) == 20
    assert set(background["drawings"]) == {20}
    assert set(evaluation["drawings"]) == {20}
    ids = background["global_ids"] + evaluation["global_ids"]
    assert sorted(ids) == list(range(1, 1624))


@needs_omniglot
def test_decode_subset_values_and_cache(tmp_path: Path) -> None:
    kwargs = {
        "data_dir": OMNIGLOT_DIR,
        "cache_dir": tmp_path,
        "alphabets": ["Greek", "Latin"],
    }
    first = omniglot.load_omniglot_archive("background", **kwargs)
    assert set(first.alphabets) == {"Greek", "Latin"}
    assert first.images.shape == (24 + 26, 20, 1, 28, 28)
    assert first.images.dtype == torch.uint8
    assert bool((first.global_ids.diff() > 0).all())
    x = first.images.float() / 255.0
    assert x.min() == 0.0 and x.max() == 1.0
    # strokes = 1: ink is a minority of the pixels; the border is background
    assert 0.03 < float(x.mean()) < 0.3
    assert float(x[..., 0, :].mean()) < 0.05
    # same pixels as decoding one PNG directly (LANCZOS, inverted)
    with zipfile.ZipFile(OMNIGLOT_DIR / "images_background.zip") as zf:
        name = next(
            n for n in zf.namelist() if "/Greek/character01/" in n and n.endswith("_01.png")
        )
        direct = omniglot.decode_png(zf.read(name))
    assert torch.equal(first.images[0, 0, 0], torch.from_numpy(direct))

    files = list((tmp_path / "omniglot").glob("decoded-*.pt"))
    assert len(files) == 1
    assert not list((tmp_path / "omniglot").glob(".*tmp"))  # no temporary left behind
    start = time.perf_counter()
    second = omniglot.load_omniglot_archive("background", **kwargs)
    assert time.perf_counter() - start < 2.0
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.global_ids, second.global_ids)
    assert first.alphabets == second.alphabets and first.characters == second.characters
    # a different size is a different cache entry
    small = omniglot.load_omniglot_archive("background", image_size=14, **kwargs)
    assert small.images.shape[-2:] == (14, 14)
    assert len(list((tmp_path / "omniglot").glob("decoded-*.pt"))) == 2


@needs_omniglot
def test_full_dataset_paper_and_lake_splits(session_cache: Path) -> None:
    kwargs = {"data_dir": OMNIGLOT_DIR, "cache_dir": session_cache}
    shapes = {s: load_dataset("omniglot", s, **kwargs).shape for s in ("train", "val", "test")}
    assert shapes == {
        "train": (1100, 20, 1, 28, 28),
        "val": (100, 20, 1, 28, 28),
        "test": (423, 20, 1, 28, 28),
    }
    assert load_dataset("omniglot", "train", val_classes=0, **kwargs).shape[0] == 1200
    assert load_dataset("omniglot-lake", "background", **kwargs).shape[0] == 964
    assert load_dataset("omniglot-lake", "evaluation", **kwargs).shape[0] == 659

    # the splits are the characters paper_split names, sorted by global id
    everything = omniglot.load_omniglot(**kwargs)
    assert everything.global_ids.tolist() == list(range(1, 1624))
    test_index = omniglot.paper_split()["test"]
    test = load_dataset("omniglot", "test", **kwargs)
    assert torch.equal(test, everything.images[torch.from_numpy(test_index)])
    # meta-train and meta-test share no character (no identical drawing either)
    train = load_dataset("omniglot", "train", val_classes=0, **kwargs)
    train_keys = {bytes(img.numpy()) for img in train[:, 0]}
    assert not any(bytes(img.numpy()) in train_keys for img in test[:, 0])

    start = time.perf_counter()
    again = load_dataset("omniglot", "test", **kwargs)
    assert time.perf_counter() - start < 2.0
    assert torch.equal(again, test)


def test_paper_split_protocol() -> None:
    split = omniglot.paper_split()
    assert {k: len(v) for k, v in split.items()} == {"train": 1100, "val": 100, "test": 423}
    union = np.concatenate(list(split.values()))
    assert len(np.unique(union)) == 1623 and union.min() == 0 and union.max() == 1622
    again = omniglot.paper_split()
    assert all(np.array_equal(split[k], again[k]) for k in split)
    other = omniglot.paper_split(seed=1)
    assert not np.array_equal(split["test"], other["test"])
    no_val = omniglot.paper_split(val_classes=0)
    assert len(no_val["train"]) == 1200 and len(no_val["val"]) == 0
    assert np.array_equal(no_val["test"], split["test"])
    assert np.array_equal(np.sort(np.concatenate([split["train"], split["val"]])), no_val["train"])
    with pytest.raises(ValueError, match="val_classes"):
        omniglot.paper_split(val_classes=1200)


@needs_omniglot
def test_rotations_are_new_classes_and_sampler_uses_quarter_turns(tmp_path: Path) -> None:
    data = omniglot.load_omniglot_archive(
        "background", data_dir=OMNIGLOT_DIR, cache_dir=tmp_path, alphabets=["Korean", "Bengali"]
    )
    x = data.images.float() / 255.0  # [C, 20, 1, 28, 28]
    mean = x.mean(dim=1)  # class templates
    for k in (1, 2, 3):
        rotated = torch.rot90(mean, k, dims=(-2, -1))
        diff = (rotated - mean).abs().flatten(1).sum(1) / mean.flatten(1).sum(1)
        assert float(diff.min()) > 0.2, f"a character is invariant to a {90 * k}° rotation"

    sampler = TaskSampler(data.images, ways=5, shots=2, queries=3, rotate=True, seed=7)
    state = sampler.state_dict()
    classes, instances, rotations = sampler.sample_indices(64)
    sampler.load_state_dict(state)
    batch = sampler.sample(64)
    assert set(rotations.unique().tolist()) == {0, 1, 2, 3}
    for b in range(4):
        for i in range(5):
            for j in range(5):
                img = x[classes[b, i], instances[b, i, j]]
                expected = torch.rot90(img, int(rotations[b, i]), dims=(-2, -1))
                got = batch.support_x[b, i * 2 + j] if j < 2 else batch.query_x[b, i * 3 + j - 2]
                assert torch.equal(got, expected)


@needs_omniglot
def test_one_shot_runs() -> None:
    runs = one_shot.load_one_shot_runs(data_dir=OMNIGLOT_DIR)
    assert [r.run for r in runs] == list(range(1, 21))
    for r in runs:
        assert r.training.shape == (20, 1, 28, 28) and r.test.shape == (20, 1, 28, 28)
        assert r.training.dtype == torch.float32 and 0.0 <= float(r.training.min())
        assert float(r.test.max()) <= 1.0 and float(r.test.mean()) < 0.3
        assert r.labels.dtype == torch.int64
        assert sorted(r.labels.tolist()) == list(range(20))  # each class is asked once
    batch = one_shot.one_shot_task_batch(runs)
    assert batch.support_x.shape == (20, 20, 1, 28, 28)
    assert batch.support_y[3].tolist() == list(range(20))
    assert torch.equal(batch.query_y[0], runs[0].labels)
    assert one_shot.one_shot_error_rate(batch.query_y, runs) == 0.0
    wrong = (batch.query_y + 1) % 20
    assert one_shot.one_shot_error_rate(wrong, runs) == 1.0
    # run01/test/item01.png is class08 (see class_labels.txt)
    assert int(runs[0].labels[0]) == 7


# ----------------------------------------------------------------------------- missing data


def test_offline_and_absent_gives_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(omniglot.OMNIGLOT_ENV, raising=False)
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("omniglot", "train", cache_dir=cache)
    message = str(info.value)
    for needle in (
        "images_background.zip",
        "images_evaluation.zip",  # both missing archives in one error
        omniglot.OMNIGLOT_ENV,
        str(cache / "omniglot"),
        OFFLINE_ENV,
    ):
        assert needle in message

    # an explicit data_dir is the only place searched, and download=False is reported
    monkeypatch.delenv(OFFLINE_ENV)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="download=False") as info:
        one_shot.load_one_shot_runs(data_dir=empty, download=False)
    assert str(empty) in str(info.value) and "all_runs.zip" in str(info.value)


def test_failed_download_reports_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(OFFLINE_ENV)
    monkeypatch.delenv(omniglot.OMNIGLOT_ENV, raising=False)

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(omniglot.urllib.request, "urlopen", no_network)
    with pytest.raises(FileNotFoundError, match="Downloading failed") as info:
        omniglot.locate_omniglot(cache_dir=tmp_path)
    assert "Name or service not known" in str(info.value)
    assert omniglot.OMNIGLOT_URLS["images_background"] in str(info.value)
    assert not any((tmp_path / "omniglot").iterdir())


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (105, 105), color=value).save(buf, format="PNG")
    return buf.getvalue()


def test_download_is_atomic_and_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A download (served from a local file:// URL) lands under the final name, is then read."""
    monkeypatch.delenv(OFFLINE_ENV)
    monkeypatch.delenv(omniglot.OMNIGLOT_ENV, raising=False)
    served = tmp_path / "served.zip"
    with zipfile.ZipFile(served, "w") as zf:
        lines = []
        for i in (1, 2):
            zf.writestr(f"run01/training/class{i:02d}.png", _png(i - 1))
            zf.writestr(f"run01/test/item{i:02d}.png", _png(2 - i))
            lines.append(f"run01/test/item{i:02d}.png run01/training/class{3 - i:02d}.png")
        zf.writestr("run01/class_labels.txt", "\n".join(lines) + "\n")
    monkeypatch.setitem(omniglot.OMNIGLOT_URLS, "all_runs", served.as_uri())
    cache = tmp_path / "cache"
    runs = one_shot.load_one_shot_runs(cache_dir=cache)
    assert (cache / "omniglot" / "all_runs.zip").is_file()
    assert sorted(p.name for p in (cache / "omniglot").iterdir()) == ["all_runs.zip"]
    assert len(runs) == 1 and runs[0].labels.tolist() == [1, 0]
    assert float(runs[0].training[0].min()) == 1.0  # an all-black PNG is all ink

    # a source that is not a zip (an HTML error page, say) is rejected and leaves nothing
    bad = tmp_path / "bad.html"
    bad.write_text("<html>rate limited</html>")
    monkeypatch.setitem(omniglot.OMNIGLOT_URLS, "images_background", bad.as_uri())
    with pytest.raises(FileNotFoundError, match="Downloading failed"):
        omniglot.locate_omniglot(("images_background",), cache_dir=cache)
    assert sorted(p.name for p in (cache / "omniglot").iterdir()) == ["all_runs.zip"]


def test_extracted_folder_is_read(tmp_path: Path) -> None:
    root = tmp_path / "images_evaluation"
    for gid, alphabet, char in ((5, "Zeta", "character01"), (3, "Alpha", "character02")):
        folder = root / alphabet / char
        folder.mkdir(parents=True)
        for d in (1, 2):
            (folder / f"{gid:04d}_{d:02d}.png").write_bytes(_png(d - 1))
    data = omniglot.load_omniglot_archive("evaluation", data_dir=tmp_path, cache_dir=tmp_path)
    assert data.global_ids.tolist() == [3, 5]
    assert data.alphabets == ("Alpha", "Zeta")
    assert data.images.shape == (2, 2, 1, 28, 28)
    assert int(data.images[0, 0].min()) == 255 and int(data.images[0, 1].max()) == 0


# ----------------------------------------------------------------------------- embedded glyphs


def test_glyphs_classes_shapes_and_splits(glyph_data: glyphs.GlyphDataset) -> None:
    c = len(glyph_data)
    assert c >= 800
    assert glyph_data.images.shape == (c, 20, 1, 28, 28)
    assert glyph_data.images.dtype == torch.uint8
    assert len(set(glyph_data.codepoints)) == c
    ink = glyph_data.images.float().div(255).sum(dim=(-1, -2, -3))
    assert float(ink.min()) > 5.0  # no blank instance
    assert float(glyph_data.images.float().mean() / 255) < 0.35
    split = glyphs.glyph_split(c)
    sets = [set(split[k].tolist()) for k in ("train", "val", "test")]
    assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1 :])
    assert set().union(*sets) == set(range(c))
    assert len(split["test"]) == round(0.25 * c) and len(split["val"]) == round(0.1 * c)
    assert glyphs.glyph_split(c, val_classes=0)["val"].size == 0


def test_glyphs_load_dataset_and_cache(
    glyph_data: glyphs.GlyphDataset, session_cache: Path
) -> None:
    parts = {
        s: load_dataset("glyphs", s, cache_dir=session_cache) for s in ("train", "val", "test")
    }
    assert sum(p.shape[0] for p in parts.values()) == len(glyph_data)
    index = glyphs.glyph_split(len(glyph_data))["val"]
    assert torch.equal(parts["val"], glyph_data.images[torch.from_numpy(index)])
    start = time.perf_counter()
    again = glyphs.load_glyph_dataset(cache_dir=session_cache)
    assert time.perf_counter() - start < 2.0
    assert torch.equal(again.images, glyph_data.images)
    assert again.codepoints == glyph_data.codepoints


def test_glyphs_deterministic_for_a_seed() -> None:
    a = glyphs.build_glyph_dataset(seed=3, max_classes=40, workers=1)
    b = glyphs.build_glyph_dataset(seed=3, max_classes=40, workers=2)
    c = glyphs.build_glyph_dataset(seed=4, max_classes=40, workers=1)
    assert len(a) == 40 and a.codepoints == b.codepoints == c.codepoints
    assert torch.equal(a.images, b.images) and torch.equal(a.variants, b.variants)
    assert not torch.equal(a.images, c.images)
    # instances of a class differ from each other (distortions), classes differ from each other
    x = a.images.float()
    assert float((x[:, 0] - x[:, 1]).abs().mean()) > 5.0
    assert len({bytes(img.numpy()) for img in a.images[:, 0]}) == 40


# ----------------------------------------------------------------------------- sampler


def _coded_images(classes: int, instances: int) -> torch.Tensor:
    """Float images whose constant value encodes (class, instance): invariant to rotations."""
    codes = torch.arange(classes * instances, dtype=torch.float32).view(classes, instances)
    return codes.view(classes, instances, 1, 1, 1).expand(classes, instances, 1, 4, 4).clone()


@given(
    classes=st.integers(1, 12),
    instances=st.integers(2, 8),
    data=st.data(),
)
def test_sampler_task_structure(classes: int, instances: int, data: st.DataObject) -> None:
    ways = data.draw(st.integers(1, classes), label="ways")
    shots = data.draw(st.integers(1, instances - 1), label="shots")
    queries = data.draw(st.integers(1, instances - shots), label="queries")
    batch_size = data.draw(st.integers(1, 4), label="batch_size")
    rotate = data.draw(st.booleans(), label="rotate")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    images = _coded_images(classes, instances)
    batch = TaskSampler(images, ways, shots, queries, rotate=rotate, seed=seed).sample(batch_size)
    assert batch.support_x.shape == (batch_size, ways * shots, 1, 4, 4)
    assert batch.query_x.shape == (batch_size, ways * queries, 1, 4, 4)
    assert batch.support_x.dtype == torch.float32 and batch.support_y.dtype == torch.int64
    labels = torch.arange(ways)
    for b in range(batch_size):
        assert torch.equal(batch.support_y[b], labels.repeat_interleave(shots))
        assert torch.equal(batch.query_y[b], labels.repeat_interleave(queries))
        s_code = batch.support_x[b, :, 0, 0, 0].long().view(ways, shots)
        q_code = batch.query_x[b, :, 0, 0, 0].long().view(ways, queries)
        both = torch.cat([s_code, q_code], dim=1)  # [N, K+Q]
        cls = both // instances
        assert bool((cls == cls[:, :1]).all())  # one class per label
        assert len(set(cls[:, 0].tolist())) == ways  # distinct classes within a task
        for row in both.tolist():
            assert len(set(row)) == shots + queries  # support and query never share a drawing


@given(seed=st.integers(0, 2**63 - 1), splits=st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_sampler_seed_and_state_round_trip(seed: int, splits: list[int]) -> None:
    images = torch.randint(0, 256, (9, 6, 1, 5, 5), dtype=torch.uint8)
    one = TaskSampler(images, 3, 2, 2, seed=seed)
    two = TaskSampler(images, 3, 2, 2, seed=seed)
    first, second = one.sample(3), two.sample(3)
    assert torch.equal(first.support_x, second.support_x)
    assert torch.equal(first.query_x, second.query_x)
    # resume: a fresh sampler loading the state continues exactly where `one` stands
    state = one.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restored = torch.load(buf, weights_only=True)
    expected = [one.sample(n) for n in splits]
    fresh = TaskSampler(images, 3, 2, 2, seed=seed + 1)
    fresh.load_state_dict(restored)
    got = [fresh.sample(n) for n in splits]
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e.support_x, g.support_x) and torch.equal(e.query_x, g.query_x)
    assert fresh.tasks_drawn == one.tasks_drawn == 3 + sum(splits)


@given(
    group_sizes=st.lists(st.integers(1, 7), min_size=1, max_size=5),
    ways=st.integers(1, 4),
    share=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_within_group_tasks(group_sizes: list[int], ways: int, share: float, seed: int) -> None:
    groups = torch.cat([torch.full((n,), g) for g, n in enumerate(group_sizes)])
    classes = len(groups)
    if ways > classes:
        return
    images = _coded_images(classes, 4)
    eligible = [g for g, n in enumerate(group_sizes) if n >= ways]
    if share > 0 and not eligible:
        with pytest.raises(ValueError, match="at least one group"):
            TaskSampler(images, ways, 1, 1, groups=groups, group_tasks=share, seed=seed)
        return
    sampler = TaskSampler(images, ways, 1, 1, groups=groups, group_tasks=share, seed=seed)
    plain = TaskSampler(images, ways, 1, 1, seed=seed)
    picked, _, _ = sampler.sample_indices(64)
    reference, _, _ = plain.sample_indices(64)
    for row in picked.tolist():
        assert len(set(row)) == ways  # distinct classes, as in every task
    same = torch.stack([(groups[row] == groups[row[0]]).all() for row in picked])
    if share == 0.0:  # no groups asked for: the very stream of a sampler without them
        assert torch.equal(picked, reference)
    if share == 1.0:  # every task inside one group, and only eligible groups are used
        assert bool(same.all())
        assert set(groups[picked[:, 0]].tolist()) <= set(eligible)


def test_within_group_tasks_are_validated() -> None:
    images = _coded_images(6, 4)
    with pytest.raises(ValueError, match="one id per class"):
        TaskSampler(images, 2, 1, 1, groups=torch.zeros(5, dtype=torch.int64), group_tasks=1.0)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        TaskSampler(images, 2, 1, 1, groups=torch.zeros(6, dtype=torch.int64), group_tasks=1.5)
    with pytest.raises(ValueError, match="needs groups="):
        TaskSampler(images, 2, 1, 1, group_tasks=0.5)


def test_within_group_state_is_checked_on_resume() -> None:
    images, groups = _coded_images(8, 4), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    one = TaskSampler(images, 3, 1, 1, groups=groups, group_tasks=0.5, seed=3)
    one.sample(2)
    other = TaskSampler(images, 3, 1, 1, seed=3)
    with pytest.raises(ValueError, match="group_tasks"):
        other.load_state_dict(one.state_dict())
    again = TaskSampler(images, 3, 1, 1, groups=groups, group_tasks=0.5, seed=9)
    again.load_state_dict(one.state_dict())
    assert torch.equal(again.sample_indices(4)[0], one.sample_indices(4)[0])


@needs_omniglot
def test_alphabet_tasks_draw_lake_background_classes_from_one_alphabet() -> None:
    from applications.imaml.datasets import task_sampler

    chars = omniglot.load_omniglot_archive("background", data_dir=OMNIGLOT_DIR)
    sampler = task_sampler(
        "omniglot-lake",
        "background",
        ways=20,
        shots=1,
        queries=1,
        seed=0,
        data_dir=OMNIGLOT_DIR,
        alphabet_tasks=1.0,
    )
    classes, _, _ = sampler.sample_indices(16)
    for row in classes.tolist():
        assert len({chars.alphabets[c] for c in row}) == 1
    with pytest.raises(ValueError, match="omniglot-lake"):
        task_sampler("glyphs", "train", ways=5, shots=1, queries=1, seed=0, alphabet_tasks=0.5)


def test_sampler_uint8_scaling_device_and_batch_helpers() -> None:
    images = torch.full((4, 3, 1, 6, 6), 255, dtype=torch.uint8)
    batch = TaskSampler(images, 2, 1, 1, rotate=False).sample(2)
    assert float(batch.support_x.min()) == 1.0
    moved = batch.to("cpu")
    assert isinstance(moved, TaskBatch) and moved.batch_size == 2
    one = batch.task(1)
    assert one.support_x.shape == (1, 2, 1, 6, 6) and torch.equal(one.query_y, batch.query_y[1:])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ways": 10}, ValueError, "ways=10 exceeds the 4 classes"),
        ({"shots": 3, "queries": 3}, ValueError, "shots \\+ queries"),
        ({"ways": 0}, ValueError, "ways must be positive"),
        ({"shots": -1}, ValueError, "shots must be positive"),
        ({"queries": 0}, ValueError, "queries must be positive"),
        ({"ways": 2.0}, TypeError, "ways must be an int"),
        ({"seed": "0"}, TypeError, "seed must be an int"),
    ],
)
def test_sampler_argument_errors(kwargs: dict, error: type[Exception], match: str) -> None:
    args = {"ways": 2, "shots": 1, "queries": 1} | kwargs
    with pytest.raises(error, match=match):
        TaskSampler(torch.zeros(4, 5, 1, 6, 6), **args)


def test_sampler_other_errors() -> None:
    with pytest.raises(ValueError, match="images must have shape"):
        TaskSampler(torch.zeros(4, 5, 6, 6), 2, 1, 1)
    with pytest.raises(ValueError, match="square"):
        TaskSampler(torch.zeros(4, 5, 1, 6, 7), 2, 1, 1)
    TaskSampler(torch.zeros(4, 5, 1, 6, 7), 2, 1, 1, rotate=False)  # fine without rotations
    sampler = TaskSampler(torch.zeros(4, 5, 1, 6, 6), 2, 1, 1)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        sampler.sample(0)
    other = TaskSampler(torch.zeros(4, 5, 1, 6, 6), 3, 1, 1)
    with pytest.raises(ValueError, match="config"):
        other.load_state_dict(sampler.state_dict())


@pytest.mark.parametrize(
    ("name", "split", "match"),
    [
        ("mnist", "train", "unknown dataset name 'mnist'"),
        ("omniglot", "background", "unknown split 'background'"),
        ("omniglot-lake", "train", "unknown split 'train'"),
        ("glyphs", "evaluation", "unknown split 'evaluation'"),
    ],
)
def test_load_dataset_rejects_unknown_names(name: str, split: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_dataset(name, split)


def test_load_dataset_rejects_bad_options(session_cache: Path) -> None:
    with pytest.raises(ValueError, match="image_size must be positive"):
        load_dataset("glyphs", "train", image_size=0)
    with pytest.raises(ValueError, match="val_classes"):
        load_dataset("glyphs", "train", val_classes=-1, cache_dir=session_cache)
    with pytest.raises(ValueError, match="seed and val_classes do not apply"):
        load_dataset("omniglot-lake", "background", val_classes=10)
    with pytest.raises(TypeError, match="seed must be an int"):
        load_dataset("glyphs", "train", seed=1.5, cache_dir=session_cache)


# ----------------------------------------------------------------------------- sinusoid


def test_sinusoid_tasks() -> None:
    sampler = SinusoidSampler(shots=5, queries=7, seed=3)
    batch = sampler.sample(200)
    assert isinstance(batch, SinusoidTaskBatch)
    assert batch.support_x.shape == (200, 5, 1) and batch.query_y.shape == (200, 7, 1)
    assert batch.support_x.dtype == torch.float32
    assert 0.1 <= float(batch.amplitude.min()) and float(batch.amplitude.max()) <= 5.0
    assert 0.0 <= float(batch.phase.min()) and float(batch.phase.max()) <= math.pi
    x = torch.cat([batch.support_x, batch.query_x], dim=1)
    assert -5.0 <= float(x.min()) and float(x.max()) <= 5.0
    expected = batch.amplitude[:, None, None] * torch.sin(
        batch.query_x - batch.phase[:, None, None]
    )
    # (torch.allclose: the first torch.testing.assert_close call costs ~2 s of lazy imports)
    assert torch.allclose(batch.query_y, expected, rtol=1e-6, atol=1e-6)
    assert torch.allclose(sinusoid(batch.query_x, batch.amplitude, batch.phase), expected)
    # seeded, resumable, movable
    again = SinusoidSampler(shots=5, queries=7, seed=3).sample(200)
    assert torch.equal(again.support_y, batch.support_y)
    state = sampler.state_dict()
    nxt = sampler.sample(4)
    fresh = SinusoidSampler(shots=5, queries=7, seed=0)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.sample(4).query_x, nxt.query_x)
    moved = nxt.to("cpu")
    assert isinstance(moved, SinusoidTaskBatch) and torch.equal(moved.amplitude, nxt.amplitude)
    f64 = SinusoidSampler(2, 2, dtype=torch.float64).sample(1)
    assert f64.query_y.dtype == torch.float64


def test_sinusoid_argument_errors() -> None:
    with pytest.raises(ValueError, match="shots must be positive"):
        SinusoidSampler(0, 5)
    with pytest.raises(ValueError, match="amplitude"):
        SinusoidSampler(5, 5, amplitude=(5.0, 0.1))
    with pytest.raises(TypeError, match="dtype"):
        SinusoidSampler(5, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match="batch_size"):
        SinusoidSampler(5, 5).sample(-1)
