"""``benchmarks/imaml_adaptation_steps.py``: choose on validation, test once (embedded glyphs)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from _references import tiny_imaml_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "imaml_adaptation_steps.py"


def _module():
    spec = importlib.util.spec_from_file_location("imaml_adaptation_steps", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chooses_on_validation_and_tests_only_the_choice(tmp_path, monkeypatch, capsys):
    from applications.imaml.cli import main as imaml_main
    from applications.imaml.trainer import train

    cfg = tiny_imaml_config(steps=2, test_tasks=0, val_every=0)
    run = tmp_path / "run"
    train(cfg, run, progress=False, log=lambda s: None)
    module = _module()
    calls = []
    evaluate = module._evaluate

    def spy(run, split, tasks, mode, steps, extra):
        calls.append((split, mode, steps))
        return evaluate(run, split, tasks, mode, steps, extra)

    monkeypatch.setattr(module, "_evaluate", spy)
    out = tmp_path / "out.json"
    argv = [str(run), "--steps", "3,0", "--val-tasks", "4", "--test-tasks", "3", "--out", str(out)]
    assert module.main(argv) == 0
    data = json.loads(out.read_text())

    assert data["meta_steps"] == 2
    assert data["trained_adaptation"]["inner_steps"] == cfg.inner_steps
    for mode in ("prox", "gd"):
        rows = data["validation"][mode]
        assert [r["steps"] for r in rows] == [0, 3]
        best = max(r["metric"] for r in rows)
        chosen = data["chosen"][mode]
        assert chosen == min(r["steps"] for r in rows if r["metric"] == best)
        assert data["test"][mode]["steps"] == chosen
        # the test split is evaluated once per mode, with the choice only
        assert [c for c in calls if c[0] == "test" and c[1] == mode] == [("test", mode, chosen)]

    # the recorded test number is the CLI's own for that choice
    chosen = data["chosen"]["prox"]
    argv = ["evaluate", str(run), "--tasks", "3", "--modes", "prox", "--json"]
    capsys.readouterr()
    assert imaml_main([*argv, "--inner-steps", str(chosen)]) == 0
    direct = json.loads(capsys.readouterr().out)["test"]["prox"]
    assert data["test"]["prox"]["metric"] == direct["metric"]
    assert data["test"]["prox"]["loss"] == direct["loss"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--steps", "a,2"], "--steps must be comma-separated integers"),
        (["run", "--steps", "-1"], "--steps must be non-negative"),
        (["run", "--val-tasks", "0"], "--val-tasks must be >= 1"),
        (["run", "--modes", "sgd"], "--modes must be a comma-separated subset"),
    ],
)
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _module().main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
