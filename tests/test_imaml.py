"""iMAML application: meta-gradient correctness, vmap = loop, training, resume, CLI, stability."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from _references import tiny_imaml_config
from torch import nn
from torch.func import functional_call

from applications.imaml.meta import (
    FOMAML,
    IMAML,
    MAML,
    GradientDescent,
    NewtonCG,
    TorchOptimizer,
    build_meta_learner,
    confidence_interval,
)
from applications.imaml.models import Conv4, FunctionalModel, build_model
from bilevel.tree import tree_norm, tree_sub

OMNIGLOT_DIR = os.environ.get("BILEVEL_OMNIGLOT_DIR")


def _batch(b: int, n: int, k: int, q: int, *, in_features: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (in_features,) if in_features else (1, 28, 28)
    ys = torch.arange(n).repeat_interleave(k).expand(b, -1).contiguous()
    yq = torch.arange(n).repeat_interleave(q).expand(b, -1).contiguous()
    return SimpleNamespace(
        support_x=torch.rand(b, n * k, *shape, generator=g, dtype=torch.float64),
        support_y=ys,
        query_x=torch.rand(b, n * q, *shape, generator=g, dtype=torch.float64),
        query_y=yq,
    )


def _tiny_mlp(seed: int = 0) -> FunctionalModel:
    torch.manual_seed(seed)
    return FunctionalModel(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)))


def _rel(a: dict, b: dict) -> float:
    return float(tree_norm(tree_sub(a, b)) / tree_norm(b))


# --- meta-gradient correctness --------------------------------------------------------------


def test_imaml_meta_gradient_matches_dense_reference():
    """(I + H/λ)⁻¹ ∇L_test at the adapted φ, with H from autograd.functional.hessian."""
    lam = 3.0
    model = _tiny_mlp()
    learner = IMAML(
        model,
        lam=lam,
        cg_steps=80,  # ≥ #params (51): CG is exact in exact arithmetic
        inner=GradientDescent(steps=30, lr=0.2),
        dtype=torch.float64,
        batched=False,
    )
    batch = _batch(1, 3, 2, 4, in_features=4)
    xs, ys, xq, yq = (t[0] for t in vars(batch).values())
    theta = learner.params
    grads, _, _ = learner.task_meta_grad(theta, xs, ys, xq, yq)

    # Independent reference on flat vectors.
    names = list(theta)
    shapes = [theta[k].shape for k in names]
    sizes = [theta[k].numel() for k in names]

    def unflat(v):
        return {k: p.reshape(s) for k, p, s in zip(names, v.split(sizes), shapes, strict=True)}

    phi = learner.adapt(theta, xs, ys, "prox")
    phi_flat = torch.cat([phi[k].reshape(-1) for k in names])

    def support_loss(v):
        return nn.functional.cross_entropy(functional_call(model.module, unflat(v), (xs,)), ys)

    def query_loss(v):
        return nn.functional.cross_entropy(functional_call(model.module, unflat(v), (xq,)), yq)

    hessian = torch.autograd.functional.hessian(support_loss, phi_flat)
    g_test = torch.autograd.functional.jacobian(query_loss, phi_flat)
    eye = torch.eye(len(phi_flat), dtype=torch.float64)
    assert torch.linalg.eigvalsh(hessian + lam * eye).min() > 0  # the theory's assumption
    reference = torch.linalg.solve(eye + hessian / lam, g_test)
    ours = torch.cat([grads[k].reshape(-1) for k in names])
    torch.testing.assert_close(ours, reference, rtol=1e-7, atol=1e-10)


def test_imaml_gradient_differs_from_first_order():
    """The implicit correction is not a no-op (guards against a silently zero second term)."""
    model = _tiny_mlp(1)
    learner = IMAML(model, lam=0.5, cg_steps=20, dtype=torch.float64, batched=False)
    batch = _batch(1, 3, 2, 4, in_features=4, seed=1)
    xs, ys, xq, yq = (t[0] for t in vars(batch).values())
    grads, _, _ = learner.task_meta_grad(learner.params, xs, ys, xq, yq)
    phi = learner.adapt(learner.params, xs, ys)
    first_order = torch.func.grad(learner.loss)(phi, xq, yq)
    assert _rel(grads, first_order) > 1e-3


@pytest.mark.parametrize(
    "make",
    [
        lambda m: IMAML(m, lam=2.0, cg_steps=4, inner=GradientDescent(3, 0.1), dtype=torch.float64),
        lambda m: IMAML(m, lam=2.0, cg_steps=3, inner=NewtonCG(2, 3), dtype=torch.float64),
        lambda m: MAML(m, steps=2, lr=0.1, dtype=torch.float64),
        lambda m: FOMAML(m, steps=2, lr=0.1, dtype=torch.float64),
    ],
    ids=["imaml-gd", "imaml-newton-cg", "maml", "fomaml"],
)
def test_vmap_equals_loop(make):
    model = FunctionalModel(Conv4(5, hidden=4))
    learner = make(model)
    batch = _batch(2, 5, 1, 2)
    g_vmap, s_vmap = learner.meta_gradient(batch)
    learner.batched = False
    g_loop, s_loop = learner.meta_gradient(batch)
    assert _rel(g_vmap, g_loop) < 1e-10
    torch.testing.assert_close(s_vmap["loss"], s_loop["loss"])
    # evaluation too
    learner.batched = True
    ev = learner.evaluate(batch, "prox")
    learner.batched = False
    torch.testing.assert_close(ev, learner.evaluate(batch, "prox"))


@pytest.mark.parametrize("method", ["imaml", "maml", "fomaml"])
def test_compiled_meta_batch_equals_eager(method):
    """compile=True: the same meta-gradient and statistics as the eager vmap (both through
    the one custom_root-decorated solve), and it really is compiled."""
    kwargs = {"lam": 2.0, "cg_steps": 2} if method == "imaml" else {}
    batch = _batch(3, 3, 2, 2, in_features=4)
    batch.support_x, batch.query_x = batch.support_x.float(), batch.query_x.float()
    eager = build_meta_learner(method, _tiny_mlp(), inner=GradientDescent(2, 0.3), **kwargs)
    compiled = build_meta_learner(
        method, _tiny_mlp(), inner=GradientDescent(2, 0.3), compile=True, **kwargs
    )
    graphs = torch._dynamo.utils.counters["stats"]
    before = graphs["unique_graphs"]
    g_eager, s_eager = eager.meta_gradient(batch)
    g_compiled, s_compiled = compiled.meta_gradient(batch)
    assert _rel(g_compiled, g_eager) < 1e-5
    torch.testing.assert_close(s_compiled["loss"], s_eager["loss"])
    assert graphs["unique_graphs"] == before + 1  # one whole graph: no break, no fallback
    # Later meta-steps reuse it (static shapes, parameters updated in place: no recompile).
    compiled.step(batch)
    compiled.meta_gradient(batch)
    assert graphs["unique_graphs"] == before + 1


def test_compile_needs_the_vmapped_meta_batch():
    with pytest.raises(ValueError, match="needs batched=True"):
        IMAML(_tiny_mlp(), batched=False, compile=True)


def test_torch_optim_inner_solver_matches_gd():
    """A torch.optim SGD inner loop (per-task, autograd path) = the functional GD path."""
    model = _tiny_mlp(2)
    batch = _batch(2, 3, 2, 3, in_features=4, seed=2)
    gd = IMAML(
        model,
        lam=2.0,
        cg_steps=10,
        inner=GradientDescent(5, 0.1, safeguard=False),
        dtype=torch.float64,
    )
    sgd = IMAML(
        model,
        lam=2.0,
        cg_steps=10,
        inner=TorchOptimizer(torch.optim.SGD, steps=5, lr=0.1),
        dtype=torch.float64,
        batched=False,
    )
    g1, _ = gd.meta_gradient(batch)
    g2, _ = sgd.meta_gradient(batch)
    assert _rel(g2, g1) < 1e-10
    with pytest.raises(ValueError, match="vmap"):
        IMAML(model, inner=TorchOptimizer(torch.optim.SGD, steps=1, lr=0.1))


def test_maml_second_order_differs_from_first_order():
    model = FunctionalModel(Conv4(5, hidden=8))
    batch = _batch(2, 5, 1, 2)
    g2, _ = MAML(model, steps=2, lr=0.4, dtype=torch.float64).meta_gradient(batch)
    g1, _ = FOMAML(model, steps=2, lr=0.4, dtype=torch.float64).meta_gradient(batch)
    assert _rel(g2, g1) > 1e-4


# --- stability -----------------------------------------------------------------------------


class _Bilinear(nn.Module):
    """pred = w₀·w₁·x: the MSE Hessian at w = 0 is [[0, −2xy], [−2xy, 0]], indefinite."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w[0] * self.w[1] * x


