"""Plain data -> checked frozen dataclasses: the type coercion and range checks every config uses.

A bad value fails where it enters (a preset, a ``--set``, a ``config.json``) with a message naming
the key, not deep inside a layer.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing

__all__ = ["config_from_dict", "check_numbers", "check_seed", "check_choice", "is_count", "SEED_RANGE"]

# Seeds go into torch.Generator.manual_seed, also multiplied by step counts (train.step_generator):
# 32 bits keep every derived seed inside 64.
SEED_RANGE = (0, 2**32 - 1)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str):
    """``value`` as the annotated type ``tp``, or a ValueError naming ``key``. Numbers written as
    strings (YAML reads ``1e-4`` as a string) and integral floats (JSON's ``1e7``) are converted;
    ``true`` is not a number."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ValueError as e:
                # a list is reported against the list form (int | tuple[int, ...]: the bad entry)
                if isinstance(value, (list, tuple)) and typing.get_origin(option) is tuple:
                    errors.insert(0, str(e))
                else:
                    errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{key} must not be null")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]: any length
            args = (args[0],) * len(value)
        if len(args) != len(value):
            raise ValueError(f"{key} must have {len(args)} entries, got {list(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if tp in (int, float):
        v = value
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                raise ValueError(f"{key} must be a number, got {value!r}") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{key} must be a{'n integer' if tp is int else ' number'}, got {value!r}")
        if tp is int:
            if not (math.isfinite(v) and float(v).is_integer()):
                raise ValueError(f"{key} must be an integer, got {value!r}")
            return int(v)
        return float(v)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key} must be a string, got {value!r}")
    if tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ValueError(f"{key} must be a mapping of settings, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a group of settings, got {value!r}")
        return tp.from_dict(value)
    return value


def config_from_dict(cls, d: dict, what: str):
    """Build the frozen dataclass ``cls`` from plain data (a preset, a JSON file), refusing unknown
    keys and values of the wrong type with a message that names them."""
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be a mapping of settings, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {what} keys: {sorted(unknown)}; known: {sorted(names)}")
    out = {k: _coerce(v, hints[k], k) for k, v in d.items()}
    return cls(**out)


def check_seed(seed, name: str = "seed") -> int:
    """A seed as an int in :data:`SEED_RANGE`, or a ValueError naming it."""
    low, high = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high:,} (2**32 - 1), got {seed!r}")
    return seed


def _numeric_options(tp) -> tuple[type, ...]:
    """The number types a field annotation admits (``int``, ``float``), with NoneType if optional."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return tuple(t for t in options if t in (int, float, type(None)))


def check_numbers(obj, bounds: dict[str, tuple]) -> None:
    """Every number field of the dataclass ``obj`` has its declared type (an ``int`` field takes no
    1.5 and no ``True``) and is finite; those in ``bounds`` (name -> ``(low, high, interval)``,
    ``interval`` one of ``"[]"``, ``"[)"``, ``"(]"``, ``"()"``, None for no bound) lie within.
    Called where a config is made, so a value that would train backwards or silently do nothing
    (``grad_clip=-1``, ``ema_decay=1``) never reaches the loop."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        options = _numeric_options(hints[f.name])
        value = getattr(obj, f.name)
        if not options or options == (type(None),) or (value is None and type(None) in options):
            continue
        if isinstance(value, (list, tuple)) and typing.get_origin(hints[f.name]) in (typing.Union, types.UnionType):
            continue  # an int | tuple field (steps per level): checked by its own rule
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (float not in options and not isinstance(value, int)):
            kind = "an integer" if float not in options else "a number"
            raise ValueError(f"{f.name} must be {kind}, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        if f.name in bounds:
            low, high, interval = bounds[f.name]
            above = low is None or (value >= low if interval[0] == "[" else value > low)
            below = high is None or (value <= high if interval[1] == "]" else value < high)
            if not (above and below):
                where = f"{interval[0]}{'-inf' if low is None else low}, {'inf' if high is None else high}{interval[1]}"
                raise ValueError(f"{f.name} must be in {where}, got {value!r}")


def is_count(value) -> bool:
    """An integer >= 1 (``True`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_choice(name: str, value, options) -> None:
    """A ValueError naming ``name`` unless ``value`` is one of ``options``."""
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
