r"""Euclidean projections onto convex sets, for [`projected_gradient`][bilevel.projected_gradient].

The projection onto a non-empty closed convex set ``C`` is its nearest point to ``v``,

```text
Π_C(v) = argmin_{x ∈ C} ‖x − v‖₂
```

unique because ``C`` is closed and convex; it is the proximal operator of the indicator of
``C`` (Parikh & Boyd, *Proximal Algorithms*, Foundations and Trends in Optimization 1(3),
2014, §1.1; Bauschke & Combettes, *Convex Analysis and Monotone Operator Theory*, 2011,
ch. 3). Each projection here has the signature ``projection(v, hyper) -> tree like v``,
``hyper`` describing ``C``, which is what [`projected_gradient`][bilevel.projected_gradient]
calls:

* [`projection_box`][bilevel.projection_box] — ``C = {x : lower ≤ x ≤ upper}``:
  elementwise clipping ``min(max(v, lower), upper)``;
* [`projection_simplex`][bilevel.projection_simplex] — ``C = {x : x ≥ 0, Σᵢ xᵢ = r}``
  along the last axis: the sort-based algorithm of Held, Wolfe & Crowder (1974) and Duchi,
  Shalev-Shwartz, Singer & Chandra ("Efficient projections onto the ℓ1-ball for learning in
  high dimensions", ICML 2008), ``O(d log d)``;
* [`projection_l2_ball`][bilevel.projection_l2_ball] — ``C = {x : ‖x‖₂ ≤ r}``, the norm
  over the whole tree: ``v · min(1, r/‖v‖)``.

Assumptions: ``C`` is non-empty and its parameters finite (``lower ≤ upper`` elementwise,
``r > 0``). This is checked, because a violation does not fail on its own: an empty box
returns points outside it and a negative radius flips the sign of ``v``. The projections
use differentiable torch primitives only (sort, cumsum, gather, where: no host
synchronisation, no data-dependent shapes), so they run under ``torch.func.vmap`` and are
differentiable almost everywhere in ``v`` and in the parameters of ``C`` (bounds, radius):
the set itself can be a hyperparameter. Under ``torch.func`` transforms and
``torch.compile`` an invalid parameter makes the result NaN instead of raising (see
``bilevel._checks``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from ._checks import (
    check_nonnegative,
    check_nonnegative_tree,
    check_real_type,
    leafwise,
    poison,
    readable,
)
from .tree import Tree, tree_dot, tree_leaves, tree_map

__all__ = ["projection_box", "projection_l2_ball", "projection_simplex"]

_RADIUS_FIX = "Pass r > 0; to learn it, parametrise it as exp(log_radius)."


def projection_box(v: Tree, bounds: Any) -> Tree:
    r"""Euclidean projection onto the box ``{x : lower ≤ x ≤ upper}``: ``min(max(v, l), u)``.

    Differentiable almost everywhere in ``v`` (Jacobian: the mask of coordinates strictly
    inside the box) and in the bounds (the complementary masks).

    Args:
        v: a tree of tensors.
        bounds: the pair ``(lower, upper)``; each a number, a tensor broadcast to every leaf,
            or a tree with the structure of ``v``. Requires ``lower ≤ upper`` elementwise (a
            non-empty box); ``lower = -inf`` or ``upper = inf`` leave a side open, NaN is
            rejected.

    Returns:
        A tree with the structure, shapes and dtypes of ``v``: each leaf clipped to
        ``[lower, upper]`` elementwise.

    Raises:
        TypeError: a bound is not a real number / tensor (tree).
        ValueError: ``bounds`` is not a pair, or the box is empty or NaN somewhere
            (``lower > upper``, ``lower = inf``, ``upper = -inf``).
    """
    if not (isinstance(bounds, tuple | list) and len(bounds) == 2):
        raise ValueError(
            "projection_box needs bounds=(lower, upper); pass proj_hyper= to "
            "projected_gradient selecting such a pair (e.g. proj_hyper=lambda *args: (0.0, 1.0))"
        )
    lower, upper = bounds
    for arg, bound in (("lower (bounds[0])", lower), ("upper (bounds[1])", upper)):
        for leaf in tree_leaves(bound) if isinstance(bound, tuple | list | dict) else [bound]:
            check_real_type(leaf, "projection_box", arg, _BOX_FIX)

    def clip(leaf: torch.Tensor, lo: Any, hi: Any) -> torch.Tensor:
        lo = torch.as_tensor(lo, dtype=leaf.dtype, device=leaf.device)
        hi = torch.as_tensor(hi, dtype=leaf.dtype, device=leaf.device)
        lo, hi = _check_box(lo, hi)
        return torch.minimum(torch.maximum(leaf, lo), hi)

    return leafwise(clip, v, lower, upper)


_BOX_FIX = (
    "The box must be non-empty: lower ≤ upper elementwise (±inf leave a side open). Swap the "
    "bounds, or to learn them parametrise upper = lower + exp(log_width)."
)


def _check_box(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of a non-empty box: ``lower ≤ upper``, ``lower < inf``, ``upper > -inf``.

    Comparisons with NaN are false, so a NaN bound is invalid too. Unreadable bounds (under
    ``torch.func`` transforms) come back NaN where invalid instead of raising.
    """
    valid = (lo <= hi) & (lo < math.inf) & (hi > -math.inf)
    if not readable(lo, hi):
        return poison(valid, lo), poison(valid, hi)
    if not bool(valid.all()):
        lo_b, hi_b = torch.broadcast_tensors(lo.detach(), hi.detach())
        i = int((~valid).reshape(-1).nonzero()[0])
        raise ValueError(
            f"projection_box: the box is empty at {int((~valid).sum())} coordinate(s), e.g. "
            f"lower={lo_b.reshape(-1)[i].item()!r}, upper={hi_b.reshape(-1)[i].item()!r}. "
            f"{_BOX_FIX}"
        )
    return lo, hi


