"""The iMAML tutorial's code blocks compute what the page says they compute.

docs/imaml_tutorial.md is not a fully runnable page (it refers to data batches), so it is
not in test_docs.RUNNABLE_PAGES; its self-contained blocks are run here, in page order, on a
few random images. The compiled meta-batch block of §5 is checked task by task against the
eager meta-gradient of §4 (through the same decorated ``adapt``) and against a dense
reference ``λ(H + (λ+ρ)I)⁻¹∇L`` built with ``torch.autograd.functional.hessian``, so a block
that drops the implicit term, or the ridge, fails. Compiling the page's 64-filter Conv4 takes
minutes on two cores: the model is shrunk to 4 filters and the inner loop to 3 steps by
rewriting those two literals (the assertions check the rewrites hit).
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


def _shrunk(block: str, old: str, new: str) -> str:
    assert old in block, f"the tutorial no longer contains {old!r}: update this test"
    return block.replace(old, new)


def _run(blocks: list[str], namespace: dict) -> dict:
    for i, block in enumerate(blocks):
        exec(compile(block, f"{PAGE.name} (block {i})", "exec"), namespace)
    return namespace


def _tasks(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 5, 1, 28, 28, generator=g)
    xq = torch.randn(n, 5, 1, 28, 28, generator=g)
    ys = torch.arange(5).expand(n, -1).contiguous()
    yq = torch.stack([torch.randperm(5, generator=g) for _ in range(n)])
    return xs, ys, xq, yq


def _rel(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖b‖ over the whole tree (BatchNorm makes the conv biases' gradients ~0)."""
    num = sum(float((a[k] - b[k]).double().square().sum()) for k in b)
    den = sum(float(b[k].double().square().sum()) for k in b)
    return (num / den) ** 0.5


def _dense_meta_grad(ns: dict, theta: dict, task: tuple, rho: float) -> dict:
    """λ (H + (λ+ρ)I)⁻¹ ∇L_query(φ) at the page's adapted φ, from a dense Hessian."""
    xs, ys, xq, yq = task
    names = list(theta)
    shapes = [theta[k].shape for k in names]
    sizes = [theta[k].numel() for k in names]
    phi = {k: v.detach() for k, v in ns["adapt"](theta, theta, xs, ys).items()}

    def unflat(v: torch.Tensor) -> dict:
        return {k: p.view(s) for k, p, s in zip(names, v.split(sizes), shapes, strict=True)}

    flat = torch.cat([phi[k].reshape(-1) for k in names]).double()

    def support(v: torch.Tensor) -> torch.Tensor:
        return ns["support_loss"]({k: t.float() for k, t in unflat(v).items()}, xs, ys)

    H = torch.autograd.functional.hessian(lambda v: support(v).double(), flat)
    query = torch.func.grad(lambda p: ns["F"].cross_entropy(ns["model"](p, xq), yq))(phi)
    v = torch.cat([query[k].reshape(-1) for k in names]).double()
    lam = ns["lam"]
    # Random images give support Hessians with λ_min ≈ −7: the reference is only a reference
    # for CG (and unique) where the damped system is positive definite.
    assert float(torch.linalg.eigvalsh(H)[0]) + lam + rho > 1.0, "raise rho in the test"
    u = torch.linalg.solve(H + (lam + rho) * torch.eye(len(flat), dtype=H.dtype), v)
    return {k: t.float() for k, t in unflat(lam * u).items()}


@pytest.mark.filterwarnings("ignore::UserWarning")  # fixed-K CG diagnostics, if any
def test_compiled_meta_batch_block_equals_eager_task_meta_grad_and_dense_reference() -> None:
    blocks = _blocks()
    model_block = _shrunk(
        _block_with("build_model", blocks), "zero_head=True)", "zero_head=True, hidden=4)"
    )
    adapt_block = _shrunk(_block_with("def adapt", blocks), "range(16)", "range(3)")
    setup = [
        model_block,  # §1
        _block_with("bl.stationarity(inner_objective)", blocks),  # §2
        adapt_block,  # §3
        _block_with("def task_meta_grad", blocks),  # §4
    ]
    # The same page with a converged backward solve, damped so that H + (λ+ρ)I is positive
    # definite on these random tasks (the page's ρ = 2 is not: CG breaks down), for the
    # dense comparison.
    rho = 10.0
    converged = [
        *setup[:2],
        _shrunk(adapt_block, "tol=0, maxiter=5, ridge=2.0", f"tol=1e-7, maxiter=2000, ridge={rho}"),
        setup[3],
    ]
    compiled_block = _block_with("torch.compile(batched", blocks)  # §5, compiled
    XS, YS, XQ, YQ = _tasks(3)
    ns = _run(setup, {"images": XS[0]})
    theta = ns["theta"]
    # §4 eagerly, one task at a time; with a converged CG it is the dense reference.
    eager = [ns["task_meta_grad"](theta, *(t[i] for t in (XS, YS, XQ, YQ))) for i in range(3)]
    first = tuple(t[0] for t in (XS, YS, XQ, YQ))
    ns_converged = _run(converged, {"images": XS[0]})
    dense = _dense_meta_grad(ns_converged, ns_converged["theta"], first, rho)
    assert _rel(ns_converged["task_meta_grad"](ns_converged["theta"], *first), dense) <= 1e-3

    ns.update(XS=XS, YS=YS, XQ=XQ, YQ=YQ)
    counters = torch._dynamo.utils.counters["stats"]
    before = counters["unique_graphs"]
    meta_grads = _run([compiled_block], ns)["meta_grads"]
    assert counters["unique_graphs"] == before + 1  # fullgraph: one graph, really compiled
    for i in range(3):
        assert _rel({k: g[i] for k, g in meta_grads.items()}, eager[i]) <= 1e-4
