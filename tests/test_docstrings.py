"""Every public function and method documents its arguments and its result (issue 15 item 5).

The API pages render Google-style docstrings with mkdocstrings, which shows an ``Args:``
section as a parameter table and a ``Returns:`` section as the result; a parameter missing
from ``Args:`` is simply absent from the page. The checker walks the public API (each
public module's ``__all__``, and the public methods of the public classes found there) and
requires, per callable:

* a docstring;
* when it takes parameters (besides ``self``/``cls``): an ``Args:`` section with one
  described entry per parameter (``*args``/``**kwargs`` as ``*args``/``**kwargs`` or
  ``args``/``kwargs``), and no entry naming a parameter the signature lacks;
* when its return annotation is not ``None``: a ``Returns:`` (or ``Yields:``) section with
  text in it.

Properties need only a docstring. A constructor may be documented in the class docstring
(Google style), a dataclass's fields in its ``Attributes:`` section.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# The public modules, most specific first: an object exported by several of them is checked
# once, under the first name found (``bilevel.linear.CG``, not ``bilevel.CG``), which names
# the module whose docstrings to fix.
PUBLIC_MODULES = (
    "bilevel.tree",
    "bilevel.optimality",
    "bilevel.prox",
    "bilevel.projection",
    "bilevel.inner",
    "bilevel.distributed",
    "bilevel.linear",
    "bilevel.implicit",
    "bilevel.implicit.diagnostics",
    "bilevel.errors",
    "bilevel",
)

# Dunder methods that are API (their parameters are the call's); other dunders are protocol.
API_DUNDERS = ("__init__", "__call__")

_RETURNS_HEADERS = ("Returns", "Yields")
_ENTRY = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:(.*)$")


# -- docstring parsing ---------------------------------------------------------------------


def sections(doc: str) -> dict[str, list[str]]:
    """The Google-style sections of a (cleaned) docstring: header -> its dedented body lines.

    A section starts at a line ``Header:`` with nothing after the colon and holds the
    following lines indented deeper than the header (blank lines included); text at the
    header's indentation or less ends it.
    """
    found: dict[str, list[str]] = {}
    lines = doc.splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^(\s*)([A-Z]\w*):\s*$", lines[i])
        if match is None:
            i += 1
            continue
        indent = len(match.group(1))
        body: list[str] = []
        i += 1
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
        ):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        found.setdefault(match.group(2), inspect.cleandoc("\n".join(body)).splitlines())
    return found


def documented_names(body: list[str]) -> dict[str, str]:
    """Entries of an ``Args:``/``Attributes:`` body: name (stars dropped) -> its description."""
    entries: dict[str, str] = {}
    current: str | None = None
    for line in body:
        if line and not line[0].isspace():
            match = _ENTRY.match(line)
            current = None
            if match is not None:
                name = match.group(1).lstrip("*")
                entries[name] = match.group(2).strip()
                current = name
        elif current is not None and line.strip():
            entries[current] = (entries[current] + " " + line.strip()).strip()
    return entries


# -- the rules -----------------------------------------------------------------------------


def _parameters(fn: Callable[..., Any], *, bound: bool) -> list[inspect.Parameter]:
    params = list(inspect.signature(fn).parameters.values())
    if bound and params:
        params = params[1:]  # self / cls
    return params


def _returns_none(annotation: Any) -> bool:
    return annotation is None or annotation is type(None) or annotation == "None"


def check_args(doc: str, params: list[inspect.Parameter], header: str = "Args") -> list[str]:
    """Problems with the ``Args:`` (or ``header``) section of ``doc`` for ``params``."""
    if not params:
        return []
    found = sections(doc)
    if header not in found:
        return [f"no {header}: section (parameters: {', '.join(p.name for p in params)})"]
    entries = documented_names(found[header])
    problems = []
    missing = [p.name for p in params if p.name not in entries]
    if missing:
        problems.append(f"{header}: does not document {', '.join(missing)}")
    empty = [name for name, text in entries.items() if not text]
    if empty:
        problems.append(f"{header}: entries without a description: {', '.join(empty)}")
    stale = sorted(set(entries) - {p.name for p in params})
    if stale:
        problems.append(f"{header}: documents parameters the signature lacks: {', '.join(stale)}")
    return problems


def check_returns(doc: str, annotation: Any) -> list[str]:
    """Problems with the ``Returns:``/``Yields:`` section of ``doc``."""
    if _returns_none(annotation):
        return []
    found = sections(doc)
    if not any(found.get(h) for h in _RETURNS_HEADERS):
        return ["no Returns: section (return annotation is not None)"]
    return []


def check_function(fn: Callable[..., Any], *, bound: bool = False) -> list[str]:
    """Problems with the docstring of a function or (``bound=True``) a method."""
    if not fn.__doc__:  # inspect.getdoc would inherit a base method's; the API page does not
        return ["no docstring"]
    doc = inspect.cleandoc(fn.__doc__)
    params = _parameters(fn, bound=bound)
    return check_args(doc, params) + check_returns(doc, inspect.signature(fn).return_annotation)


def check_constructor(cls: type, init: Callable[..., Any]) -> list[str]:
    """Problems with how ``cls``'s constructor arguments are documented.

    Either ``__init__``'s own docstring or the class docstring may hold the ``Args:``
    section; a dataclass may list its fields under ``Attributes:`` instead.
    """
    params = _parameters(init, bound=True)
    if not params:
        return []
    candidates = [inspect.getdoc(cls) or ""]
    own = init.__doc__
    if own:
        candidates.append(inspect.cleandoc(own))
    headers = ["Args", "Attributes"] if dataclasses.is_dataclass(cls) else ["Args"]
    attempts = [check_args(doc, params, header) for doc in candidates for header in headers]
    return [] if any(not a for a in attempts) else min(attempts, key=len)


def check_class(cls: type) -> list[str]:
    """Problems with the class docstring itself."""
    doc = cls.__doc__  # not inspect.getdoc: that would inherit a base class's docstring
    if dataclasses.is_dataclass(cls) and doc and doc.startswith(f"{cls.__name__}("):
        doc = None  # the signature that @dataclass writes in place of a missing docstring
    return [] if doc else ["no class docstring"]


# -- the walk over the public API ----------------------------------------------------------


def _ours(obj: Any) -> bool:
    return getattr(obj, "__module__", "").split(".")[0] == "bilevel"


def _exports(module: Any) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items() if not n.startswith("_") and _ours(v)]
    return list(names)


def _members(cls: type) -> Iterator[tuple[str, Any, type]]:
    """``(name, raw attribute, owner)`` for the API members of ``cls`` (inherited ones too)."""
    seen: set[str] = set()
    for owner in cls.__mro__:
        if not owner.__module__.startswith("bilevel"):
            continue
        for name, raw in vars(owner).items():
            if name in seen or (name.startswith("_") and name not in API_DUNDERS):
                continue
            seen.add(name)
            yield name, raw, owner


def public_api() -> dict[str, Callable[[], list[str]]]:
    """Qualified name -> a thunk returning that callable's docstring problems."""
    checks: dict[str, Callable[[], list[str]]] = {}
    seen: set[int] = set()
    classes: list[tuple[str, type]] = []

    def once(obj: Any) -> bool:
        if id(obj) in seen:
            return False
        seen.add(id(obj))
        return True

    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in _exports(module):
            obj = getattr(module, name)
            if not _ours(obj) or inspect.ismodule(obj) or not once(obj):
                continue
            qualname = f"{module_name}.{name}"
            if inspect.isclass(obj):
                classes.append((qualname, obj))
            elif inspect.isfunction(obj):
                checks[qualname] = lambda obj=obj: check_function(obj)

    # A method inherited from a public class is checked once, under that class's name.
    public_classes = {id(cls): name for name, cls in classes}
    for class_name, cls in classes:
        checks[class_name] = lambda cls=cls: check_class(cls)
        for name, raw, owner in _members(cls):
            prefix = public_classes.get(id(owner), class_name)
            qualname = f"{prefix}.{name}"
            if isinstance(raw, property):
                target = raw.fget
                if once(target):
                    checks[qualname] = lambda t=target: [] if t.__doc__ else ["no docstring"]
                continue
            bound = not isinstance(raw, staticmethod)
            target = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
            if not inspect.isfunction(target):
                continue  # class attributes, ClassVars
            if name == "__init__":
                # the constructor belongs to every class that inherits it: check each
                checks[f"{class_name}.__init__"] = lambda c=cls, t=target: check_constructor(c, t)
                continue
            if name == "__call__" and not _parameters(target, bound=True):
                continue
            if once(target):
                checks[qualname] = lambda t=target, b=bound: check_function(t, bound=b)
    return checks


