"""Numeric options checked when they are parsed: type, finiteness and range, with the range
in the one-line message (``--beta1 1.5: must be in [0, 1)``).

:class:`Range` describes the allowed values; the train options carry one in their dataclass
field's metadata (``hpcllm.config.opt(..., range=Range(0, 1, hi_open=True))``), so every new
option gets the check and its ``--help`` text for free; the other commands use
:func:`number` as their Click type.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import click

from hpcllm.errors import HpcllmError


@dataclass(frozen=True)
class Range:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def text(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{_fmt(self.lo)}, {_fmt(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_fmt(self.lo)}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {_fmt(self.hi)}"
        return "a finite number"

    def contains(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


#: common ranges
POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_1 = Range(1)
FRACTION = Range(0, 1)
FINITE = Range()


def check(flag: str, value, rng: Range | None) -> None:
    """Raise the one-line error for a value outside ``rng`` (floats must also be finite)."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise HpcllmError(f"{flag} {value}: must be a finite number{'' if rng is None else ' ' + rng.text()}")
    if rng is not None and not rng.contains(value):
        raise HpcllmError(f"{flag} {_fmt(value) if isinstance(value, float) else value}: must be {rng.text()}")


class Number(click.ParamType):
    """An int or float option in a :class:`Range` (floats finite), checked by Click."""

    def __init__(self, kind: type, rng: Range | None = None):
        self.kind, self.rng = kind, rng
        self.name = kind.__name__

    def convert(self, value, param, ctx):
        flag = param.opts[0] if param is not None and param.opts else "value"
        if isinstance(value, self.kind) and not isinstance(value, bool):
            v = value
        else:
            try:
                v = self.kind(value)
            except (TypeError, ValueError):
                raise HpcllmError(f"{flag} {value}: not {'an integer' if self.kind is int else 'a number'}") from None
        check(flag, v, self.rng)  # HpcllmError: the CLI prints it as one line
        return v

    def get_metavar(self, param, ctx=None):  # noqa: D401  (click API)
        return self.name.upper()


def number(kind: type, rng: Range | None = FINITE) -> Number:
    return Number(kind, rng)
