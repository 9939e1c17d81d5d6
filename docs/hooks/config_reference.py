"""MkDocs hook: the configuration reference, generated from the settings models at build time.

docs/reference/configuration.md holds a marker; this hook replaces it with one table per TOML table (key, type,
default, description), walked from ``geoagent.config.Settings``, so the page cannot drift from the code.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

MARKER = "<!-- settings-reference -->"


class Table(NamedTuple):
    """One TOML table: how a user writes its header, its model, and the field that holds it."""

    header: str
    model: type[BaseModel]
    field: FieldInfo | None


def _models(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _models(arg)


def tables(model: type[BaseModel], path: str = "", field: FieldInfo | None = None) -> Iterator[Table]:
    """Every table of ``model`` that holds keys, depth first, as a user writes its header."""
    if any(not list(_models(f.annotation)) for f in model.model_fields.values()):
        yield Table(path, model, field)
    for name, sub in model.model_fields.items():
        origin = typing.get_origin(sub.annotation)
        for nested in _models(sub.annotation):
            if origin is dict:
                header = f"{path}.{name}.NAME" if path else f"{name}.NAME"
            elif origin is list:
                header = f"[{path}.{name}]" if path else f"[{name}]"
            else:
                header = f"{path}.{name}" if path else name
            yield from tables(nested, header, sub)


def keys(table: Table) -> Iterator[tuple[str, FieldInfo]]:
    """The table's own keys (not its sub-tables)."""
    for name, field in table.model.model_fields.items():
        if not list(_models(field.annotation)):
            yield name, field


def type_name(annotation: Any) -> str:
    """A type as a TOML user reads it: string, integer, a choice of literals, "or unset" for an optional key."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(f'`{value_text(v)}`' for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        text = " or ".join(type_name(a) for a in args)
        return text + (" or unset" if len(args) < len(typing.get_args(annotation)) else "")
    if origin in (list, tuple, set, frozenset):
        inner = typing.get_args(annotation)
        return f"list of {type_name(inner[0])}" if inner else "list"
    if origin is dict:
        return "table"
    names = {bool: "boolean", int: "integer", float: "number", str: "string", Path: "path", PurePath: "path"}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " \\| ".join(f"`{value_text(m.value)}`" for m in annotation)
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def constraints(field: FieldInfo) -> str:
    """Bounds such as ``>= 1, <= 1024`` from the field's metadata."""
    found = []
    for item in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            bound = getattr(item, attr, None)
            if bound is not None:
                found.append(f"{sign} {bound}")
    return ", ".join(found)


def value_text(value: Any) -> str:
    """A value as it is written in TOML."""
    from geoagent.config_toml import _value

    if isinstance(value, PurePath):
        value = str(value)
    if isinstance(value, enum.Enum):
        value = value.value
    return _value(value)


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return ""
    try:
        return f"`{value_text(value)}`"
    except TypeError:
        return f"`{value!r}`"


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def env_name(header: str, key: str) -> str:
    parts = [p for p in header.split(".") if p] + [key]
    return "GEOAGENT_" + "__".join("<NAME>" if p == "NAME" else p.upper() for p in parts)


def render() -> str:
    """The reference: one section per table with a row per key."""
    from geoagent.config import Settings

    out: list[str] = []
    for table in tables(Settings):
        out.append(f"## `[{table.header}]`")
        out.append("")
        intro = table.model.__doc__ or (table.field.description if table.field else None)
        if intro:
            out.append(" ".join(intro.split()).replace("``", "`"))
            out.append("")
        out.append("| key | type | default | description |")
        out.append("| --- | --- | --- | --- |")
        for name, field in keys(table):
            kind = type_name(field.annotation)
            bounds = constraints(field)
            kind = f"{kind} ({bounds})" if bounds else kind
            description = cell(field.description or "")
            out.append(f"| `{name}` | {kind} | {default_text(field)} | {description} |")
        example = next(iter(keys(table)), None)
        if example is not None and not table.header.startswith("["):
            out.append("")
            out.append(f"Environment: `{env_name(table.header, example[0])}` and so on for each key.")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs event: fill the marker on the page that carries it."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())
