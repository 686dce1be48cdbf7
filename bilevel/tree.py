"""Trees: a tensor, or nested tuple / list / dict of tensors.

Every public function of bilevel accepts trees, so users never flatten parameters by hand
(a ``dict`` from ``nn.Module.named_parameters()`` is a tree). The arithmetic here is
leaf-wise and free of host synchronisation, so it runs unchanged under
``torch.func.vmap`` and on CUDA.

Structure is handled by ``torch.utils._pytree``, the same registry ``torch.func`` uses, so
a tree that ``torch.func.grad`` accepts is a tree here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import torch
from torch.utils import _pytree as pytree

Tree: TypeAlias = Any
"""A ``torch.Tensor`` or a nested ``tuple`` / ``list`` / ``dict`` of tensors."""

__all__ = [
    "Tree",
    "check_float_tree",
    "check_same_structure",
    "tree_add",
    "tree_axpy",
    "tree_dot",
    "tree_flatten",
    "tree_leaves",
    "tree_map",
    "tree_norm",
    "tree_ravel",
    "tree_scale",
    "tree_sub",
    "tree_unflatten",
    "tree_where",
    "tree_zeros_like",
]


_LEAF_SPEC = pytree.tree_flatten(torch.zeros(()))[1]


def tree_flatten(tree: Tree) -> tuple[list[Any], pytree.TreeSpec]:
    """Leaves in a fixed order, and the structure needed to rebuild the tree.

    Args:
        tree: a tensor or a nested ``tuple`` / ``list`` / ``dict`` of tensors (any leaf type
            is accepted; a bare tensor is a one-leaf tree).

    Returns:
        ``(leaves, spec)``: the leaves in ``torch.utils._pytree`` order and the ``TreeSpec``
        that [`tree_unflatten`][bilevel.tree.tree_unflatten] rebuilds ``tree`` from.
    """
    if isinstance(tree, torch.Tensor):
        return [tree], _LEAF_SPEC  # fast path: pytree's generic dispatch costs ~15 µs
    return pytree.tree_flatten(tree)


def tree_unflatten(leaves: Sequence[Any], spec: pytree.TreeSpec) -> Tree:
    """Inverse of [`tree_flatten`][bilevel.tree.tree_flatten].

    Args:
        leaves: one value per leaf of ``spec``, in flattening order.
        spec: the ``TreeSpec`` returned by [`tree_flatten`][bilevel.tree.tree_flatten].

    Returns:
        The tree with the structure ``spec`` and ``leaves`` as its leaves.
    """
    return pytree.tree_unflatten(list(leaves), spec)


def tree_leaves(tree: Tree) -> list[Any]:
    """The leaves of ``tree`` in flattening order.

    Args:
        tree: a tensor or a nested ``tuple`` / ``list`` / ``dict`` of tensors.

    Returns:
        The leaves as a list (``[tree]`` for a bare tensor, ``[]`` for an empty container).
    """
    if isinstance(tree, torch.Tensor):
        return [tree]
    return pytree.tree_leaves(tree)


def tree_map(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` leaf-wise to ``tree`` and trees of the same structure.

    Args:
        fn: called as ``fn(leaf, *rest_leaves)`` once per leaf of ``tree``.
        tree: the tree whose structure the result takes.
        *rest: further trees with the structure of ``tree``; their leaves at the same
            position are passed to ``fn`` after the leaf of ``tree``.

    Returns:
        A tree with the structure of ``tree`` holding ``fn``'s outputs.
    """
    if isinstance(tree, torch.Tensor) and all(isinstance(t, torch.Tensor) for t in rest):
        return fn(tree, *rest)  # fast path: a bare tensor is a one-leaf tree
    return pytree.tree_map(fn, tree, *rest)


def tree_zeros_like(tree: Tree) -> Tree:
    """Zeros shaped like ``tree``.

    Args:
        tree: a tree of tensors.

    Returns:
        A tree with the structure of ``tree`` whose leaves are ``torch.zeros_like`` of its
        leaves (same shape, dtype and device).
    """
    return tree_map(torch.zeros_like, tree)


def tree_add(a: Tree, b: Tree) -> Tree:
    """Leaf-wise sum ``a + b``.

    Args:
        a: a tree of tensors.
        b: a tree with the structure of ``a``; leaves broadcast as in ``torch.add``.

    Returns:
        A tree with the structure of ``a`` holding ``a_leaf + b_leaf``.
    """
    return tree_map(torch.add, a, b)