API = public_api()


@pytest.mark.parametrize("qualname", sorted(API))
def test_public_callable_documents_args_and_returns(qualname: str) -> None:
    problems = API[qualname]()
    assert not problems, f"{qualname}: " + "; ".join(problems)


def test_the_walk_covers_the_public_api() -> None:
    # A walk that silently found nothing would pass every check above.
    for name in (
        "bilevel.implicit.custom_root",
        "bilevel.tree.tree_map",
        "bilevel.linear.CG",
        "bilevel.linear.CG.__init__",
        "bilevel.linear.LinearSolver.__call__",
        "bilevel.linear.SolveInfo.failed",
        "bilevel.implicit.ImplicitFunction.__call__",
        "bilevel.errors.ConvergenceError.__init__",
    ):
        assert name in API, f"{name} is not checked"
    assert len(API) > 60


# -- the checker can fail --------------------------------------------------------------------


def _undocumented(x, y=1):
    return x + y


def _half_documented(x: int, *rest: int, scale: float = 1.0) -> int:
    """Add things.

    Args:
        x: the first term.
        *rest:
        gone: a parameter that no longer exists.
    """
    return x


def _documented(x: int, *rest: int, **options: Any) -> int:
    """Add things.

    Args:
        x: the first term.
        *rest: further terms,
            each an int.
        **options: ignored.

    Returns:
        The sum.
    """
    return x


