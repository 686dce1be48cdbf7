"""iMAML runs under attack and accident: hostile checkpoints, concurrent runs, bad flags,
damaged files, kills mid-write and full disks (issue 12; docs/reliability.md).

Every run here is tiny (4-filter conv4, a few meta-steps on the embedded glyphs), so the file
runs in well under a minute on two cores.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from applications.imaml import rundir
from applications.imaml import trainer as trainer_module
from applications.imaml._cache import CACHE_ENV, OFFLINE_ENV, DataFileError
from applications.imaml.cli import FLAG_RANGES, build_parser, main, resume_config
from applications.imaml.rundir import (
    CheckpointError,
    CheckpointWriteError,
    RunError,
    load_checkpoint,
    read_metrics,
)
from applications.imaml.trainer import Config, train

REPO = Path(__file__).resolve().parents[1]
TINY = (
    "--dataset glyphs --meta-batch 2 --inner-steps 1 --cg-steps 1 --hidden 4 --val-every 0 "
    "--test-tasks 0 --eval-batch 2 --log-every 1 --ckpt-every 1 --zero-head --threads 1 "
    "--no-progress"
).split()  # the CLI twin of _cfg()


def _cfg(**kw: object) -> Config:
    base: dict[str, object] = dict(
        dataset="glyphs",
        meta_batch=2,
        steps=3,
        inner_steps=1,
        cg_steps=1,
        hidden=4,
        zero_head=True,
        val_every=0,
        test_tasks=0,
        eval_batch=2,
        log_every=1,
        ckpt_every=1,
        threads=1,
    )
    base.update(kw)
    return Config(**base)  # type: ignore[arg-type]


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped after 1 of 3 meta-steps (checkpoint at step 1); copy it before changing it."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    train(_cfg(), out, stop_after=1, progress=False, log=_quiet)
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Final meta-parameters of the same run without interruption."""
    out = tmp_path_factory.mktemp("full") / "run"
    train(_cfg(), out, progress=False, log=_quiet)
    return load_checkpoint(out)["learner"]["params"]


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _one_error_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- no code execution on load ------------------------------------------------------------