@pytest.mark.parametrize("batched", [True, False])
def test_indefinite_system_gives_finite_meta_gradient(batched):
    lam = 1.0
    learner = IMAML(
        FunctionalModel(_Bilinear()),
        task="regression",
        lam=lam,
        cg_steps=5,
        inner=GradientDescent(steps=0),  # stay at the saddle θ = 0
        dtype=torch.float64,
        batched=batched,
    )
    x = torch.ones(1, 4, 1, dtype=torch.float64)
    y = 5.0 * x
    batch = SimpleNamespace(support_x=x, support_y=y, query_x=x, query_y=y)
    # H + λI at φ = θ = 0 is indefinite: eigenvalues λ ± 2·x·y = 1 ± 10.
    h = torch.autograd.functional.hessian(
        lambda w: ((w[0] * w[1] * x[0] - y[0]) ** 2).mean(), torch.zeros(2, dtype=torch.float64)
    )
    assert torch.linalg.eigvalsh(h + lam * torch.eye(2, dtype=torch.float64)).min() < 0
    grads, stats = learner.meta_gradient(batch)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert int(stats["nonfinite_tasks"]) == 0
    stats = learner.step(batch)
    assert all(torch.isfinite(p).all() for p in learner.params.values())


def test_monotone_gd_survives_a_stiff_task():
    """lr far beyond 2/L: plain GD blows up, the safeguarded GD stays finite and decreases."""
    a = torch.tensor([100.0, 1.0], dtype=torch.float64)

    def loss(p):
        return 0.5 * (a * p["w"] ** 2).sum()

    p0 = {"w": torch.ones(2, dtype=torch.float64)}
    plain = GradientDescent(steps=30, lr=0.5, safeguard=False)(loss, p0)
    guarded = GradientDescent(steps=30, lr=0.5, safeguard=True)(loss, p0)
    assert not torch.isfinite(loss(plain)) or loss(plain) > 1e10
    assert torch.isfinite(loss(guarded)) and loss(guarded) < loss(p0)


