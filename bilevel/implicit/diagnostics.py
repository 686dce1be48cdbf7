"""What the implicit layer checks and says: the failure policy, its messages, the probes.

The implicit function theorem differentiates a *root*, through a *linear solve*. Either can
fail without a sign in the numbers: the inner solver returns NaN or a point that is not a
root, the linear solve diverges or breaks down, the cotangent is NaN, or θ never enters the
optimality condition (so its gradient is identically zero). ``Diagnosed`` holds the
policy (``on_failure``, ``callback``, ``root_tol``) and turns each of these into one message
that names the cause and the fix. Every check reads the host at most once, and none runs
under ``vmap`` or while ``torch.compile`` traces (nothing can be read on the host there).
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from .._transforms import any_batched
from ..errors import ConvergenceError, ConvergenceWarning
from ..linear import LinearSolver, Result, SolveInfo
from ..tree import Tree, tree_leaves, tree_map, tree_norm
from ._rules import explain_mutation

__all__ = ["ON_FAILURE", "Diagnosed", "OnFailure", "warn"]

OnFailure = Literal["warn", "raise", "ignore"]
ON_FAILURE = ("warn", "raise", "ignore")

# Frames in these directories are not the user's: a warning is attributed to the first frame
# outside them (the line calling .backward(), torch.func.grad(...)(...), or the solver).
_INTERNAL_DIRS = (
    os.path.dirname(torch.__file__),
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
)


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the user's line, not to torch or bilevel internals.

    The ``stacklevel`` is that of the first frame outside the torch and bilevel source
    directories (the line calling ``.backward()``, ``torch.func.grad(...)(...)`` or the
    solver), so the warning filters and the printed location point at user code.

    Args:
        message: the warning text.
        category: the warning class, e.g. [`ConvergenceWarning`][bilevel.ConvergenceWarning].
    """
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _host(value: float | torch.Tensor) -> float:
    """A diagnostic scalar on the host (detached: it may carry a torch.func grad level)."""
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def _silent() -> bool:
    """True where nothing may be read on the host: while ``torch.compile`` traces."""
    return bool(torch.compiler.is_compiling())


def check_policy(
    on_failure: str, callback: Callable[[SolveInfo], None] | None, root_tol: float | None
) -> float | None:
    """Validate the policy arguments of ``custom_root``; returns ``root_tol`` as a float."""
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable(SolveInfo), got {type(callback).__name__}")
    if root_tol is None:
        return None
    if isinstance(root_tol, bool) or not isinstance(root_tol, int | float):
        raise TypeError(f"root_tol must be a real number or None, got {type(root_tol).__name__}")
    if not (root_tol >= 0 and math.isfinite(root_tol)):
        raise ValueError(f"root_tol must be finite and >= 0, got {root_tol!r}")
    return float(root_tol)


