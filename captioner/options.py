"""Options given as Python values, checked against their config dataclass's annotations.

Why: on the command line argparse converts and checks every value, but ``Captioner.caption(image, **options)``
and the other Python entry points hand values straight to a config dataclass, where a wrong type either fails
later as a bare ``TypeError`` deep inside decoding (``beam_size="5"``, ``specificity_levels=None``) or silently
means something else (``guide="no"`` is true). A misspelt option name gets the list of the real ones.
"""

from __future__ import annotations

import functools
import numbers
import types
import typing
from dataclasses import fields
from typing import Any

from .errors import ConfigError


def _accepts(kind: Any, value: Any) -> bool:
    """Whether ``value`` fits the annotation ``kind`` (numpy numbers count as numbers; a bool is not a number)."""
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if kind is type(None):
        return value is None
    origin = typing.get_origin(kind)
    if origin in (types.UnionType, typing.Union):
        return any(_accepts(k, value) for k in typing.get_args(kind))
    if origin is tuple:  # tuple[float, ...]: a list (as JSON gives it) or a tuple of such values
        item = typing.get_args(kind)[0]
        return isinstance(value, (list, tuple)) and all(_accepts(item, v) for v in value)
    return True  # other annotations (nested configs) are checked by their own class


def _name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A dataclass's resolved annotations, once per class: resolving them took ~0.4 ms, paid on every
    ``DecodeConfig`` a request builds."""
    return typing.get_type_hints(cls)


def check_types(config: Any) -> None:
    """Raise ``ConfigError`` naming the first field of the dataclass instance ``config`` whose value does not
    fit its annotation."""
    hints = _hints(type(config))
    for f in fields(config):
        value = getattr(config, f.name)
        if not _accepts(hints[f.name], value):
            raise ConfigError(f"option {f.name} must be {_name(hints[f.name])}, got {value!r}")


def check_names(cls: type, options: dict[str, Any]) -> None:
    """Raise ``ConfigError`` when ``options`` names something the dataclass ``cls`` has no field for."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                          f"the options are: {', '.join(known)}")
