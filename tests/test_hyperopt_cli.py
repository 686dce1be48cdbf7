"""The hyperopt command line checks its flags at the door (issue 12): a seed every random
generator accepts, and a non-empty output directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from applications.hyperopt.__main__ import RANGES, build_parser, main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ridge", "--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
        (["ridge", "--seed", str(2**32)], "--seed must be in [0, 4294967295], got 4294967296"),
        (["ridge", "--seed", "x"], "argument --seed: expected a int, got 'x'"),
        (["ridge", "--out-dir", ""], "argument --out-dir: must not be empty"),
        (["all", "--out-dir", "  "], "argument --out-dir: must not be empty"),
    ],
)
def test_bad_flags_are_refused_naming_them(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_every_numeric_flag_has_a_range() -> None:
    numeric = {
        a.option_strings[0]
        for a in build_parser()._actions
        if a.option_strings and hasattr(a.type, "kind")
    }
    assert numeric == set(RANGES)


def test_the_largest_seed_is_accepted_and_the_run_writes_into_out_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ridge"
    argv = ["ridge", "--quick", "--seed", str(2**32 - 1), "--out-dir", str(out), "--no-progress"]
    assert main([*argv, "--json"]) == 0
    assert (out / "results.json").is_file() and (out / "figure.png").is_file()