def tree_sub(a: Tree, b: Tree) -> Tree:
    """Leaf-wise difference ``a - b``.

    Args:
        a: a tree of tensors.
        b: a tree with the structure of ``a``; leaves broadcast as in ``torch.sub``.

    Returns:
        A tree with the structure of ``a`` holding ``a_leaf - b_leaf``.
    """
    return tree_map(torch.sub, a, b)


def tree_scale(alpha: torch.Tensor | float, a: Tree) -> Tree:
    """``alpha * a`` for a scalar (python number or 0-d tensor) ``alpha``.

    Args:
        alpha: the scale: a python number or a 0-d tensor.
        a: a tree of tensors.

    Returns:
        A tree with the structure of ``a`` holding ``alpha * a_leaf``.
    """
    return tree_map(lambda leaf: alpha * leaf, a)


def tree_axpy(alpha: torch.Tensor | float, x: Tree, y: Tree) -> Tree:
    """``alpha * x + y`` leaf-wise, in one fused kernel per leaf.

    Args:
        alpha: the scale of ``x``: a python number or a 0-d tensor.
        x: a tree of tensors.
        y: a tree with the structure and leaf shapes of ``x``.

    Returns:
        A tree with the structure of ``x`` holding ``alpha * x_leaf + y_leaf``.
    """
    if isinstance(alpha, torch.Tensor):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            return torch.addcmul(y, alpha, x)
        return tree_map(lambda xl, yl: torch.addcmul(yl, alpha, xl), x, y)
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return torch.add(y, x, alpha=alpha)
    return tree_map(lambda xl, yl: torch.add(yl, xl, alpha=alpha), x, y)


def _leaf_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if x.dtype != y.dtype or x.shape != y.shape or x.is_complex():
        return torch.sum(x * y)  # promotion and broadcasting, as ``x * y`` does
    from ._transforms import is_batched  # lazy: _transforms builds on this module

    if torch.compiler.is_compiling() or is_batched(x) or is_batched(y):
        # vmap lowers torch.dot to a bmm of 1×n by n×1 blocks: about 8× slower than a
        # fused multiply-and-sum for iMAML's 16 × 113k-parameter CG vectors. Under
        # torch.compile the transform wrappers cannot be inspected, and the compiler fuses
        # the multiply-and-sum anyway.
        return torch.sum(x * y)
    if x.dim() != 1 or y.dim() != 1:
        x, y = x.reshape(-1), y.reshape(-1)
    return torch.dot(x, y)


def tree_dot(a: Tree, b: Tree) -> torch.Tensor:
    """Euclidean inner product ``Σ_leaves ⟨a_leaf, b_leaf⟩`` as a 0-d tensor.

    Args:
        a: a non-empty tree of tensors.
        b: a tree with the same number of leaves as ``a``, paired in flattening order;
            each pair is multiplied elementwise (with broadcasting) and summed.

    Returns:
        The inner product as a 0-d tensor (differentiable; no host synchronisation).

    Raises:
        ValueError: if ``a`` and ``b`` have different numbers of leaves.
    """
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return _leaf_dot(a, b)
    la, lb = tree_leaves(a), tree_leaves(b)
    if len(la) != len(lb):
        raise ValueError(f"tree_dot: trees have {len(la)} and {len(lb)} leaves")
    total = _leaf_dot(la[0], lb[0])
    for x, y in zip(la[1:], lb[1:], strict=True):
        total = total + _leaf_dot(x, y)
    return total


def tree_norm(a: Tree) -> torch.Tensor:
    """Euclidean norm of all leaves taken together, as a 0-d tensor.

    Args:
        a: a non-empty tree of tensors.

    Returns:
        ``sqrt(Σ_leaves ‖a_leaf‖²)`` as a 0-d tensor.
    """
    if isinstance(a, torch.Tensor):
        return torch.linalg.vector_norm(a)
    return torch.sqrt(tree_dot(a, a))


def tree_where(condition: torch.Tensor, a: Tree, b: Tree) -> Tree:
    """Leaf-wise ``torch.where(condition, a, b)`` for a 0-d boolean ``condition``.

    This is how fixed-iteration loops branch on tensor values without a host sync.

    Args:
        condition: a 0-d boolean tensor (under ``vmap``, one per batch entry).
        a: the tree chosen where ``condition`` is true.
        b: the tree chosen where it is false; the structure and leaf shapes of ``a``.

    Returns:
        A tree with the structure of ``a``: its leaves where ``condition`` holds, else
        those of ``b``.
    """
    return tree_map(lambda x, y: torch.where(condition, x, y), a, b)


