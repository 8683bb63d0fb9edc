"""Flat, typed configurations read from Flower's key/value records.

Flower hands a node config and a run config to apps as flat mappings of scalars. Each config
here is a frozen dataclass whose fields name their key (`setting`); `parse` reads one from a
mapping once, converting each value to the field's type and checking its range, and
`to_record` writes it back. A missing, malformed or out-of-range key is a `ConfigError` naming
the key, where it was read and the fix. Floats must be finite (a NaN timeout never expires).
"""

from __future__ import annotations

import json
import math
import types
from collections.abc import Callable, Mapping
from dataclasses import MISSING, field, fields
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")
Scalar = str | int | float | bool


class ConfigError(ValueError):
    """A key missing from, or malformed in, a node config or run config."""


Check = tuple[str, Callable[[Any], bool]]  # (what it must be, the test)
POSITIVE: Check = ("greater than 0", lambda v: v > 0)
NON_NEGATIVE: Check = ("0 or more", lambda v: v >= 0)
# A name that survives Flower's --node-config parser and TOML: printable, no double quote.
NAME: Check = ("a non-empty printable name without '\"'",
               lambda v: bool(str(v)) and str(v).isprintable() and '"' not in str(v))


def setting(key: str, default: Any = MISSING, help: str = "", check: Check | None = None
            ) -> Any:
    """A dataclass field read from `key`; without a default the key is required."""
    return field(default=default, metadata={"key": key, "help": help, "check": check})


def key_of(cls: type, name: str) -> str:
    """The record key of field `name` of config class `cls`."""
    for f in fields(cls):
        if f.name == name:
            return str(f.metadata["key"])
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


def _base_type(hint: Any) -> tuple[type, bool]:
    """(the scalar type, whether None is allowed) of a field's annotation."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _convert(raw: Any, kind: type, key: str, where: str) -> Any:
    if kind is bool:
        if isinstance(raw, bool):
            return raw
    elif kind is Path:
        if isinstance(raw, (str, Path)) and str(raw):
            return Path(raw)
    elif kind is str:
        if isinstance(raw, str):
            return raw
    elif kind in (int, float) and not isinstance(raw, bool):
        try:
            value = kind(raw)
            if kind is int and isinstance(raw, float) and raw != value:
                raise ValueError
            if kind is float and not math.isfinite(value):
                raise ValueError
            return value
        except (TypeError, ValueError, OverflowError):
            pass
    raise ConfigError(f"{where}: '{key}' must be {'a path' if kind is Path else kind.__name__}, "
                      f"got {raw!r}")


def parse(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    """An instance of config class `cls` from a flat mapping; unknown keys are ignored."""
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        key = f.metadata["key"]
        if key not in values:
            if f.default is MISSING:
                raise ConfigError(f"{where}: missing '{key}' ({f.metadata['help']})")
            continue
        kind, optional = _base_type(hints[f.name])
        raw = values[key]
        if optional and raw in ("", None):
            kwargs[f.name] = None
            continue
        value = _convert(raw, kind, key, where)
        check = f.metadata["check"]
        if check is not None and not check[1](value):
            raise ConfigError(f"{where}: '{key}' must be {check[0]}, got {raw!r}")
        kwargs[f.name] = value
    return cls(**kwargs)


def to_record(config: object) -> dict[str, Scalar]:
    """The config as record key -> scalar; None fields are left out."""
    out: dict[str, Scalar] = {}
    for f in fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        if value is not None:
            out[f.metadata["key"]] = str(value) if isinstance(value, Path) else value
    return out



def toml_value(value: Scalar) -> str:
    """A scalar as TOML: how Flower reads `--node-config` values and an app's run config.
    Flower cuts a quoted value at the first '"', so a string holding one is refused."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if '"' in str(value):
        raise ConfigError(f"{value!r} holds a '\"', which Flower's config parser cannot carry")
    return json.dumps(str(value), ensure_ascii=False)


def read_toml(cls: type[T], path: Path, missing_hint: str) -> T:
    """A config class read from a flat TOML file; `missing_hint` says how to make one."""
    import tomllib

    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist; {missing_hint}")
    try:
        values = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from err
    return parse(cls, values, str(path))


def toml_text(config: Any) -> str:
    """A config object as a flat TOML file."""
    return "".join(f"{k} = {toml_value(v)}\n" for k, v in to_record(config).items())