def test_nonfinite_task_is_zeroed():
    model = _tiny_mlp(3)
    learner = IMAML(model, lam=2.0, cg_steps=3, dtype=torch.float64)
    batch = _batch(3, 3, 2, 2, in_features=4, seed=3)
    batch.query_x[1, 0, 0] = float("nan")
    grads, stats = learner.meta_gradient(batch)
    assert int(stats["nonfinite_tasks"]) == 1
    assert all(torch.isfinite(g).all() for g in grads.values())
    # The logged loss is the mean over the two finite tasks, not NaN.
    losses, _ = learner.evaluate(batch)
    assert torch.isnan(losses[1])
    torch.testing.assert_close(stats["loss"], losses[[0, 2]].mean())


def test_evaluation_excludes_and_counts_diverged_tasks():
    """A test task whose adaptation diverges is reported, not averaged in as NaN."""
    from applications.imaml.trainer import describe_result, evaluate_learner

    model = _tiny_mlp(3)
    learner = IMAML(model, lam=2.0, cg_steps=3, dtype=torch.float64)
    batch = _batch(4, 3, 2, 2, in_features=4, seed=3)
    batch.query_x[2, 0, 0] = float("nan")

    class Once:
        def sample(self, n):
            assert n == 4
            return batch

    res = evaluate_learner(learner, Once(), 4, batch=4, modes=("prox",))["prox"]
    _, metrics = learner.evaluate(batch)
    assert res["nonfinite_tasks"] == 1 and res["tasks"] == 4
    assert res["metric"] == pytest.approx(float(metrics[[0, 1, 3]].mean()))
    line = describe_result("prox", res, regression=False)
    assert line.startswith("accuracy (prox adaptation, 4 tasks): ")
    assert "1 task(s) whose adaptation diverged" in line
    assert describe_result("gd", {**res, "nonfinite_tasks": 0}, regression=True).startswith(
        "MSE (gd adaptation, 4 tasks): "
    )


