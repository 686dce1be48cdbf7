"""A matrix-free linear operator and what is known about its structure.

Solvers take ``matvec`` (and, for some, ``rmatvec``) as plain callables. What a caller knows
about ``A`` beyond its products — that it is symmetric, or positive semidefinite — lives in
one place, a [`LinearOperator`][bilevel.LinearOperator], instead of in per-solver flags:
``LinearSolver.__call__`` reads it once and hands it to the solver in its
``LinearProblem``. A symmetric operator is its own transpose, so solvers that apply ``Aᵀ``
(NormalCG, SciPy) get it for free; a positive semidefinite one lets ``Dense`` factorise by
Cholesky. The implicit layer builds one from the optimality condition's linearisation, tagged
with the condition's ``symmetric`` mark (``bl.stationarity`` sets it).

Modelled on Lineax's operators and their structure tags (``symmetric_tag``,
``positive_semidefinite_tag``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

__all__ = ["LinearOperator"]

Matvec = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class LinearOperator:
    """A linear map ``v ↦ A v`` on trees, with its transpose and structure when known.

    Pass it wherever a solver takes ``matvec``: ``solver(LinearOperator(matvec,
    symmetric=True), b)``. Calling it applies ``A``.

    Attributes:
        matvec: ``v ↦ A v``, a linear map from trees to trees of the same structure.
        rmatvec: ``u ↦ Aᵀ u``, or ``None`` when not known (a symmetric operator does not
            need it: it is its own transpose).
        symmetric: the caller promises ``A = Aᵀ``. Nothing checks it in the solvers; the
            implicit layer probes it once when a solver that assumes symmetry meets an
            optimality condition that does not declare it.
        positive_semidefinite: the caller promises ``vᵀ A v ≥ 0`` for all ``v``; requires
            ``symmetric``. ``Dense`` then factorises ``A + ridge·I`` by Cholesky.
    """

    matvec: Matvec
    rmatvec: Matvec | None = None
    symmetric: bool = False
    positive_semidefinite: bool = False

    def __post_init__(self) -> None:
        if not callable(self.matvec):
            raise TypeError(
                f"LinearOperator: matvec must be callable (tree -> tree), got "
                f"{type(self.matvec).__name__}"
            )
        if self.rmatvec is not None and not callable(self.rmatvec):
            raise TypeError(
                f"LinearOperator: rmatvec must be callable or None, got "
                f"{type(self.rmatvec).__name__}"
            )
        if self.positive_semidefinite and not self.symmetric:
            raise ValueError(
                "LinearOperator: positive_semidefinite=True needs symmetric=True (a "
                "semidefinite operator here means a symmetric one with vᵀAv ≥ 0)"
            )

    def __call__(self, v: Any) -> Any:
        """``A v``.

        Args:
            v: a tree in ``A``'s domain.

        Returns:
            ``A v``, a tree of the same structure.
        """
        return self.matvec(v)

    @property
    def transpose_matvec(self) -> Matvec | None:
        """``u ↦ Aᵀ u``: ``rmatvec``, or ``matvec`` itself for a symmetric ``A``; else ``None``."""
        if self.rmatvec is not None:
            return self.rmatvec
        return self.matvec if self.symmetric else None

    def transpose(self) -> LinearOperator:
        """The operator ``Aᵀ``, with the same structure tags.

        Returns:
            ``Aᵀ`` as a LinearOperator whose ``rmatvec`` is this ``matvec``.

        Raises:
            ValueError: the operator is not symmetric and has no ``rmatvec``.
        """
        transposed = self.transpose_matvec
        if transposed is None:
            raise ValueError(
                "LinearOperator.transpose: Aᵀ is unknown; pass rmatvec= (u ↦ Aᵀu) or symmetric=True"
            )
        if transposed is self.matvec:
            return self
        return LinearOperator(transposed, self.matvec, self.symmetric, self.positive_semidefinite)
