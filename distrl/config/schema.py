"""Typed config sections built from plain data (YAML mappings), and back.

``build`` turns a mapping into a frozen dataclass, checking every key, type and range (the
``ge``/``gt``/``le``/``lt`` metadata of a field); ``to_dict`` turns one back into YAML-ready data.
Every error names the dotted field path at fault, or the file; an unknown key comes with the
closest valid spelling. ``read_with_base`` reads a YAML file, or a packaged one by name, with a
``base`` it builds on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from distrl.errors import ConfigError


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(
            "empty" if a is type(None) else _type_name(a) for a in typing.get_args(tp)
        )
    return getattr(tp, "__name__", str(tp))


def _check_range(path: str, value: float, meta: dict[str, Any]) -> None:
    bounds = {
        "ge": (">=", lambda a, b: a >= b),
        "gt": (">", lambda a, b: a > b),
        "le": ("<=", lambda a, b: a <= b),
        "lt": ("<", lambda a, b: a < b),
    }
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: {value!r} is not a finite number")
    for key, (_, ok) in bounds.items():
        if key in meta and not ok(value, meta[key]):
            allowed = " and ".join(f"{bounds[k][0]} {meta[k]}" for k in bounds if k in meta)
            raise ConfigError(f"{path}: {value!r} is out of range (allowed: {allowed})")


def _convert(path: str, value: Any, tp: Any, meta: dict[str, Any]) -> Any:
    """Check ``value`` against type ``tp`` (and the field's range) and return it converted."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(path, value, inner, meta)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {_type_name(tp)}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_convert(f"{path}[{i}]", v, args[0], {}) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        if args and args[1] is not Any:
            return {str(k): _convert(f"{path}.{k}", v, args[1], {}) for k, v in value.items()}
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '3e-5' as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        value = float(value)
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
    elif tp is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: expected a non-empty string, got {value!r}")
        return value
    _check_range(path, value, meta)
    return value


def unknown_key(path: str, key: str, valid: list[str]) -> ConfigError:
    """The error for ``key`` under dotted ``path``, with the closest of ``valid`` if one is near."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" (did you mean '{join_path(path, close[0])}'?)" if close else ""
    return ConfigError(
        f"unknown config key '{join_path(path, key)}'{hint}; valid keys here: {', '.join(valid)}"
    )


def join_path(path: str, key: str) -> str:
    """Dotted ``path.key``, or ``key`` at the top level."""
    return f"{path}.{key}" if path else key


def build(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key, type and range.

    Raises:
        ConfigError: naming the dotted field at fault.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise unknown_key(path, str(key), list(fields))
        kwargs[key] = _convert(join_path(path, key), value, hints[key], dict(fields[key].metadata))
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def to_dict(config: Any) -> dict[str, Any]:
    """Return a config as plain YAML-ready data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def read_yaml(source: str, packaged: Sequence[str] = ()) -> dict[str, Any]:
    """Read a YAML file into a mapping; a ``source`` among ``packaged`` is the packaged config
    ``distrl/config/presets/<source>.yaml``."""
    if source in packaged:
        text = resources.files("distrl.config.presets").joinpath(f"{source}.yaml").read_text()
        name = f"packaged config '{source}'"
    else:
        file = Path(source)
        if not file.is_file():
            raise ConfigError(
                f"config {source!r} is neither a packaged config "
                f"({', '.join(packaged)}) nor an existing YAML file"
            )
        text, name = file.read_text(encoding="utf-8"), str(file)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{name}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{name}: expected a mapping of config sections, got {type(data).__name__}"
        )
    return data


def read_with_base(
    source: str, packaged: Sequence[str] = (), seen: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``read_yaml``, with a top-level ``base: <packaged name or file>`` read first and this
    file's fields applied over it (mappings merge, any other value replaces); a relative base
    path is relative to the file naming it."""
    if source in seen:
        raise ConfigError(f"config {source}: 'base' goes round in a circle ({' -> '.join(seen)})")
    data = read_yaml(source, packaged)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config {source}: base must be a packaged config name or a file")
    if base not in packaged and source not in packaged:
        near = Path(source).parent / base
        base = str(near) if near.is_file() else base
    return _merged(read_with_base(base, packaged, (*seen, source)), data)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out
