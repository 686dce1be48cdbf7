"""One implicit rule under torch.compile: every composition against the ridge closed form.

torch 2.13's dynamo inlines an ``autograd.Function`` under ``torch.func`` transforms and drops
its custom backward without an error (pytorch#193279); ``bl.custom_root`` carries its rule in
a form the compiler keeps. Each test compiles a realistic user program and compares it with
the closed form ``dL/dλ = −u ⊙ w*`` — a compiled gradient that silently lost the implicit
term would be ``0`` (the inner solve is detached) and fail here. Compilation costs seconds
per graph on two cores, so the problems are tiny and each test compiles once.
"""

from __future__ import annotations

import pytest
import torch
from _references import F64, Ridge, rel_err

import bilevel as bl

D = 4


def _problem() -> Ridge:
    return Ridge.make(d=D, seed=3)


def _closed_form_solver(p: Ridge) -> bl.ImplicitFunction:
    """Fixed-K CG backward over a closed-form inner solve: traceable, no host syncs."""
    return bl.custom_root(bl.stationarity(Ridge.inner_loss), solver=bl.CG(tol=0, maxiter=2 * D))(
        p.closed_form_inner
    )


def _objective(p: Ridge, solve: bl.ImplicitFunction):
    def hyper(lam: torch.Tensor) -> torch.Tensor:
        return p.outer_loss(solve(torch.zeros(D, dtype=F64), lam, p.X, p.y))

    return hyper


def test_compiled_vmap_of_grad_matches_closed_form() -> None:
    p = _problem()
    hyper = _objective(p, _closed_form_solver(p))
    lams = torch.stack([p.lam, 0.5 * p.lam, p.lam.flip(0)])
    got = torch.compile(torch.func.vmap(torch.func.grad(hyper)), fullgraph=True)(lams)
    ref = torch.stack([p.closed_form(lam) for lam in lams])
    assert got.abs().min() > 0  # the implicit term survived compilation
    assert rel_err(got, ref) <= 1e-8
    assert rel_err(got, torch.func.vmap(torch.func.grad(hyper))(lams)) <= 1e-12  # = eager


def test_compiled_vmap_of_grad_through_an_intermediate_hyperparameter() -> None:
    # λ = exp(log λ) is computed in the graph: dynamo traces an autograd.Function fed by an
    # intermediate as a higher-order op (not inlined), which the decorator must not rely on.
    p = _problem()
    solve = _closed_form_solver(p)

    def hyper(log_lam: torch.Tensor) -> torch.Tensor:
        return p.outer_loss(solve(torch.zeros(D, dtype=F64), log_lam.exp(), p.X, p.y))

    log_lams = torch.stack([p.lam, 0.5 * p.lam]).log()
    got = torch.compile(torch.func.vmap(torch.func.grad(hyper)), fullgraph=True)(log_lams)
    ref = torch.stack([p.closed_form(lam) * lam for lam in log_lams.exp()])  # chain rule
    assert rel_err(got, ref) <= 1e-8