class _Payload:
    """Unpickling this object runs ``exec``: it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("command", ["resume", "evaluate"])
def test_malicious_checkpoint_never_executes(
    interrupted: Path, tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy_run(interrupted, tmp_path / "run")
    marker = tmp_path / "pwned"
    state = load_checkpoint(run)
    state["extra"] = _Payload(marker)
    torch.save(state, run / "checkpoint.pt")
    torch.load(run / "checkpoint.pt", weights_only=False)  # the payload is live ...
    assert marker.exists()
    marker.unlink()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    argv = (
        ["train", "--out-dir", str(run), "--resume", "--no-progress"]
        if command == "resume"
        else ["evaluate", str(run), "--tasks", "2"]
    )
    assert main(argv) == 1
    assert not marker.exists()  # ... and never ran here
    _one_error_line(capsys, str(run / "checkpoint.pt"), "refused without running them")
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".lock"}
    assert after == {k: v for k, v in before.items() if k != ".lock"}  # the evidence is kept


# --- one writer per run directory ---------------------------------------------------------


def test_second_training_into_a_busy_directory_is_refused_naming_the_pid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    flags = [*TINY, "--steps", "30", "--out-dir", str(out)]
    first = subprocess.Popen(
        [sys.executable, "-m", "applications.imaml", "train", *flags],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            lock = out / ".lock"
            if lock.is_file() and lock.read_text().strip() == str(first.pid):
                break
            time.sleep(0.02)
        for extra in ([], ["--overwrite"]):
            assert main(["train", *flags, *extra]) == 1
            _one_error_line(capsys, f"in use by process {first.pid}", str(out))
        while first.poll() is None and not (out / "checkpoint.pt").is_file():
            time.sleep(0.02)
        assert main(["train", "--out-dir", str(out), "--resume", "--no-progress"]) == 1
        _one_error_line(capsys, f"in use by process {first.pid}")
        assert first.poll() is None, "the first run ended before the second was tried"
    finally:
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr.decode()
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 31))  # one writer: no interleaved or truncated metrics
    assert json.loads((out / "config.json").read_text())["steps"] == 30
    assert load_checkpoint(out)["step"] == 30
    assert (out / ".lock").read_text() == ""  # released, no stale PID


def test_fresh_train_into_a_run_is_refused_unless_resume_or_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["train", *TINY, "--steps", "1", "--out-dir", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    ckpt = (out / "checkpoint.pt").read_bytes()
    assert main([*argv, "--seed", "1"]) == 1
    _one_error_line(capsys, str(out), "already holds a run", "--resume", "--overwrite")
    assert (out / "checkpoint.pt").read_bytes() == ckpt
    (out / "stray.txt").write_text("not ours")
    assert main([*argv, "--seed", "1", "--overwrite"]) == 0
    assert "--overwrite: removed the previous run's" in capsys.readouterr().out
    assert load_checkpoint(out)["config"]["seed"] == 1
    assert (out / "stray.txt").read_text() == "not ours"  # only the run's own files go
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--resume", "--overwrite"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


# --- flag ranges at the door --------------------------------------------------------------


def _train(*flags: str) -> list[str]:
    return ["train", "--dataset", "glyphs", *flags]


@pytest.mark.parametrize(
    "argv, message",
    [
        (_train("--max-meta-grad-norm", "-1"), "--max-meta-grad-norm must be > 0, got -1.0"),
        (_train("--inner-clip", "-1"), "--inner-clip must be > 0"),
        (_train("--time-limit", "-1"), "--time-limit must be > 0"),
        (_train("--time-limit", "0"), "--time-limit must be > 0"),
        (_train("--val-every", "-1"), "--val-every must be >= 0, got -1"),
        (_train("--test-tasks", "-5"), "--test-tasks must be >= 0, got -5"),
        (_train("--hidden", "0"), "--hidden must be >= 1, got 0"),
        (_train("--threads", "-2"), "--threads must be >= 1, got -2"),
        (_train("--cg-steps", "0"), "--cg-steps must be >= 1, got 0"),
        (_train("--seed", "-1"), "--seed must be in [0, 4294967295], got -1"),
        (_train("--steps", "0"), "--steps must be >= 1"),
        (_train("--ckpt-every", "-1"), "--ckpt-every must be >= 0"),
        (_train("--stop-after", "0"), "--stop-after must be >= 1"),
        (_train("--meta-lr", "nan"), "argument --meta-lr: expected a finite number"),
        (_train("--lam", "inf"), "argument --lam: expected a finite number"),
        (_train("--out-dir", ""), "argument --out-dir: directory must not be empty"),
        (_train("--data-dir", ""), "argument --data-dir: directory must not be empty"),
        (["evaluate", "run", "--tasks", "0"], "--tasks must be >= 1, got 0"),
        (["evaluate", "run", "--eval-queries", "0"], "--eval-queries must be >= 1"),
        (["evaluate", "run", "--threads", "0"], "--threads must be >= 1"),
        (["evaluate", "run", "--data-dir", ""], "directory must not be empty"),
    ],
)
def test_flag_out_of_range_is_refused_naming_it(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def _numeric_flags() -> dict[str, set[str]]:
    """Command -> its options whose ``type=`` is a number parser (``_flags.number``)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._actions[-1])))
    out: dict[str, set[str]] = {}
    for name, command in sub.choices.items():  # type: ignore[union-attr]
        out[name] = {
            a.option_strings[0]
            for a in command._actions
            if a.option_strings and hasattr(a.type, "kind")
        }
    return out


def test_every_numeric_flag_has_a_range_and_every_range_a_flag() -> None:
    flags = _numeric_flags()
    used = set().union(*flags.values())
    assert used - set(FLAG_RANGES) == set(), "numeric flags without a range"
    assert set(FLAG_RANGES) - used == set(), "ranges of flags that do not exist"


def _just_outside(flag: str) -> str:
    r = FLAG_RANGES[flag]
    if r.high is not None:
        return str(int(r.high) + 1)
    assert r.low is not None
    return str(r.low) if r.low_open else str(int(r.low) - 1)


