"""The iMAML tutorial's code blocks compute what the page says they compute.

docs/imaml_tutorial.md is not a fully runnable page (it refers to data batches), so it is
not in test_docs.RUNNABLE_PAGES; its self-contained blocks are run here, in page order, on a
few random images, and the ``root_vjp`` block of §5 is checked against the meta-gradient of
§4 — the one ``custom_root`` computes through ``adapt`` — so a wrong block fails.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

PAGE = Path(__file__).resolve().parents[1] / "docs" / "imaml_tutorial.md"


def _blocks() -> list[str]:
    """The page's ```python blocks, extracted like test_docs does."""
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)


def _block_with(marker: str, blocks: list[str]) -> str:
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"expected one block containing {marker!r}, found {len(found)}"
    return found[0]


def _run(blocks: list[str], namespace: dict) -> dict:
    for i, block in enumerate(blocks):
        exec(compile(block, f"{PAGE.name} (block {i})", "exec"), namespace)
    return namespace


def _task(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(5, 1, 28, 28, generator=g), torch.randn(5, 1, 28, 28, generator=g)
    ys, yq = torch.arange(5), torch.randperm(5, generator=g)
    return xs, ys, xq, yq


def _max_rel_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in b)


@pytest.mark.filterwarnings("ignore::UserWarning")  # fixed-K CG diagnostics, if any
def test_root_vjp_block_equals_the_custom_root_meta_gradient() -> None:
    blocks = _blocks()
    setup = [
        _block_with("build_model", blocks),  # §1
        _block_with("bl.stationarity(inner_objective)", blocks),  # §2
        _block_with("def adapt", blocks),  # §3
        _block_with("def task_meta_grad", blocks),  # §4
    ]
    traceable = _block_with("bl.root_vjp", blocks)  # §5, compiled path
    xs, ys, xq, yq = _task()
    ns = _run([*setup, traceable], {"images": xs})
    theta = ns["theta"]
    expected = ns["task_meta_grad"](theta, xs, ys, xq, yq)  # through custom_root
    got = ns["traceable_task_meta_grad"](theta, xs, ys, xq, yq)
    assert set(got) == set(expected)
    assert _max_rel_diff(got, expected) <= 1e-4

    # the comparison is sensitive to the bug the block had: without adapt's ridge=2.0 the
    # system is H + λI instead of H + (λ + ρ)I, a different meta-gradient
    undamped = traceable.replace("ridge=2.0", "ridge=0.0")
    assert undamped != traceable
    wrong = _run([undamped], ns)["traceable_task_meta_grad"](theta, xs, ys, xq, yq)
    assert _max_rel_diff(wrong, expected) >= 0.05
