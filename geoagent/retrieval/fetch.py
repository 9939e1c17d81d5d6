"""The CLIP weights a configuration needs, found and fetched ahead of the first photo (``geoagent setup``).

Where the weights come from is decided as :meth:`Embedder.load` decides it: random (``clip_pretrained = "none"``),
a local checkpoint file, or a pretrained tag that open_clip fetches from the Hugging Face Hub into its cache
(``HF_HOME``; ``HF_HUB_OFFLINE=1`` forbids the download). Nothing here loads the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

from geoagent.errors import WeightsError
from geoagent.retrieval.embedder import _cached_weights, _hf_reachable, _weights_missing, clip_name, pretrained_cfg

if TYPE_CHECKING:
    from geoagent.config import RetrievalConfig

#: open_clip's file names on the Hub, in the order it tries them (safetensors first).
HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class WeightsPlan(BaseModel):
    """Where the configured CLIP weights come from, and whether they are here already."""

    model: str
    source: Literal["random", "file", "hub"]
    location: str  # the checkpoint file, or the Hub's "repo/file"
    local: str | None = None  # the file on this machine, when it is here
    size_bytes: int | None = None  # on disk when local; else from the Hub's metadata (None: unknown, e.g. offline)


def _hub_repo(config: RetrievalConfig) -> tuple[str, list[str], dict[str, object]]:
    cfg = pretrained_cfg(clip_name_for_open_clip(config), config.clip_pretrained)
    parts = str(cfg.get("hf_hub", "")).strip("/").split("/")
    if len(parts) < 2:  # an older tag open_clip fetches from a plain URL
        return str(cfg.get("url", "")), [], cfg
    return "/".join(parts[:2]), (["/".join(parts[2:])] if len(parts) > 2 else list(HUB_FILES)), cfg


def clip_name_for_open_clip(config: RetrievalConfig) -> str:
    """The name open_clip knows the model by (a config JSON is registered under its stem first)."""
    from geoagent.retrieval.embedder import _register_model_config

    return _register_model_config(config.clip_model)


def weights_plan(config: RetrievalConfig, *, ask_hub: bool = False) -> WeightsPlan:
    """What :meth:`Embedder.load` would read (imports open_clip, loads nothing). ``ask_hub``: when the weights are
    not here, ask the Hub for their size (one metadata request; skipped offline)."""
    name, requested = clip_name(config), config.clip_pretrained
    if requested == "none":
        return WeightsPlan(model=name, source="random", location="none")
    path = Path(requested).expanduser()
    if path.is_file():
        return WeightsPlan(model=name, source="file", location=str(path), local=str(path), size_bytes=path.stat().st_size)
    repo, files, cfg = _hub_repo(config)
    local = _cached_weights(cfg)
    location = f"{repo}/{files[0]}" if files else repo
    if local is not None:
        return WeightsPlan(model=name, source="hub", location=location, local=local, size_bytes=Path(local).stat().st_size)
    size = _hub_size(repo, files) if ask_hub and files and _hf_reachable() else None
    return WeightsPlan(model=name, source="hub", location=location, size_bytes=size)


def _hub_size(repo: str, files: list[str]) -> int | None:
    """The first of ``files`` the Hub has, by its metadata (a HEAD request); None when it cannot say."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    for name in files:
        try:
            return get_hf_file_metadata(hf_hub_url(repo, name), timeout=10).size
        except Exception:  # noqa: BLE001 - a missing file, a refused or failed request: try the next, else unknown
            continue
    return None


def fetch_weights(config: RetrievalConfig) -> WeightsPlan:
    """Make the configured weights local: open_clip downloads a pretrained tag through huggingface_hub (its own
    progress bar, its cache). WeightsError, naming what to do, when that cannot happen (offline, refused)."""
    plan = weights_plan(config)
    if plan.local is not None or plan.source == "random":
        return plan
    import open_clip

    model = clip_name_for_open_clip(config)
    if not _hf_reachable():
        raise _weights_missing(model, config.clip_pretrained, "huggingface.co is unreachable or HF_HUB_OFFLINE is set")
    try:
        local = open_clip.download_pretrained(pretrained_cfg(model, config.clip_pretrained))
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        raise _weights_missing(model, config.clip_pretrained, f"download failed: {str(exc).splitlines()[0][:200]}") from None
    if not local or not Path(local).is_file():
        raise WeightsError(f"CLIP weights {model}/{config.clip_pretrained}: open_clip reported no file after the download")
    return plan.model_copy(update={"local": str(local), "size_bytes": Path(local).stat().st_size})