def failure_message(info: SolveInfo, name: str, solver: LinearSolver, direction: str) -> str:
    """The message for a failed linear solve: what happened, why it matters, what to do.

    The generic meaning and remedy come from the outcome's [`Result`][bilevel.Result]; this
    adds what they mean for the gradient and the numbers of this solve.

    Args:
        info: the failed solve's diagnostics.
        name: the inner solver's name, for the message.
        solver: the linear solver used.
        direction: ``"backward"`` (reverse mode) or ``"forward"`` (forward mode).

    Returns:
        One paragraph naming the cause and the fix.
    """
    outcome = info.outcome
    residual = _host(info.residual_norm)
    head = f"implicit differentiation of {name} ({direction} linear solve, {solver!r}): "
    if outcome is Result.NONFINITE_INPUT:
        return head + (
            "the cotangent reaching x* holds NaN/Inf, so the gradient is NaN. It comes from "
            "the outer loss or from a layer applied to x* after this solve, not from the "
            "linear solve: check the outer loss at x* (e.g. log of 0, division by 0)."
        )
    if outcome is Result.NONFINITE:
        return head + (
            f"{outcome.message} ({info.iterations} iterations); a non-finite inner solution "
            f"would do it too. The gradient is not trustworthy. Fix: {outcome.fix}."
        )
    if outcome is Result.DIVERGED:
        return head + (
            f"{outcome.message} (final residual "
            f"{_host(info.stats['final_residual_norm']):.3g}), so the implicit term of the "
            f"gradient is zero. Fix: {outcome.fix}."
        )
    negative = info.stats.get("negative_curvature")
    after = bool(info.stats.get("negative_curvature_after", False))
    if (
        outcome is Result.BREAKDOWN
        and info.fixed
        and negative is not None
        and (int(negative) > 0 or after)
    ):
        where = " and in the search direction after them" if after else ""
        return head + (
            f"CG met negative curvature in {int(negative)} of {info.iterations} iterations{where} "
            "(∂F/∂x is indefinite: e.g. a Hessian at a saddle point, or iMAML's H + λI with an "
            "eigenvalue of H below −λ) and no iterate improved on the start, so x = x0 was used "
            f"(residual {residual:.3g}) and the implicit gradient is zero or meaningless. "
            f"Fix: {outcome.fix}."
        )
    if outcome is Result.BREAKDOWN and info.fixed:
        return head + (
            f"the fixed-K solve broke down in {int(info.stats['breakdowns'])} of "
            f"{info.iterations} iterations (e.g. a singular or not positive definite ∂F/∂x); "
            f"the iterate reached before it (residual {residual:.3g}) was used. "
            f"Fix: {outcome.fix}."
        )
    message = head + (
        f"stopped with reason='{info.reason}' after {info.iterations} iterations (residual "
        f"{residual:.3g}): {outcome.message}. The gradient is only as accurate as that "
        f"residual. Fix: {outcome.fix}, or pass on_failure='ignore'."
    )
    if outcome is Result.BREAKDOWN:
        message += (
            " For a hypergradient, ∂F/∂x is then not positive definite (CG) or singular (Dense) "
            "at the inner solution: a saddle point, or an unconverged inner solve."
        )
    return message