# --- training, resume, CLI --------------------------------------------------------------------


_tiny_cfg = tiny_imaml_config


def test_few_meta_steps_lower_the_meta_test_loss():
    from applications.imaml.datasets import load_dataset
    from applications.imaml.tasks import TaskSampler
    from applications.imaml.trainer import build_learner

    cfg = _tiny_cfg(hidden=8, meta_batch=4, inner_steps=2, meta_lr=1e-2)
    learner = build_learner(cfg)
    train = TaskSampler(load_dataset("glyphs", "train"), 5, 1, 2, seed=0)
    test = TaskSampler(load_dataset("glyphs", "test"), 5, 1, 2, seed=1).sample(16)
    before = learner.evaluate(test, "prox")[0].mean()
    for _ in range(15):
        learner.step(train.sample(4))
    after = learner.evaluate(test, "prox")[0].mean()
    assert after < before - 0.05, (before, after)


# --- sinusoid regression ---------------------------------------------------------------------


def test_imaml_regression_meta_gradient_matches_dense_reference():
    """Regression (MSE) flavour of the dense check, on a small ReLU MLP and sinusoid tasks."""
    from applications.imaml.models import SineMLP
    from applications.imaml.sinusoid import SinusoidSampler

    lam = 1.5
    torch.manual_seed(3)
    model = FunctionalModel(SineMLP(hidden=6))  # 6 + 6 + 36 + 6 + 6 + 1 = 61 parameters
    learner = IMAML(
        model,
        task="regression",
        lam=lam,
        cg_steps=90,  # ≥ #params: exact in exact arithmetic
        inner=GradientDescent(steps=40, lr=0.05),
        dtype=torch.float64,
        batched=False,
    )
    task = SinusoidSampler(10, 10, seed=4).sample(1)
    xs, ys, xq, yq = (
        t[0].double() for t in (task.support_x, task.support_y, task.query_x, task.query_y)
    )
    theta = learner.params
    grads, _, _ = learner.task_meta_grad(theta, xs, ys, xq, yq)

    names = list(theta)
    sizes = [theta[k].numel() for k in names]

    def unflat(v):
        parts = v.split(sizes)
        return {k: p.reshape(theta[k].shape) for k, p in zip(names, parts, strict=True)}

    phi = learner.adapt(theta, xs, ys, "prox")
    phi_flat = torch.cat([phi[k].reshape(-1) for k in names])

    def mse(v, x, y):
        return nn.functional.mse_loss(functional_call(model.module, unflat(v), (x,)), y)

    hessian = torch.autograd.functional.hessian(lambda v: mse(v, xs, ys), phi_flat)
    g_test = torch.autograd.functional.jacobian(lambda v: mse(v, xq, yq), phi_flat)
    eye = torch.eye(len(phi_flat), dtype=torch.float64)
    assert torch.linalg.eigvalsh(hessian + lam * eye).min() > 0
    reference = torch.linalg.solve(eye + hessian / lam, g_test)
    ours = torch.cat([grads[k].reshape(-1) for k in names])
    torch.testing.assert_close(ours, reference, rtol=1e-7, atol=1e-10)


