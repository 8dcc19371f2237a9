"""Experiment configs to and from JSON: `config_to_dict` and its exact inverse `config_from_dict`.

A run writes its config as ``config.json`` and into every checkpoint; sampling writes it beside the
samples. Rebuilding follows the dataclasses' field types, so nothing but the config classes
themselves describes the format.
"""

import dataclasses
import types
import typing
from typing import Any, Literal, Union

from .config import ConfigError, ExperimentConfig


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ConfigError(f"config value {value!r} of type {type(value).__name__} is not JSON-able")


def config_to_dict(cfg: ExperimentConfig) -> dict:
    """The config as a JSON-able dict of plain values (tuples become lists).

    **Arguments:**

    - `cfg`: the experiment config.

    **Returns:** a nested dict mirroring the dataclasses; `config_from_dict` inverts it exactly.
    """
    return _to_json(cfg)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _from_json(tp: Any, value: Any, where: str) -> Any:
    """Rebuild ``value`` (parsed JSON) as the annotated type ``tp``; ``where`` names the field."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{where}={value!r} is not allowed: expected a mapping for {tp.__name__}"
            )
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp) if f.init]
        for key in value:
            if key not in names:
                name = f"{where}.{key}" if where else key
                raise ConfigError(
                    f"unknown config key {name!r}: expected one of {', '.join(names)}"
                )
        kwargs = {
            key: _from_json(hints[key], value[key], f"{where}.{key}" if where else key)
            for key in names
            if key in value  # missing keys take the dataclass default (older checkpoints)
        }
        return tp(**kwargs)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _from_json(arm, value, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}={value!r} is not allowed: expected {_type_name(tp)}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"{where}={value!r} is not allowed: expected a list for {_type_name(tp)}"
            )
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if args and len(args) != len(value):
            raise ConfigError(f"{where}={value!r} is not allowed: expected {len(args)} items")
        if not args:
            return tuple(value)
        return tuple(_from_json(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is Literal:
        return value  # the dataclass's __post_init__ names the allowed values
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # JSON written by hand may say 1 for 1.0
        ok = isinstance(value, float)
    elif tp is str:
        ok = isinstance(value, str)
    else:
        return value
    if not ok:
        raise ConfigError(f"{where}={value!r} is not allowed: expected {tp.__name__}")
    return value


def config_from_dict(d: dict) -> ExperimentConfig:
    """Rebuild an `ExperimentConfig` from `config_to_dict`'s output (or a JSON file of it).

    Nested dataclasses and tuples are rebuilt from the dataclass field types; keys missing from
    `d` take their defaults, so checkpoints written before a field existed still load.

    **Raises:** `ConfigError` (one line) for an unknown key, a value of the wrong type, or a value
    the config does not allow.
    """
    return _from_json(ExperimentConfig, d, "")


__all__ = ["config_from_dict", "config_to_dict"]