def _simplex_last_axis(v: torch.Tensor, radius: Any) -> torch.Tensor:
    if v.dim() == 0:
        return _simplex_last_axis(v.unsqueeze(0), radius).squeeze(0)
    if isinstance(radius, torch.Tensor) and radius.dim() > 0:
        radius = radius.to(v.dtype).unsqueeze(-1)
    d = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    cumulative = torch.cumsum(u, dim=-1) - radius  # css_k − r
    k = torch.arange(1, d + 1, dtype=v.dtype, device=v.device)
    # ρ = max{k : u_k − (css_k − r)/k > 0}; the condition holds exactly for k ≤ ρ.
    rho = (u * k > cumulative).sum(dim=-1, keepdim=True).clamp(min=1)
    tau = torch.gather(cumulative, -1, rho - 1) / rho.to(v.dtype)
    return torch.relu(v - tau)


def projection_simplex(v: Tree, radius: Any = None) -> Tree:
    r"""Euclidean projection onto the simplex ``{x : x ≥ 0, Σᵢ xᵢ = r}`` along the last axis.

    Each leaf is projected row-wise over its last dimension (a matrix is a batch of
    distributions; a 0-d leaf is a 1-element simplex). Sort-based algorithm of Held, Wolfe
    & Crowder (1974) and Duchi et al. ("Efficient projections onto the ℓ1-ball for learning
    in high dimensions", ICML 2008), ``O(d log d)``; see Condat (2016) for a survey: with
    ``u`` sorted in decreasing order, ``ρ = max{k : u_k > (Σ_{j≤k} u_j − r)/k}``,
    ``τ = (Σ_{j≤ρ} u_j − r)/ρ`` and ``x = max(v − τ, 0)``.

    Written with sort, cumsum and gather only — no host synchronisation — so it runs under
    ``vmap`` and autograd gives its Jacobian almost everywhere,
    ``diag(s) − s sᵀ/|s|`` with ``s`` the support mask, and its derivative in ``r``,
    ``s/|s|``.

    Args:
        v: a tree of tensors.
        radius: ``r > 0`` (default 1), finite: a number, a tensor broadcast over rows, or a
            tree with the structure of ``v``.

    Returns:
        A tree with the structure, shapes and dtypes of ``v``: every leaf's rows (along its
        last axis) non-negative and summing to ``r``.

    Raises:
        TypeError: ``radius`` is not a real number / tensor (tree).
        ValueError: ``radius`` is ``≤ 0`` or non-finite.
    """
    r = 1.0 if radius is None else radius
    r = check_nonnegative_tree(r, "projection_simplex", "radius", _RADIUS_FIX, strict=True)
    return leafwise(_simplex_last_axis, v, r)


def projection_l2_ball(v: Tree, radius: Any = None) -> Tree:
    r"""Euclidean projection onto the ball ``{x : ‖x‖₂ ≤ r}``, the norm over the whole tree.

    ``proj(v) = v · min(1, r/‖v‖)``. Differentiable in ``v`` and ``r`` except on the sphere;
    the inside branch is guarded so no NaN appears at ``v = 0``.

    Args:
        v: a tree of tensors.
        radius: ``r > 0`` (default 1), finite: a number or a 0-d tensor.

    Returns:
        A tree with the structure, shapes and dtypes of ``v``: ``v`` itself (values) when
        ``‖v‖ ≤ r``, else ``v`` rescaled onto the sphere of radius ``r``.

    Raises:
        TypeError: ``radius`` is not a real number or tensor.
        ValueError: ``radius`` is not 0-d, ``≤ 0`` or non-finite.
    """
    r = 1.0 if radius is None else radius
    if isinstance(r, bool) or not isinstance(r, torch.Tensor | numbers.Real):
        raise TypeError(
            f"projection_l2_ball: radius must be a number or a 0-d tensor, got "
            f"{type(r).__name__}. {_RADIUS_FIX}"
        )
    if isinstance(r, torch.Tensor) and r.dim() != 0:
        raise ValueError(
            "projection_l2_ball: radius must be a number or a 0-d tensor (the norm is over the "
            f"whole tree), got shape {tuple(r.shape)}; for one ball per row, vmap over the rows"
        )
    r = check_nonnegative(r, "projection_l2_ball", "radius", _RADIUS_FIX, strict=True)
    sq = tree_dot(v, v)
    inside = sq <= r**2
    safe = torch.where(inside, torch.ones_like(sq), sq)
    factor = torch.where(inside, torch.ones_like(sq), r / torch.sqrt(safe))
    return tree_map(lambda leaf: leaf * factor, v)