class Diagnosed:
    """The failure policy of an implicit function and the checks that apply it.

    Subclasses set ``on_failure``, ``callback``, ``root_tol``, ``optimality_fn``, ``solver``
    and ``__wrapped__`` (the inner solver); ``latest_info`` records the last solve.
    """

    on_failure: OnFailure
    callback: Callable[[SolveInfo], None] | None
    root_tol: float | None
    optimality_fn: Callable[..., Tree]
    solver: LinearSolver
    __wrapped__: Callable[..., Any]
    latest_info: SolveInfo | None
    symmetric: bool
    _dependence_checked: bool
    _symmetry_checked: bool
    _checks_solution: bool

    @property
    def _name(self) -> str:
        return getattr(self.__wrapped__, "__name__", "inner_solver")

    def _fail(self, message: str, info: SolveInfo | None) -> None:
        """Apply ``on_failure`` to a diagnosed problem."""
        if self.on_failure == "ignore":
            return
        if self.on_failure == "raise":
            raise ConvergenceError(message, info)
        warn(message, ConvergenceWarning)

    def _check_root(self, x_star: Tree, args: Sequence[Any]) -> None:
        """After the inner solve: x* finite, and ``‖F(x*, args)‖ ≤ root_tol`` when set.

        One host sync (skipped under ``vmap`` and while compiling). The implicit function
        theorem differentiates the *root*: at a point that is not one the gradient is wrong
        by about ``‖A⁻¹‖·‖F‖``, with no other sign of trouble.
        """
        if not self._checks_solution or _silent() or any_batched((x_star, args)):
            return
        leaves = tree_leaves(x_star)
        bad = int(sum((~torch.isfinite(t)).sum() for t in leaves))  # one sync for the tree
        if bad:
            self._fail(
                f"{self._name} returned a non-finite inner solution ({bad} NaN/Inf entries), so "
                "its implicit gradient is meaningless: the inner solve diverged — lower its "
                "step size, clip its updates, or check its inputs.",
                None,
            )
            return
        if self.root_tol is None:
            return
        # x requires grad so that stationarity() takes its plain-autograd path (no torch.func
        # transform, so modules with running statistics still work).
        x = tree_map(lambda t: t.detach().requires_grad_(True), x_star)
        with torch.enable_grad(), explain_mutation("optimality_fn"):
            residual = float(tree_norm(tree_map(torch.detach, self.optimality_fn(x, *args))))
        if residual <= self.root_tol:
            return
        self._fail(
            f"{self._name} returned a point that is not a root of optimality_fn: "
            f"‖F(x*, args)‖ = {residual:.3g} > root_tol = {self.root_tol:.3g}. The implicit "
            "gradient assumes F(x*) = 0 and is off by about ‖(∂F/∂x)⁻¹‖·‖F‖: run the inner "
            "solver longer or with a tighter tolerance, or raise root_tol if this accuracy is "
            "enough.",
            None,
        )

    def _report(self, info: SolveInfo, direction: str) -> None:
        """Record the solve's info and apply the failure policy (one host sync at the end)."""
        if _silent() or any_batched(tree_leaves((info.residual_norm, dict(info.stats)))):
            return  # batched or traced diagnostics cannot be read on the host
        self.latest_info = info
        if self.callback is not None:
            self.callback(info)
        if self.on_failure == "ignore" or not info.failed:
            return
        self._fail(failure_message(info, self._name, self.solver, direction), info)

    def _warn_unused(self, unused: Sequence[int] | None) -> None:
        """Warn once per implicit function when a differentiated argument misses ``F``.

        The classic porting bug: θ only initialises the inner solver (``x0``), so the implicit
        gradient through ``F`` is identically zero. Autograd reports such inputs as unused in
        the backward pass, so the probe costs nothing; ``unused`` is ``None`` where it did
        not run (under ``torch.func`` transforms), and after its first run it is not asked
        again.
        """
        if unused is None or self._dependence_checked or _silent():
            return
        self._dependence_checked = True
        for i in unused:
            warn(
                f"argument {i} of {self._name} is differentiated but does not enter "
                "optimality_fn, so its implicit gradient is zero. If it only sets the initial "
                "point, the optimality condition is missing its dependence on it (e.g. "
                "iMAML's proximal term λ(φ − θ)).",
                UserWarning,
            )

    def _symmetry_probe(self) -> Callable[[Any, Tree], None] | None:
        """The one-time symmetry check for a solver that assumes ``A = Aᵀ``, or ``None``.

        CG and MINRES solve ``Aᵀu = v`` correctly only when ``A = ∂F/∂x`` is symmetric; on a
        non-symmetric ``A`` they return a wrong ``u`` that looks converged. An optimality
        condition marked ``symmetric`` (``bl.stationarity``) is trusted; for any other, the
        first backward pass compares ``A w`` with ``Aᵀw`` for one random ``w`` (one JVP and
        one VJP, once per implicit function, never under transforms or while compiling).
        """
        if (
            self._symmetry_checked
            or self.symmetric
            or not type(self.solver).assumes_symmetric
            or _silent()
        ):
            return None
        return self._check_symmetry

    def _check_symmetry(self, lin: Any, cotangent: Tree) -> None:
        if any_batched(cotangent):
            return  # nothing can be read on the host under vmap: ask again eagerly
        self._symmetry_checked = True
        leaves = tree_leaves(cotangent)
        if not leaves:
            return
        generator = torch.Generator(device=leaves[0].device).manual_seed(0)
        w = tree_map(
            lambda t: torch.randn(t.shape, generator=generator, dtype=t.dtype, device=t.device),
            cotangent,
        )
        try:
            aw = tree_map(torch.detach, lin.matvec(w))
            atw = tree_map(torch.detach, lin.rmatvec(w))
        except Exception:  # a best-effort probe must never break a backward that works
            return  # F's Jacobian-vector product is unavailable: nothing to compare
        scale = max(float(tree_norm(aw)), float(tree_norm(atw)))
        if not scale > 0:
            return
        mismatch = float(tree_norm(tree_map(torch.sub, aw, atw))) / scale
        threshold = 100 * math.sqrt(torch.finfo(leaves[0].dtype).eps)
        if not mismatch > threshold:
            return
        self._fail(
            f"implicit differentiation of {self._name}: the linear solver {self.solver!r} "
            "assumes a symmetric ∂F/∂x, but optimality_fn's is not symmetric "
            f"(‖(A − Aᵀ)w‖/‖Aw‖ = {mismatch:.2g} for a random w), so it would solve the wrong "
            "system and the gradient would be wrong without any other sign. Use bl.GMRES, "
            "bl.NormalCG or bl.Dense for a non-symmetric ∂F/∂x (the default when the solver "
            "is omitted).",
            None,
        )
