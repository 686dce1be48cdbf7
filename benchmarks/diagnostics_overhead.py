"""Eager cost of the implicit layer: this checkout against an older one.

Written for the issue-11 diagnostics (divergence guard, best-residual tracking, root and NaN
checks, the failure policy), which must not slow the hypergradient by more than 5%, and used
again for issue 15's tensor-only binding (baseline: the commit before it, ``df9f88e``). With
``--d 20`` the linear algebra is negligible and the ratio is the per-call overhead of the
binding itself. This times the backward of
``custom_root`` on ridge regression (float64, d = 500, n = 2000, ``bl.stationarity`` and a
hand-written F; CG fixed-K with 20 steps and adaptive to 1e-10) in child processes that
import either this checkout or ``--baseline`` (a checkout of an older commit, e.g. made with
``git worktree add /tmp/old <commit>``), alternating the two in every round so that machine
load affects both alike. CPU time of the calling thread, median over rounds.

Usage::

    python benchmarks/diagnostics_overhead.py --baseline /tmp/old [--rounds 7]
        [--out benchmarks/results/diagnostics_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
import bilevel as bl
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
d = int(sys.argv[1]); n = 4 * d
X = torch.randn(n, d, generator=g, dtype=torch.float64) / n ** 0.5
y = torch.randn(n, generator=g, dtype=torch.float64)
lam = 0.5 + torch.rand(d, generator=g, dtype=torch.float64)
w = torch.linalg.solve(X.T @ X + torch.diag(lam), X.T @ y)
v = torch.randn(d, generator=g, dtype=torch.float64)
loss = lambda w, lam: 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (lam * w * w).sum()
hand = lambda w, lam: X.T @ (X @ w - y) + lam * w
out = {}
for fname, F in (("stationarity", bl.stationarity(loss)), ("hand", hand)):
    solvers = (("cg_fixed20", bl.CG(tol=0, maxiter=20)),
               ("cg_tol1e-10", bl.CG(tol=1e-10, maxiter=500)))
    for sname, solver in solvers:
        solve = bl.custom_root(F, solver=solver, symmetric=True)(lambda x0, lam: w)
        times = []
        for i in range(12):
            l = lam.clone().requires_grad_(True)
            t0 = time.thread_time()
            (solve(w, l) @ v).backward()
            times.append(time.thread_time() - t0)
        out[f"{fname}/{sname}"] = sorted(times[2:])[len(times[2:]) // 2]
print(json.dumps(out))
"""


def run(tree: Path, d: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(d)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--d", type=int, default=500, help="ridge dimension (n = 4d)")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/diagnostics_overhead.json")
    )
    options = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    samples: dict[str, dict[str, list[float]]] = {"baseline": {}, "current": {}}
    for _ in range(options.rounds):
        for label, tree in (("baseline", options.baseline.resolve()), ("current", here)):
            for key, value in run(tree, options.d).items():
                samples[label].setdefault(key, []).append(value)
    rows = []
    print(f"{'case':28} {'baseline ms':>12} {'current ms':>11} {'ratio':>7}")
    for key in samples["current"]:
        old = statistics.median(samples["baseline"][key]) * 1e3
        new = statistics.median(samples["current"][key]) * 1e3
        rows.append({"case": key, "baseline_ms": old, "current_ms": new, "ratio": new / old})
        print(f"{key:28} {old:12.2f} {new:11.2f} {new / old:7.3f}")
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(
        json.dumps(
            {
                "rows": rows,
                "rounds": options.rounds,
                "d": options.d,
                "baseline": str(options.baseline),
                "command": "python benchmarks/diagnostics_overhead.py " + " ".join(sys.argv[1:]),
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {options.out}")


if __name__ == "__main__":
    main()
