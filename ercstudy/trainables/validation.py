"""Typed, keyword-only config dataclasses built from plain dicts (YAML, Ray), with errors that name the field.

Every component owns its config dataclass and checks its own fields in __post_init__
with `require`. `from_dict` turns a nested dict into such a dataclass tree: unknown keys,
wrong types and failed checks all raise ConfigError whose message starts with the dotted
path of the offending field (`moe.top_k: must be <= moe.num_experts (8), got 10`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is not allowed. `path` is the dotted field name, e.g. `moe.top_k`."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.reason = message
        super().__init__(f"{path}: {message}" if path else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error, re-rooted below `prefix` (a section name)."""
        if not prefix:
            return self
        return ConfigError(f"{prefix}.{self.path}" if self.path else prefix, self.reason)


def require(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise ConfigError(path, message)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int -> float, list -> tuple)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=path)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(path, f"must be one of {', '.join(repr(a) for a in get_args(tp))}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        for arm in get_args(tp):
            try:
                return _coerce(value, arm, path)
            except ConfigError:
                continue
        raise ConfigError(path, f"must be {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"must be a list, got {value!r}")
        (item,) = get_args(tp)[:1]
        return tuple(_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is type(None):
        if value is not None:
            raise ConfigError(path, f"must be null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():  # `1e5`, `2.0`: as researchers write token budgets
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(path, f"must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"must be a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"{path}: unsupported config annotation {tp!r}")


def from_dict(cls: type[T], data: Any, *, prefix: str = "") -> T:
    """Build the dataclass `cls` from a (nested) dict, checking keys, types and values."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"must be a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(where, f"unknown key{hint}; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(prefix) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The plain-dict form of a config tree (tuples become lists), the inverse of from_dict."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)
