r"""Inner solvers of the iMAML application: adapt one task's weights ``φ`` from ``φ₀``.

Each solver minimises ``loss(φ) + λ/2‖φ − c‖²`` (just ``loss`` without a centre ``c``) and is
called as ``solver(loss_fn, phi0, center, lam) -> φ`` (:class:`InnerSolver`). The
meta-learners of :mod:`applications.imaml.learners` call them inside ``bl.custom_root``
(iMAML: ``c = θ``) and for adaptation at evaluation time.

* :class:`GradientDescent`: (monotone) gradient descent, vmappable; the default.
* :class:`NewtonCG`: damped Newton steps, each solved with fixed-K ``bl.CG``, vmappable.
* :class:`TorchOptimizer`: any ``torch.optim`` optimiser through ``bl.inner.torch_optimizer``
  (per-task loop only).

The monotone safeguard (why the paper's plain GD diverges on real Omniglot) is described in
:mod:`applications.imaml.learners`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.func import grad, grad_and_value

import bilevel as bl
from bilevel.tree import tree_norm

__all__ = ["GradientDescent", "InnerSolver", "NewtonCG", "TorchOptimizer"]

Params = dict[str, Tensor]
Objective = Callable[[Params], Tensor]


class InnerSolver(Protocol):
    """What a meta-learner needs of an inner solver.

    ``solver(loss_fn, phi0, center, lam)`` returns weights minimising
    ``loss_fn(φ) + λ/2‖φ − center‖²`` from ``phi0`` (``center=None`` or ``lam=0``: just
    ``loss_fn``). ``vmappable`` says whether the call runs under ``torch.func.vmap``; a
    meta-learner with ``batched=True`` refuses a solver that lacks it or sets it false.
    """

    vmappable: bool

    def __call__(
        self,
        loss_fn: Objective,
        phi0: Params,
        center: Params | None = None,
        lam: float = 0.0,
    ) -> Params: ...


def _prox_parts(
    params: Params, grads: Params, center: Params | None, lam: float, *, value: bool = True
) -> tuple[Params, Tensor | None]:
    """Gradient ``g + λ(φ − c)`` of the proximal objective and ``½‖φ − c‖²`` (fused per leaf).

    ``value=False`` skips ``½‖φ − c‖²`` (two passes over the parameters) when nobody reads it.
    """
    if center is None or lam == 0.0:
        return grads, None
    full, sq = {}, None
    for k, p in params.items():
        diff = p - center[k]
        full[k] = torch.add(grads[k], diff, alpha=lam)
        if value:
            term = torch.sum(diff * diff)
            sq = term if sq is None else sq + term
    return full, None if sq is None else 0.5 * sq


def _sq_dist(a: Params, b: Params) -> Tensor:
    total = None
    for k in a:
        term = torch.sum((a[k] - b[k]) ** 2)
        total = term if total is None else total + term
    assert total is not None
    return total


def _proximal(loss_fn: Objective, center: Params | None, lam: float) -> Objective:
    """``loss(φ) + λ/2 ‖φ − c‖²`` (just ``loss`` without a centre)."""
    if center is None or not lam:
        return loss_fn
    return lambda p: loss_fn(p) + 0.5 * lam * _sq_dist(p, center)


def _monotone(
    f: Tensor, f_candidate: Tensor, lr: Tensor
) -> tuple[Callable[[Params, Params], Params], Tensor, Tensor]:
    """Branch-free accept/reject of a step: keep the candidate where the objective is finite
    and did not increase, otherwise stay and halve that task's step size.

    Returns ``(select, f, lr)`` where ``select(candidate, current)`` picks per leaf.
    """
    ok = torch.isfinite(f_candidate) & (f_candidate <= f)

    def select(candidate: Params, current: Params) -> Params:
        return {k: torch.where(ok, candidate[k], v) for k, v in current.items()}

    return select, torch.where(ok, f_candidate, f), torch.where(ok, lr, 0.5 * lr)


@dataclasses.dataclass
class GradientDescent:
    """``steps`` of gradient descent on ``loss(φ) + λ/2‖φ − c‖²``, vmappable.

    The proximal term's gradient ``λ(φ − c)`` is added analytically (not through autograd),
    fused with the update, so each step costs one gradient of the loss and a few
    element-wise passes over the parameters.

    Args:
        steps: number of gradient steps.
        lr: (initial) step size.
        safeguard: monotone GD — a step that does not lower the objective (or makes it
            non-finite) is rejected and that task's step size halved. Costs one extra gradient
            evaluation per solve; branch-free (``torch.where``), so it runs under ``vmap``.
        max_grad_norm: clip each step's gradient to this norm (``None``: no clipping).
    """

    steps: int = 16
    lr: float = 0.1
    safeguard: bool = True
    max_grad_norm: float | None = None

    vmappable = True

    def __call__(
        self,
        loss_fn: Objective,
        phi0: Params,
        center: Params | None = None,
        lam: float = 0.0,
    ) -> Params:
        if self.steps == 0:
            return phi0
        value_grad = grad_and_value(loss_fn)

        def evaluate(p: Params) -> tuple[Params, Tensor]:
            g, loss = value_grad(p)
            # Plain GD never reads the objective's value: skip its proximal part.
            g, half_sq = _prox_parts(p, g, center, lam, value=self.safeguard)
            return g, loss if half_sq is None else loss + lam * half_sq

        # Not bl.inner.gradient_descent: that loop differentiates the whole objective and
        # steps x - lr·g; this one adds the proximal gradient analytically, fused with the step
        # (torch.add / addcmul with alpha), clips, and has the monotone safeguard. The iterates
        # (and so every trained checkpoint) depend on those exact operations.
        p = phi0
        g, f = evaluate(p)
        if not self.safeguard:
            for step in range(self.steps):
                g = self._clip(g)
                p = {k: torch.add(v, g[k], alpha=-self.lr) for k, v in p.items()}
                if step + 1 < self.steps:
                    g, _ = evaluate(p)
            return p
        lr = torch.full_like(f, self.lr)
        for _ in range(self.steps):
            g = self._clip(g)
            candidate = {k: torch.addcmul(v, lr, g[k], value=-1) for k, v in p.items()}
            g_c, f_c = evaluate(candidate)
            select, f, lr = _monotone(f, f_c, lr)
            p, g = select(candidate, p), select(g_c, g)
        return p

    def _clip(self, g: Params) -> Params:
        if self.max_grad_norm is None:
            return g
        scale = torch.clamp(self.max_grad_norm / (tree_norm(g) + 1e-12), max=1.0)
        return {k: v * scale for k, v in g.items()}


@dataclasses.dataclass
class NewtonCG:
    """Hessian-free inner solver: damped Newton steps, each solved with fixed-K ``bl.CG``.

    Each step solves ``(∇²f(φ) + damping·I) d = ∇f(φ)`` for ``f = loss + λ/2‖φ − c‖²`` with
    ``cg_steps`` CG iterations through one linearisation of ``∇loss`` (``torch.func.vjp``),
    then takes ``φ ← φ − lr·d``, guarded like :class:`GradientDescent` (rejected and halved
    unless ``f`` decreases). Where the Hessian is indefinite the fixed-K CG returns its
    best-residual iterate, or ``d = 0`` (no step) when no iterate beats the start.
    Vmappable.
    """

    steps: int = 5
    cg_steps: int = 5
    lr: float = 1.0
    damping: float = 1.0
    safeguard: bool = True

    vmappable = True

    def __call__(
        self,
        loss_fn: Objective,
        phi0: Params,
        center: Params | None = None,
        lam: float = 0.0,
    ) -> Params:
        cg = bl.CG(tol=0, maxiter=self.cg_steps, ridge=self.damping + lam)
        grad_fn = grad(loss_fn)

        # bl.inner has no Newton solver: this loop is the app's own.
        objective = _proximal(loss_fn, center, lam)
        p = phi0
        f = objective(p)
        lr = torch.full_like(f, self.lr)
        for _ in range(self.steps):
            g, hvp = torch.func.vjp(grad_fn, p)
            g, _ = _prox_parts(p, g, center, lam, value=False)
            d, _ = cg(lambda v, hvp=hvp: hvp(v)[0], g)
            candidate = {k: torch.addcmul(v, lr, d[k], value=-1) for k, v in p.items()}
            if not self.safeguard:
                p = candidate
                continue
            select, f, lr = _monotone(f, objective(candidate), lr)
            p = select(candidate, p)
        return p


class TorchOptimizer:
    """Any ``torch.optim`` optimiser as the inner solver (per-task loop only, not vmappable).

    Example: ``TorchOptimizer(torch.optim.Adam, steps=20, lr=1e-2)``.
    """

    vmappable = False

    def __init__(self, optimizer: type[torch.optim.Optimizer], steps: int = 16, **kwargs: Any):
        self.optimizer, self.steps, self.kwargs = optimizer, steps, kwargs

    def __repr__(self) -> str:
        return f"TorchOptimizer({self.optimizer.__name__}, steps={self.steps}, {self.kwargs})"

    def __call__(
        self,
        loss_fn: Objective,
        phi0: Params,
        center: Params | None = None,
        lam: float = 0.0,
    ) -> Params:
        detached = None if center is None else {k: c.detach() for k, c in center.items()}
        objective = _proximal(loss_fn, detached, lam)
        # The library's loop: a fresh optimiser on a detached copy of φ0 (no state leaks between
        # tasks), autograd gradients of the objective, a detached result.
        solve = bl.inner.torch_optimizer(objective, self.optimizer, steps=self.steps, **self.kwargs)
        return solve(phi0)