def test_sinusoid_meta_training_learns_an_adaptable_initialisation():
    """A short iMAML run on sinusoids: held-out tasks' post-adaptation MSE falls well below the
    untrained model's, and adapting on 10 support points beats not adapting at all."""
    from applications.imaml.sinusoid import SinusoidSampler
    from applications.imaml.trainer import build_learner

    cfg = _tiny_cfg(
        dataset="sinusoid",
        shots=10,
        queries=10,
        meta_batch=10,
        inner_steps=10,
        inner_lr=0.02,
        lam=1.0,
        cg_steps=5,
        cg_ridge=1.0,
    )
    learner = build_learner(cfg)
    train = SinusoidSampler(10, 10, seed=0)
    test = SinusoidSampler(10, 10, seed=1).sample(100)
    before = learner.evaluate(test, "prox")[1].mean()
    for _ in range(150):
        stats = learner.step(train.sample(10))
        assert int(stats["nonfinite_tasks"]) == 0
    after = learner.evaluate(test, "prox")[1].mean()
    unadapted = nn.functional.mse_loss(
        learner.model(learner.params, test.query_x), test.query_y, reduction="none"
    ).mean()
    assert after < 0.6 * before, (before, after)
    assert after < 0.8 * unadapted, (after, unadapted)


def test_learning_curve_of_a_run_shorter_than_one_log_interval(tmp_path):
    """No metric line yet: the plot is still written, without matplotlib's empty-legend warning."""
    import warnings

    from applications.imaml.trainer import plot_curve

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_curve(metrics, tmp_path / "curve.png", title="imaml sinusoid", ylabel="MSE")
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_cli_sinusoid_preset_smoke(tmp_path, capsys):
    from applications.imaml.cli import main

    out = tmp_path / "sin"
    args = ["train", "--preset", "sinusoid", "--out-dir", str(out), "--steps", "3"]
    args += "--val-every 2 --val-tasks 4 --test-tasks 6 --meta-batch 4 --no-progress".split()
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "test MSE (prox adaptation, 6 tasks)" in text
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["dataset"] == "sinusoid"
    assert results["test"]["gd"]["metric"] > 0


def test_cli_resume_can_switch_compile_on(tmp_path, capsys):
    from applications.imaml.cli import main

    out = str(tmp_path / "sin")
    args = ["train", "--preset", "sinusoid", "--out-dir", out, "--steps", "2", "--no-progress"]
    args += "--inner-steps 1 --cg-steps 1 --meta-batch 2 --val-every 0 --test-tasks 2".split()
    assert main([*args, "--stop-after", "1"]) == 0
    graphs = torch._dynamo.utils.counters["stats"]
    before = graphs["unique_graphs"]
    assert main(["train", "--out-dir", out, "--resume", "--compile", "--no-progress"]) == 0
    assert graphs["unique_graphs"] == before + 1
    results = json.loads((tmp_path / "sin/results.json").read_text())
    assert results["config"]["compile"] is True and results["meta_steps"] == 2


def test_resume_equals_uninterrupted(tmp_path):
    from applications.imaml.trainer import load_checkpoint, train

    cfg = _tiny_cfg(steps=4, test_tasks=0)
    train(cfg, tmp_path / "full", progress=False, log=lambda s: None)
    part = train(cfg, tmp_path / "part", stop_after=2, progress=False, log=lambda s: None)
    assert part.get("interrupted")
    assert load_checkpoint(tmp_path / "part")["step"] == 2
    train(cfg, tmp_path / "part", resume=True, progress=False, log=lambda s: None)
    full = load_checkpoint(tmp_path / "full")
    resumed = load_checkpoint(tmp_path / "part")
    assert resumed["step"] == full["step"] == 4
    for k, v in full["learner"]["params"].items():
        assert torch.equal(v, resumed["learner"]["params"][k]), k
    steps = [
        r["step"]
        for r in map(json.loads, (tmp_path / "part/metrics.jsonl").open())
        if r["kind"] == "train"
    ]
    assert steps == [1, 2, 3, 4]


