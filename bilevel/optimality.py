"""Optimality conditions ``F(x, *args) = 0`` characterising an inner solution ``x*``.

An optimality function maps ``(x, *args)`` to a tree with the structure of ``x``; its root
in ``x`` is the inner solution. The implicit function theorem differentiates ``x*(args)``
through ``F`` alone, so any solver that finds the root can be used. Functions built here
carry an attribute ``symmetric``: ``True`` when ``∂F/∂x`` is symmetric (a Hessian), which
lets the implicit layer pick conjugate gradients and use one VJP for both ``A`` and ``Aᵀ``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .tree import Tree, tree_sub

__all__ = ["OptimalityFn", "fixed_point", "is_symmetric", "stationarity"]

OptimalityFn = Callable[..., Tree]
"""``F(x, *args) -> tree like x``."""


def _mark(fn: Callable[..., Tree], *, symmetric: bool, name: str) -> Callable[..., Tree]:
    fn.symmetric = symmetric  # type: ignore[attr-defined]
    fn.__name__ = name
    fn.__qualname__ = name
    return fn


def is_symmetric(optimality_fn: Callable[..., Any]) -> bool:
    """Whether ``optimality_fn`` declares a symmetric Jacobian ``∂F/∂x``."""
    return bool(getattr(optimality_fn, "symmetric", False))


def stationarity(loss: Callable[..., torch.Tensor]) -> OptimalityFn:
    r"""First-order condition of ``min_x loss(x, *args)``: ``F(x, *args) = ∇ₓ loss(x, *args)``.

    ``∂F/∂x`` is the Hessian of ``loss``, symmetric, so the result is marked
    ``symmetric=True``; it is positive definite at a strict local minimum, the assumption
    under which :class:`~bilevel.CG` applies. ``loss`` must return a scalar tensor; ``x`` may
    be any tree of floating-point tensors. The gradient is taken with ``torch.func.grad``, so
    ``F`` composes with ``vmap`` and with forward- and reverse-mode differentiation.

    Example:
        >>> F = stationarity(lambda w, lam, X, y: ((X @ w - y) ** 2).sum() / 2
        ...                  + (lam * w**2).sum() / 2)
    """
    if not callable(loss):
        raise TypeError(f"stationarity(loss): loss must be callable, got {type(loss).__name__}")
    grad_fn = torch.func.grad(loss, argnums=0)

    def optimality_fn(x: Tree, *args: Any) -> Tree:
        return grad_fn(x, *args)

    return _mark(optimality_fn, symmetric=True, name=f"stationarity({_name(loss)})")


def fixed_point(mapping: Callable[..., Tree]) -> OptimalityFn:
    r"""Residual of a fixed-point equation ``x = T(x, *args)``: ``F(x, *args) = T(x, *args) − x``.

    ``∂F/∂x = ∂T/∂x − I`` is in general not symmetric (marked ``symmetric=False``). It is
    invertible when ``T`` is a contraction in ``x`` (``‖∂T/∂x‖ < 1``), which also makes the
    Neumann series converge.
    """
    if not callable(mapping):
        raise TypeError(f"fixed_point(T): T must be callable, got {type(mapping).__name__}")

    def optimality_fn(x: Tree, *args: Any) -> Tree:
        return tree_sub(mapping(x, *args), x)

    return _mark(optimality_fn, symmetric=False, name=f"fixed_point({_name(mapping)})")


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", type(fn).__name__)
