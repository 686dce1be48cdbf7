"""Fixed-K Krylov solves on symmetric *indefinite* systems: which strategy is sound.

iMAML's backward system is ``(H + λI) u = g`` with ``H`` a network Hessian, indefinite when
``H`` has eigenvalues below ``−λ``. A fixed-K solve (``tol=0``, run under ``vmap``) cannot stop
on a host-side test, so it must stay bounded by construction. This script compares, on
``A = Q diag(e) Qᵀ`` (n = 200, a few eigenvalues in [−3, −0.5], the rest in [0.5, 10]) and on
the 4×4 ``diag(3, 1, −2, 0.5)`` that exposed the old guard:

* ``skip_restart``: the previous fixed-K CG (skip a step with ``pᵀAp ≤ 0`` and restart the
  search direction from the residual), re-implemented here for reference;
* ``freeze``: stop updating at the first ``pᵀAp ≤ 0`` (truncated-Newton style);
* ``bl.CG``: the library's fixed-K CG (Galerkin steps kept, best-residual iterate returned);
* ``bl.MINRES``: the library's fixed-K MINRES (monotone residual by construction).

It prints the relative error ``‖x − x*‖/‖x*‖`` and relative residual ``‖b − Ax‖/‖b‖`` at
several K, and writes them as JSON. Usage::

    python benchmarks/indefinite_krylov.py [--out benchmarks/results/indefinite_krylov.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

import bilevel as bl

F64 = torch.float64
Solve = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def skip_restart(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """The fixed-K CG this library shipped before: skip non-positive curvature, restart."""
    x, r = torch.zeros_like(b), b.clone()
    p, rz = r.clone(), r @ r
    tiny = torch.finfo(b.dtype).tiny
    for _ in range(k):
        ap = a @ p
        curvature = p @ ap
        step = float(curvature > 0)
        alpha = rz * step / curvature.clamp_min(tiny)
        x, r = x + alpha * p, r - alpha * ap
        rz_new = r @ r
        p = r + (rz_new * step / rz.clamp_min(tiny)) * p
        rz = rz_new
    return x


def freeze(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """CG that stops updating at the first non-positive curvature."""
    x, r = torch.zeros_like(b), b.clone()
    p, rz, active = r.clone(), r @ r, True
    for _ in range(k):
        ap = a @ p
        curvature = p @ ap
        active = active and bool(curvature > 0)
        if not active:
            break
        alpha = rz / curvature
        x, r = x + alpha * p, r - alpha * ap
        rz_new = r @ r
        p, rz = r + (rz_new / rz) * p, rz_new
    return x


def library(solver: Callable[[int], bl.LinearSolver]) -> Solve:
    def solve(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
        return solver(k)(lambda v: a @ v, b)[0]

    return solve


METHODS: dict[str, Solve] = {
    "skip_restart": skip_restart,
    "freeze": freeze,
    "bl.CG": library(lambda k: bl.CG(tol=0, maxiter=k)),
    "bl.MINRES": library(lambda k: bl.MINRES(tol=0, maxiter=k)),
}


def imaml_like(n: int, negatives: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    e = torch.cat(
        [
            -0.5 - 2.5 * torch.rand(negatives, generator=g, dtype=F64),
            0.5 + 9.5 * torch.rand(n - negatives, generator=g, dtype=F64),
        ]
    )
    return (q * e) @ q.T, torch.randn(n, generator=g, dtype=F64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/indefinite_krylov.json")
    )
    options = parser.parse_args()
    problems = {
        "diag(3,1,-2,0.5)": (
            torch.diag(torch.tensor([3.0, 1.0, -2.0, 0.5], dtype=F64)),
            torch.ones(4, dtype=F64),
            (2, 4, 20, 60),
        ),
    }
    for seed in range(3):
        a, b = imaml_like(200, 6, seed)
        problems[f"imaml_like_n200_neg6_seed{seed}"] = (a, b, (5, 20, 100))
    rows = []
    print(f"{'problem':34} {'method':13} {'K':>4} {'rel. error':>11} {'rel. residual':>14}")
    for name, (a, b, budgets) in problems.items():
        x_star = torch.linalg.solve(a, b)
        for method, solve in METHODS.items():
            for k in budgets:
                x = solve(a, b, k)
                error = float(
                    torch.linalg.vector_norm(x - x_star) / torch.linalg.vector_norm(x_star)
                )
                residual = float(torch.linalg.vector_norm(b - a @ x) / torch.linalg.vector_norm(b))
                rows.append(
                    {
                        "problem": name,
                        "method": method,
                        "K": k,
                        "rel_error": error,
                        "rel_residual": residual,
                    }
                )
                print(f"{name:34} {method:13} {k:4d} {error:11.3g} {residual:14.3g}")
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps({"rows": rows, "torch": torch.__version__}, indent=1) + "\n")
    print(f"wrote {options.out}")


if __name__ == "__main__":
    main()
