"""Introspection of ``torch.func`` transforms (private).

``torch.func`` wraps tensors in one layer per active transform: a BatchedTensor per
``vmap`` level, a GradTrackingTensor per ``grad`` / ``vjp`` / ``jvp`` level. Solvers need to
know whether they run under ``vmap`` because adaptive stopping (a host-side branch on a
tensor value) is impossible there.
"""

from __future__ import annotations

import torch

from .tree import Tree, tree_leaves

# torch._C's stub does not declare the private _functorch extension module (it exists at runtime).
_functorch = torch._C._functorch  # pyright: ignore[reportAttributeAccessIssue]


def is_batched(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` carries a ``vmap`` batch dimension at any transform level."""
    if _functorch.is_legacy_batchedtensor(tensor):  # torch.autograd.functional's vectorize=True
        return True
    while _functorch.is_functorch_wrapped_tensor(tensor):
        if _functorch.is_batchedtensor(tensor):
            return True
        tensor = _functorch.get_unwrapped(tensor)
    return False


def is_wrapped(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` is seen through any ``torch.func`` transform."""
    return bool(_functorch.is_functorch_wrapped_tensor(tensor))


def any_batched(tree: Tree) -> bool:
    return any(isinstance(t, torch.Tensor) and is_batched(t) for t in tree_leaves(tree))


def any_wrapped(tree: Tree) -> bool:
    return any(isinstance(t, torch.Tensor) and is_wrapped(t) for t in tree_leaves(tree))
