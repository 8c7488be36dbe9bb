"""Command-line flags made from a config dataclass, so a flag and its field cannot disagree.

A field declares its flag the way PEFT's ``LoraConfig`` declares its options: the help text and
any choices ride on the field's metadata, the default is the field's own::

    optimizer: str = dataclasses.field(default="sgd", metadata={"help": "on-device optimizer", "choices": OPTIMIZERS})

:func:`add_config_args` turns each field into ``--field-name`` (type, default, choices and help
from the field; ``X | None`` takes an ``X``; ``tuple[X, ...]`` takes comma-separated values; a
``bool`` is a switch, ``--no-NAME`` for a field that defaults to true), and
:func:`config_from_args` builds the config back from the parsed flags. Metadata keys: ``help``
(required for a flag), ``choices``, ``flag`` (another flag name), ``metavar``, ``cli`` (False:
no flag). With ``base``, flags default to ``None`` and only what the user gave replaces
``base``'s values (one parser serves two commands with different defaults: simulate and demo).
Importing this module imports nothing but the standard library.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, Iterable, TypeVar

__all__ = ["add_config_args", "config_from_args", "flag_name"]

C = TypeVar("C")


def flag_name(f: dataclasses.Field) -> str:
    """The flag of field ``f``: its ``flag`` metadata, else ``--no-NAME`` for a bool that defaults to
    true, else ``--NAME`` (underscores become dashes)."""
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(the type without ``| None``, whether None was allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _csv(item: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        return tuple(item(s.strip()) for s in text.split(",") if s.strip())

    parse.__name__ = f"comma-separated {getattr(item, '__name__', 'value')}"  # argparse names it in errors
    return parse


def _fields(cls: type, only: Iterable[str] | None, skip: Iterable[str]) -> list[dataclasses.Field]:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}
    names = list(only) if only is not None else list(fields)
    missing = [n for n in names if n not in fields]
    if missing:
        raise ValueError(f"{cls.__name__} has no command-line field {', '.join(missing)}")
    return [fields[n] for n in names if n not in set(skip)]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_config_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    base: Any = None,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
) -> None:
    """Add one flag per field of dataclass ``cls`` (those in ``only``, in that order; minus ``skip``).

    Without ``base`` a flag's default is the field's and a field without one is a required flag.
    With ``base`` (an instance of ``cls``) every flag defaults to None and its help states
    ``base``'s value; :func:`config_from_args` then replaces only what was given.
    """
    hints = typing.get_type_hints(cls)
    for f in _fields(cls, only, skip):
        if "help" not in f.metadata:
            raise ValueError(f"{cls.__name__}.{f.name}: a command-line field needs metadata['help']")
        tp, _ = _unwrap(hints[f.name])
        default = getattr(base, f.name) if base is not None else _default(f)
        kw: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
        if tp is bool:
            flag = flag_name(f)
            off = flag.startswith("--no-")
            kw.update(action="store_const", const=not off, default=None if base is not None else off)
            parser.add_argument(flag, **kw)
            continue
        if typing.get_origin(tp) is tuple:
            item = typing.get_args(tp)[0]
            kw["type"] = _csv(item)
            kw["metavar"] = f.metadata.get("metavar", f"{item.__name__.upper()}[,...]")
        else:
            kw["type"] = tp
            if "metavar" in f.metadata:
                kw["metavar"] = f.metadata["metavar"]
        if "choices" in f.metadata:
            kw["choices"] = tuple(f.metadata["choices"])
        if base is not None:
            kw["default"] = None
        elif default is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = default
        if default is not dataclasses.MISSING and default is not None:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            kw["help"] += f" (default: {shown})"
        parser.add_argument(flag_name(f), **kw)


def config_from_args(cls: type[C], args: argparse.Namespace, *, base: C | None = None, **extra: Any) -> C:
    """The config the parsed ``args`` describe: each field's flag value (flags not given keep
    ``base``'s value when ``base`` is given), plus ``extra`` fields set by the caller."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    if base is not None:
        given = {k: v for k, v in values.items() if v is not None}
        return dataclasses.replace(base, **given, **extra)
    return cls(**values, **extra)
