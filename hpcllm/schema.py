"""Checking the structure of an on-disk JSON document, with one line naming the file and the field.

Each on-disk format reads its JSON through :func:`validate` with a small schema, so a file
that is valid JSON but not a valid manifest, ``trainer.json``, ``config.json`` or preprocess
state (a key missing, ``null`` where an object belongs, a string for a count) is one error
line such as ``data/x/manifest.json: field 'splits.val' must be an object, not null``
instead of a ``KeyError`` deep in the code that uses it.

A schema is a Python value:

- a type (``str``, ``bool``, ``dict``, ``list``) or one of :data:`INT`, :data:`COUNT`,
  :data:`POSITIVE`, :data:`NUMBER`: the value's kind (``INT`` refuses ``True``);
- ``{"key": schema, ...}``: an object with these keys (others are allowed); wrap a schema in
  :class:`Opt` for a key that may be missing;
- ``[schema]``: a list whose items all match;
- :class:`Nullable` (``null`` allowed), :class:`OneOf` (one of some values), :class:`MapOf`
  (an object whose values all match).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from hpcllm.errors import HpcllmError, excerpt


@dataclass(frozen=True)
class Kind:
    what: str
    test: Callable[[Any], bool]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


INT = Kind("an integer", _is_int)
COUNT = Kind("an integer >= 0", lambda v: _is_int(v) and v >= 0)
POSITIVE = Kind("an integer >= 1", lambda v: _is_int(v) and v >= 1)
NUMBER = Kind("a finite number", _is_number)
WEIGHT = Kind("a finite number >= 0", lambda v: _is_number(v) and v >= 0)


@dataclass(frozen=True)
class Opt:
    schema: Any


@dataclass(frozen=True)
class Nullable:
    schema: Any


@dataclass(frozen=True)
class OneOf:
    values: tuple


@dataclass(frozen=True)
class MapOf:
    schema: Any


_NAMES = {str: "a string", bool: "true or false", dict: "an object", list: "a list"}


def _show(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "a list"
    return excerpt(repr(v), 40)


def validate(obj, schema, where: str, field: str = "") -> None:
    """Raise ``HpcllmError("WHERE: field 'a.b' must be ..., not ...")`` at the first mismatch."""
    def fail(expected: str):
        name = f"field '{field}'" if field else "the document"
        raise HpcllmError(f"{where}: {name} must be {expected}, not {_show(obj)}")

    if isinstance(schema, Nullable):
        if obj is None:
            return
        return validate(obj, schema.schema, where, field)
    if isinstance(schema, Kind):
        if not schema.test(obj):
            fail(schema.what)
        return
    if isinstance(schema, OneOf):
        if obj not in schema.values:
            fail("one of " + ", ".join(map(repr, schema.values)))
        return
    if isinstance(schema, type):
        ok = isinstance(obj, schema) and not (schema is int and isinstance(obj, bool))
        if not ok:
            fail(_NAMES.get(schema, schema.__name__))
        return
    if isinstance(schema, MapOf):
        if not isinstance(obj, dict):
            fail("an object")
        for k, v in obj.items():
            validate(v, schema.schema, where, f"{field}.{k}" if field else str(k))
        return
    if isinstance(schema, list):
        if not isinstance(obj, list):
            fail("a list")
        for i, v in enumerate(obj):
            validate(v, schema[0], where, f"{field}[{i}]")
        return
    if isinstance(schema, dict):
        if not isinstance(obj, dict):
            fail("an object")
        for key, sub in schema.items():
            path = f"{field}.{key}" if field else key
            if key not in obj:
                if isinstance(sub, Opt):
                    continue
                raise HpcllmError(f"{where}: field '{path}' is missing")
            validate(obj[key], sub.schema if isinstance(sub, Opt) else sub, where, path)
        return
    raise TypeError(f"bad schema {schema!r}")
