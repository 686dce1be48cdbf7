"""``benchmarks/imaml_inner_solvers.py`` on a checkpoint trained here (embedded glyphs)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from _references import tiny_imaml_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "imaml_inner_solvers.py"


def test_reports_every_solver_on_validation_tasks(tmp_path, monkeypatch):
    from applications.imaml.trainer import train

    cfg = tiny_imaml_config(steps=2, test_tasks=0, val_every=0)
    train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    spec = importlib.util.spec_from_file_location("imaml_inner_solvers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # two solvers keep the test short; the script's list is what the docs quote
    monkeypatch.setattr(module, "SOLVERS", module.SOLVERS[:2])
    out = tmp_path / "out.json"
    assert (
        module.main([str(tmp_path / "run" / "checkpoint.pt"), "--tasks", "3", "--out", str(out)])
        == 0
    )
    data = json.loads(out.read_text())
    assert data["tasks"] == 3 and data["step"] == 2 and data["lam"] == cfg.lam
    assert [r["solver"] for r in data["solvers"]] == [label for label, _ in module.SOLVERS]
    for r in data["solvers"]:
        assert 0.0 <= r["support_acc"] <= 1.0 and 0.0 <= r["query_acc"] <= 1.0
