"""Prompt templates from a folder (the bundled ``templates/`` by default): loading, rendering, content hashes.

The bundled templates ship inside the package, so a wheel finds them; ``export_prompts`` copies them out
for editing (``geoagent prompts export DIR``, then ``--prompts DIR``).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from string import Template

from geoagent.errors import ConfigError

DEFAULT_PROMPTS_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE_SUFFIX = ".txt"
#: The guide to the placeholders, exported beside the templates.
PROMPTS_README = "README.md"
#: The templates every question of a photo opens with (the shared prefix). A folder exported before they existed
#: lacks them: the bundled ones stand in, so an older copy keeps working.
SHARED_TEMPLATES = ("instructions", "query")


def export_prompts(directory: str | Path, *, force: bool = False) -> list[Path]:
    """Copy the bundled templates and their README into ``directory``; existing files only with ``force``."""
    target = Path(directory).expanduser()
    sources = sorted(DEFAULT_PROMPTS_DIR.glob(f"*{TEMPLATE_SUFFIX}")) + [DEFAULT_PROMPTS_DIR / PROMPTS_README]
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{target}: exists and is not a folder")
    existing = [target / source.name for source in sources if (target / source.name).exists()]
    if existing and not force:
        others = f" and {len(existing) - 1} other files" if len(existing) > 1 else ""
        raise ConfigError(f"{target}: {existing[0].name}{others} already there; pass --force to overwrite")
    try:
        target.mkdir(parents=True, exist_ok=True)
        written = [Path(shutil.copyfile(source, target / source.name)) for source in sources]
    except OSError as exc:
        raise ConfigError(f"{target}: cannot write the prompts ({exc.strerror or exc})") from None
    return written


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
            if name in SHARED_TEMPLATES and not path.exists():
                path = DEFAULT_PROMPTS_DIR / path.name
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
