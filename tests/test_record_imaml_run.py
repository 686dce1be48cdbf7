"""``benchmarks/record_imaml_run.py``: what it reads from a run directory, on a run built here."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "record_imaml_run.py"


@pytest.fixture(scope="module")
def record():
    spec = importlib.util.spec_from_file_location("record_imaml_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_dir(tmp_path: Path, *, finished: bool = True) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "kind": "train",
            "step": s,
            "metric": 0.5 + s / 1000,
            "nonfinite_tasks": s % 2,
            "grad_norm": 0.1 * s,
        }
        for s in range(10, 210, 10)
    ]
    rows.insert(5, {"kind": "val", "step": 50, "prox": {"metric": 0.81234}, "gd": {"metric": 0.7}})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "curve.png").write_bytes(b"png")
    if finished:
        summary = {"meta_steps": 200, "lake_one_shot": {"prox": 0.4, "gd": 0.25}}
        (tmp_path / "results.json").write_text(json.dumps(summary))
    return tmp_path


def test_summary_reads_curve_statistics_and_lake_interval(record, tmp_path):
    s = record.summarise(_run_dir(tmp_path))
    assert s["meta_steps"] == 200
    assert s["validation"] == [{"step": 50, "prox": 0.8123, "gd": 0.7}]
    assert s["nonfinite_tasks_total"] == 0  # every logged step is even
    assert s["max_meta_grad_norm_seen"] == pytest.approx(20.0)
    # steps 110..200: the last 100 meta-steps
    assert s["train_query_accuracy_last_100_steps"] == pytest.approx(0.5 + 0.155)
    half = s["lake_one_shot_ci95_half_width"]
    assert half["prox"] == pytest.approx(1.96 * math.sqrt(0.24 / 400))
    assert half["gd"] == pytest.approx(1.96 * math.sqrt(0.1875 / 400))


def test_main_writes_json_and_copies_the_curve(record, tmp_path):
    run = _run_dir(tmp_path / "run")
    out, curve = tmp_path / "out.json", tmp_path / "c.png"
    assert (
        record.main([str(run), "--command", "cmd", "--out", str(out), "--curve", str(curve)]) == 0
    )
    data = json.loads(out.read_text())
    assert data["command"] == "cmd" and data["run_directory"] == str(run)
    assert curve.read_bytes() == b"png"


def test_an_unfinished_run_is_refused_with_the_resume_command(record, tmp_path, capsys):
    run = _run_dir(tmp_path, finished=False)
    assert record.main([str(run), "--command", "c", "--out", str(tmp_path / "o.json")]) == 2
    assert "--resume" in capsys.readouterr().err