def test_cli_train_and_evaluate_glyphs(tmp_path, capsys):
    from applications.imaml.cli import main

    out = tmp_path / "run"
    args = ["train", "--dataset", "glyphs", "--out-dir", str(out)]
    args += (
        "--steps 3 --meta-batch 4 --inner-steps 2 --cg-steps 2 --hidden 8 --val-every 2 "
        "--val-tasks 4 --test-tasks 6 --eval-batch 3 --threads 1 --no-progress"
    ).split()
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "test accuracy (prox adaptation, 6 tasks)" in text
    assert "test accuracy (gd adaptation, 6 tasks)" in text
    for name in ("checkpoint.pt", "metrics.jsonl", "curve.png", "results.json", "config.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["test"]["prox"]["metric"] <= 1.0
    assert main(["evaluate", str(out), "--tasks", "6", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert set(evaluated["test"]) == {"prox", "gd"}


def test_cli_evaluate_overrides_adaptation_only(tmp_path, capsys):
    """``evaluate --inner-steps/--inner-lr/--lam`` change how tasks adapt, not θ.

    With 0 inner steps both modes leave φ = θ, so prox and gd give the same numbers, and those
    are the query loss of θ itself, computed here from the checkpoint's parameters directly.
    """
    from applications.imaml.cli import main
    from applications.imaml.rundir import load_checkpoint
    from applications.imaml.trainer import TEST_SEED, config_from_checkpoint, make_sampler

    out = tmp_path / "run"
    args = ["train", "--dataset", "glyphs", "--out-dir", str(out)]
    args += (
        "--steps 2 --meta-batch 4 --inner-steps 2 --cg-steps 2 --hidden 8 --val-every 0 "
        "--test-tasks 0 --eval-batch 3 --threads 1 --no-progress"
    ).split()
    assert main(args) == 0
    capsys.readouterr()

    def evaluate(*extra: str) -> dict:
        argv = ["evaluate", str(out), "--tasks", "5", "--split", "val", "--json", *extra]
        assert main(argv) == 0
        return json.loads(capsys.readouterr().out)

    run_default = evaluate()
    frozen = evaluate("--inner-steps", "0")
    longer = evaluate("--inner-steps", "6", "--inner-lr", "0.05", "--lam", "0.25")
    assert run_default["adaptation"]["overridden"] == []
    assert run_default["adaptation"]["inner_steps"] == 2
    assert frozen["adaptation"]["overridden"] == ["inner_steps"]
    assert longer["adaptation"] == {
        "inner": "gd",
        "inner_steps": 6,
        "inner_lr": 0.05,
        "lam": 0.25,
        "overridden": ["inner_lr", "inner_steps", "lam"],
    }
    assert frozen["test"]["prox"] == frozen["test"]["gd"]

    state = load_checkpoint(out)
    cfg = config_from_checkpoint(state, out / "checkpoint.pt")
    model = build_model("conv4", ways=cfg.ways, hidden=cfg.hidden, zero_head=cfg.zero_head)
    sampler = make_sampler(cfg, "val", queries=cfg.eval_queries, seed=TEST_SEED)
    theta = state["learner"]["params"]
    losses = []
    with torch.no_grad():
        for batch in (sampler.sample(3), sampler.sample(2)):  # as evaluate draws, --eval-batch 3
            for xq, yq in zip(batch.query_x, batch.query_y, strict=True):
                losses.append(nn.functional.cross_entropy(model(theta, xq), yq))
    assert frozen["test"]["gd"]["loss"] == pytest.approx(float(torch.stack(losses).mean()), 1e-5)
    assert run_default["test"]["gd"]["loss"] != pytest.approx(frozen["test"]["gd"]["loss"])

    assert main(["evaluate", str(out), "--tasks", "5", "--inner-steps", "6"]) == 0
    assert "adaptation overridden for this evaluation: inner_steps = 6" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--inner-steps", "-1", "--inner-steps must be >= 0"),
        ("--inner-lr", "0", "--inner-lr must be > 0"),
        ("--lam", "0", "--lam must be > 0"),
    ],
)
def test_cli_evaluate_refuses_bad_adaptation(flag, value, message, capsys):
    from applications.imaml.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "run", flag, value])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not OMNIGLOT_DIR, reason="BILEVEL_OMNIGLOT_DIR is not set (real Omniglot)")
