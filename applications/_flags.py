"""Numeric command-line values: parsing and allowed ranges, shared by the applications' CLIs.

A range lives in one table per application (``CONFIG_RANGES`` in the iMAML trainer, ``RANGES``
in the hyperopt CLI), so the check at the door, the check of a saved configuration and the help
text cannot drift apart. Every message names the flag, the allowed range and the value given.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Range", "number", "range_errors"]


@dataclass(frozen=True)
class Range:
    """An interval of allowed values; ``None`` bounds are open-ended.

    Attributes:
        low: smallest allowed value (``None``: no lower bound).
        high: largest allowed value (``None``: no upper bound).
        low_open: exclude ``low`` itself (``> low`` instead of ``>= low``), for quantities such as
            learning rates and norms where zero is as wrong as a negative value.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def text(self) -> str:
        """The range in words: ``>= 1``, ``> 0`` or ``in [0, 4294967295]``."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}]"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"<= {_num(self.high)}"
        return "a finite number"

    def problem(self, value: float | None) -> str | None:
        """Why ``value`` is out of range (``must be > 0, got -1.0``), or ``None`` if it is fine.

        ``None`` is always fine: it means "off" / "default" for the optional settings.
        """
        if value is None:
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number {self.text()}, got {value}"
        too_low = self.low is not None and (
            value <= self.low if self.low_open else value < self.low
        )
        too_high = self.high is not None and value > self.high
        return f"must be {self.text()}, got {value}" if too_low or too_high else None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def range_errors(
    values: Mapping[str, Any], ranges: Mapping[str, Range], names: Iterable[str] | None = None
) -> list[str]:
    """``"NAME must be ..., got ..."`` for every value of ``values`` outside its range.

    Args:
        values: name -> value (``None`` values are skipped).
        ranges: name -> allowed range; names without a range are not checked.
        names: the names to check (default: every name of ``values``).
    """
    out = []
    for name in values if names is None else names:
        if name in ranges and name in values:
            why = ranges[name].problem(values[name])
            if why is not None:
                out.append(f"{name} {why}")
    return out


def number(kind: type) -> Callable[[str], Any]:
    """An argparse ``type=`` for ``int`` or ``float`` that also refuses ``nan`` and ``inf``.

    The range is checked after parsing (against the table), so that one message format serves
    flags, presets and saved configurations alike.
    """

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    parse.kind = kind  # type: ignore[attr-defined]  # lets tests find every numeric flag
    return parse