def tree_ravel(tree: Tree) -> tuple[torch.Tensor, Callable[[torch.Tensor], Tree]]:
    """Concatenate all leaves into one vector; return it and the inverse map.

    Args:
        tree: a tree of tensors; leaves of different dtypes are promoted by ``torch.cat``.

    Returns:
        ``(flat, unravel)``: the 1-D concatenation of the flattened leaves (length the total
        number of elements; empty for an empty tree), and the map taking such a vector back
        to a tree with the structure, shapes and dtypes of ``tree``.
    """
    leaves, spec = tree_flatten(tree)
    shapes = [leaf.shape for leaf in leaves]
    sizes = [leaf.numel() for leaf in leaves]
    dtypes = [leaf.dtype for leaf in leaves]
    flat = torch.cat([leaf.reshape(-1) for leaf in leaves]) if leaves else torch.zeros(0)
    common = flat.dtype if all(d == flat.dtype for d in dtypes) else None

    def unravel(vector: torch.Tensor) -> Tree:
        # Called once per matvec inside solvers' loops: keep it to one split and views.
        parts = vector.split_with_sizes(sizes) if len(sizes) > 1 else (vector,)
        out = [p.reshape(s) for p, s in zip(parts, shapes, strict=True)]
        if common is None or vector.dtype != common:
            out = [p.to(d) for p, d in zip(out, dtypes, strict=True)]
        return tree_unflatten(out, spec)

    return flat, unravel


def _describe(tree: Tree) -> str:
    leaves, spec = tree_flatten(tree)
    shapes = [
        f"{tuple(leaf.shape)}:{str(leaf.dtype).removeprefix('torch.')}"
        if isinstance(leaf, torch.Tensor)
        else type(leaf).__name__
        for leaf in leaves
    ]
    return f"structure {spec} with leaves [{', '.join(shapes)}]"


def check_same_structure(
    reference: Tree,
    other: Tree,
    *,
    reference_name: str,
    other_name: str,
    check_dtype: bool = True,
) -> None:
    """Raise ``ValueError`` naming both arguments unless the trees match leaf for leaf.

    Structure, shapes and (optionally) dtypes must agree. This is a Python-level check: it
    never synchronises with the device.

    Args:
        reference: the tree whose structure, shapes and dtypes are expected.
        other: the tree to check; every leaf must be a tensor.
        reference_name: how the error message names ``reference`` (e.g. ``"b"``).
        other_name: how the error message names ``other`` (e.g. ``"x0"``).
        check_dtype: whether leaf dtypes must also agree.

    Raises:
        ValueError: if the trees differ in structure, a leaf of ``other`` is not a tensor, or
            a leaf's shape (or, with ``check_dtype``, dtype) differs.
    """
    ref_leaves, ref_spec = tree_flatten(reference)
    oth_leaves, oth_spec = tree_flatten(other)
    problem = None
    if ref_spec != oth_spec:
        problem = "different tree structures"
    else:
        for i, (r, o) in enumerate(zip(ref_leaves, oth_leaves, strict=True)):
            if not isinstance(o, torch.Tensor):
                problem = f"leaf {i} of {other_name} is a {type(o).__name__}, not a tensor"
            elif r.shape != o.shape:
                problem = f"leaf {i} has shape {tuple(o.shape)}, expected {tuple(r.shape)}"
            elif check_dtype and r.dtype != o.dtype:
                problem = f"leaf {i} has dtype {o.dtype}, expected {r.dtype}"
            if problem:
                break
    if problem:
        raise ValueError(
            f"{other_name} must have the same structure, shapes and dtypes as {reference_name} "
            f"({problem}).\n  {reference_name}: {_describe(reference)}\n"
            f"  {other_name}: {_describe(other)}"
        )


def check_float_tree(tree: Tree, *, name: str) -> None:
    """Raise a clear error unless ``tree`` is a non-empty tree of floating-point tensors.

    Args:
        tree: the tree to check.
        name: how the error message names ``tree`` (e.g. ``"b"``).

    Raises:
        ValueError: if ``tree`` has no leaves.
        TypeError: if a leaf is not a tensor or not of a floating-point dtype.
    """
    leaves = tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{name} is an empty tree; pass a tensor or a tree of tensors")
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{name} must be a tensor or a tree (tuple/list/dict) of tensors; "
                f"leaf {i} is a {type(leaf).__name__}. Convert it with torch.as_tensor."
            )
        if not leaf.is_floating_point():
            raise TypeError(
                f"{name} must hold floating-point tensors; leaf {i} has dtype {leaf.dtype}. "
                f"Convert it, e.g. with .to(torch.float32) or .double()."
            )
