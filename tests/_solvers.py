"""The one list of linear solvers every solver test draws from (after Lineax's tests/helpers.py).

Each row is a :class:`SolverCase`: a name (the pytest id), a factory and the tags stating what
the solver promises. A test asks for the rows whose promises it relies on::

    @pytest.mark.parametrize("case", solvers("handles_nonsymmetric", exclude=("fixed_k",)))
    def test_something(case: SolverCase) -> None:
        solver = case(tol=1e-12, maxiter=200, restart=4)

so adding a solver (or a variant of one) is one row in ``SOLVERS``;
``test_every_exported_solver_has_a_row`` fails when a public solver class has none.

``case(**overrides)`` builds the solver from the row's defaults updated by ``overrides``. One
call configures every row the same way:

* keywords a row's constructor does not take are dropped (``restart=`` reaches only GMRES,
  ``alpha=`` only Neumann, ``tol=`` and ``maxiter=`` never reach Dense); a keyword no row
  takes is a typo and raises ``TypeError``;
* a ``fixed_k`` row is fixed-K whatever ``tol`` / ``atol`` the test gives the adaptive rows
  (its mode is part of what the row is);
* SciPy rows take only ``tol``, ``atol``, ``maxiter`` and ``ridge``; their method and options
  are part of the row.

Tags (each read off the solver's docstring and checked by the tests that filter on it):

* mode, exactly one of ``adaptive`` (stops on ``tol``; host-side info),
  ``fixed_k`` (exactly ``maxiter`` iterations, sync-free) and ``exact`` (Dense: a
  factorisation, no iterations);
* operators it solves, beyond the SPD systems every row solves: ``handles_indefinite``
  (symmetric indefinite nonsingular ``A``) and ``handles_nonsymmetric`` (non-symmetric ``A``);
  what it needs: ``symmetric_only`` (assumes ``A = Aᵀ``), ``needs_positive_definite``
  (fails on an indefinite ``A``: CG's adaptive breakdown, Cholesky), ``needs_contraction``
  (Neumann: converges only when ``ρ(I − αA) < 1``, at a linear rate, so it needs a
  well-conditioned ``A`` or many steps);
* ``uses_rmatvec`` (applies ``Aᵀ``: ``rmatvec`` when given, else derived from ``matvec``),
  ``squares_condition`` (works on ``AᵀA``: ``κ(A)²``), ``indirect_tol`` (its ``tol`` is not
  ``‖b − A x‖ ≤ tol·‖b‖``: NormalCG tests the normal-equation residual, SciPy's MINRES is
  relative to ``‖A‖‖x‖ + ‖b‖``; tests give it a ten times tighter ``tol``),
  ``preconditioned`` (takes ``preconditioner=``; the row's default is ``M = ½I``);
* ``vmappable`` (runs under ``torch.func`` transforms: vmap, jacrev, jacfwd, and is
  differentiable through its own iterations) and ``host`` (SciPy: NumPy on the host, refuses
  ``torch.func`` transforms, result detached from autograd).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest

import bilevel as bl

TAGS = frozenset(
    {
        "adaptive",
        "fixed_k",
        "exact",
        "handles_indefinite",
        "handles_nonsymmetric",
        "symmetric_only",
        "needs_positive_definite",
        "needs_contraction",
        "uses_rmatvec",
        "squares_condition",
        "indirect_tol",
        "preconditioned",
        "vmappable",
        "host",
    }
)
MODES = frozenset({"adaptive", "fixed_k", "exact"})
_SCIPY_KEYWORDS = frozenset({"tol", "atol", "maxiter", "ridge"})


@dataclasses.dataclass(frozen=True)
class SolverCase:
    """One row: ``case(**overrides)`` builds the solver (see the module docstring)."""

    name: str
    factory: Callable[..., bl.LinearSolver]
    tags: frozenset[str]
    cls: type[bl.LinearSolver]

    def __call__(self, **overrides: Any) -> bl.LinearSolver:
        unknown = set(overrides) - _KEYWORDS
        if unknown:
            raise TypeError(f"no solver in tests/_solvers.py takes {sorted(unknown)}")
        return self.factory(**overrides)

    def __repr__(self) -> str:  # the id pytest prints for a failing case
        return f"SolverCase({self.name})"


def _keywords(cls: type) -> frozenset[str]:
    parameters = inspect.signature(cls).parameters.values()
    return frozenset(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _row(
    name: str,
    cls: type[bl.LinearSolver],
    tags: Iterable[str],
    *args: Any,
    **defaults: Any,
) -> SolverCase:
    tags = frozenset(tags)
    accepted = _SCIPY_KEYWORDS if cls is bl.SciPy else _keywords(cls)
    pinned: Mapping[str, Any] = {"tol": 0.0, "atol": 0.0} if "fixed_k" in tags else {}

    def factory(**overrides: Any) -> bl.LinearSolver:
        kwargs = {**defaults, **{k: v for k, v in overrides.items() if k in accepted}}
        return cls(*args, **{**kwargs, **pinned})

    return SolverCase(name, factory, tags, cls)


def _half(r: Any) -> Any:
    """``M = ½I``: a symmetric positive definite preconditioner for any tree."""
    return bl.tree.tree_map(lambda t: 0.5 * t, r)


_SPD = ("symmetric_only", "needs_positive_definite")
_SYMMETRIC = ("symmetric_only", "handles_indefinite")
_ANY = ("handles_indefinite", "handles_nonsymmetric")
_NORMAL = ("uses_rmatvec", "squares_condition", *_ANY)
_FIXED = ("fixed_k", "vmappable")

SOLVERS: tuple[SolverCase, ...] = (
    _row("cg", bl.CG, ("adaptive", *_SPD)),
    _row("cg_preconditioned", bl.CG, ("adaptive", "preconditioned", *_SPD), preconditioner=_half),
    # Fixed-K CG does not stop at negative curvature: on a symmetric indefinite A its
    # Lanczos–Galerkin iterates converge as MINRES's do (CG's docstring).
    _row("cg_fixed", bl.CG, (*_FIXED, *_SYMMETRIC)),
    _row("minres", bl.MINRES, ("adaptive", *_SYMMETRIC)),
    _row("minres_fixed", bl.MINRES, (*_FIXED, *_SYMMETRIC)),
    _row("gmres", bl.GMRES, ("adaptive", *_ANY)),
    _row("gmres_fixed", bl.GMRES, (*_FIXED, *_ANY)),
    _row("normal_cg", bl.NormalCG, ("adaptive", "indirect_tol", *_NORMAL)),
    _row("normal_cg_fixed", bl.NormalCG, (*_FIXED, *_NORMAL)),
    _row("neumann", bl.Neumann, (*_FIXED, "needs_contraction", "handles_nonsymmetric")),
    _row(
        "neumann_adaptive",
        bl.Neumann,
        ("adaptive", "needs_contraction", "handles_nonsymmetric"),
        tol=1e-6,
    ),
    _row("dense", bl.Dense, ("exact", "vmappable", *_ANY)),
    _row("dense_cholesky", bl.Dense, ("exact", "vmappable", *_SPD), positive_definite=True),
    _row("scipy_cg", bl.SciPy, ("adaptive", "host", *_SPD), "cg"),
    _row("scipy_minres", bl.SciPy, ("adaptive", "host", "indirect_tol", *_SYMMETRIC), "minres"),
    _row("scipy_gmres", bl.SciPy, ("adaptive", "host", *_ANY), "gmres"),
    _row("scipy_lgmres", bl.SciPy, ("adaptive", "host", *_ANY), "lgmres"),
    _row("scipy_bicgstab", bl.SciPy, ("adaptive", "host", *_ANY), "bicgstab"),
)

_KEYWORDS = frozenset().union(*(_SCIPY_KEYWORDS, *(_keywords(c.cls) for c in SOLVERS)))


def cases(*required: str, exclude: Iterable[str] = ()) -> list[SolverCase]:
    """The rows carrying every tag in ``required`` and none in ``exclude``."""
    required_set, excluded = frozenset(required), frozenset(exclude)
    unknown = (required_set | excluded) - TAGS
    if unknown:
        raise ValueError(f"unknown solver tags {sorted(unknown)}; known: {sorted(TAGS)}")
    chosen = [c for c in SOLVERS if required_set <= c.tags and not c.tags & excluded]
    if not chosen:
        raise ValueError(f"no solver has tags {sorted(required_set)} without {sorted(excluded)}")
    return chosen


def solvers(*required: str, exclude: Iterable[str] = ()) -> list[Any]:
    """``cases(...)`` as pytest params, with the row name as id."""
    return [pytest.param(c, id=c.name) for c in cases(*required, exclude=exclude)]
