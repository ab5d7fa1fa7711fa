"""Typed options: the one place where each setting's type, default, bounds, choices and help live.

A settings class is a frozen dataclass whose fields are made with `option()`:

    @dataclass(frozen=True)
    class Settings:
        lr: float = option(0.01, "Base learning rate.", low=0, low_open=True)

From the fields come the validation of every value, once, when the dataclass is constructed
(its `__post_init__` calls `validate`; `updated` names the YAML file or flag a bad value came
from), and the command-line flags with their `--help` text (`click_options`).
Field types are the annotations: bool, int, float (finite), str, `X | None` for an
optional value, and `tuple[int, ...]`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from pathlib import Path

import click

from segkit.errors import InputError


def option(default, help: str, *, choices: tuple | None = None, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, pattern: str | None = None, flag: str | None = None,
           directory: bool = False, cli: bool = True):
    """A dataclass field with its validation rules and help text.

    low/high bound numbers (inclusive unless low_open/high_open); `pattern` must match a
    whole string; `directory` marks a directory path, stored resolved (a flag checks that it exists, a
    YAML value is checked by what reads it);
    `flag` overrides the flag declaration (e.g. "--normalize/--no-norm"); `cli=False`
    keeps the option out of the command line (YAML only).
    """
    return dataclasses.field(default=default, metadata=dict(
        help=help, choices=choices, low=low, high=high, low_open=low_open, high_open=high_open, pattern=pattern,
        flag=flag, directory=directory, cli=cli))


@functools.lru_cache(maxsize=None)
def fields(cls) -> dict[str, tuple[dataclasses.Field, type, bool]]:
    """name -> (field, base type, optional) for a settings dataclass."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        kind, optional = hints[f.name], False
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            kind, optional = args[0], True
        out[f.name] = (f, kind, optional)
    return out


def _typed(name: str, kind, value) -> tuple[object, str | None]:
    """(`value` in canonical form for `kind`, None), or (None, an error message)."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            return None, f"option {name!r} must be a finite number, got {value!r}"
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    elif typing.get_origin(kind) is tuple:
        ok = (isinstance(value, (list, tuple)) and len(value) > 0
              and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
        if not ok:
            return None, f"option {name!r} expects a non-empty list of int, got {value!r}"
        value = tuple(value)
    else:
        raise TypeError(f"option {name!r}: unsupported type {kind!r}")
    return (value, None) if ok else (None, f"option {name!r} expects {kind.__name__}, got {value!r}")


def _bounds(name: str, meta, value) -> str | None:
    """An error message when `value` breaks the field's choices, pattern or bounds."""
    if meta["choices"] is not None and value not in meta["choices"]:
        return f"option {name!r} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}"
    if meta["pattern"] is not None and not re.fullmatch(meta["pattern"], value):
        return f"option {name!r} must match {meta['pattern']}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float, tuple)):
        return None
    low, high = meta["low"], meta["high"]
    for v in value if isinstance(value, tuple) else (value,):
        if low is not None and (v < low or (meta["low_open"] and v == low)):
            if low == 0 and meta["low_open"]:
                return f"option {name!r} must be positive, got {value!r}"
            return f"option {name!r} must be {'above' if meta['low_open'] else 'at least'} {low}, got {value!r}"
        if high is not None and (v > high or (meta["high_open"] and v == high)):
            return f"option {name!r} must be {'below' if meta['high_open'] else 'at most'} {high}, got {value!r}"
    return None


def check(cls, name: str, value) -> object:
    """One value of option `name` of `cls`, validated and canonical; an InputError (naming no file) if bad."""
    field, kind, optional = fields(cls)[name]
    meta = field.metadata
    if value is None:
        if optional:
            return None
        raise InputError(None, f"option {name!r} cannot be empty")
    if meta["directory"]:
        if not isinstance(value, (str, Path)):
            raise InputError(None, f"option {name!r} expects a directory path, got {value!r}")
        return str(Path(value).expanduser().resolve())
    value, problem = _typed(name, kind, value)
    problem = problem or _bounds(name, meta, value)
    if problem:
        raise InputError(None, problem)
    return value


def validate(settings) -> None:
    """Check every field of a frozen settings dataclass and store its canonical value: its __post_init__."""
    for name in fields(type(settings)):
        object.__setattr__(settings, name, check(type(settings), name, getattr(settings, name)))


def updated(settings, values: dict, source):
    """A copy of the `settings` dataclass with `values` (name -> value) applied; a bad one is an InputError
    naming `source` (the YAML file, or the command line)."""
    try:
        return dataclasses.replace(settings, **values)
    except InputError as e:
        raise InputError(source, e.message) from None


def plain(settings) -> dict:
    """The settings as a dict of plain YAML types (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}


def _click_type(kind, meta):
    if meta["directory"]:
        return click.Path(exists=True, file_okay=False, path_type=Path)
    if meta["choices"] is not None and kind is str:
        return click.Choice(meta["choices"])
    return {int: click.INT, float: click.FLOAT, str: click.STRING}[kind]


def click_options(*classes):
    """A decorator adding one flag per command-line option of the settings `classes`.

    Every flag defaults to None (not given), so that it overrides the YAML only when used;
    the help text shows the dataclass default.
    """
    decorators = []
    for cls in classes:
        defaults = cls()
        for name, (field, kind, _) in fields(cls).items():
            meta = field.metadata
            if not meta["cli"]:
                continue
            default = getattr(defaults, name)
            shown = "" if default is None else f" [default: {_show(default)}]"
            flag = "--" + name.replace("_", "-")
            if kind is bool:
                decl = meta["flag"] or f"{flag}/--no-{name.replace('_', '-')}"
                decorators.append(click.option(decl, name, default=None, help=meta["help"] + shown))
            else:
                decorators.append(click.option(meta["flag"] or flag, name, type=_click_type(kind, meta), default=None,
                                               help=meta["help"] + shown))

    def decorate(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return decorate


def _show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
