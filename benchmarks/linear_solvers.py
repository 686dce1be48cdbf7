"""Speed of the linear solvers relative to their matvec, and iterations to a tolerance.

Two problems:

* ``dense``: an SPD matrix (n = 1000, condition number 1e3, float64), ``matvec = A @ v``;
* ``mlp_hessian``: the damped Hessian ``H + λI`` of a small MLP's loss as a matrix-free
  operator on the parameter dict, ``v ↦ Hv + λv``, linearised once with ``torch.func``.

For every solver: the cost of one iteration relative to one bare ``matvec`` (fixed budget,
timed together with the bare matvecs in the same repeat; median over repeats), and the
iterations and time to reach ``‖r‖ ≤ 1e-6·‖b‖``. For the SciPy bridge, the overhead per
product over calling SciPy on a NumPy matrix directly. CG's own overhead beyond its matvecs
(``per_iteration − 1``) is the number to keep at or below 15% at n = 1000.

Usage::

    python benchmarks/linear_solvers.py [--quick] [--out benchmarks/results/linear_solvers.json]
"""

# ruff: noqa: E402  (BLAS thread variables must be set before numpy and torch load)
from __future__ import annotations

import os

# Single-threaded BLAS by default: on a shared machine, CPU time of one thread is the only
# clock that other load does not distort (set these variables to override).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import scipy.sparse.linalg as spla
import torch

import bilevel as bl

TOL = 1e-6


