"""Settings written as TOML that `load_config` reads back to the same settings (`geoagent config show`).

Written here rather than with a TOML library: the settings hold only tables, strings, numbers, booleans, lists and
unset (None) values, and unset keys are written as comments, which a writer library would drop.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from geoagent.config import Settings

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
HEADER = "# The configuration in effect (file + environment + defaults); save it as geoagent.toml to keep it.\n"


def _key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else _string(name)


def _string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, less surrogate pairs (kept as characters) and DEL."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _table(path: tuple[str, ...], data: dict[str, Any], unset_notes: dict[tuple[str, ...], str], out: list[str]) -> None:
    """``[path]`` with its plain keys, unset keys as comments, then its sub-tables and arrays of tables."""
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    arrays = {k: v for k, v in data.items() if isinstance(v, list) and v and all(isinstance(i, dict) for i in v)}
    plain = [name for name in data if name not in tables and name not in arrays]
    if path and (plain or not (tables or arrays)):  # a table of tables needs no header of its own
        out.append("")
        out.append("[" + ".".join(_key(part) for part in path) + "]")
    for name in plain:
        value = data[name]
        if value is None:
            note = unset_notes.get((*path, name))
            out.append(f"# {_key(name)} = {_value(note)}  # unset: the default" if note else f"# {_key(name)} is unset")
        else:
            out.append(f"{_key(name)} = {_value(value)}")
    for name, value in tables.items():
        _table((*path, name), value, unset_notes, out)
    for name, items in arrays.items():
        for item in items:
            out.append("")
            out.append("[[" + ".".join(_key(part) for part in (*path, name)) + "]]")
            out.extend(f"{_key(k)} = {_value(v)}" for k, v in item.items() if v is not None)


def settings_toml(settings: Settings, unset_notes: dict[tuple[str, ...], str] | None = None) -> str:
    """``settings`` as a TOML document. An unset key is a comment, showing ``unset_notes[path]`` where given
    (e.g. the URL a backend uses when ``base_url`` is unset), so reading the text back leaves it unset."""
    out: list[str] = []
    _table((), settings.model_dump(mode="json"), unset_notes or {}, out)
    return HEADER + "\n".join(out).lstrip("\n") + "\n"
