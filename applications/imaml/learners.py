r"""Meta-learners: iMAML (implicit meta-gradients through :mod:`bilevel`), MAML and FOMAML.

This module owns the meta-learners, their losses and metrics and :func:`build_meta_learner`;
the inner solvers they adapt with are in :mod:`applications.imaml.inner`.

iMAML (Rajeswaran, Finn, Kakade & Levine, NeurIPS 2019). For task ``i`` with support loss
``L̂ᵢ`` and query loss ``Lᵢ``, the adapted weights solve the proximal inner problem

.. math::  φᵢ(θ) = \arg\min_φ\; L̂ᵢ(φ) + \tfrac{λ}{2}‖φ − θ‖²,

characterised by ``F(φ, θ) = ∇L̂ᵢ(φ) + λ(φ − θ) = 0``. The implicit function theorem gives
``dφᵢ/dθ = (I + H/λ)⁻¹`` with ``H = ∇²L̂ᵢ(φᵢ)``, so the meta-gradient of task ``i`` is
``(I + H/λ)⁻¹ ∇Lᵢ(φᵢ)``: a few conjugate-gradient steps, with memory independent of how the
inner problem was solved. Here that is exactly three calls of the public bilevel API::

    F = bl.stationarity(inner_objective)                    # ∇L̂(φ) + λ(φ − θ)
    solve = bl.custom_root(F, solver=bl.CG(tol=0, maxiter=5, ridge=ρ))(inner_solver)
    φ = solve(θ, θ, support_x, support_y)                   # differentiable in θ

and ``torch.func.grad`` of the query loss through ``solve``, batched over the tasks of a
meta-batch with ``torch.func.vmap``.

Stability (the paper's recipe diverges on real Omniglot: support-loss Hessians with
``λ_max`` 14–39 make GD at lr 0.1 unstable, and ``H + λI`` is indefinite in about one task
in eight):

* the inner GD is *monotone*: a step that does not decrease the proximal objective is
  rejected and that task's step size halved (branch-free, per task, so it runs under vmap);
* the backward solve is fixed-K MINRES (``bl.MINRES``, Paige & Saunders 1975) on the damped
  system ``H + (λ + ρ)I`` (``ridge=ρ``): where ``H + λI`` is indefinite, CG's iterates have no
  error bound and its former skip-and-restart guard grew them without bound
  (``benchmarks/indefinite_krylov.py``); MINRES's residual never increases, so each task's
  meta-gradient is bounded by construction. On a positive definite system it converges at
  CG's rate;
* a task whose meta-gradient is not finite contributes zero, and the meta-gradient's norm can
  be clipped before the outer Adam step.

Baselines, with the same inner budget: second-order MAML (unrolled; memory grows with the
inner steps) and first-order MAML (``∂φ/∂θ ≈ I``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vmap
from torch.nn import functional as F

import bilevel as bl
from bilevel.tree import tree_norm

from .inner import GradientDescent, InnerSolver, Params, _sq_dist
from .models import FunctionalModel

__all__ = [
    "FOMAML",
    "IMAML",
    "MAML",
    "MetaLearner",
    "build_meta_learner",
    "confidence_interval",
]


# --- losses --------------------------------------------------------------------------------


def _classification_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y)


def _regression_loss(pred: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(pred, y)


def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(-1) == y).to(logits.dtype).mean()


def _all_finite(tree: Params) -> Tensor:
    flags = [torch.isfinite(t).all() for t in tree.values()]
    return torch.stack(flags).all()


def confidence_interval(values: Tensor | Iterable[float]) -> tuple[float, float]:
    """Mean and 95% normal-approximation half-width ``1.96·s/√n``."""
    v = torch.as_tensor(list(values) if not isinstance(values, Tensor) else values).double()
    n = v.numel()
    if n == 0:
        return float("nan"), float("nan")
    half = 1.96 * float(v.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return float(v.mean()), half


# --- meta-learners -------------------------------------------------------------------------


class MetaLearner:
    """Shared machinery: θ as a dict of tensors, meta-batches under ``vmap`` or a loop, Adam.

    Subclasses implement :meth:`task_meta_grad` ``(θ, xs, ys, xq, yq) -> (grads, loss,
    metric)`` for a single task; it must be written with ``torch.func`` so that it runs under
    ``vmap``.

    Args:
        model: the network as a :class:`~applications.imaml.models.FunctionalModel`.
        task: ``"classification"`` (cross-entropy, accuracy) or ``"regression"`` (MSE).
        inner: inner solver used for adaptation.
        meta_lr: outer Adam learning rate.
        batched: run the meta-batch under ``torch.func.vmap`` (``False``: per-task loop).
        max_meta_grad_norm: clip the averaged meta-gradient's norm (``None``: off).
        compile: compile the vmapped meta-batch with ``torch.compile`` (whole graph, static
            shapes). The first meta-step then takes minutes; later ones fuse the element-wise
            passes that dominate on CPU (BatchNorm's double backward). Needs ``batched=True``
            and a vmappable inner solver; a meta-batch or data of another shape recompiles.
        dtype, device: of the meta-parameters θ.
    """

    name = "meta"

    def __init__(
        self,
        model: FunctionalModel,
        *,
        task: str = "classification",
        inner: InnerSolver | None = None,
        meta_lr: float = 1e-3,
        batched: bool = True,
        max_meta_grad_norm: float | None = None,
        compile: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        params: Mapping[str, Tensor] | None = None,
    ) -> None:
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
        self.model = model
        self.task = task
        self.inner = GradientDescent() if inner is None else inner
        self.batched = batched
        if batched and not getattr(self.inner, "vmappable", False):
            raise ValueError(
                f"inner solver {self.inner!r} cannot run under torch.func.vmap; "
                "pass batched=False to use the per-task loop"
            )
        if compile and not batched:
            raise ValueError(
                "compile=True compiles the vmapped meta-batch and needs batched=True; "
                "the per-task loop runs eagerly"
            )
        self.compile = compile
        self._compiled: Callable[..., Any] | None = None
        self.max_meta_grad_norm = max_meta_grad_norm
        source = model.init_params(dtype=dtype, device=device) if params is None else params
        self.params: Params = {k: v.detach().clone().to(dtype=dtype) for k, v in source.items()}
        self.meta_lr = meta_lr
        self.optimizer = torch.optim.Adam(self.params.values(), lr=meta_lr)
        self._loss_fn = _classification_loss if task == "classification" else _regression_loss

    # -- per-task pieces ----------------------------------------------------------------------

    def loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return self._loss_fn(self.model(params, x), y)

    def metric(self, output: Tensor, y: Tensor) -> Tensor:
        """Accuracy (classification) or MSE (regression) of one task's predictions."""
        if self.task == "classification":
            return _accuracy(output, y)
        return _regression_loss(output, y).detach()

    def task_meta_grad(
        self, theta: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor
    ) -> tuple[Params, Tensor, Tensor]:
        raise NotImplementedError

    def query_loss(
        self, phi: Params, xq: Tensor, yq: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``(L(φ), (L(φ) detached, metric))``: the outer objective with its statistics as aux."""
        out = self.model(phi, xq)
        loss = self._loss_fn(out, yq)
        return loss, (loss.detach(), self.metric(out.detach(), yq))

    def adapt(self, theta: Params, xs: Tensor, ys: Tensor, mode: str = "prox") -> Params:
        """Adapted weights for one task (no meta-gradient)."""
        raise NotImplementedError

    # -- meta-batches -----------------------------------------------------------------------

    def meta_gradient_sums(self, batch: Any, *, chunk: int | None = None) -> dict[str, Any]:
        """The sums over the tasks of ``batch`` from which :meth:`meta_gradient` forms its means.

        Returns a tree ``{"grads": Σᵢ gᵢ, "loss": Σ loss, "metric": Σ metric, "tasks": B,
        "counted": n}``: the meta-gradient sum runs over the tasks whose meta-gradient is finite
        (a non-finite one contributes zero), the loss and metric sums over the ``n`` tasks whose
        meta-gradient, loss and metric are all finite; ``tasks`` and ``counted`` are 0-d int64.
        Sums rather than means, so that the sums of the shards of one meta-batch, computed by
        different processes and added with ``bl.distributed.all_reduce_tree(op="sum")``, give
        exactly this batch's sums. An empty batch (a process with no task) gives zeros.

        The sums are accumulated in float64: a sum of a few float32 numbers is exact in
        float64 unless their magnitudes differ by more than about 2²⁴, so after the division
        and the rounding back the float32 mean does not depend on the order of summation, that
        is, on how the meta-batch was split across processes. No host synchronisation.

        Args:
            batch: the meta-batch, or this process's shard of it.
            chunk: with ``batched=True``, compute at most this many tasks per vmapped call
                (default: all of ``batch`` in one). The batched kernels' float32 rounding
                depends on how many tasks one call computes, so a shard made of whole chunks
                (:meth:`applications.imaml.distributed.Team.part` with the same ``chunk``)
                gives every task's meta-gradient bit for bit as one process computing the
                whole meta-batch in the same chunks does. Ignored by the per-task loop.
        """
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be a positive number of tasks, got {chunk!r}")
        theta = self.params
        xs, ys, xq, yq = batch.support_x, batch.support_y, batch.query_x, batch.query_y
        ref = next(iter(theta.values()))
        wide = torch.float64
        tasks = torch.tensor(xs.shape[0], dtype=torch.int64, device=ref.device)
        if xs.shape[0] == 0:
            zero = torch.zeros((), dtype=wide, device=ref.device)
            return {
                "grads": {
                    k: torch.zeros(v.shape, dtype=wide, device=v.device) for k, v in theta.items()
                },
                "loss": zero,
                "metric": zero.clone(),
                "tasks": tasks,
                "counted": torch.zeros_like(tasks),
            }
        if self.batched:
            n = int(xs.shape[0])
            size = n if chunk is None else min(chunk, n)
            parts = [
                self._batched_meta_grad()(
                    theta, xs[i : i + size], ys[i : i + size], xq[i : i + size], yq[i : i + size]
                )
                for i in range(0, n, size)
            ]
            if len(parts) == 1:
                grads, losses, metrics = parts[0]
            else:
                grads = {k: torch.cat([p[0][k] for p in parts]) for k in theta}
                losses = torch.cat([p[1] for p in parts])
                metrics = torch.cat([p[2] for p in parts])
        else:
            outs = [
                self.task_meta_grad(theta, xs[i], ys[i], xq[i], yq[i]) for i in range(xs.shape[0])
            ]
            grads = {k: torch.stack([o[0][k] for o in outs]) for k in theta}
            losses = torch.stack([o[1] for o in outs])
            metrics = torch.stack([o[2] for o in outs])
        # A task whose meta-gradient is not finite contributes zero (no host sync).
        finite = torch.stack([torch.isfinite(g).flatten(1).all(1) for g in grads.values()]).all(0)
        summed = {
            k: torch.where(finite.view(-1, *([1] * (g.dim() - 1))), g, 0.0).sum(0, dtype=wide)
            for k, g in grads.items()
        }
        # Statistics over the tasks that count, so one diverged task cannot turn the logged
        # loss into NaN (it is reported in nonfinite_tasks instead).
        counted = finite & torch.isfinite(losses) & torch.isfinite(metrics)
        return {
            "grads": summed,
            "loss": torch.where(counted, losses, 0.0).sum(dtype=wide),
            "metric": torch.where(counted, metrics, 0.0).sum(dtype=wide),
            "tasks": tasks,
            "counted": counted.sum(),
        }

    def meta_gradient(
        self,
        batch: Any,
        *,
        reduce: Callable[[Any], Any] | None = None,
        chunk: int | None = None,
    ) -> tuple[Params, dict[str, Tensor]]:
        """Average meta-gradient over the tasks of ``batch`` and per-batch statistics.

        Returns ``(grads, stats)`` with ``stats`` holding 0-d tensors ``loss`` (mean query
        loss at the adapted weights), ``metric`` (mean query accuracy or MSE), both over the
        finite tasks, and ``nonfinite_tasks`` (tasks whose meta-gradient, loss or metric was
        not finite: zeroed in the meta-gradient, left out of the means). The meta-gradient is
        the sum over the finite tasks divided by the number of tasks. No host
        synchronisation happens here.

        Args:
            batch: the meta-batch, or this process's shard of it.
            reduce: applied to the tree of :meth:`meta_gradient_sums` before the division; for
                data-parallel training, ``functools.partial(bl.distributed.all_reduce_tree,
                op="sum")`` makes every process return the mean over the whole meta-batch.
            chunk: at most this many tasks per vmapped call (see :meth:`meta_gradient_sums`).
        """
        sums = self.meta_gradient_sums(batch, chunk=chunk)
        if reduce is not None:
            sums = reduce(sums)
        tasks = sums["tasks"].clamp_min(1)
        mean = {k: (s / tasks).to(self.params[k].dtype) for k, s in sums["grads"].items()}
        dtype = next(iter(self.params.values())).dtype
        n = sums["counted"].clamp_min(1)
        stats = {
            "loss": (sums["loss"] / n).to(dtype),
            "metric": (sums["metric"] / n).to(dtype),
            "nonfinite_tasks": sums["tasks"] - sums["counted"],
        }
        return mean, stats

    def _batched_meta_grad(self) -> Callable[..., tuple[Params, Tensor, Tensor]]:
        """``(θ, xs, ys, xq, yq) -> (grads, losses, metrics)`` over a meta-batch (vmap)."""
        if not self.compile:
            return vmap(self.task_meta_grad, in_dims=(None, 0, 0, 0, 0))
        if self._compiled is None:
            batched = vmap(self.task_meta_grad, in_dims=(None, 0, 0, 0, 0))
            # fullgraph: a graph break inside vmap would silently fall back to eager.
            self._compiled = torch.compile(batched, fullgraph=True, dynamic=False)
        return self._compiled

    def step(
        self,
        batch: Any,
        *,
        reduce: Callable[[Any], Any] | None = None,
        chunk: int | None = None,
    ) -> dict[str, Tensor]:
        """One outer Adam step on a meta-batch; returns the statistics of meta_gradient.

        ``reduce`` and ``chunk`` are passed to :meth:`meta_gradient`: with a sum across
        processes, every process takes the same step from the same meta-gradient.
        """
        grads, stats = self.meta_gradient(batch, reduce=reduce, chunk=chunk)
        for k, p in self.params.items():
            p.grad = grads[k]
        norm = tree_norm(grads)
        stats["grad_norm"] = norm
        if self.max_meta_grad_norm is not None:
            scale = torch.clamp(self.max_meta_grad_norm / (norm + 1e-12), max=1.0)
            for p in self.params.values():
                p.grad.mul_(scale)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    @torch.no_grad()
    def evaluate(self, batch: Any, mode: str = "prox") -> tuple[Tensor, Tensor]:
        """Per-task query loss and metric after adapting on the support set.

        ``mode="prox"`` adapts with the training-time inner problem (iMAML: the λ-proximal
        objective); ``mode="gd"`` with plain gradient descent on the support loss (the
        official iMAML evaluation).
        """
        theta = self.params

        def one(xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor]:
            phi = self.adapt(theta, xs, ys, mode)
            out = self.model(phi, xq)
            return self._loss_fn(out, yq), self.metric(out, yq)

        xs, ys, xq, yq = batch.support_x, batch.support_y, batch.query_x, batch.query_y
        if self.batched:
            return vmap(one)(xs, ys, xq, yq)
        outs = [one(xs[i], ys[i], xq[i], yq[i]) for i in range(xs.shape[0])]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {k: v.detach().clone() for k, v in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k, v in state["params"].items():
            self.params[k].data.copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])


class IMAML(MetaLearner):
    """iMAML: implicit meta-gradients through ``bl.custom_root`` with the proximal condition.

    Args:
        lam: proximal strength λ (``φ`` stays near θ; the implicit Jacobian is
            ``(I + H/λ)⁻¹``).
        cg_steps: fixed-K Krylov (MINRES) iterations of the backward solve; the name is the
            paper's "CG steps".
        cg_ridge: damping ρ of the backward solve: MINRES runs on ``H + (λ + ρ)I``, so the
            meta-gradient is ``λ(H + (λ+ρ)I)⁻¹∇L_test``. ``0`` is the paper's undamped
            ``(I + H/λ)⁻¹``.
        **kwargs: see :class:`MetaLearner`.
    """

    name = "imaml"

    def __init__(
        self,
        model: FunctionalModel,
        *,
        lam: float = 2.0,
        cg_steps: int = 5,
        cg_ridge: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if not lam > 0:
            raise ValueError(f"lam must be > 0, got {lam!r}")
        super().__init__(model, **kwargs)
        self.lam = float(lam)
        self.cg_steps = cg_steps
        self.cg_ridge = float(cg_ridge)
        # tol=0: fixed-K, no host sync, runs under vmap; MINRES stays bounded when H + λI is
        # indefinite (about one Omniglot task in eight).
        self.cg = bl.MINRES(tol=0, maxiter=cg_steps, ridge=cg_ridge)
        self.optimality_fn = bl.stationarity(self.inner_objective)
        self.solve = bl.custom_root(self.optimality_fn, solver=self.cg)(self._inner_solve)

    def inner_objective(self, phi: Params, theta: Params, xs: Tensor, ys: Tensor) -> Tensor:
        """``L̂(φ) + λ/2 ‖φ − θ‖²``, whose stationarity is the proximal condition."""
        return self.loss(phi, xs, ys) + 0.5 * self.lam * _sq_dist(phi, theta)

    def _inner_solve(self, phi0: Params, theta: Params, xs: Tensor, ys: Tensor) -> Params:
        # The solver adds the proximal term λ/2‖φ − θ‖² itself (analytic gradient, fused).
        return self.inner(lambda phi: self.loss(phi, xs, ys), phi0, theta, self.lam)

    def task_meta_grad(
        self, theta: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor
    ) -> tuple[Params, Tensor, Tensor]:
        """One task's meta-gradient ``λ(H + (λ+ρ)I)⁻¹∇L(φ*)``, query loss and metric.

        The one path for every mode: ``bl.implicit_grad`` through ``self.solve`` runs on
        autograd for a single eager task (any inner solver, ``torch.optim`` included), and on
        ``torch.func.grad`` under ``vmap`` and ``torch.compile``, where the decorated solve
        carries its implicit rule into the graph.
        """

        def outer(
            phi: Params, th: Params, xs_: Tensor, ys_: Tensor
        ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            return self.query_loss(phi, xq, yq)

        # x0 = θ; only θ (argnums=0) is differentiated, never the support data.
        value_and_grad = bl.implicit_grad(self.solve, outer, argnums=0, has_aux=True)
        (_, (loss, metric)), (grads, _, _) = value_and_grad(theta, theta, xs, ys)
        return grads, loss, metric

    def adapt(self, theta: Params, xs: Tensor, ys: Tensor, mode: str = "prox") -> Params:
        if mode == "prox":
            return self._inner_solve(theta, theta, xs, ys)
        if mode == "gd":
            return self.inner(lambda phi: self.loss(phi, xs, ys), theta)
        raise ValueError(f"mode must be 'prox' or 'gd', got {mode!r}")


class MAML(MetaLearner):
    """Second-order MAML: the meta-gradient differentiates through the unrolled inner GD.

    The inner loop is plain GD (``steps`` × ``lr``) on the support loss; memory grows
    linearly with ``steps``. ``first_order=True`` (or :class:`FOMAML`) drops the
    second-order terms: the meta-gradient is the query gradient at the adapted weights.
    """

    name = "maml"

    def __init__(
        self,
        model: FunctionalModel,
        *,
        steps: int = 16,
        lr: float = 0.1,
        first_order: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("inner", GradientDescent(steps=steps, lr=lr, safeguard=False))
        super().__init__(model, **kwargs)
        self.steps, self.lr, self.first_order = steps, lr, first_order
        if first_order:
            self.name = "fomaml"

    def _unrolled(self, theta: Params, xs: Tensor, ys: Tensor) -> Params:
        # Not bl.inner.gradient_descent: MAML differentiates through these iterates, which
        # the library's solvers detach (their derivatives come from the implicit function
        # theorem instead).
        grad_fn = grad(self.loss)
        phi = theta
        for _ in range(self.steps):
            g = grad_fn(phi, xs, ys)
            if self.first_order:
                g = {k: v.detach() for k, v in g.items()}
            phi = {k: phi[k] - self.lr * g[k] for k in phi}
        return phi

    def task_meta_grad(
        self, theta: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor
    ) -> tuple[Params, Tensor, Tensor]:
        def outer(th: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            return self.query_loss(self._unrolled(th, xs, ys), xq, yq)

        grads, (loss, metric) = grad(outer, has_aux=True)(theta)
        return grads, loss, metric

    def adapt(self, theta: Params, xs: Tensor, ys: Tensor, mode: str = "gd") -> Params:
        if mode not in ("prox", "gd"):
            raise ValueError(f"mode must be 'prox' or 'gd', got {mode!r}")
        # MAML has no proximal term: both modes adapt with its own inner GD.
        return self.inner(lambda phi: self.loss(phi, xs, ys), theta)


class FOMAML(MAML):
    """First-order MAML (``∂φ/∂θ ≈ I``)."""

    def __init__(self, model: FunctionalModel, **kwargs: Any) -> None:
        kwargs["first_order"] = True
        super().__init__(model, **kwargs)


def build_meta_learner(method: str, model: FunctionalModel, **kwargs: Any) -> MetaLearner:
    """``"imaml"``, ``"maml"`` or ``"fomaml"``; keyword arguments as the classes take them."""
    if method == "imaml":
        return IMAML(model, **kwargs)
    if method in ("maml", "fomaml"):
        kwargs.pop("lam", None)
        kwargs.pop("cg_steps", None)
        kwargs.pop("cg_ridge", None)
        inner = kwargs.pop("inner", None)
        if isinstance(inner, GradientDescent):
            kwargs.setdefault("steps", inner.steps)
            kwargs.setdefault("lr", inner.lr)
        return MAML(model, first_order=(method == "fomaml"), **kwargs)
    raise ValueError(f"unknown method {method!r}; expected 'imaml', 'maml' or 'fomaml'")
