"""Configuration as data: a dataclass is the one table of a program's settings, and its command
line is derived from it (one default and one help text per setting, defaults shown in ``--help``).

A field is declared with :func:`setting`::

    @dataclass
    class RunConfig:
        out: str = setting(help="run folder")                       # no default: a required flag
        epochs: int = setting(10, help="passes over the training set", group="optimisation")
        augment: bool = setting(True, help="random flips")         # --augment / --no-augment

:func:`add_arguments` adds one flag per field to an ``argparse`` parser (``--epochs``; the type,
``nargs`` and choices follow the annotation unless the field's metadata says otherwise) and
:func:`from_arguments` builds the dataclass from the parsed namespace. Fields with ``cli=False``
stay library-only.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

_MISSING = dataclasses.MISSING


def setting(
    default: Any = _MISSING,
    *,
    help: str,
    group: str | None = None,
    flag: str | None = None,
    choices: Sequence[Any] | None = None,
    nargs: int | str | None = None,
    metavar: str | tuple[str, ...] | None = None,
    type: Callable[[str], Any] | None = None,
    const: Any = _MISSING,
    convert: Callable[[Any], Any] | None = None,
    default_text: str | None = None,
    exclusive: str | None = None,
    cli: bool = True,
) -> Any:
    """A dataclass field that carries its command-line description.

    ``default`` is the one default of the setting (omit it for a required setting). ``help`` is the
    flag's help; ``group`` its section in ``--help``. ``flag`` overrides the flag name (default:
    ``--field-name``). ``choices``, ``nargs``, ``metavar``, ``type`` (string → value) and ``const``
    (the value of a bare flag, with ``nargs="?"``) go to ``argparse``; ``convert`` maps the parsed
    value to the field's value; ``default_text`` replaces the shown default; fields with the same
    ``exclusive`` name form a mutually exclusive group. ``cli=False``: no flag.
    """
    metadata = {"help": help, "group": group, "flag": flag, "choices": choices, "nargs": nargs, "metavar": metavar,
                "type": type, "const": const, "convert": convert, "default_text": default_text, "exclusive": exclusive,
                "cli": cli}
    if isinstance(default, list | dict | set):
        raise TypeError("mutable defaults are not allowed; use a tuple or None")
    return dataclasses.field(default=default, metadata=metadata)


def int_at_least(minimum: int, name: str | None = None) -> Callable[[str], int]:
    """An ``argparse`` type: an integer of at least ``minimum`` (``--train -1`` is an argparse error
    such as ``argument --train: must be an integer of at least 0, got '-1'``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer of at least {minimum}, got {text!r}")
        return value

    parse.__name__ = name or f"int_at_least_{minimum}"
    return parse


def fraction(text: str) -> float:
    """An ``argparse`` type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def int_list(minimum: int) -> Callable[[str], list[int]]:
    """An ``argparse`` type: a comma list of integers, each at least ``minimum`` (e.g. ``1728,2048``)."""
    one = int_at_least(minimum)

    def parse(text: str) -> list[int]:
        items = [t.strip() for t in str(text).split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected one or more integers of at least {minimum}, got {text!r}")
        return [one(t) for t in items]

    return parse


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without ``None``, whether None was allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) == 1:
            return args[0], optional
        return typing.Union[tuple(args)], optional  # noqa: UP007 - built from a runtime tuple
    return annotation, False


def _argparse_kind(annotation: Any) -> dict[str, Any]:
    """``type``/``nargs`` (and tuple conversion) for an annotation without ``None``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation in (int, float, str):
        return {"type": annotation}
    if origin is tuple and args and Ellipsis not in args:
        return {"type": args[0], "nargs": len(args), "convert": tuple}
    if origin in (list, tuple, Sequence, typing.Sequence) or (origin is not None and origin.__name__ == "Sequence"):
        return {"type": args[0] if args else str, "nargs": "+"}
    return {"type": str}


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, tuple | list):
        return " ".join(str(v) for v in value)
    return str(value)


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = (),
                  groups: Sequence[str] = ()) -> None:
    """Add one flag per field of the dataclass ``cls`` (those without ``cli=False`` or in ``skip``),
    grouped by their ``group`` (sections in the order of ``groups``, then as they come), in field
    order; ``--help`` shows each default."""
    hints = typing.get_type_hints(cls)
    sections: dict[str | None, Any] = {name: parser.add_argument_group(name) for name in groups}
    exclusive: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta or not meta.get("cli", True) or f.name in skip:
            continue
        group_name = meta.get("group")
        if group_name not in sections:
            sections[group_name] = parser if group_name is None else parser.add_argument_group(group_name)
        target = sections[group_name]
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        required = f.default is _MISSING and f.default_factory is _MISSING
        default = None if required else (f.default if f.default is not _MISSING else f.default_factory())
        shown = meta.get("default_text") or _show(default)
        help_text = meta["help"] + ("" if required else f" (default: {shown})")
        annotation, _ = _strip_optional(hints[f.name])
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
        if annotation is bool and meta.get("type") is None:
            kwargs.update(action=argparse.BooleanOptionalAction, default=default)
            target.add_argument(flag, **kwargs)
            continue
        kind = _argparse_kind(annotation)
        kwargs["type"] = meta.get("type") or kind["type"]
        nargs = meta.get("nargs") if meta.get("nargs") is not None else kind.get("nargs")
        if nargs is not None:
            kwargs["nargs"] = nargs
        if meta.get("const") is not _MISSING:
            kwargs["const"] = meta["const"]
        for key in ("choices", "metavar"):
            if meta.get(key) is not None:
                kwargs[key] = meta[key]
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        exclusive_name = meta.get("exclusive")
        if exclusive_name:
            if exclusive_name not in exclusive:
                exclusive[exclusive_name] = target.add_mutually_exclusive_group()
            exclusive[exclusive_name].add_argument(flag, **kwargs)
        else:
            target.add_argument(flag, **kwargs)


def from_arguments(cls: type, namespace: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of the dataclass ``cls`` from a namespace parsed with :func:`add_arguments`.

    Values of fields without a flag come from ``overrides`` or the field defaults.
    """
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        if not hasattr(namespace, f.name):
            continue
        value = getattr(namespace, f.name)
        annotation, _ = _strip_optional(hints[f.name])
        convert = f.metadata.get("convert") if f.metadata else None
        if convert is None and annotation is not bool:
            convert = _argparse_kind(annotation).get("convert")
        if convert is not None and value is not None:
            value = convert(value)
        values[f.name] = value
    return cls(**values)