def test_cli_train_and_evaluate_omniglot(tmp_path, capsys):
    from applications.imaml.cli import main

    out = tmp_path / "run"
    args = ["train", "--preset", "cpu-quick", "--data-dir", OMNIGLOT_DIR, "--out-dir", str(out)]
    args += (
        "--steps 2 --meta-batch 2 --inner-steps 1 --hidden 8 --val-every 0 --test-tasks 4 "
        "--eval-batch 4 --threads 1 --no-progress"
    ).split()
    assert main(args) == 0
    assert "test accuracy (prox adaptation, 4 tasks)" in capsys.readouterr().out
    assert main(["evaluate", str(out), "--tasks", "4"]) == 0
    assert "omniglot/test: accuracy (gd adaptation, 4 tasks)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train"], "give --preset NAME or at least --dataset"),
        (["train", "--preset", "nope"], "invalid choice"),
        (["train", "--dataset", "glyphs", "--lam", "-1"], "--lam must be > 0"),
        (["train", "--dataset", "glyphs", "--shots", "10", "--queries", "15"], "<= 20"),
        (["train", "--dataset", "glyphs", "--steps", "x"], "expected a int"),
        (["train", "--dataset", "glyphs", "--method", "reptile"], "--method must be"),
        (["train", "--dataset", "glyphs", "--compile", "--no-vmap"], "drop --no-vmap"),
        (
            ["train", "--dataset", "glyphs", "--alphabet-tasks", "0.5"],
            "needs --dataset omniglot-lake",
        ),
        (["train", "--dataset", "omniglot-lake", "--alphabet-tasks", "2"], "must be in [0, 1]"),
        (["evaluate", "/nonexistent/run"], "no checkpoint"),
    ],
)
def test_cli_bad_arguments(argv, message, capsys):
    from applications.imaml.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_presets_are_literal_paper_values():
    from applications.imaml.cli import PRESETS

    for name, steps, ways in (("paper-5w1s", 16, 5), ("paper-20w5s", 25, 20)):
        p = PRESETS[name]
        assert (p["inner_steps"], p["ways"], p["lam"], p["cg_steps"]) == (steps, ways, 2.0, 5)
        assert (p["meta_batch"], p["meta_lr"], p["inner_lr"]) == (32, 1e-3, 0.1)


def test_cpu_long_10_is_cpu_long_with_more_adaptation():
    """The recorded run's preset: cpu-long's recipe except the inner steps and the length."""
    from applications.imaml.cli import PRESETS

    long, long10 = PRESETS["cpu-long"], PRESETS["cpu-long-10"]
    differ = {k for k in long.keys() | long10.keys() if long.get(k) != long10.get(k)}
    assert differ == {"inner_steps", "steps", "time_limit"}
    assert (long10["inner_steps"], long10["steps"]) == (10, 10500)


def test_confidence_interval():
    mean, half = confidence_interval(torch.tensor([0.0, 1.0] * 50))
    assert mean == pytest.approx(0.5)
    assert half == pytest.approx(1.96 * 0.5025 / 10, rel=1e-3)


def test_models_work_under_vmap_and_have_no_buffers():
    m = build_model("conv4", ways=5)
    assert m.buffers == {}
    # conv1 (64·9 + 64), conv2-4 (64·64·9 + 64 each), 4 BatchNorms (2·64), head (256·5 + 5)
    assert m.num_params() == 640 + 3 * 36928 + 4 * 128 + 1285
    p = m.init_params()
    x = torch.rand(3, 5, 1, 28, 28)
    out = torch.func.vmap(m, in_dims=(None, 0))(p, x)
    assert out.shape == (3, 5, 5)
    torch.testing.assert_close(out[1], m(p, x[1]))
    mlp = build_model("mlp")
    assert mlp(mlp.init_params(), torch.rand(7, 1)).shape == (7, 1)


