"""Validation and leafwise broadcasting of the hyperparameters of prox and projection operators.

Private: shared by ``bilevel.prox`` and ``bilevel.projection``; it imports neither of them
(nor ``bilevel.optimality``), so the imports run one way.

Every hyperparameter is validated, because an invalid one does not fail on its own: a
negative ℓ₁ strength *enlarges* ``v``, a negative radius flips its sign, an empty box returns
points outside it. A wrong type raises ``TypeError`` and an invalid value ``ValueError``,
naming the function, the argument and the fix. Values of plain tensors are checked eagerly
(one host synchronisation per call on CUDA). Under ``torch.func`` transforms and
``torch.compile`` a value cannot be read on the host, so the check is done without a
synchronisation instead: an invalid entry is replaced by NaN, which makes the result NaN
(loud) instead of silently wrong.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch

from ._transforms import is_batched, is_wrapped
from .tree import Tree, tree_flatten, tree_map, tree_unflatten


def readable(*tensors: torch.Tensor) -> bool:
    """Whether the values of ``tensors`` can be read on the host right now.

    Not under a ``torch.func`` transform (a wrapped tensor's ``.item()`` is forbidden, and a
    batched one has no single value) nor while ``torch.compile`` traces (it would break the
    graph). Plain tensors inside a transform's function are readable.
    """
    if torch.compiler.is_compiling():
        return False
    return not any(is_wrapped(t) or is_batched(t) for t in tensors)


def poison(valid: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` with its invalid entries made NaN: the sync-free form of a check.

    A product, not ``torch.where``: ``where`` would give the invalid entries a zero
    derivative, so a gradient taken under ``torch.func.grad`` would be a silent 0 instead of
    NaN; ``value · NaN`` has a NaN derivative too.
    """
    dtype = value.dtype if value.is_floating_point() else torch.get_default_dtype()
    return value * torch.where(valid, torch.ones_like(value, dtype=dtype), math.nan)


def _first_bad(value: torch.Tensor, valid: torch.Tensor) -> str:
    """``"2 invalid entries, e.g. -1.0"``: what an error message says about a bad tensor."""
    bad = value.detach().expand_as(valid)[~valid]
    count = int(bad.numel())
    return f"{count} invalid entr{'y' if count == 1 else 'ies'}, e.g. {bad[0].item()!r}"


def check_real_type(value: Any, where: str, arg: str, fix: str) -> None:
    """``value`` must be a real number or a real (not bool, not complex) tensor."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{where}: {arg} must be a real tensor, got dtype {value.dtype}. {fix}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{where}: {arg} must be a number, a tensor, or a tree of them with the structure "
            f"of x; got {type(value).__name__}. {fix}"
        )


def check_nonnegative(value: Any, where: str, arg: str, fix: str, *, strict: bool = False) -> Any:
    """Check a number or tensor is finite and ``≥ 0`` (``> 0`` if ``strict``); return it.

    Raises ``TypeError`` / ``ValueError`` naming ``where`` and ``arg``; a tensor that cannot be
    read on the host comes back with its invalid entries set to NaN.
    """
    check_real_type(value, where, arg, fix)
    bound = "> 0" if strict else "≥ 0"
    if not isinstance(value, torch.Tensor):
        if not (math.isfinite(value) and (value > 0 if strict else value >= 0)):
            raise ValueError(f"{where}: {arg} must be finite and {bound}, got {value!r}. {fix}")
        return value
    can_read = readable(value)
    if can_read and value.numel() == 1:  # the common case, ~3x cheaper than the reductions
        number = value.item()
        if math.isfinite(number) and (number > 0 if strict else number >= 0):
            return value
    valid = torch.isfinite(value) & (value > 0 if strict else value >= 0)
    if not can_read:
        return poison(valid, value)
    if not bool(valid.all()):
        raise ValueError(
            f"{where}: {arg} must be finite and {bound}, got a tensor with "
            f"{_first_bad(value, valid)}. {fix}"
        )
    return value


def check_nonnegative_tree(
    value: Any, where: str, arg: str, fix: str, *, strict: bool = False
) -> Any:
    """``check_nonnegative`` on a number, a tensor, or every leaf of a tree of them."""
    if isinstance(value, tuple | list | dict):
        return tree_map(lambda leaf: check_nonnegative(leaf, where, arg, fix, strict=strict), value)
    return check_nonnegative(value, where, arg, fix, strict=strict)


# --- one hyperparameter per leaf -----------------------------------------------------------


def _is_scalar_like(value: Any) -> bool:
    return isinstance(value, int | float | torch.Tensor)


def leafwise(fn: Callable[..., torch.Tensor], v: Tree, *hypers: Any) -> Tree:
    """Apply ``fn(leaf, *hyper_leaves)``; a tensor/number hyper is shared by every leaf."""
    leaves, spec = tree_flatten(v)
    per_hyper = []
    for h in hypers:
        if _is_scalar_like(h):
            per_hyper.append([h] * len(leaves))
        else:
            h_leaves, h_spec = tree_flatten(h)
            if h_spec != spec:
                raise ValueError(
                    "a hyperparameter given as a tree must have the structure of x "
                    f"(x: {spec}; hyperparameter: {h_spec}); or pass one tensor / number "
                    "shared by every leaf"
                )
            per_hyper.append(h_leaves)
    out = [fn(leaf, *(h[i] for h in per_hyper)) for i, leaf in enumerate(leaves)]
    return tree_unflatten(out, spec)
