r"""Ready inner solvers for [`custom_root`][bilevel.custom_root].

Each function here is a factory: it takes the inner objective ``loss(x, *args) -> scalar``
and a few settings, and returns ``solver(x0, *args) -> x*`` with exactly the signature
[`custom_root`][bilevel.custom_root] decorates:

```python
import bilevel as bl

inner = bl.inner.gradient_descent(loss, steps=200, lr=0.1)
solve = bl.custom_root(bl.stationarity(loss))(inner)
x_star = solve(x0, theta, X, y)
```

``x`` may be any tree of floating-point tensors (a tensor, or a tuple / list / dict such as
an ``nn.Module``'s parameters). Every solver returns a **detached** solution: the
derivatives of ``x*`` come from the implicit function theorem, never from the iterations,
which is why memory does not depend on the number of steps.

| factory | method | under ``vmap`` / ``jacfwd`` / ``jvp`` |
|---|---|---|
| ``gradient_descent`` | fixed-step GD with ``torch.func.grad`` / autograd | yes |
| ``torch_optimizer`` | any ``torch.optim`` optimiser for k steps | no (clear error) |
| ``lbfgs`` | ``torch.optim.LBFGS`` with a strong-Wolfe line search | no (clear error) |
| ``scipy_minimize`` | ``scipy.optimize.minimize`` on the flattened tree | no (clear error) |

Inside [`custom_root`][bilevel.custom_root], reverse mode (``.backward()``, ``torch.autograd.grad``,
``torch.func.grad`` / ``vjp`` / ``jacrev``) runs the inner solver outside every transform, so
all four solvers work there. ``torch.func.vmap``, ``jvp`` and ``jacfwd`` run it inside a
transform, where only ``gradient_descent`` can work: the other three need tensors that
require grad (``torch.optim``, autograd gradients for SciPy), which ``torch.func`` forbids,
and they raise a ``RuntimeError`` saying so.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any, cast

import numpy as np
import torch

from ._transforms import any_wrapped
from .errors import ConvergenceError
from .tree import Tree, check_float_tree, tree_flatten, tree_map, tree_unflatten

__all__ = ["gradient_descent", "lbfgs", "scipy_minimize", "torch_optimizer"]

InnerSolver = Callable[..., Tree]
"""``solver(x0, *args) -> x*``."""


def _check_loss(loss: Any, factory: str) -> None:
    if not callable(loss):
        raise TypeError(
            f"{factory}(loss, ...): loss must be callable loss(x, *args) -> scalar, "
            f"got {type(loss).__name__}"
        )


def _check_steps(steps: Any, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{name} must be a non-negative int, got {steps!r}")
    return steps


def _detach(tree: Tree) -> Tree:
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tree)


def _scalar(value: Any, factory: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(
            f"{factory}: loss(x, *args) must return a scalar tensor, got {shape}; reduce it, "
            "e.g. with .sum() or .mean()"
        )
    return value.reshape(())


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _transform_active() -> bool:
    """True while any ``torch.func`` transform (vmap, grad, jvp, jacfwd...) is running.

    Testing the inputs is not enough: under ``jacfwd`` the forward of ``custom_root`` runs
    inside a ``vmap`` level with plain, unwrapped inputs, and ``torch.func`` still forbids
    ``requires_grad_()`` there.
    """
    # torch._C's stub does not declare the private _functorch module (it exists at runtime).
    functorch = torch._C._functorch  # pyright: ignore[reportAttributeAccessIssue]
    return functorch.peek_interpreter_stack() is not None


def _refuse_transforms(factory: str, why: str) -> None:
    """Raise a clear error for a solver that cannot run inside a ``torch.func`` transform."""
    if _transform_active():
        raise RuntimeError(
            f"bl.inner.{factory} cannot run inside a torch.func transform (vmap, jvp, jacfwd, "
            f"or a grad / vjp of the solver itself): {why}, and torch.func forbids tensors that "
            "require grad there. Use bl.inner.gradient_descent, which runs under every "
            "transform, or differentiate the custom_root-decorated solver in reverse mode "
            "(.backward(), torch.autograd.grad, torch.func.grad / jacrev), which calls the "
            "inner solver outside the transform."
        )


def _check_lr(lr: Any) -> None:
    """A numeric step size must be finite and positive (a tensor is the caller's business:
    it may be batched under vmap, where reading its value is impossible)."""
    if isinstance(lr, torch.Tensor):
        return
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a positive number or a 0-d tensor, got {type(lr).__name__}")
    if not 0 < cast(float, lr) < float("inf"):  # numbers.Real's stub has no ordering
        raise ValueError(
            f"lr must be finite and > 0 (e.g. lr=1/L for an L-smooth loss), got {lr!r}"
        )


def gradient_descent(
    loss: Callable[..., torch.Tensor], *, steps: int = 100, lr: float = 0.1
) -> InnerSolver:
    r"""Fixed-step gradient descent ``x ← x − lr · ∇ₓ loss(x, *args)`` for ``steps`` steps.

    The number of steps is fixed and no value is read on the host, so the solver is a pure
    function of its inputs. While a ``torch.func`` transform is active the gradient is taken
    with ``torch.func.grad``, elsewhere with plain autograd (about ten times less overhead per
    step; the iterates are identical). The solver runs under ``torch.func.vmap`` (a batch of
    tasks or hyperparameters), ``jvp`` / ``jacfwd`` / ``jacrev`` / ``grad``, on CUDA, and inside
    [`custom_root`][bilevel.custom_root] where nothing it does is recorded. It converges linearly
    for a ``μ``-strongly convex, ``L``-smooth loss when ``0 < lr < 2/L`` (rate
    ``max(|1 − lr·μ|, |1 − lr·L|)``; Nesterov, *Lectures on Convex Optimization*, 2018,
    Thm. 2.1.15); it does not check convergence — pick ``steps`` for the accuracy the
    implicit gradient needs (its error is proportional to ``‖∇ₓ loss(x*)‖``).

    Args:
        loss: ``loss(x, *args) -> scalar tensor``; ``x`` any tree of float tensors.
        steps: number of iterations.
        lr: step size (a number, or a 0-d tensor).

    Returns:
        ``solver(x0, *args) -> x`` (detached, the tree structure of ``x0``).
    """
    _check_loss(loss, "gradient_descent")
    _check_steps(steps)
    _check_lr(lr)

    def scalar_loss(x: Tree, *args: Any) -> torch.Tensor:
        return _scalar(loss(x, *args), "gradient_descent")

    functional_grad = torch.func.grad(scalar_loss)

    def eager_grad(x: Tree, *args: Any) -> Tree:
        leaves, spec = tree_flatten(x)
        params = [leaf.detach().requires_grad_(True) for leaf in leaves]
        with torch.enable_grad():
            value = scalar_loss(tree_unflatten(params, spec), *args)
            grads = torch.autograd.grad(value, params, allow_unused=True)
        return tree_unflatten(
            [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)],
            spec,
        )

    def solver(x0: Tree, *args: Any) -> Tree:
        check_float_tree(x0, name="x0")
        x = _detach(x0)
        args = _detach(args)
        # Outside torch.func transforms plain autograd is ~10x cheaper per step than
        # torch.func.grad; both compute the same gradient. Inside one (even with plain
        # inputs, as in custom_root's forward under jacfwd) only torch.func.grad is allowed.
        transformed = _transform_active() or any_wrapped((x, args))
        grad_fn = functional_grad if transformed else eager_grad
        for _ in range(steps):
            x = tree_map(lambda xi, gi: (xi - lr * gi).detach(), x, grad_fn(x, *args))
        return _detach(x)

    solver.__name__ = solver.__qualname__ = f"gradient_descent({_name(loss)})"
    return solver


def _parameters(x0: Tree) -> tuple[list[torch.Tensor], Any]:
    """Fresh leaf tensors (``requires_grad``) holding a copy of ``x0``, and its structure."""
    check_float_tree(x0, name="x0")
    leaves, spec = tree_flatten(x0)
    return [leaf.detach().clone().requires_grad_(True) for leaf in leaves], spec


def torch_optimizer(
    loss: Callable[..., torch.Tensor],
    optimizer: type[torch.optim.Optimizer] = torch.optim.Adam,
    *,
    steps: int = 100,
    **optimizer_kwargs: Any,
) -> InnerSolver:
    r"""Run any ``torch.optim`` optimiser on ``loss(x, *args)`` for ``steps`` steps.

    A fresh optimiser is built at every call on a copy of ``x0`` (so its state, e.g. Adam's
    moments, never leaks between calls or tasks), and each step computes the gradient with
    ``torch.autograd.grad`` on detached ``args``: the caller's tensors are never given a
    ``.grad``. Not ``vmap``-able (optimisers update tensors in place); use
    ``gradient_descent`` for batched tasks.

    Args:
        loss: ``loss(x, *args) -> scalar tensor``.
        optimizer: an optimiser class, e.g. ``torch.optim.SGD`` or ``torch.optim.Adam``.
        steps: number of ``optimizer.step()`` calls.
        **optimizer_kwargs: passed to the optimiser, e.g. ``lr=1e-2, momentum=0.9``.

    Returns:
        ``solver(x0, *args) -> x`` (detached).

    Example:
        >>> solver = torch_optimizer(loss, torch.optim.SGD, steps=50, lr=0.1, momentum=0.9)
    """
    _check_loss(loss, "torch_optimizer")
    _check_steps(steps)
    if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
        raise TypeError(
            "torch_optimizer(loss, optimizer): optimizer must be a torch.optim.Optimizer "
            f"subclass such as torch.optim.Adam, got {optimizer!r}"
        )
    if optimizer is torch.optim.LBFGS:
        raise TypeError("use bilevel.inner.lbfgs for torch.optim.LBFGS (it needs a closure)")

    def solver(x0: Tree, *args: Any) -> Tree:
        _refuse_transforms("torch_optimizer", "torch.optim updates tensors in place")
        params, spec = _parameters(x0)
        args = _detach(args)
        opt = optimizer(params, **optimizer_kwargs)
        with torch.enable_grad():
            for _ in range(steps):
                value = _scalar(loss(tree_unflatten(params, spec), *args), "torch_optimizer")
                grads = torch.autograd.grad(value, params, allow_unused=True)
                for p, g in zip(params, grads, strict=True):
                    p.grad = torch.zeros_like(p) if g is None else g
                opt.step()
        return tree_unflatten([p.detach() for p in params], spec)

    solver.__name__ = solver.__qualname__ = f"torch_optimizer({_name(loss)}, {optimizer.__name__})"
    return solver


def _default_tolerance_grad(x0: Tree) -> float:
    leaves, _ = tree_flatten(x0)
    return 1e-10 if all(leaf.dtype == torch.float64 for leaf in leaves) else 1e-6


def lbfgs(
    loss: Callable[..., torch.Tensor],
    *,
    max_iter: int = 500,
    tolerance_grad: float | None = None,
    tolerance_change: float = 0.0,
    history_size: int = 20,
    line_search_fn: str | None = "strong_wolfe",
    lr: float = 1.0,
) -> InnerSolver:
    r"""L-BFGS (``torch.optim.LBFGS``, Liu & Nocedal 1989) with a strong-Wolfe line search.

    The defaults aim at the accuracy implicit differentiation needs (its error is
    proportional to the inner gradient norm at the returned point): stop when
    ``max |∇ₓ loss| ≤ tolerance_grad`` — by default ``1e-10`` for float64 trees and
    ``1e-6`` otherwise — or after ``max_iter`` iterations; ``tolerance_change=0`` disables
    torch's stop on a small change of the loss, which otherwise ends well-conditioned
    problems early. Not ``vmap``-able.

    Args:
        loss: ``loss(x, *args) -> scalar tensor``.
        max_iter: iteration budget (function evaluations: ``1.25 · max_iter``).
        tolerance_grad: stop when the largest absolute gradient entry falls below it.
        tolerance_change: stop when the loss or the step changes by less than it.
        history_size: number of curvature pairs kept.
        line_search_fn: ``"strong_wolfe"`` or ``None`` (fixed step ``lr``).
        lr: step length scale.

    Returns:
        ``solver(x0, *args) -> x`` (detached). The solver's attribute ``last_state`` holds
        the optimiser state of the latest call (``n_iter``, ``func_evals``).
    """
    _check_loss(loss, "lbfgs")
    _check_steps(max_iter, "max_iter")

    def solver(x0: Tree, *args: Any) -> Tree:
        _refuse_transforms("lbfgs", "torch.optim.LBFGS updates tensors in place")
        params, spec = _parameters(x0)
        args = _detach(args)
        tol = _default_tolerance_grad(x0) if tolerance_grad is None else tolerance_grad
        opt = torch.optim.LBFGS(
            params,
            lr=lr,
            max_iter=max_iter,
            tolerance_grad=tol,
            tolerance_change=tolerance_change,
            history_size=history_size,
            line_search_fn=line_search_fn,
        )

        def closure() -> torch.Tensor:
            value = _scalar(loss(tree_unflatten(params, spec), *args), "lbfgs")
            grads = torch.autograd.grad(value, params, allow_unused=True)
            for p, g in zip(params, grads, strict=True):
                p.grad = torch.zeros_like(p) if g is None else g
            return value.detach()

        with torch.enable_grad():
            opt.step(closure)
        state = opt.state[params[0]]
        solver.last_state = {  # type: ignore[attr-defined]
            "n_iter": int(state.get("n_iter", 0)),
            "func_evals": int(state.get("func_evals", 0)),
        }
        return tree_unflatten([p.detach() for p in params], spec)

    solver.__name__ = solver.__qualname__ = f"lbfgs({_name(loss)})"
    solver.last_state = None  # type: ignore[attr-defined]
    return solver


def scipy_minimize(
    loss: Callable[..., torch.Tensor],
    method: str = "L-BFGS-B",
    *,
    tol: float | None = None,
    options: Mapping[str, Any] | None = None,
    bounds: Any = None,
    raise_on_failure: bool = False,
) -> InnerSolver:
    r"""Minimise ``loss(x, *args)`` with ``scipy.optimize.minimize`` on a tree ``x``.

    The tree is flattened to one float64 NumPy vector for SciPy; each evaluation maps the
    vector back to the tree's own dtypes and device, evaluates the loss and its gradient
    with torch autograd (the Jacobian SciPy receives, ``jac=True``), and returns both in
    float64. The solution is mapped back the same way. Use it for the quasi-Newton and
    trust-region methods of SciPy (``"L-BFGS-B"``, ``"BFGS"``, ``"CG"``, ``"TNC"``,
    ``"trust-constr"``…); methods that need a Hessian are not supported. Not ``vmap``-able
    (every evaluation synchronises with the host).

    Performance notes: with SciPy 1.17, L-BFGS-B with ``ftol=0`` was about 10× slower than
    with ``ftol=1e-15`` for the same accuracy; and on small problems a multi-threaded BLAS
    can make each SciPy iteration much slower than a single-threaded one. L-BFGS-B stops on
    function-value changes, so for finite-difference references polish its solution.

    Args:
        loss: ``loss(x, *args) -> scalar tensor``.
        method: a ``scipy.optimize.minimize`` method that uses gradients.
        tol: SciPy's ``tol``.
        options: SciPy's ``options``, e.g. ``{"maxiter": 500, "gtol": 1e-10}``.
        bounds: SciPy's ``bounds`` on the flattened vector (for ``"L-BFGS-B"``, ``"TNC"``…).
        raise_on_failure: raise [`ConvergenceError`][bilevel.ConvergenceError] (holding SciPy's
            ``OptimizeResult`` as ``.info``) when SciPy reports ``success=False``;
            otherwise the last iterate is returned silently.

    Returns:
        ``solver(x0, *args) -> x`` (detached). The solver's attribute ``last_result`` holds
        SciPy's ``OptimizeResult`` of the latest call.
    """
    import scipy.optimize

    _check_loss(loss, "scipy_minimize")
    if not isinstance(method, str):
        raise TypeError(f"method must be a scipy.optimize.minimize method name, got {method!r}")
    opts = dict(options or {})

    def solver(x0: Tree, *args: Any) -> Tree:
        _refuse_transforms(
            "scipy_minimize", "SciPy works on NumPy arrays and takes its gradients from autograd"
        )
        check_float_tree(x0, name="x0")
        leaves, spec = tree_flatten(_detach(x0))
        shapes = [leaf.shape for leaf in leaves]
        sizes = [leaf.numel() for leaf in leaves]
        dtypes = [leaf.dtype for leaf in leaves]
        devices = [leaf.device for leaf in leaves]
        args = _detach(args)

        def to_tree(z: np.ndarray) -> list[torch.Tensor]:
            parts = np.split(np.asarray(z, dtype=np.float64), np.cumsum(sizes)[:-1])
            return [
                torch.from_numpy(np.ascontiguousarray(p)).reshape(s).to(dtype=dt, device=dev)
                for p, s, dt, dev in zip(parts, shapes, dtypes, devices, strict=True)
            ]

        def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
            with torch.enable_grad():
                params = [t.requires_grad_(True) for t in to_tree(z)]
                value = _scalar(loss(tree_unflatten(params, spec), *args), "scipy_minimize")
                grads = torch.autograd.grad(value, params, allow_unused=True)
            flat = [
                np.zeros(n) if g is None else g.detach().cpu().double().reshape(-1).numpy()
                for g, n in zip(grads, sizes, strict=True)
            ]
            return float(value.detach()), np.concatenate(flat) if flat else np.zeros(0)

        z0 = np.concatenate([leaf.detach().cpu().double().reshape(-1).numpy() for leaf in leaves])
        result = scipy.optimize.minimize(
            fun, z0, method=method, jac=True, tol=tol, options=opts, bounds=bounds
        )
        solver.last_result = result  # type: ignore[attr-defined]
        if raise_on_failure and not result.success:
            raise ConvergenceError(
                f"scipy.optimize.minimize(method={method!r}) failed on {_name(loss)} after "
                f"{result.get('nit', '?')} iterations: {result.message}",
                result,
            )
        return tree_unflatten(to_tree(result.x), spec)

    solver.__name__ = solver.__qualname__ = f"scipy_minimize({_name(loss)}, {method})"
    solver.last_result = None  # type: ignore[attr-defined]
    return solver
