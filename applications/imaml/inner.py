r"""Inner solvers of the iMAML application: adapt one task's weights ``φ`` from ``φ₀``.

Each solver minimises ``loss(φ) + λ/2‖φ − c‖²`` (just ``loss`` without a centre ``c``) and is
called as ``solver(loss_fn, phi0, center, lam) -> φ`` (:class:`InnerSolver`). The
meta-learners of :mod:`applications.imaml.learners` call them inside ``bl.custom_root``
(iMAML: ``c = θ``) and for adaptation at evaluation time.

* :class:`GradientDescent`: (monotone) gradient descent, vmappable; the default.
* :class:`NewtonCG`: damped Newton steps, each by truncated CG (line-search Newton–CG), vmappable.
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
from bilevel.tree import tree_axpy, tree_dot, tree_norm, tree_where, tree_zeros_like

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


def _newton_direction(
    hvp: Callable[[Params], Params], g: Params, shift: float, steps: int
) -> Params:
    """``steps`` truncated CG iterations on ``(H + shift·I) d = g`` from ``d = 0``.

    Nocedal & Wright, Algorithm 7.1: at the first ``p`` with ``pᵀ(H + shift·I)p ≤ 0`` the
    iteration stops and keeps its current ``d`` (``g`` itself if that is the first
    iteration), so ``gᵀd > 0`` always. Branch-free (``torch.where`` per task) for vmap.
    """
    d = tree_zeros_like(g)
    r, p = g, g
    rr = tree_dot(r, r)
    active = torch.ones_like(rr, dtype=torch.bool)
    for j in range(steps):
        hp = tree_axpy(shift, p, hvp(p))
        curvature = tree_dot(p, hp)
        # A zero residual is converged, not negative curvature: stop without the fallback.
        done = rr <= torch.finfo(rr.dtype).tiny
        negative = active & (curvature <= 0) & ~done
        if j == 0:
            d = tree_where(negative, g, d)
        active = active & ~negative & ~done
        alpha = torch.where(active, rr / torch.where(active, curvature, 1), 0)
        d = tree_axpy(alpha, p, d)
        r = tree_axpy(-alpha, hp, r)
        rr_next = tree_dot(r, r)
        beta = torch.where(active, rr_next / torch.where(active, rr, 1), 0)
        p = tree_axpy(beta, p, r)
        rr = rr_next
    return d


@dataclasses.dataclass
class NewtonCG:
    """Hessian-free inner solver: damped Newton steps, each solved by truncated CG.

    Each step solves ``(∇²f(φ) + damping·I) d = ∇f(φ)`` for ``f = loss + λ/2‖φ − c‖²`` with
    ``cg_steps`` CG iterations through one linearisation of ``∇loss`` (``torch.func.vjp``),
    then takes ``φ ← φ − α·d`` with ``α`` the first of ``lr, lr/2, …, lr/2^(backtracks−1)``
    that does not increase ``f`` (backtracking line search; where none does, the task stays
    and its ``lr`` shrinks by ``2^backtracks``; ``safeguard=False`` takes ``α = lr`` blindly).
    The CG is truncated as in line-search Newton–CG (Nocedal &
    Wright, *Numerical Optimization*, 2nd ed., Algorithm 7.1): it stops at the first
    direction of non-positive curvature, keeping the iterate built so far, and falls back to
    the steepest-descent direction ``d = ∇f`` when that happens on the first iteration.
    Every returned ``d`` is therefore a descent direction, also where ``∇²f + damping·I`` is
    indefinite — the case of most tasks at a random initialisation, where a linear solver
    that refuses the system (``d = 0``) would leave the weights unadapted. Vmappable.
    """

    steps: int = 5
    cg_steps: int = 5
    lr: float = 1.0
    damping: float = 1.0
    safeguard: bool = True
    backtracks: int = 4

    vmappable = True

    def __post_init__(self) -> None:
        if isinstance(self.backtracks, bool) or not isinstance(self.backtracks, int):
            raise TypeError(f"backtracks must be an int >= 1, got {self.backtracks!r}")
        if self.backtracks < 1:
            raise ValueError(
                f"backtracks must be >= 1 (1: try the step lr once), got {self.backtracks}"
            )

    def __call__(
        self,
        loss_fn: Objective,
        phi0: Params,
        center: Params | None = None,
        lam: float = 0.0,
    ) -> Params:
        shift = self.damping + lam
        grad_fn = grad(loss_fn)

        # bl.inner has no Newton solver: this loop is the app's own. Its CG is not bl.CG: on
        # an indefinite system a linear solver either reports a breakdown and keeps x0 = 0
        # (no step) or solves it, and A⁻¹g may point uphill; an optimiser needs descent.
        objective = _proximal(loss_fn, center, lam)
        p = phi0
        f = objective(p)
        lr = torch.full_like(f, self.lr)
        for _ in range(self.steps):
            g, hvp = torch.func.vjp(grad_fn, p)
            g, _ = _prox_parts(p, g, center, lam, value=False)
            d = _newton_direction(lambda v, hvp=hvp: hvp(v)[0], g, shift, self.cg_steps)
            if not self.safeguard:
                p = {k: torch.addcmul(v, lr, d[k], value=-1) for k, v in p.items()}
                continue
            # Backtracking: the first of lr, lr/2, ... that lowers f. All are evaluated (one
            # forward pass each, cheap next to the CG's Hessian products) since vmap cannot
            # branch per task. Without it a Newton step that overshoots is simply lost.
            accepted = torch.zeros_like(f, dtype=torch.bool)
            p_next, f_next = p, f
            for t in range(self.backtracks):
                step = lr * 0.5**t
                candidate = tree_axpy(-step, d, p)
                f_c = objective(candidate)
                take = ~accepted & torch.isfinite(f_c) & (f_c <= f)
                p_next = tree_where(take, candidate, p_next)
                f_next = torch.where(take, f_c, f_next)
                accepted = accepted | take
            p, f = p_next, f_next
            lr = torch.where(accepted, lr, lr * 0.5**self.backtracks)
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