def _nothing() -> None:
    """Do nothing; takes nothing, returns nothing."""


class _Point:
    """A point."""

    def __init__(self, x: float) -> None:
        self.x = x

    def shift(self, by: float) -> _Point:
        """Move the point.

        Args:
            by: the offset.
        """
        return _Point(self.x + by)


@dataclasses.dataclass
class _Record:
    """A record.

    Attributes:
        value: the stored value.
    """

    value: int


@dataclasses.dataclass
class _Bare:
    value: int


def test_checker_reports_an_undocumented_function() -> None:
    assert check_function(_undocumented) == ["no docstring"]
    assert check_class(_Bare) == ["no class docstring"]


def test_checker_reports_missing_empty_and_stale_entries_and_a_missing_returns() -> None:
    problems = check_function(_half_documented)
    assert problems == [
        "Args: does not document scale",
        "Args: entries without a description: rest",
        "Args: documents parameters the signature lacks: gone",
        "no Returns: section (return annotation is not None)",
    ]


def test_checker_accepts_a_complete_docstring() -> None:
    assert check_function(_documented) == []
    assert check_function(_nothing) == []
    assert check_constructor(_Record, _Record.__init__) == []


def test_checker_reads_the_class_docstring_for_the_constructor() -> None:
    assert check_constructor(_Point, _Point.__init__) == ["no Args: section (parameters: x)"]
    assert check_function(_Point.shift, bound=True) == [
        "no Returns: section (return annotation is not None)"
    ]
