r"""Implicit differentiation of a root ``F(x*, θ) = 0`` in reverse and forward mode.

One rule (``._rules``) serves eager autograd, ``torch.func`` transforms and
``torch.compile``; ``._function`` binds it to an inner solver, ``.diagnostics`` says
when a gradient cannot be trusted, and ``._api`` holds the decorators.
"""

from ._api import custom_fixed_point, custom_root, implicit_grad
from ._function import ImplicitFunction
from ._rules import root_jvp, root_vjp

__all__ = [
    "ImplicitFunction",
    "custom_fixed_point",
    "custom_root",
    "implicit_grad",
    "root_jvp",
    "root_vjp",
]
