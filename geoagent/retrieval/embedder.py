"""open_clip image and text embeddings, L2-normalised, computed in worker threads.

``clip_model`` is an open_clip model name or a path to a model-config JSON; ``clip_pretrained`` a pretrained
tag, a local checkpoint file, or "none" (seeded random weights, identical across processes: for tests and
offline smoke runs only).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel

from geoagent.errors import ConfigError, WeightsError
from geoagent.loading import loading

if TYPE_CHECKING:
    from PIL import Image

    from geoagent.config import RetrievalConfig

HF_HOST = "huggingface.co"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")  # a clip_pretrained ending so names a file, not a tag


class EmbedderSpec(BaseModel):
    """What identifies an embedding space: an index built with one spec is only searchable with the same."""

    model: str
    pretrained: str
    seed: int
    config_hash: str

    def describe(self) -> str:
        seed = f", seed {self.seed}" if self.pretrained == "none" else ""
        return f"{self.model} / {self.pretrained}{seed} (config {self.config_hash[:12]})"


def _hf_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection((HF_HOST, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _cached_weights(cfg: dict[str, Any]) -> str | None:
    """A local path for a pretrained tag's weights if the Hugging Face cache already holds them."""
    from huggingface_hub import try_to_load_from_cache

    parts = cfg.get("hf_hub", "").strip("/").split("/")
    if len(parts) < 2:
        return None
    repo_id = "/".join(parts[:2])
    names = ["/".join(parts[2:])] if len(parts) > 2 else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for name in names:
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str):
            return found
    return None


def _weights_missing(model: str, tag: str, reason: str) -> WeightsError:
    from huggingface_hub.constants import HF_HUB_CACHE

    return WeightsError(
        f"CLIP weights {model}/{tag} are not available ({reason}); they are not in the Hugging Face cache "
        f"({HF_HUB_CACHE}). Either run once where {HF_HOST} is reachable so open_clip downloads them, copy that "
        f"cache here (or point HF_HOME at it), or set retrieval.clip_pretrained to a local checkpoint file"
    )


class Embedder:
    """A loaded open_clip model. Blocking methods end in ``_sync``; the async ones run them in a thread."""

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, spec: EmbedderSpec, device: str) -> None:
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.spec, self.device = spec, device
        self._lock = threading.Lock()  # one forward pass at a time; torch uses the cores itself

    @cached_property
    def dim(self) -> int:
        return int(self.embed_texts_sync(["dimension probe"]).shape[1])

    @classmethod
    def load(cls, config: RetrievalConfig) -> Embedder:
        """Build the model described by ``config`` (blocking: seconds)."""
        with loading(f"loading CLIP {clip_name(config)}"):
            return cls._load(config)

    @classmethod
    def _load(cls, config: RetrievalConfig) -> Embedder:
        import open_clip
        import torch

        _register_model_config(config.clip_model)  # open_clip knows a config JSON only once it is added
        spec = embedder_spec(config)
        model_name = spec.model
        device = _pick_device(config.device)
        kwargs: dict[str, Any] = {"device": device}
        requested = config.clip_pretrained
        pretrained: str | None = requested
        if requested == "none":
            pretrained = None
            torch.manual_seed(config.seed)
        elif Path(requested).expanduser().is_file():
            pretrained = str(Path(requested).expanduser())
        else:
            cfg = pretrained_cfg(model_name, requested)
            local = _cached_weights(cfg)
            if local is not None:  # load the cached file directly: no network round-trips when offline
                pretrained = local
                kwargs.update(force_quick_gelu=bool(cfg.get("quick_gelu")), image_mean=cfg.get("mean"), image_std=cfg.get("std"))
            elif not _hf_reachable():
                raise _weights_missing(model_name, config.clip_pretrained, f"{HF_HOST} is unreachable")
        if pretrained is None:
            warnings.warn(
                f"retrieval.clip_pretrained = 'none': {model_name} has random weights (seed {config.seed}); "
                "fine for tests and smoke runs, useless for real geolocation",
                RandomWeightsWarning,
                stacklevel=3,  # the caller of Embedder.load
            )
        try:
            with _quiet_open_clip():
                model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, **kwargs)
        except RuntimeError as exc:
            if "download" in str(exc).lower():
                raise _weights_missing(model_name, config.clip_pretrained, "download failed") from None
            raise WeightsError(f"cannot load CLIP {model_name} with {config.clip_pretrained}: {exc}") from None
        model.eval()
        return cls(model, preprocess, open_clip.get_tokenizer(model_name), spec, device)

    def embed_images_sync(self, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        import torch

        chunks = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = torch.stack([self.preprocess(img) for img in images[start : start + batch_size]]).to(self.device)
                chunks.append(self.model.encode_image(batch).float().cpu().numpy())
        return _normalise(np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32))

    def embed_texts_sync(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        import torch

        chunks = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(texts[start : start + batch_size]).to(self.device)
                chunks.append(self.model.encode_text(tokens).float().cpu().numpy())
        return _normalise(np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32))

    async def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        return await asyncio.to_thread(self.embed_images_sync, images)

    async def embed_texts(self, texts: list[str]) -> np.ndarray:
        return await asyncio.to_thread(self.embed_texts_sync, texts)