def spd_problem(n: int, condition: float, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(0.0, math.log10(condition), n, dtype=torch.float64)
    a = ((q * eigenvalues) @ q.T).contiguous()
    a = 0.5 * (a + a.T)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    return {
        "name": f"dense SPD n={n} cond={condition:.0e} float64",
        "matvec": lambda v: a @ v,
        "b": b,
        "matrix": a,
        "alpha": 2.0 / (1.0 + condition),
        "diagonal": torch.diagonal(a).clone(),
        "n": n,
    }


def mlp_problem(hidden: int, samples: int, damping: float, seed: int = 0) -> dict[str, Any]:
    """``H + λI`` for the cross-entropy loss of a 2-hidden-layer MLP, on a parameter dict."""
    g = torch.Generator().manual_seed(seed)
    inputs, classes = 20, 5
    sizes = [(hidden, inputs), (hidden, hidden), (classes, hidden)]
    params = {}
    for i, (fan_out, fan_in) in enumerate(sizes):
        params[f"w{i}"] = torch.randn(fan_out, fan_in, generator=g) / math.sqrt(fan_in)
        params[f"b{i}"] = torch.zeros(fan_out)
    x = torch.randn(samples, inputs, generator=g)
    y = torch.randint(0, classes, (samples,), generator=g)

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        h = torch.tanh(x @ p["w0"].T + p["b0"])
        h = torch.tanh(h @ p["w1"].T + p["b1"])
        return torch.nn.functional.cross_entropy(h @ p["w2"].T + p["b2"], y)

    _, hvp = torch.func.linearize(torch.func.grad(loss), params)

    def matvec(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return bl.tree.tree_axpy(damping, v, hvp(v))

    b = {k: torch.randn(t.shape, generator=g) for k, t in params.items()}
    n = sum(t.numel() for t in params.values())
    return {
        "name": f"MLP Hessian + {damping}·I, {n} parameters (dict of 6 tensors) float32",
        "matvec": matvec,
        "b": b,
        "matrix": None,
        "alpha": 0.5 / damping,
        "diagonal": None,
        "n": n,
    }


def timed(fn: Callable[[], Any]) -> float:
    """CPU seconds of this process spent in ``fn`` (immune to other processes' load)."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def per_iteration_ratio(
    problem: dict[str, Any], solver: bl.LinearSolver, repeats: int
) -> tuple[float, float, int]:
    """Median over interleaved repeats of (solver time per iteration) / (one bare matvec).

    Returns the ratio, the median matvec time and the iterations the solver performed (an
    adaptive solver given an unreachable tolerance can still stop early, e.g. on breakdown
    at rounding level in float32, so the division uses the count it reports).
    """
    matvec, b = problem["matvec"], problem["b"]
    _, info = solver(matvec, b)  # warm-up, and the iteration count
    k = int(info.iterations)
    ratios, matvec_times = [], []
    for _ in range(repeats):
        t_matvec = timed(lambda: [matvec(b) for _ in range(k)]) / k
        t_solver = timed(lambda: solver(matvec, b)) / k
        ratios.append(t_solver / t_matvec)
        matvec_times.append(t_matvec)
    return statistics.median(ratios), statistics.median(matvec_times), k


class TorchCGFloor:
    """The same CG iteration written inline with plain torch calls: no library at all.

    The cost of any CG in eager PyTorch (one matvec, two dots, three axpys per iteration),
    measured like the solvers, so the library's own share of the overhead is visible.
    """

    def __init__(self, maxiter: int) -> None:
        self.maxiter = maxiter

    def __call__(self, matvec: Callable[[Any], Any], b: torch.Tensor) -> tuple[Any, Any]:
        x, r, p = torch.zeros_like(b), b, b
        rz = float(torch.dot(r, r))
        for _ in range(self.maxiter):
            ap = matvec(p)
            alpha = rz / float(torch.dot(p, ap))
            x = torch.add(x, p, alpha=alpha)
            r = torch.add(r, ap, alpha=-alpha)
            rz_new = float(torch.dot(r, r))
            p = torch.add(r, p, alpha=rz_new / rz)
            rz = rz_new
        return x, bl.SolveInfo(True, self.maxiter, math.sqrt(rz), "fixed_iterations")


def solvers_for(problem: dict[str, Any], budget: int) -> dict[str, tuple[Any, ...]]:
    """name → (fixed-budget solver or None, adaptive solver reaching TOL)."""
    jacobi = None
    if problem["diagonal"] is not None:
        inverse = 1.0 / problem["diagonal"]
        jacobi = lambda r: inverse * r  # noqa: E731
    # An unreachable tolerance makes an adaptive solver run its whole budget.
    never = {"tol": 1e-300, "atol": 1e-300, "maxiter": budget}
    big = 20 * budget
    table: dict[str, tuple[Any, ...]] = {
        "CG": (bl.CG(**never), bl.CG(tol=TOL, maxiter=big)),
        "CG fixed-K": (bl.CG(tol=0, maxiter=budget), None),
        "Neumann": (bl.Neumann(steps=budget, alpha=problem["alpha"]), None),
        "GMRES(20)": (bl.GMRES(**never), bl.GMRES(tol=TOL, maxiter=big)),
        "GMRES(20) fixed-K": (bl.GMRES(tol=0, maxiter=budget), None),
        "NormalCG": (bl.NormalCG(**never), bl.NormalCG(tol=TOL, maxiter=big)),
        "NormalCG fixed-K": (bl.NormalCG(tol=0, maxiter=budget), None),
    }
    if isinstance(problem["b"], torch.Tensor):
        table["torch CG loop (floor)"] = (TorchCGFloor(budget), None)
    if jacobi is not None:
        table["CG + Jacobi"] = (
            bl.CG(preconditioner=jacobi, **never),
            bl.CG(tol=TOL, maxiter=big, preconditioner=jacobi),
        )
    for method in ("cg", "minres", "gmres", "bicgstab", "lgmres"):
        cap = big if method not in ("gmres", "lgmres") else max(big // 20, 5)
        table[f"SciPy {method}"] = (None, bl.SciPy(method, tol=TOL, maxiter=cap))
    if problem["n"] <= 2000:
        table["Dense LU"] = (None, bl.Dense())
        table["Dense Cholesky"] = (None, bl.Dense(positive_definite=True))
    return table


def scipy_native_overhead(problem: dict[str, Any], repeats: int) -> dict[str, float] | None:
    """Bridge time minus SciPy's own time on the NumPy matrix, per matvec, in µs."""
    if problem["matrix"] is None:
        return None
    a_np, b_np = problem["matrix"].numpy(), problem["b"].numpy()
    solver = bl.SciPy("cg", tol=TOL, maxiter=10_000)
    bridge, native, count = [], [], 0
    for _ in range(repeats):
        bridge.append(timed(lambda: solver(problem["matvec"], problem["b"])))
        native.append(timed(lambda: spla.cg(a_np, b_np, rtol=TOL, maxiter=10_000)))
    _, info = solver(problem["matvec"], problem["b"])
    count = info.stats["matvecs"]
    t_bridge, t_native = statistics.median(bridge), statistics.median(native)
    return {
        "bridge_s": t_bridge,
        "native_scipy_s": t_native,
        "matvecs": count,
        "overhead_per_matvec_us": 1e6 * (t_bridge - t_native) / count,
    }


def run_problem(problem: dict[str, Any], budget: int, repeats: int) -> dict[str, Any]:
    rows = []
    for name, (fixed, adaptive) in solvers_for(problem, budget).items():
        row: dict[str, Any] = {"solver": name}
        if fixed is not None:
            ratio, t_matvec, k = per_iteration_ratio(problem, fixed, repeats)
            row["per_iteration_vs_matvec"] = ratio
            row["matvec_us"] = 1e6 * t_matvec
            row["timed_iterations"] = k
        if adaptive is not None:
            times = []
            for _ in range(max(1, repeats // 2)):
                t = timed(lambda s=adaptive: s(problem["matvec"], problem["b"]))
                times.append(t)
            _, info = adaptive(problem["matvec"], problem["b"])
            row["iterations_to_tol"] = int(info.iterations)
            row["converged"] = bool(info.converged)
            row["reason"] = info.reason
            row["matvecs_to_tol"] = int(info.stats.get("matvecs", info.iterations))
            row["time_to_tol_ms"] = 1e3 * statistics.median(times)
            if "SciPy" in name:  # the whole solve, per product
                row["scipy_time_per_matvec_us"] = (
                    1e3 * row["time_to_tol_ms"] / max(1, row["matvecs_to_tol"])
                )
        rows.append(row)
    return {"problem": problem["name"], "rows": rows}


def print_table(result: dict[str, Any]) -> None:
    print(f"\n## {result['problem']}\n")
    print("| solver | time/iteration ÷ matvec | iterations to 1e-6 | matvecs | time to 1e-6 |")
    print("|---|---:|---:|---:|---:|")
    for row in result["rows"]:
        ratio = row.get("per_iteration_vs_matvec")
        ratio_s = f"{ratio:.2f}" if ratio is not None else "—"
        if "iterations_to_tol" in row:
            iters = str(row["iterations_to_tol"]) + ("" if row["converged"] else " (not conv.)")
            mv, t = str(row["matvecs_to_tol"]), f"{row['time_to_tol_ms']:.1f} ms"
        else:
            iters, mv, t = "(fixed-K)", "—", "—"
        print(f"| {row['solver']} | {ratio_s} | {iters} | {mv} | {t} |")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--out", default="benchmarks/results/linear_solvers.json")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, budget, repeats = (300, 30, 3) if args.quick else (1000, 100, 15)
    problems = [
        spd_problem(n, 1e3),
        mlp_problem(
            hidden=16 if args.quick else 32, samples=64 if args.quick else 256, damping=1.0
        ),
    ]
    results = {
        "environment": {
            "torch": torch.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "clock": "time.process_time (CPU time), median of interleaved repeats",
            "quick": args.quick,
            "budget_iterations": budget,
            "repeats": repeats,
        },
        "problems": [],
    }
    for problem in problems:
        result = run_problem(problem, budget, repeats)
        result["scipy_bridge"] = scipy_native_overhead(problem, repeats)
        results["problems"].append(result)
        print_table(result)
        if result["scipy_bridge"]:
            s = result["scipy_bridge"]
            print(
                f"\nSciPy bridge (cg): {1e3 * s['bridge_s']:.1f} ms vs SciPy on the NumPy matrix "
                f"{1e3 * s['native_scipy_s']:.1f} ms, {s['matvecs']} matvecs: "
                f"{s['overhead_per_matvec_us']:.1f} µs overhead per matvec"
            )
    rows = {r["solver"]: r for r in results["problems"][0]["rows"]}
    overhead = {
        key: rows[name]["per_iteration_vs_matvec"] - 1.0
        for key, name in [
            ("adaptive", "CG"),
            ("fixed_k", "CG fixed-K"),
            ("torch_loop_floor", "torch CG loop (floor)"),
        ]
    }
    results["cg_overhead"] = {**overhead, "target": 0.15, "n": n}
    print(
        f"\nCG overhead beyond its matvecs at n={n}: adaptive {100 * overhead['adaptive']:.1f}%, "
        f"fixed-K {100 * overhead['fixed_k']:.1f}%, inline torch loop "
        f"{100 * overhead['torch_loop_floor']:.1f}% (target ≤ 15%)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