@pytest.mark.parametrize("flag", sorted(FLAG_RANGES))
def test_every_flag_refuses_a_value_just_outside_its_range(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = _numeric_flags()
    for command, argv in (("train", _train()), ("evaluate", ["evaluate", "run"])):
        if flag in flags[command]:
            with pytest.raises(SystemExit) as exc:
                main([*argv, flag, _just_outside(flag)])
            assert exc.value.code == 2
            assert f"{flag} must be" in capsys.readouterr().err


# --- resume compares the requested settings with the saved run ----------------------------


def test_resume_refuses_settings_that_change_the_meta_gradient(
    interrupted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy_run(interrupted, tmp_path / "run")
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out-dir", str(run), "--resume", "--preset", "sinusoid", "--seed", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for difference in (
        "--dataset: saved 'glyphs', requested 'sinusoid'",
        "--seed: saved 0, requested 3",
        "--shots: saved 1, requested 10",
    ):
        assert difference in err, err
    assert (run / "checkpoint.pt").read_bytes() == before
    threads = torch.get_num_threads()
    try:
        argv = ["train", "--out-dir", str(run), "--resume", "--threads", "2", "--no-progress"]
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # the run set it for this whole process
    assert "resume: --threads 1 -> 2 (CPU threads); allowed" in capsys.readouterr().out


def test_resume_config_allows_only_what_leaves_the_meta_gradient_alone() -> None:
    saved = _cfg(lr_schedule="cosine")
    cfg, applied = resume_config(saved, {"threads": 2, "compile": True, "device": "cpu"})
    assert (cfg.threads, cfg.compile) == (2, True) and len(applied) == 2
    assert saved.threads == 1  # the saved config is not modified
    with pytest.raises(ValueError, match=r"--steps: saved 3, requested 9 \(the cosine"):
        resume_config(saved, {"steps": 9})
    with pytest.raises(ValueError, match=r"--meta-lr: saved 0.001, requested 0.1"):
        resume_config(saved, {"meta_lr": 0.1, "threads": 2})
    cfg, _ = resume_config(_cfg(lr_schedule="constant"), {"steps": 9, "time_limit": 5.0})
    assert (cfg.steps, cfg.time_limit) == (9, 5.0)


# --- damaged checkpoints ------------------------------------------------------------------


def _edit(state: dict, change: str) -> object:
    """The checkpoint ``state`` damaged as ``change`` names."""
    params = state["learner"]["params"]
    if change == "missing key":
        del state["sampler"]
    elif change == "missing parameter":
        del params[sorted(params)[0]]
    elif change == "unknown parameter":
        params["extra.weight"] = torch.zeros(3)
    elif change == "shape mismatch":  # a 1-element bias that copy_ would broadcast
        bias = next(k for k in params if k.endswith("bias"))
        params[bias] = params[bias][:1].clone()
    elif change == "adam moment shape":
        entry = next(iter(state["learner"]["optimizer"]["state"].values()))
        entry["exp_avg"] = torch.zeros(1)
    elif change == "config/weights mismatch":
        state["config"]["hidden"] = 8
    elif change == "config out of range":
        state["config"]["hidden"] = 0
    elif change == "config wrong type":
        state["config"]["ways"] = "5"
    elif change == "config unknown setting":
        state["config"]["warp_drive"] = True
    elif change == "other version":
        state["version"] = 99
    elif change == "not a dict":
        return [1, 2, 3]
    return state


@pytest.mark.parametrize(
    "change, message",
    [
        ("empty", "is empty (0 bytes)"),
        ("truncated", "is not a torch checkpoint (no zip archive: truncated"),
        ("text", "is not a torch checkpoint"),
        ("damaged member", "is damaged"),
        ("missing key", "lacks the entries ['sampler']"),
        ("missing parameter", "lacks parameters"),
        ("unknown parameter", "has unknown parameters ['extra.weight']"),
        ("shape mismatch", "has shape (1,)"),
        ("adam moment shape", "Adam's exp_avg of parameter"),
        ("config/weights mismatch", "the model built from its config has"),
        ("config out of range", "--hidden must be >= 1, got 0"),
        ("config wrong type", "saved setting ways='5' is not of type int"),
        ("config unknown setting", "unknown settings ['warp_drive']"),
        ("other version", "format version 99"),
        ("not a dict", "holds a list, not a checkpoint dict"),
    ],
)
def test_damaged_checkpoint_gives_one_line_naming_file_and_fix(
    interrupted: Path, tmp_path: Path, change: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy_run(interrupted, tmp_path / "run")
    ckpt = run / "checkpoint.pt"
    data = ckpt.read_bytes()
    if change == "empty":
        ckpt.write_bytes(b"")
    elif change == "truncated":
        ckpt.write_bytes(data[: len(data) // 2])
    elif change == "text":
        ckpt.write_text("this is not a checkpoint\n")
    elif change == "damaged member":  # keep the zip directory, garble the pickled payload
        with zipfile.ZipFile(ckpt) as zf:
            info = next(i for i in zf.infolist() if i.filename.endswith("data.pkl"))
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 :][:4])
        start = info.header_offset + 30 + name_len + extra_len + 2  # past the protocol opcode
        ckpt.write_bytes(data[:start] + b"\xff" * 16 + data[start + 16 :])
    else:
        torch.save(_edit(torch.load(ckpt, weights_only=True), change), ckpt)
    for argv in (
        ["evaluate", str(run), "--tasks", "2"],
        ["train", "--out-dir", str(run), "--resume", "--no-progress"],
    ):
        assert main(argv) == 1, argv
        err = _one_error_line(capsys, str(ckpt), message)
        assert "--overwrite" in err or "code that wrote it" in err or "retrain" in err


# --- damaged metrics ----------------------------------------------------------------------


def test_torn_final_metrics_line_is_dropped_and_the_run_resumes(
    interrupted: Path, tmp_path: Path, uninterrupted: dict[str, torch.Tensor]
) -> None:
    run = _copy_run(interrupted, tmp_path / "run")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 2, "lo')  # killed while appending
    lines: list[str] = []
    train(_cfg(), run, resume=True, progress=False, log=lines.append)
    assert any("dropped a torn final line 2" in line for line in lines), lines
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3]
    assert _same_params(load_checkpoint(run)["learner"]["params"], uninterrupted)


def test_broken_metrics_line_in_the_middle_is_named(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}')  # last line complete, no newline
    with pytest.raises(RunError, match=r"metrics.jsonl, line 2: not a JSON record"):
        read_metrics(path)
    path.write_text('{"step": 1}\n{"step": 3}')
    assert read_metrics(path) == [{"step": 1}, {"step": 3}]


# --- damaged Omniglot archives ------------------------------------------------------------


def _png(seed: int) -> bytes:
    im = Image.new("1", (105, 105), 1)
    im.putpixel((seed % 105, 50), 0)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _omniglot_zip(path: Path, *, bad_member: bytes | None = None) -> bytes:
    """A two-character, five-drawing ``images_background.zip`` (stored, not compressed)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for c in (1, 2):
            for d in range(1, 6):
                name = f"images_background/Alpha/character{c:02d}/{c:04d}_{d:02d}.png"
                data = bad_member if (bad_member is not None and (c, d) == (2, 3)) else _png(d)
                zf.writestr(name, data)
    return path.read_bytes()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncated", "images_background.zip is not a readable zip archive"),
        ("corrupted member", "member images_background/Alpha/character01/0001_02.png is damaged"),
        ("non-png member", "0002_03.png is not a readable PNG image"),
    ],
)
def test_damaged_omniglot_archive_gives_one_line_naming_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    damage: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    data_dir = tmp_path / "omniglot"
    data_dir.mkdir()
    archive = data_dir / "images_background.zip"
    if damage == "non-png member":
        _omniglot_zip(archive, bad_member=b"<html>rate limited</html>")
    else:
        data = _omniglot_zip(archive)
        if damage == "truncated":
            archive.write_bytes(data[: len(data) // 2])
        else:  # flip bytes inside the second drawing's PNG: its CRC-32 no longer matches
            at = data.find(_png(2)) + 40
            archive.write_bytes(
                data[:at] + bytes(b ^ 0xFF for b in data[at : at + 8]) + data[at + 8 :]
            )
    from applications.imaml.omniglot import load_omniglot_archive

    with pytest.raises(DataFileError, match=r"download images_background\.zip again"):
        load_omniglot_archive("background", data_dir=data_dir, workers=1)
    argv = ["train", *TINY, "--dataset", "omniglot-lake", "--data-dir", str(data_dir)]
    assert (
        main(
            [
                *argv,
                "--ways",
                "2",
                "--shots",
                "1",
                "--queries",
                "1",
                "--steps",
                "1",
                "--out-dir",
                str(tmp_path / "run"),
            ]
        )
        == 1
    )
    _one_error_line(capsys, str(archive), message, "download")


# --- kills and full disks during checkpoint writes ----------------------------------------

_KILL_ON_THIRD_SAVE = """
import os, signal, sys, torch
real, calls = torch.save, []
def save(obj, f, *a, **k):
    calls.append(1)
    if len(calls) == 3:
        f.write(b"PK\\x03\\x04 half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *a, **k)
torch.save = save
from applications.imaml.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_a_checkpoint_write_leaves_nothing_that_breaks_the_resume(
    tmp_path: Path, uninterrupted: dict[str, torch.Tensor]
) -> None:
    out = tmp_path / "run"
    flags = ["train", *TINY, "--steps", "3", "--out-dir", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_ON_THIRD_SAVE, *flags], cwd=REPO, stderr=subprocess.PIPE
    )
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()
    stale = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert stale == [f".checkpoint.pt.{proc.pid}.tmp"]  # the killed write's partial file
    assert load_checkpoint(out)["step"] == 2  # the previous checkpoint is whole
    lines: list[str] = []
    train(_cfg(), out, resume=True, progress=False, log=lines.append)
    assert any(f".checkpoint.pt.{proc.pid}.tmp" in line for line in lines), lines
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert _same_params(load_checkpoint(out)["learner"]["params"], uninterrupted)


@pytest.mark.parametrize("disk", ["patched writer", "/dev/full"])
def test_disk_full_during_a_checkpoint_is_clear_and_keeps_the_previous_one(
    interrupted: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    uninterrupted: dict[str, torch.Tensor],
    capsys: pytest.CaptureFixture[str],
    disk: str,
) -> None:
    run = _copy_run(interrupted, tmp_path / "run")
    before = (run / "checkpoint.pt").read_bytes()

    def full_disk(obj: object, f: io.BufferedWriter, *args: object, **kwargs: object) -> None:
        f.write(b"PK\x03\x04 some bytes before the disk filled up")
        raise OSError(errno.ENOSPC, "No space left on device")

    if disk == "/dev/full":  # the kernel's ENOSPC: the temporary file is a link to /dev/full
        if not Path("/dev/full").exists():
            pytest.skip("no /dev/full on this system")
        temp = run / f".checkpoint.pt.{os.getpid()}.tmp"
        real_claim = trainer_module._claim_run_dir

        def claim_then_fill(out: Path, **kwargs: object) -> None:
            real_claim(out, **kwargs)  # (it removes stale temporary files: link afterwards)
            temp.symlink_to("/dev/full")

        monkeypatch.setattr(trainer_module, "_claim_run_dir", claim_then_fill)
    else:
        monkeypatch.setattr(torch, "save", full_disk)
    assert main(["train", "--out-dir", str(run), "--resume", "--no-progress"]) == 1
    _one_error_line(
        capsys,
        f"could not write the checkpoint {run / 'checkpoint.pt'}: No space left on device",
        "the previous checkpoint is intact",
        "free some space",
    )
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert (run / "checkpoint.pt").read_bytes() == before
    monkeypatch.undo()
    train(_cfg(), run, resume=True, progress=False, log=_quiet)  # and the run goes on
    assert _same_params(load_checkpoint(run)["learner"]["params"], uninterrupted)


def test_a_write_error_maps_to_checkpoint_write_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointWriteError, match="make it writable"):
        rundir.save_checkpoint(tmp_path / "missing-dir" / "checkpoint.pt", {"x": 1})


