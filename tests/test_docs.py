"""The documentation site builds with --strict (broken links, missing API objects fail)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("mkdocs") is None, reason="mkdocs not installed (docs extra)")
def test_docs_build_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Pages whose every ```python block is a complete, runnable example (run in order, sharing a
# namespace), so the tutorials cannot rot silently.
RUNNABLE_PAGES = [
    "README.md",
    "docs/tutorial.md",
    "docs/diagnostics.md",
    "docs/optimality.md",
    "docs/compiling.md",
]


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_documentation_examples_run(page: str) -> None:
    import re

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)
    assert blocks, f"{page} has no python example"
    namespace: dict[str, object] = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page} (block {i})", "exec"), namespace)