def test_compiled_grad_of_a_tree_solution_matches_closed_form() -> None:
    # x* is a dict (two leaves): the traced rule ravels it at one boundary.
    p = _problem()

    def loss(w: dict, lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return Ridge.inner_loss(torch.cat([w["a"], w["b"]]), lam, X, y)

    @bl.custom_root(bl.stationarity(loss), solver=bl.CG(tol=0, maxiter=2 * D))
    def solve(w0: dict, lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> dict:
        w = p.closed_form_inner(None, lam, X, y)
        return {"a": w[:2], "b": w[2:]}

    def hyper(lam: torch.Tensor) -> torch.Tensor:
        w = solve({"a": torch.zeros(2, dtype=F64), "b": torch.zeros(2, dtype=F64)}, lam, p.X, p.y)
        return p.outer_loss(torch.cat([w["a"], w["b"]]))

    got = torch.compile(torch.func.grad(hyper), fullgraph=True)(p.lam)
    assert rel_err(got, p.closed_form()) <= 1e-10


def test_compiled_backward_keeps_the_eager_rule_or_refuses_fullgraph() -> None:
    # No torch.func transform: the call runs eagerly (a graph break), so .backward() gets the
    # binding's own backward; fullgraph=True refuses the break instead of dropping the rule.
    p = _problem()
    solve = bl.custom_root(bl.stationarity(Ridge.inner_loss), solver=bl.CG(tol=1e-12))(
        p.closed_form_inner
    )
    lam = p.lam.clone().requires_grad_(True)
    torch.compile(_objective(p, solve))(lam).backward()
    assert rel_err(lam.grad, p.closed_form()) <= 1e-10
    assert solve.latest_info is not None and not solve.latest_info.failed
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"implicit differentiation under plain autograd"):
        torch.compile(_objective(p, solve), fullgraph=True)(lam)


def test_compiled_grad_through_an_unrolled_gd_inner_loop_equals_eager() -> None:
    # A GD loop traces into the graph (unrolled) while its iterations stay unrecorded.
    p = _problem()
    step = 1.0 / (p.lipschitz() + 1.0)

    @bl.custom_root(bl.stationarity(Ridge.inner_loss), solver=bl.CG(tol=0, maxiter=2 * D))
    def solve(w0: torch.Tensor, lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor):
        w = w0
        for _ in range(12):
            w = w - step * Ridge.gradient(w, lam, X, y)
        return w

    hyper = _objective(p, solve)
    got = torch.compile(torch.func.grad(hyper), fullgraph=True)(p.lam)
    eager = torch.func.grad(hyper)(p.lam)
    assert got.abs().min() > 0
    assert rel_err(got, eager) <= 1e-12


def test_compiled_implicit_grad_matches_closed_form() -> None:
    p = _problem()
    solve = _closed_form_solver(p)
    value_and_grad = bl.implicit_grad(solve, p.outer_loss)
    x0 = torch.zeros(D, dtype=F64)
    value, (g_lam, _, _) = torch.compile(value_and_grad, fullgraph=True)(x0, p.lam, p.X, p.y)
    assert rel_err(g_lam, p.closed_form()) <= 1e-8
    eager_value, (eager_lam, _, _) = value_and_grad(x0, p.lam, p.X, p.y)
    assert rel_err(value, eager_value) <= 1e-12 and rel_err(g_lam, eager_lam) <= 1e-12


def test_forward_mode_under_compile_raises_instead_of_dropping_the_rule() -> None:
    p = _problem()
    hyper = _objective(p, _closed_form_solver(p))
    jvp = torch.compile(lambda lam, t: torch.func.jvp(hyper, (lam,), (t,)), fullgraph=True)
    with pytest.raises(Exception, match=r"pytorch#192985"):
        jvp(p.lam, torch.ones(D, dtype=F64))


def test_has_aux_under_compile_needs_one_eager_call_first() -> None:
    p = _problem()

    @bl.custom_root(
        bl.stationarity(Ridge.inner_loss), solver=bl.CG(tol=0, maxiter=2 * D), has_aux=True
    )
    def solve(w0, lam, X, y):
        w = p.closed_form_inner(w0, lam, X, y)
        return w, {"residual": Ridge.gradient(w, lam, X, y).norm(), "method": "closed form"}

    def hyper(lam: torch.Tensor) -> torch.Tensor:
        w, aux = solve(torch.zeros(D, dtype=F64), lam, p.X, p.y)
        return p.outer_loss(w) + 0 * aux["residual"]

    compiled = torch.compile(torch.func.grad(hyper), fullgraph=True)
    with pytest.raises(Exception, match=r"call it once outside torch\.compile"):
        compiled(p.lam)
    torch._dynamo.reset()
    _, aux = solve(torch.zeros(D, dtype=F64), p.lam, p.X, p.y)  # the eager call
    assert aux["method"] == "closed form"
    got = torch.compile(torch.func.grad(hyper), fullgraph=True)(p.lam)
    assert rel_err(got, p.closed_form()) <= 1e-10


def test_compiling_before_any_eager_call_does_not_recompile_on_new_values() -> None:
    # The first call is compiled: x*'s structure is taken from x0 inside the trace, without
    # writing to the implicit function (a traced attribute write guards and recompiles).
    p = _problem()
    hyper = _objective(p, _closed_form_solver(p))
    counters = torch._dynamo.utils.counters["stats"]
    before = counters["unique_graphs"]
    compiled = torch.compile(torch.func.grad(hyper), fullgraph=True)
    first = compiled(p.lam)
    second = compiled(0.5 * p.lam)
    assert counters["unique_graphs"] == before + 1
    assert rel_err(first, p.closed_form(p.lam)) <= 1e-8
    assert rel_err(second, p.closed_form(0.5 * p.lam)) <= 1e-8


def test_compiled_vmap_without_grad_returns_the_solution() -> None:
    # No reverse pass asks for the rule: the traced forward must not attach its hook.
    p = _problem()
    solve = _closed_form_solver(p)
    lams = torch.stack([p.lam, 2.0 * p.lam])
    batched = torch.func.vmap(lambda lam: solve(torch.zeros(D, dtype=F64), lam, p.X, p.y))
    got = torch.compile(batched, fullgraph=True)(lams)
    ref = torch.stack([p.closed_form_inner(None, lam, p.X, p.y) for lam in lams])
    assert rel_err(got, ref) <= 1e-12
