"""Where the ranker's weights are, found before torch or transformers is imported: fast, clear errors.

The base model resolves offline-first, as the CLIP weights do: a local folder, else the Hugging Face cache,
else (only where huggingface.co answers) a download; unreachable and not cached is one line saying what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from geoagent.errors import ConfigError, WeightsError
from geoagent.paths import display_path
from geoagent.retrieval.embedder import HF_HOST, _hf_reachable

if TYPE_CHECKING:
    from geoagent.config import RankerConfig

#: What a model folder needs (weights may be sharded), and what a download fetches.
MODEL_CONFIG = "config.json"
MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.jinja", "*.model")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
GEORANKER_REPO = "github.com/Applied-Machine-Learning-Lab/GeoRanker"


def _is_model_folder(folder: Path) -> bool:
    return (folder / MODEL_CONFIG).is_file() and any(folder.glob("*.safetensors"))


def _looks_like_a_path(name: str) -> bool:
    """A Hugging Face name is ``owner/model``; anything else (./x, /x, ~/x, a/b/c) is meant as a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or os.sep != "/" and os.sep in name


def _base_missing(name: str, reason: str) -> WeightsError:
    from huggingface_hub.constants import HF_HUB_CACHE

    return WeightsError(
        f"ranker base model {name} is not available ({reason}); it is not in the Hugging Face cache ({HF_HUB_CACHE}). "
        f"Either run `huggingface-cli download {name}` where {HF_HOST} is reachable, copy that cache here "
        f"(or point HF_HOME at it), or set ranker.base_model to a local model folder"
    )


def resolve_base_model(name: str) -> Path:
    """The folder holding ``name``'s weights: the folder itself, its Hugging Face cache snapshot, or a download."""
    path = Path(name).expanduser()
    if path.exists() or _looks_like_a_path(name):
        if not path.is_dir():
            raise ConfigError(f"ranker.base_model: no model folder at {display_path(path)}")
        if not _is_model_folder(path):
            raise WeightsError(f"ranker.base_model: {display_path(path)} has no {MODEL_CONFIG} and *.safetensors weights")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    try:
        cached = Path(snapshot_download(name, local_files_only=True))
        if _is_model_folder(cached):
            return cached
    except LocalEntryNotFoundError:
        pass
    if not _hf_reachable():
        raise _base_missing(name, f"{HF_HOST} is unreachable")
    try:
        return Path(snapshot_download(name, allow_patterns=list(MODEL_FILES)))
    except (HfHubHTTPError, OSError) as exc:
        raise _base_missing(name, f"download failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def resolve_adapter(adapter: Path | None) -> Path:
    """The adapter folder, checked to hold peft's two files."""
    if adapter is None:
        raise ConfigError(
            "ranker.adapter is not set: strategy 'georanker' needs a GeoRanker adapter folder "
            f"(e.g. the checkpoints/ folder of {GEORANKER_REPO}, or one `geoagent ranker train` wrote)"
        )
    if not adapter.is_dir():
        raise ConfigError(f"ranker.adapter: no adapter folder at {display_path(adapter)}")
    missing = [name for name in ADAPTER_FILES if not (adapter / name).is_file()]
    if missing:
        raise WeightsError(f"ranker.adapter: {display_path(adapter)} lacks {' and '.join(missing)} (not a peft adapter folder)")
    return adapter


def resolve_weights(config: RankerConfig) -> tuple[Path, Path]:
    """(base model folder, adapter folder) for ``config``; the adapter is checked first (no network for it)."""
    adapter = resolve_adapter(config.adapter)
    return resolve_base_model(config.base_model), adapter