def pretrained_cfg(model_name: str, tag: str) -> dict[str, Any]:
    """open_clip's download record of a pretrained ``tag`` of ``model_name``; ConfigError for a tag it does not know
    (or a checkpoint path with no file)."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if tag not in tags:
        if "/" in tag or tag.endswith(CHECKPOINT_SUFFIXES):
            raise ConfigError(f"retrieval.clip_pretrained: no checkpoint file at {tag}")
        raise ConfigError(
            f"retrieval.clip_pretrained: '{tag}' is not a pretrained tag of {model_name} "
            f"(known: {', '.join(tags) or 'none'}), a checkpoint file, or 'none'"
        )
    return dict(open_clip.get_pretrained_cfg(model_name, tag))


def clip_name(config: RetrievalConfig) -> str:
    """The CLIP model as a person names it (a model-config JSON by its stem), without importing open_clip."""
    return Path(config.clip_model).stem if config.clip_model.endswith(".json") else config.clip_model


def check_model_files(config: RetrievalConfig) -> None:
    """ConfigError when ``config`` names a model config or checkpoint file that is not there. Cheap (no open_clip,
    no torch): the preflight runs it before loading anything, so a typo in a path is told at once."""
    model = Path(config.clip_model).expanduser()
    if config.clip_model.endswith(".json") and not model.is_file():
        raise ConfigError(f"retrieval.clip_model: no model config at {model}")
    requested = config.clip_pretrained
    if requested == "none" or Path(requested).expanduser().is_file():
        return
    if "/" in requested or requested.endswith(CHECKPOINT_SUFFIXES):
        raise ConfigError(f"retrieval.clip_pretrained: no checkpoint file at {requested}")


def embedder_spec(config: RetrievalConfig) -> EmbedderSpec:
    """The spec :meth:`Embedder.load` gives for ``config``, without loading the model or importing open_clip
    (for a process that only writes or checks vectors others embed: the Ray index build's driver and the Ray
    batch's locate workers, which then never import PyTorch)."""
    model_name, model_config, _ = _model_config(config.clip_model)
    pretrained = config.clip_pretrained
    if pretrained != "none" and Path(pretrained).expanduser().is_file():
        pretrained = "file:" + _file_digest(Path(pretrained).expanduser())
    config_hash = hashlib.sha256(json.dumps(model_config, sort_keys=True).encode()).hexdigest()
    return EmbedderSpec(model=model_name, pretrained=pretrained, seed=config.seed, config_hash=config_hash)


class RandomWeightsWarning(UserWarning):
    """The embedder runs on random weights."""


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs its own 'randomly initialised' notice on the root logger; ours is the warning above."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(previous, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(previous)


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.size:
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


def _file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _model_config(clip_model: str) -> tuple[str, dict[str, Any], Path | None]:
    """(open_clip model name, its config, the JSON file it came from if a path), read as open_clip reads it:
    a built-in name from the ``model_configs`` folder open_clip ships, found without importing open_clip
    (and so PyTorch); any other name is looked up in open_clip itself."""
    path = Path(clip_model).expanduser()
    if clip_model.endswith(".json") or path.is_file():
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"retrieval.clip_model: no model config at {path}") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not a readable open_clip model config ({exc})") from None
        if not _is_model_config(config):
            raise ConfigError(f"{path}: an open_clip model config needs embed_dim, vision_cfg and text_cfg")
        return path.stem, config, path
    shipped = _shipped_model_config(clip_model)
    if shipped is not None:
        return clip_model, shipped, None
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS

    if clip_model not in open_clip.list_models():
        raise ConfigError(f"retrieval.clip_model: unknown open_clip model '{clip_model}' (see open_clip.list_models())")
    return clip_model, _MODEL_CONFIGS[clip_model], None


def _is_model_config(config: object) -> bool:
    return isinstance(config, dict) and all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg"))


def _shipped_model_config(name: str) -> dict[str, Any] | None:
    """``open_clip/model_configs/NAME.json`` as open_clip registers it at import, or None (not there, or not a
    model config open_clip would list)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations or "/" in name or name.startswith("."):
        return None
    file = Path(next(iter(spec.submodule_search_locations))) / "model_configs" / f"{name}.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return config if _is_model_config(config) else None


def _register_model_config(clip_model: str) -> str:
    """The name open_clip knows the model by; a JSON path is registered with open_clip under its stem."""
    name, _, path = _model_config(clip_model)
    if path is not None:
        import open_clip

        open_clip.add_model_config(path)
    return name


def _pick_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"
