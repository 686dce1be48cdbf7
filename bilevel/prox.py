r"""Proximal operators, the non-smooth steps of [`proximal_gradient`][bilevel.proximal_gradient].

The proximal operator of a closed proper convex function ``g`` is

```text
prox_g(v) = argmin_x  g(x) + ½‖x − v‖²
```

unique because the objective is strongly convex (Moreau, 1965; Parikh & Boyd, *Proximal
Algorithms*, Foundations and Trends in Optimization 1(3), 2014, §1.1); ``prox_{ηg}`` is
the same with ``g`` scaled by a step ``η > 0``. Each operator here has the signature
``prox(v, hyper, scale) -> tree like v``, the prox of ``scale · g(·, hyper)``, which is what
[`proximal_gradient`][bilevel.proximal_gradient] calls with ``scale = η``:

* [`prox_lasso`][bilevel.prox_lasso] — ``g(x) = λ‖x‖₁``: soft-thresholding,
  ``sign(vᵢ) · max(|vᵢ| − ηλᵢ, 0)`` (Parikh & Boyd, §6.5.2);
* [`prox_elastic_net`][bilevel.prox_elastic_net] — ``g(x) = λ₁‖x‖₁ + (λ₂/2)‖x‖²``:
  ``sign(vᵢ) · max(|vᵢ| − ηλ₁, 0) / (1 + ηλ₂)`` (Zou & Hastie, 2005; Parikh & Boyd, §6.5.3).

Assumptions: ``g`` is separable over coordinates and applied leaf by leaf; the strengths
are finite and ``≥ 0`` and ``scale > 0`` (checked: a negative strength would *enlarge* ``v``).
A strength is a number or tensor shared by every leaf (a scalar, or one weight per
coordinate), or a tree with the structure of ``v``.

The operators use differentiable torch primitives only (no host synchronisation, no
data-dependent shapes), so they run under ``torch.func.vmap`` and are differentiable almost
everywhere both in ``v`` (Jacobian: the 0/1 mask of the support) and in their strengths.
Under ``torch.func`` transforms and ``torch.compile`` an invalid strength makes the result
NaN instead of raising (see ``bilevel._checks``).
"""

from __future__ import annotations

from typing import Any

import torch

from ._checks import check_nonnegative, check_nonnegative_tree, leafwise
from .tree import Tree

__all__ = ["prox_elastic_net", "prox_lasso"]

_STRENGTH_FIX = (
    "A penalty weight is ≥ 0; to learn it, parametrise it as exp(log_strength) or softplus(raw)."
)
_SCALE_FIX = "scale is the step η > 0 multiplying g (proximal_gradient passes its step)."


def _soft_threshold(v: torch.Tensor, threshold: Any) -> torch.Tensor:
    return torch.sign(v) * torch.relu(v.abs() - threshold)


def prox_lasso(v: Tree, strength: Any, scale: float = 1.0) -> Tree:
    r"""Proximal operator of ``scale · strength · ‖x‖₁``: soft-thresholding.

    ``prox(v)ᵢ = sign(vᵢ) · max(|vᵢ| − scale · strengthᵢ, 0)`` (Donoho, 1995; Parikh & Boyd,
    2014, §6.5.2). Differentiable almost everywhere in ``v`` (Jacobian: the 0/1 mask of
    ``|vᵢ| > scale·strengthᵢ``) and in ``strength`` (``−scale · sign(vᵢ)`` on that mask).

    Args:
        v: a tree of tensors.
        strength: ``λ ≥ 0``, finite: a number or tensor broadcast to every leaf (a scalar, or
            one weight per coordinate), or a tree with the structure of ``v``.
        scale: the step ``η > 0`` multiplying ``g`` (a number or tensor).

    Returns:
        A tree with the structure, shapes and dtypes of ``v``: the soft-thresholded leaves.

    Raises:
        TypeError: ``strength`` or ``scale`` is not a real number / tensor (tree).
        ValueError: ``strength`` is missing, negative or non-finite, or ``scale ≤ 0``.
    """
    if strength is None:
        raise ValueError(
            "prox_lasso needs the ℓ₁ strength: pass prox_hyper= to proximal_gradient (an "
            "index into args or a callable (*args) -> strength)"
        )
    strength = check_nonnegative_tree(strength, "prox_lasso", "strength", _STRENGTH_FIX)
    scale = check_nonnegative(scale, "prox_lasso", "scale", _SCALE_FIX, strict=True)
    return leafwise(lambda leaf, lam: _soft_threshold(leaf, scale * lam), v, strength)


def prox_elastic_net(v: Tree, hyper: Any, scale: float = 1.0) -> Tree:
    r"""Proximal operator of ``scale · (λ₁‖x‖₁ + (λ₂/2)‖x‖²)`` (elastic net).

    ``prox(v)ᵢ = sign(vᵢ) · max(|vᵢ| − scale·λ₁, 0) / (1 + scale·λ₂)`` (Zou & Hastie, 2005;
    Parikh & Boyd, 2014, §6.5.3). Differentiable almost everywhere in ``v``, ``λ₁`` and
    ``λ₂``.

    Args:
        v: a tree of tensors.
        hyper: the pair ``(λ₁, λ₂)``, each finite and ``≥ 0``: a number or tensor shared by
            every leaf, or a tree with the structure of ``v``.
        scale: the step ``η > 0`` multiplying ``g`` (a number or tensor).

    Returns:
        A tree with the structure, shapes and dtypes of ``v``: the soft-thresholded leaves
        shrunk by ``1 / (1 + scale·λ₂)``.

    Raises:
        TypeError: ``λ₁``, ``λ₂`` or ``scale`` is not a real number / tensor (tree).
        ValueError: ``hyper`` is not a pair, a strength is negative or non-finite, or
            ``scale ≤ 0``.
    """
    if not (isinstance(hyper, tuple | list) and len(hyper) == 2):
        raise ValueError(
            "prox_elastic_net needs hyper=(l1, l2); pass prox_hyper= to proximal_gradient "
            f"selecting such a pair, got {type(hyper).__name__}"
        )
    l1 = check_nonnegative_tree(hyper[0], "prox_elastic_net", "l1 (hyper[0])", _STRENGTH_FIX)
    l2 = check_nonnegative_tree(hyper[1], "prox_elastic_net", "l2 (hyper[1])", _STRENGTH_FIX)
    scale = check_nonnegative(scale, "prox_elastic_net", "scale", _SCALE_FIX, strict=True)
    return leafwise(
        lambda leaf, a, b: _soft_threshold(leaf, scale * a) / (1 + scale * b), v, l1, l2
    )