def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    """A training process killed with SIGKILL mid-run resumes to the uninterrupted result."""
    import signal
    import subprocess
    import sys
    import time

    from applications.imaml.cli import main
    from applications.imaml.trainer import load_checkpoint

    flags = (
        "--dataset glyphs --steps 30 --meta-batch 4 --inner-steps 2 --cg-steps 2 --hidden 8 "
        "--val-every 0 --test-tasks 0 --ckpt-every 1 --threads 1 --no-progress"
    ).split()
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "applications.imaml", "train", *flags, "--out-dir", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            ckpt = killed / "checkpoint.pt"
            if ckpt.is_file() and load_checkpoint(ckpt)["step"] >= 3:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    step = load_checkpoint(killed)["step"]
    assert 3 <= step < 30, step  # killed mid-run
    assert main(["train", "--out-dir", str(killed), "--resume", "--no-progress"]) == 0
    assert main(["train", *flags, "--out-dir", str(tmp_path / "full")]) == 0
    a = load_checkpoint(killed)["learner"]["params"]
    b = load_checkpoint(tmp_path / "full")["learner"]["params"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not OMNIGLOT_DIR, reason="BILEVEL_OMNIGLOT_DIR is not set (real Omniglot)")
def test_cli_lake_one_shot_runs(tmp_path, capsys):
    from applications.imaml.cli import main

    out = tmp_path / "lake"
    args = ["train", "--preset", "lake-20w1s", "--data-dir", OMNIGLOT_DIR]
    # Meta-training tasks within one alphabet (as the runs are); evaluation stays random.
    args += (
        f"--steps 1 --meta-batch 2 --inner-steps 1 --hidden 8 --test-tasks 2 "
        f"--eval-batch 2 --threads 1 --no-progress --alphabet-tasks 1 --out-dir {out}"
    ).split()
    assert main(args) == 0
    assert "Lake et al.'s 20 one-shot runs, gd: error rate" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["alphabet_tasks"] == 1.0
    trained = results["lake_one_shot"]
    assert main(["evaluate", str(out), "--tasks", "2", "--lake-runs", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["lake_one_shot"]) == {"prox", "gd"}
    assert 0.0 <= res["lake_one_shot"]["gd"] <= 1.0
    # 400 test images per mode: the error rate is a multiple of 1/400, the same from both commands
    assert res["lake_one_shot"] == pytest.approx(trained)
    assert all((400 * e) == pytest.approx(round(400 * e)) for e in trained.values())


@pytest.mark.skipif(not OMNIGLOT_DIR, reason="BILEVEL_OMNIGLOT_DIR is not set (real Omniglot)")
def test_lake_runs_error_needs_a_20_way_model():
    from applications.imaml.trainer import lake_runs_error

    learner = IMAML(build_model("conv4", ways=5, hidden=8), lam=1.0, inner=GradientDescent(1, 0.1))
    with pytest.raises(ValueError, match=r"20-way.*5 outputs"):
        lake_runs_error(learner, OMNIGLOT_DIR, modes=("gd",))


@pytest.mark.skipif(not OMNIGLOT_DIR, reason="BILEVEL_OMNIGLOT_DIR is not set (real Omniglot)")
def test_cli_lake_runs_reject_a_5_way_checkpoint(tmp_path, capsys):
    from applications.imaml.cli import main

    out = tmp_path / "lake5"
    args = ["train", "--dataset", "omniglot-lake", "--data-dir", OMNIGLOT_DIR, "--ways", "5"]
    args += (
        "--steps 1 --meta-batch 2 --inner-steps 1 --hidden 8 --test-tasks 0 --no-progress".split()
    )
    args += ["--out-dir", str(out)]
    assert main(args) == 0
    assert "lake_one_shot" not in json.loads((out / "results.json").read_text())
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(out), "--tasks", "2", "--lake-runs"])
    assert exc.value.code == 2
    assert "--lake-runs: Lake's one-shot runs are 20-way; this model has 5 outputs" in (
        capsys.readouterr().err
    )
