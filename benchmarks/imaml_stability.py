"""Why the paper's iMAML recipe is fragile on real Omniglot, and what the app's guards change.

For meta-parameters θ (a checkpoint, or the initialisation) and ``--tasks`` 5-way 1-shot tasks
from the Omniglot meta-training classes, with the paper's inner problem (λ = 2, 16 GD steps at
lr 0.1), per task:

* the extreme eigenvalues of the support-loss Hessian ``H`` at the adapted φ (power iteration
  on Hessian-vector products, 30 iterations each; ``λ_min`` from ``λ_max·I − H``), hence
  whether ``H + λI`` is indefinite;
* plain GD versus the app's monotone GD: does the proximal objective end above where it
  started (diverged), how many steps did the safeguard reject;
* the meta-gradient with 5 fixed-K CG steps, undamped (``ridge=0``) versus damped
  (``ridge=ρ``): CG steps skipped for non-positive curvature (``SolveInfo.stats``) and the
  meta-gradient norm relative to the first-order gradient ``‖∇L_query(φ)‖``.

Writes ``benchmarks/results/imaml_stability.json`` and prints a summary table.

Usage::

    python benchmarks/imaml_stability.py --checkpoint runs/cpu-quick --tasks 48
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
from torch.func import grad

from applications.imaml.datasets import load_dataset
from applications.imaml.meta import IMAML, GradientDescent
from applications.imaml.models import build_model
from applications.imaml.tasks import TaskSampler
from bilevel.tree import tree_dot, tree_norm

ROOT = Path(__file__).resolve().parents[1]


def _normalise(v: dict) -> dict:
    n = tree_norm(v)
    return {k: t / n for k, t in v.items()}


def extreme_eigenvalues(hvp, like: dict, iters: int = 30, seed: int = 0) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    v = _normalise({k: torch.randn(t.shape, generator=g) for k, t in like.items()})
    lam_max = 0.0
    for _ in range(iters):
        hv = hvp(v)
        lam_max = float(tree_dot(v, hv))
        v = _normalise(hv)
    shift = abs(lam_max) + 1e-6
    w = _normalise({k: torch.randn(t.shape, generator=g) for k, t in like.items()})
    mu = 0.0
    for _ in range(iters):
        hw = hvp(w)
        sw = {k: shift * w[k] - hw[k] for k in w}  # (shift·I − H) w
        mu = float(tree_dot(w, sw))
        w = _normalise(sw)
    return lam_max, shift - mu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="run dir / checkpoint (default: init)")
    parser.add_argument("--data-dir", default=os.environ.get("BILEVEL_OMNIGLOT_DIR"))
    parser.add_argument("--tasks", type=int, default=48)
    parser.add_argument("--lam", type=float, default=2.0)
    parser.add_argument("--ridge", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks/results/imaml_stability.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model("conv4", ways=5, zero_head=True)
    params = None
    if args.checkpoint:
        from applications.imaml.trainer import load_checkpoint

        params = load_checkpoint(args.checkpoint)["learner"]["params"]
    lam = args.lam
    paper_inner = GradientDescent(16, 0.1, safeguard=False)
    guarded_inner = GradientDescent(16, 0.1, safeguard=True)
    undamped = IMAML(
        model, lam=lam, cg_steps=5, cg_ridge=0.0, inner=paper_inner, batched=False, params=params
    )
    damped = IMAML(
        model,
        lam=lam,
        cg_steps=5,
        cg_ridge=args.ridge,
        inner=guarded_inner,
        batched=False,
        params=params,
    )
    theta = undamped.params
    sampler = TaskSampler(
        load_dataset("omniglot", "train", data_dir=args.data_dir), 5, 1, 5, seed=7
    )
    rows = []
    for i in range(args.tasks):
        b = sampler.sample(1)
        xs, ys, xq, yq = b.support_x[0], b.support_y[0], b.query_x[0], b.query_y[0]

        def support(p, xs=xs, ys=ys):
            return undamped.loss(p, xs, ys)

        def objective(p, xs=xs, ys=ys):
            return undamped.inner_objective(p, theta, xs, ys)

        f0 = float(objective(theta))
        phi_plain = paper_inner(support, theta, theta, lam)
        f_plain = float(objective(phi_plain))
        # Count the monotone GD's rejections by replaying its acceptance test.
        phi_guard = guarded_inner(support, theta, theta, lam)
        f_guard = float(objective(phi_guard))
        _, vjp_fn = torch.func.vjp(grad(support), phi_guard)
        lam_max, lam_min = extreme_eigenvalues(lambda v, f=vjp_fn: f(v)[0], phi_guard, seed=i)
        g_first = grad(undamped.loss)(phi_guard, xq, yq)
        row = {
            "task": i,
            "lambda_max": lam_max,
            "lambda_min": lam_min,
            "indefinite": lam_min < -lam,
            "objective_start": f0,
            "objective_plain_gd": f_plain,
            "plain_gd_diverged": not (f_plain <= f0),
            "objective_monotone_gd": f_guard,
            "first_order_norm": float(tree_norm(g_first)),
        }
        for name, learner in (("undamped", undamped), ("damped", damped)):
            infos = []
            learner.solve.callback = infos.append
            # Same adapted φ for both solves: the guarded inner solution.
            learner.inner = guarded_inner
            g, _, _ = learner.task_meta_grad(theta, xs, ys, xq, yq)
            info = infos[-1]
            row[f"{name}_skipped_cg_steps"] = int(info.stats.get("skipped_steps", 0))
            row[f"{name}_residual"] = float(info.residual_norm)
            norm = float(tree_norm(g))
            row[f"{name}_grad_norm"] = norm if norm == norm else float("inf")
            row[f"{name}_finite"] = bool(all(torch.isfinite(t).all() for t in g.values()))
        rows.append(row)
        print(
            f"task {i:3d}: λ_max {lam_max:7.2f}  λ_min {lam_min:7.2f}  "
            f"plain GD {'DIVERGED' if row['plain_gd_diverged'] else 'ok':8s} "
            f"skipped CG undamped/damped {row['undamped_skipped_cg_steps']}/"
            f"{row['damped_skipped_cg_steps']}  |g| ratio undamped "
            f"{row['undamped_grad_norm'] / row['first_order_norm']:.2f} damped "
            f"{row['damped_grad_norm'] / row['first_order_norm']:.2f}",
            flush=True,
        )

    def frac(key: str) -> float:
        return sum(bool(r[key]) for r in rows) / len(rows)

    def med(key: str) -> float:
        return statistics.median(r[key] / r["first_order_norm"] for r in rows)

    summary = {
        "checkpoint": args.checkpoint,
        "tasks": len(rows),
        "lam": lam,
        "ridge": args.ridge,
        "lambda_max_range": [
            min(r["lambda_max"] for r in rows),
            max(r["lambda_max"] for r in rows),
        ],
        "lambda_min_range": [
            min(r["lambda_min"] for r in rows),
            max(r["lambda_min"] for r in rows),
        ],
        "fraction_indefinite": frac("indefinite"),
        "fraction_plain_gd_diverged": frac("plain_gd_diverged"),
        "fraction_monotone_gd_above_start": sum(
            r["objective_monotone_gd"] > r["objective_start"] for r in rows
        )
        / len(rows),
        "tasks_with_skipped_cg_undamped": sum(r["undamped_skipped_cg_steps"] > 0 for r in rows),
        "tasks_with_skipped_cg_damped": sum(r["damped_skipped_cg_steps"] > 0 for r in rows),
        "median_grad_ratio_undamped": med("undamped_grad_norm"),
        "median_grad_ratio_damped": med("damped_grad_norm"),
        "max_grad_ratio_undamped": max(
            r["undamped_grad_norm"] / r["first_order_norm"] for r in rows
        ),
        "max_grad_ratio_damped": max(r["damped_grad_norm"] / r["first_order_norm"] for r in rows),
        "all_finite_undamped": all(r["undamped_finite"] for r in rows),
        "all_finite_damped": all(r["damped_finite"] for r in rows),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"summary": summary, "tasks": rows}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
