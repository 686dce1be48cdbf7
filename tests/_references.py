"""Float64 reference problems for the implicit-differentiation tests.

Everything here is independent of the code under test: closed forms written with
``torch.linalg`` / NumPy, exact Newton solves, and central finite differences.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def central_fd(fn: Callable[[np.ndarray], float], theta: np.ndarray, h: float) -> np.ndarray:
    """Central finite-difference gradient of a scalar function of a float64 vector."""
    theta = np.asarray(theta, dtype=np.float64)
    grad = np.zeros_like(theta)
    for j in range(theta.size):
        e = np.zeros_like(theta)
        e.flat[j] = h
        grad.flat[j] = (fn(theta + e) - fn(theta - e)) / (2 * h)
    return grad


@dataclass
class Ridge:
    """Ridge regression with one L2 strength per feature.

    inner:  w*(λ) = argmin_w ½‖X w − y‖² + ½ Σⱼ λⱼ wⱼ²   = (XᵀX + diag λ)⁻¹ Xᵀy
    outer:  L(λ) = ½‖X_v w*(λ) − y_v‖²
    dL/dλ = −u ⊙ w*  with  u = (XᵀX + diag λ)⁻¹ X_vᵀ(X_v w* − y_v).
    """

    X: torch.Tensor
    y: torch.Tensor
    Xv: torch.Tensor
    yv: torch.Tensor
    lam: torch.Tensor

    @classmethod
    def make(
        cls, d: int = 6, n: int | None = None, seed: int = 0, dtype: torch.dtype = F64
    ) -> Ridge:
        g = torch.Generator().manual_seed(seed)
        n = 4 * d if n is None else n
        X = torch.randn(n, d, generator=g, dtype=F64) / n**0.5
        w_true = torch.randn(d, generator=g, dtype=F64)
        y = X @ w_true + 0.1 * torch.randn(n, generator=g, dtype=F64)
        Xv = torch.randn(n, d, generator=g, dtype=F64) / n**0.5
        yv = Xv @ w_true + 0.1 * torch.randn(n, generator=g, dtype=F64)
        lam = 0.5 + torch.rand(d, generator=g, dtype=F64)
        return cls(*(t.to(dtype) for t in (X, y, Xv, yv, lam)))

    @staticmethod
    def inner_loss(w: torch.Tensor, lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (lam * w * w).sum()

    @staticmethod
    def gradient(w: torch.Tensor, lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor):
        """Hand-written ∇_w inner_loss (the optimality function)."""
        return X.T @ (X @ w - y) + lam * w

    def outer_loss(self, w: torch.Tensor, *args) -> torch.Tensor:
        return 0.5 * ((self.Xv @ w - self.yv) ** 2).sum()

    def solve(self, lam: torch.Tensor) -> torch.Tensor:
        X = self.X.to(F64)
        return torch.linalg.solve(X.T @ X + torch.diag(lam.to(F64)), X.T @ self.y.to(F64))

    def closed_form(self, lam: torch.Tensor | None = None) -> torch.Tensor:
        lam = (self.lam if lam is None else lam).to(F64)
        X, Xv, yv = self.X.to(F64), self.Xv.to(F64), self.yv.to(F64)
        w = self.solve(lam)
        u = torch.linalg.solve(X.T @ X + torch.diag(lam), Xv.T @ (Xv @ w - yv))
        return -u * w

    def closed_form_inner(self, x0: torch.Tensor, lam: torch.Tensor, X, y) -> torch.Tensor:
        """A closed-form inner solver usable by custom_root."""
        return torch.linalg.solve(X.T @ X + torch.diag(lam), X.T @ y)

    def lipschitz(self) -> float:
        X = self.X.to(F64)
        return float(torch.linalg.eigvalsh(X.T @ X + torch.diag(self.lam.to(F64))).max())

    def args(self, lam: torch.Tensor | None = None) -> tuple:
        return (self.lam if lam is None else lam, self.X, self.y)


def newton_logistic(X: np.ndarray, y: np.ndarray, lam: np.ndarray, iters: int = 50) -> np.ndarray:
    """Exact minimiser of mean log(1 + exp(−y Xw)) + ½ Σ λⱼ wⱼ² (y ∈ {±1}) by Newton."""
    n, d = X.shape
    w = np.zeros(d)
    for _ in range(iters):
        z = y * (X @ w)
        s = 1.0 / (1.0 + np.exp(z))  # σ(−z)
        grad = -(X.T @ (y * s)) / n + lam * w
        hess = (X.T * (s * (1 - s))) @ X / n + np.diag(lam)
        step = np.linalg.solve(hess, grad)
        w = w - step
        if np.abs(step).max() < 1e-15:
            break
    return w


def tiny_imaml_config(**overrides: Any) -> Any:
    """A trainer ``Config`` small enough for a test to train in seconds (embedded glyphs)."""
    from applications.imaml.trainer import Config

    base: dict[str, Any] = dict(
        dataset="glyphs",
        ways=5,
        shots=1,
        queries=2,
        eval_queries=2,
        meta_batch=4,
        meta_lr=3e-3,
        steps=4,
        inner_steps=2,
        inner_lr=0.2,
        cg_steps=2,
        cg_ridge=1.0,
        hidden=8,
        zero_head=True,
        val_every=2,
        val_tasks=4,
        test_tasks=6,
        eval_batch=3,
        log_every=1,
        ckpt_every=1,
        threads=1,
    )
    base.update(overrides)
    return Config(**base)
