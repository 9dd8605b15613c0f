"""Settings declared once: each stage's typed config dataclass is the single place a setting's name, type,
default, allowed values (`choice`) and help text (the docstring under the field, `field_docs`) live. The
command line derives its flags from these fields (see `igpt.cli`), and a stage's keyword form builds the
same config (`build_config`), so a bad value gets the same one-line error from either."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

import numpy as np

from .errors import IgptError


def choice(default: Any, choices: Iterable[str]) -> Any:
    """A dataclass field whose value must be one of `choices` (the command line offers them in its help; the
    config's own check refuses the others). A mapping (a registry such as `OBJECTIVES`) stays live, so a
    later registration is a valid choice too."""
    live = choices if isinstance(choices, Mapping) else tuple(choices)
    return dataclasses.field(default=default, metadata={"choices": live})


def check_choices(config: Any) -> None:
    """Refuse, in one line, the first field of a config dataclass whose value is not among its `choice`s
    (None stays allowed where the default is None): the one check every stage's `__post_init__` runs, so the
    allowed values and the error's wording live in one place."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices is None or value in choices or (value is None and f.default is None):
            continue
        raise IgptError(f"unknown {flag_name(f.name)} '{value}'; choose one of {', '.join(choices)}")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (and of its bases), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def flag_name(field: str) -> str:
    """The flag of a field: `batch_size` -> `--batch-size`."""
    return "--" + field.replace("_", "-")


def first_sentence(doc: str) -> str:
    """The help line of a field: its docstring up to the first full stop that ends a sentence."""
    for i, ch in enumerate(doc):
        if (
            ch == "."
            and (i + 1 == len(doc) or doc[i + 1] == " ")
            and not doc[max(0, i - 3) : i].endswith("e.g")
        ):
            return doc[:i]
    return doc


def build_config(cls: type, stage: str, **settings: Any) -> Any:
    """`cls(**settings)` for a stage's keyword form, refusing names that are not fields of `cls` and values
    of the wrong type in one line, as the command line would (`resolution="8"` or `steps=2.5` are refused;
    an integer where a float is declared, a path where a string is, are taken)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"{stage}() got unknown settings {unknown}; it takes {sorted(known)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: checked_value(flag_name(k), v, hints[k]) for k, v in settings.items()})


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def checked_value(flag: str, value: Any, hint: Any) -> Any:
    """`value` as a setting declared `hint` takes it: None where the hint allows it, a bool for bool, an
    integer (not a bool, not 2.5) for int, any real number for float, text (or a path, or an integer) for
    str; IgptError naming the flag otherwise. Other hints (lists, mappings) pass unchecked."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return checked_value(flag, value, inner[0])
        return value
    if hint is bool and isinstance(value, bool | np.bool_):
        return bool(value)
    if hint is int and isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_):
        return int(value)
    if (
        hint is float
        and isinstance(value, int | float | np.integer | np.floating)
        and not isinstance(value, bool)
    ):
        return float(value)
    if hint is str and isinstance(value, str | os.PathLike | int) and not isinstance(value, bool):
        return os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if hint not in _KINDS:
        return value
    raise IgptError(f"{flag} must be {_KINDS[hint]}, got {value!r} ({type(value).__name__})")
