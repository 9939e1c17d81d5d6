"""Prompt templates from a folder (``prompts/`` by default): loading, rendering, content hashes."""

from __future__ import annotations

import hashlib
from pathlib import Path
from string import Template

from geoagent.errors import ConfigError

DEFAULT_PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
TEMPLATE_SUFFIX = ".txt"


class PromptSet:
    """The templates of one folder. Files are read once; a missing file or placeholder is a ConfigError."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory).expanduser() if directory else DEFAULT_PROMPTS_DIR
        if not self.directory.is_dir():
            raise ConfigError(f"{self.directory}: prompts folder not found")
        self._texts: dict[str, str] = {}

    def text(self, name: str) -> str:
        if name not in self._texts:
            path = self.directory / f"{name}{TEMPLATE_SUFFIX}"
            try:
                self._texts[name] = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise ConfigError(f"{path}: prompt template not found") from None
        return self._texts[name]

    def render(self, name: str, **values: object) -> str:
        try:
            return Template(self.text(name)).substitute({k: str(v) for k, v in values.items()}).strip()
        except KeyError as exc:
            raise ConfigError(f"{self.directory / (name + TEMPLATE_SUFFIX)}: unknown placeholder ${exc.args[0]}") from None
        except ValueError as exc:
            raise ConfigError(f"{self.directory / (name + TEMPLATE_SUFFIX)}: {exc} (write $$ for a literal $)") from None

    def hash(self, name: str) -> str:
        return hashlib.sha256(self.text(name).encode("utf-8")).hexdigest()[:12]

    def hashes(self) -> dict[str, str]:
        """Content hash of every template in the folder, by name."""
        return {p.stem: self.hash(p.stem) for p in sorted(self.directory.glob(f"*{TEMPLATE_SUFFIX}"))}
