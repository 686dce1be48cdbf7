"""Bridge to the Krylov solvers of ``scipy.sparse.linalg``."""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import torch

from .._transforms import any_wrapped
from ..tree import Tree, tree_norm, tree_sub
from ._base import LinearProblem, LinearSolver, Matvec, SolveInfo
from ._results import Result

__all__ = ["SciPy"]

METHODS = ("bicgstab", "cg", "gmres", "lgmres", "minres")
_RESERVED = ("x0", "tol", "rtol", "atol", "maxiter", "callback", "callback_type")


class SciPy(LinearSolver):
    r"""Solve with ``scipy.sparse.linalg.<method>`` through a ``LinearOperator``.

    The tree is raveled into one float64 NumPy vector; each SciPy matvec copies its input to
    the tree's device and dtype, calls ``matvec`` and copies the result back, so any device
    works (at the price of one host round trip per product). Methods and what they assume
    (Barrett et al., *Templates for the Solution of Linear Systems*, SIAM 1994):

    * ``"cg"``: symmetric positive definite; ``"minres"``: symmetric, possibly indefinite
      (Paige & Saunders, 1975) — its stopping test is relative to ``‖A‖‖x‖ + ‖b‖``;
    * ``"gmres"`` (restarted; ``maxiter`` counts restart cycles, as in SciPy), ``"lgmres"``
      (Baker, Jessup & Manteuffel, 2005), ``"bicgstab"`` (van der Vorst, 1992): any
      nonsingular square ``A``.

    ``tol`` is passed as SciPy's relative tolerance under the keyword the installed SciPy
    expects (``rtol``, or ``tol`` before SciPy 1.12); methods without ``atol`` get the
    relative tolerance ``max(tol, atol/‖b‖)``. Extra keyword ``options`` (``restart``,
    ``M``, ``inner_m``, ``shift``, …) go to the SciPy function unchanged.

    ``info.iterations`` is counted by SciPy's callback (inner iterations for gmres, outer
    cycles for lgmres), ``info.stats["matvecs"]`` counts products, and ``info.residual_norm``
    is the true ``‖b − A x‖`` of the returned ``x`` in the tree's dtype. SciPy's exit code
    sets the reason: 0 → ``"converged"``, > 0 → ``"max_iterations"``, < 0 → ``"breakdown"``;
    a non-finite residual → ``"nonfinite"``. With ``tol == atol == 0`` SciPy runs its full
    ``maxiter`` budget and the info is that of fixed-K mode, but the bridge always
    synchronises with the host: it cannot run under ``torch.func`` transforms (``vmap``,
    ``grad``) and its result is detached from autograd.

    Args:
        method: one of ``"bicgstab"``, ``"cg"``, ``"gmres"``, ``"lgmres"``, ``"minres"``.
        tol: relative tolerance: stop once ``‖b − A x‖ ≤ max(tol·‖b‖, atol)``; ``tol = atol = 0``
            selects fixed-K mode.
        atol: absolute tolerance on the residual norm.
        maxiter: SciPy's ``maxiter`` (restart cycles for gmres and outer cycles for lgmres).
        ridge: solve ``(A + ridge·I) x = b`` instead (damps indefinite or singular ``A``).
        **options: further keyword arguments of the SciPy function.
    """

    def __init__(
        self,
        method: str = "minres",
        *,
        tol: float = 1e-6,
        atol: float = 0.0,
        maxiter: int = 100,
        ridge: float = 0.0,
        **options: Any,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        clashes = [name for name in _RESERVED if name in options]
        if clashes:
            raise TypeError(
                f"options {clashes} are set by SciPy(...) itself: use tol=, atol=, maxiter= "
                "and the solver's x0 argument instead"
            )
        super().__init__(tol=tol, atol=atol, maxiter=maxiter, ridge=ridge)
        self.method = method
        self.options = options

    def __call__(
        self, matvec: Matvec, b: Tree, x0: Tree | None = None, rmatvec: Matvec | None = None
    ) -> tuple[Tree, SolveInfo]:
        """Solve ``(A + ridge·I) x = b`` on the host with SciPy; see the class docstring.

        Args:
            matvec: ``v ↦ A v`` on trees shaped like ``b``.
            b: the right-hand side, a tree of floating-point tensors (not under a
                ``torch.func`` transform).
            x0: the initial guess, shaped like ``b``; ``None`` starts from zero.
            rmatvec: ``u ↦ Aᵀ u``, handed to SciPy's ``LinearOperator``; ``None`` if unknown.

        Returns:
            ``(x, info)``: the solution, detached from autograd, and its
            [`SolveInfo`][bilevel.SolveInfo] with Python scalars.

        Raises:
            ValueError: ``b`` or ``x0`` is a transformed tensor (``vmap``, ``grad``, ``jvp``).
        """
        if any_wrapped(b) or (x0 is not None and any_wrapped(x0)):
            raise ValueError(
                f"SciPy(method={self.method!r}) solves in NumPy on the host and cannot run "
                "under torch.func transforms (vmap, grad, jvp): b or x0 is a transformed "
                "tensor. Use a torch solver such as CG(tol=0, maxiter=K) or GMRES(tol=0, ...)."
            )
        return super().__call__(matvec, b, x0, rmatvec)

    def _solve(self, problem: LinearProblem) -> tuple[torch.Tensor, SolveInfo]:
        import scipy.sparse.linalg as spla

        b = flat = problem.b.detach()
        counts = {"matvecs": 0, "iterations": 0}

        def wrap(fn: Matvec) -> Any:
            lifted = fn

            def apply(v: np.ndarray) -> np.ndarray:
                counts["matvecs"] += 1
                vector = torch.from_numpy(np.asarray(v, dtype=np.float64).reshape(-1))
                out = lifted(vector.to(device=flat.device, dtype=flat.dtype)).detach()
                result = out.to("cpu", torch.float64).numpy()
                # SciPy updates its vectors in place: never hand back memory it owns.
                return result.copy() if np.may_share_memory(result, v) else result

            return apply

        n = flat.shape[0]
        rmatvec = None if problem.rmatvec is None else wrap(problem.rmatvec)
        # LinearOperator.__new__ dispatches these keywords to _CustomLinearOperator; pyright
        # reads the abstract base's __init__(dtype, shape) signature instead.
        operator = spla.LinearOperator(  # pyright: ignore[reportCallIssue]
            (n, n),
            matvec=wrap(problem.matvec),  # pyright: ignore[reportCallIssue]
            rmatvec=rmatvec,  # pyright: ignore[reportCallIssue]
            dtype=np.float64,  # pyright: ignore[reportCallIssue]
        )

        def callback(_: Any) -> None:
            counts["iterations"] += 1

        function = getattr(spla, self.method)
        kwargs: dict[str, Any] = self._tolerances(function, torch.linalg.vector_norm(flat).item())
        kwargs.update(self.options, maxiter=self.maxiter, callback=callback)
        if self.method == "gmres":
            kwargs["callback_type"] = "pr_norm"
        x0 = None if problem.x0 is None else problem.x0.detach()
        if x0 is not None:
            kwargs["x0"] = x0.to("cpu", torch.float64).numpy()
        rhs = flat.to("cpu", torch.float64).numpy()
        solution, code = function(operator, rhs, **kwargs)

        x = torch.from_numpy(solution).to(device=flat.device, dtype=flat.dtype)
        residual = tree_norm(tree_sub(b, problem.matvec(x))).item()
        stats = {"matvecs": counts["matvecs"] + 1, "scipy_info": int(code)}
        iterations = counts["iterations"]
        finite = math.isfinite(residual)
        if self.fixed_iterations:
            return x, SolveInfo(finite, iterations, residual, Result.FIXED_ITERATIONS, stats)
        if not finite:
            return x, SolveInfo(False, iterations, residual, Result.NONFINITE, stats)
        reason = (
            Result.CONVERGED
            if code == 0
            else Result.MAX_ITERATIONS
            if code > 0
            else Result.BREAKDOWN
        )
        return x, SolveInfo(code == 0, iterations, residual, reason, stats)

    def _tolerances(self, function: Any, b_norm: float) -> dict[str, float]:
        """``rtol``/``tol`` and ``atol`` keywords as the installed SciPy spells them."""
        parameters = inspect.signature(function).parameters
        relative = "rtol" if "rtol" in parameters else "tol"
        if "atol" in parameters:
            return {relative: self.tol, "atol": self.atol}
        return {relative: max(self.tol, self.atol / b_norm if b_norm > 0 else 0.0)}