def test_too_little_free_space_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    usage = rundir.shutil.disk_usage(tmp_path)._replace(free=10_000)
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda _: usage)
    with pytest.raises(RunError, match=rf"not enough free space in {out} for checkpoints"):
        train(_cfg(), out, progress=False, log=_quiet)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing trained or written


def test_unwritable_run_directory_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    real_open = open

    def refuse_probe(path: object, *args: object, **kwargs: object) -> object:
        if ".write-probe" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(rundir, "open", refuse_probe, raising=False)
    with pytest.raises(RunError, match=rf"cannot write to the run directory {out}: Permission"):
        train(_cfg(), out, progress=False, log=_quiet)
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_run_directory_fails_before_training(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(RunError, match=rf"cannot create the lock file {out}"):
            train(_cfg(), out, progress=False, log=_quiet)
    finally:
        out.chmod(0o755)


def test_read_only_checkpoint_is_not_replaced(
    interrupted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy_run(interrupted, tmp_path / "run")
    ckpt = run / "checkpoint.pt"
    before = ckpt.read_bytes()
    ckpt.chmod(0o444)
    try:
        assert main(["train", "--out-dir", str(run), "--resume", "--no-progress"]) == 1
        _one_error_line(capsys, f"{ckpt} is read-only", "chmod u+w")
        assert main(["train", *TINY, "--steps", "1", "--out-dir", str(run), "--overwrite"]) == 1
        _one_error_line(capsys, f"{ckpt} is read-only")
        assert ckpt.read_bytes() == before
    finally:
        ckpt.chmod(0o644)


def test_checkpoint_error_is_a_run_error() -> None:
    """The CLI reports every RunError as one line: checkpoint problems must be among them."""
    assert issubclass(CheckpointError, RunError) and issubclass(CheckpointWriteError, RunError)
