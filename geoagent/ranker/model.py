"""GeoRanker's reward model, re-implemented on transformers 5 and peft: build, load, save, score.

The model (arXiv 2505.13731) is Qwen2-VL with LoRA on the text layers' ``q_proj``/``k_proj``/``v_proj`` and a
bias-free linear ``value_head`` (hidden size -> 1) read at the last token of the last layer's (normed) hidden
state. One input per candidate: a user message holding the query image, the question
"How far is this place from latitude: {lat}, longitude: {lon}?" and the candidate's image (left out when the
candidate has no photo), through the processor's chat template with the generation prompt.

Checkpoint compatibility: GeoRanker saved its adapter with transformers 4.5x-dev, where the text layers sat at
``model.layers.N`` and the vision tower at ``visual``; transformers 5 nests them as ``model.language_model`` and
``model.visual``, and peft silently skips adapter tensors whose names it does not find. So adapters are read
and written here with explicit name mapping (:func:`from_georanker_name`, :func:`to_georanker_name`), every
tensor must land on a parameter, and saved adapters use GeoRanker's names, readable by its own tooling.

Blocking code throughout (seconds to minutes on a 7B model): callers run it in worker threads.
"""

from __future__ import annotations

import json
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoProcessor, BatchFeature, Qwen2VLForConditionalGeneration

from geoagent.errors import WeightsError
from geoagent.paths import display_path

#: GeoRanker's base model and its LoRA recipe (paper section 4 and its repository).
GEORANKER_BASE = "Qwen/Qwen2-VL-7B-Instruct"
LORA_RANK = 16
LORA_ALPHA = 32
LORA_DROPOUT = 0.05
LORA_TARGETS = ("q_proj", "k_proj", "v_proj")
VALUE_HEAD = "value_head"
#: The one question per candidate, as GeoRanker words it.
QUESTION = "How far is this place from latitude: {lat}, longitude: {lon}?"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # peft's name for the one adapter; absent from saved tensor names
#: The keys of GeoRanker's adapter_config.json (as peft 0.15 writes them): a saved config keeps to these, plus
#: any newer key set to something other than its default, so GeoRanker's older peft can read it.
GEORANKER_CONFIG_KEYS = frozenset({
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config", "eva_config", "exclude_modules",
    "fan_in_fan_out", "inference_mode", "init_lora_weights", "layer_replication", "layers_pattern", "layers_to_transform",
    "loftq_config", "lora_alpha", "lora_bias", "lora_dropout", "megatron_config", "megatron_core", "modules_to_save",
    "peft_type", "r", "rank_pattern", "revision", "target_modules", "task_type", "trainable_token_indices", "use_dora",
    "use_rslora",
})

#: Tensor-name prefixes of a peft adapter around Qwen2VLForConditionalGeneration: (GeoRanker's, transformers 5's).
_PEFT_ROOT = "base_model.model."
_RENAMES = (
    (_PEFT_ROOT + "visual.", _PEFT_ROOT + "model.visual."),
    (_PEFT_ROOT + "model.", _PEFT_ROOT + "model.language_model."),
)
_ALREADY_NESTED = re.compile(re.escape(_PEFT_ROOT) + r"model\.(language_model|visual)\.")


def from_georanker_name(name: str) -> str:
    """An adapter tensor's name as GeoRanker stored it -> the name this model's peft state uses.

    Names already in transformers 5's layout (adapters saved by plain peft on transformers >= 4.52) pass unchanged.
    """
    if _ALREADY_NESTED.match(name):
        return name
    for theirs, ours in _RENAMES:
        if name.startswith(theirs):
            return ours + name[len(theirs) :]
    return name


def to_georanker_name(name: str) -> str:
    """The inverse of :func:`from_georanker_name`: the name GeoRanker's tooling expects in the file."""
    for theirs, ours in _RENAMES:
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    return name


def lora_config(*, inference_mode: bool = True) -> LoraConfig:
    """GeoRanker's adapter recipe: LoRA r 16, alpha 32, dropout 0.05 on q/k/v; the value head saved alongside."""
    return LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=LORA_DROPOUT,
        target_modules=list(LORA_TARGETS),
        modules_to_save=[VALUE_HEAD],
        inference_mode=inference_mode,
    )


@dataclass(frozen=True)
class RankItem:
    """One model input: the query photo, a candidate's coordinates, and the candidate's photo if it has one."""

    query: Image.Image
    lat: float
    lon: float
    candidate: Image.Image | None = None


def pick_device(device: str) -> str:
    """``auto``: CUDA where available, else the CPU."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto``: bfloat16 on a GPU that supports it (as GeoRanker ran), float32 elsewhere."""
    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype == "float32":
        return torch.float32
    return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the random initialisation inside (value head, LoRA A) without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def load_base(base_dir: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[Qwen2VLForConditionalGeneration, Any]:
    """The base Qwen2-VL with a value head attached (randomly initialised as GeoRanker does: normal, std
    1/(hidden+1), from ``seed``), and its processor set to pad on the left (the reward is read at the last token)."""
    try:
        vlm = Qwen2VLForConditionalGeneration.from_pretrained(base_dir, dtype=dtype, device_map=device)
        processor = AutoProcessor.from_pretrained(base_dir)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"ranker.base_model: cannot load a Qwen2-VL model from {display_path(base_dir)} ({_first_line(exc)})") from None
    hidden = vlm.config.text_config.hidden_size
    head = nn.Linear(hidden, 1, bias=False, device=device, dtype=dtype)
    with _seeded(seed):
        nn.init.normal_(head.weight, mean=0.0, std=1.0 / (hidden + 1))
    vlm.value_head = head
    vlm.config.use_cache = False
    processor.tokenizer.padding_side = "left"
    return vlm, processor


def read_adapter_config(adapter_dir: Path) -> LoraConfig:
    """The adapter's ``adapter_config.json`` as a LoraConfig; WeightsError naming the file if it is unusable."""
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise WeightsError(f"ranker.adapter: {display_path(adapter_dir)} has no {ADAPTER_CONFIG} (not a peft adapter folder)")
    try:
        config = LoraConfig.from_pretrained(str(adapter_dir))
    except (OSError, ValueError, TypeError) as exc:
        raise WeightsError(f"{display_path(path)}: not a usable LoRA adapter config ({_first_line(exc)})") from None
    if config.peft_type is None or str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        raise WeightsError(f"{display_path(path)}: peft_type is {config.peft_type}, GeoRanker adapters are LORA")
    if VALUE_HEAD not in (config.modules_to_save or []):
        raise WeightsError(f"{display_path(path)}: modules_to_save lacks '{VALUE_HEAD}': not a reward-model adapter")
    return config


def attach_adapter(vlm: Qwen2VLForConditionalGeneration, adapter_dir: Path | None = None, *, trainable: bool = False, seed: int = 0) -> PeftModel:
    """Wrap ``vlm`` (from :func:`load_base`) in LoRA: a fresh GeoRanker recipe adapter (LoRA B zero, so the
    base's behaviour; LoRA A from ``seed``) when ``adapter_dir`` is None, else the adapter stored there.

    Every stored tensor must land on a parameter of the model (names mapped from GeoRanker's layout), and every
    adapter parameter must be stored: a partial or foreign adapter is a WeightsError, never silently ignored.
    """
    config = lora_config(inference_mode=not trainable) if adapter_dir is None else read_adapter_config(adapter_dir)
    config.inference_mode = not trainable
    with _seeded(seed), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft on transformers 5
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*was renamed", category=UserWarning)  # the base is ours to pick
        model = get_peft_model(vlm, config, adapter_name=ADAPTER_NAME)
    if adapter_dir is not None:
        _load_adapter_tensors(model, adapter_dir)
    model.train(trainable)
    return model


def _load_adapter_tensors(model: PeftModel, adapter_dir: Path) -> None:
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise WeightsError(f"ranker.adapter: {display_path(adapter_dir)} has no {ADAPTER_WEIGHTS}")
    try:
        stored = load_file(path, device=str(next(model.parameters()).device))
    except (OSError, SafetensorError) as exc:
        raise WeightsError(f"{display_path(path)}: not a readable safetensors file ({_first_line(exc)})") from None
    renamed = {from_georanker_name(name): tensor for name, tensor in stored.items()}
    original = {new: old for old, new in zip(stored, renamed)}
    try:
        result = set_peft_model_state_dict(model, renamed, adapter_name=ADAPTER_NAME)
    except RuntimeError as exc:  # size mismatch: trained for another base model
        raise WeightsError(f"{display_path(path)}: does not fit this base model ({_first_line(exc)})") from None
    unexpected = [original.get(name, name) for name in _stored_names(result.unexpected_keys)]
    if unexpected:
        raise WeightsError(
            f"{display_path(path)}: {len(unexpected)} tensors match no parameter of the model "
            f"(e.g. {unexpected[0]}); is it an adapter for Qwen2-VL?"
        )
    missing = [name for name in result.missing_keys if f".{ADAPTER_NAME}." in name or name.endswith(f".{ADAPTER_NAME}")]
    if missing:
        raise WeightsError(f"{display_path(path)}: lacks {len(missing)} of the adapter's tensors (e.g. {missing[0]})")


def _stored_names(keys: Sequence[str]) -> list[str]:
    """peft reports unexpected keys with the adapter name inserted; take it out again to name the file's tensor."""
    return [key.replace(f".{ADAPTER_NAME}.", ".") for key in keys]


def save_adapter(model: PeftModel, folder: Path, *, base_model_name: str | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` in GeoRanker's layout: its tensor names
    (transformers 4.5x-dev), peft's file names, the value head under ``base_model.model.value_head.weight``."""
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    tensors = {to_georanker_name(name): tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = model.peft_config[ADAPTER_NAME].to_dict()
    defaults = LoraConfig().to_dict()
    fields = {key: value for key, value in config.items() if key in GEORANKER_CONFIG_KEYS or value != defaults.get(key, value)}
    fields.pop("peft_version", None)  # new in peft 0.17; older peft rejects it
    fields.update(inference_mode=True, peft_type="LORA", target_modules=sorted(config["target_modules"]))
    if base_model_name is not None:
        fields["base_model_name_or_path"] = base_model_name
    (folder / ADAPTER_CONFIG).write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    return folder


def fit_image(image: Image.Image, max_side: int) -> Image.Image:
    """RGB, longest side at most ``max_side`` (the processor then snaps it to 28-pixel blocks)."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    if max(image.size) <= max_side:
        return image
    fitted = image.copy()
    fitted.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return fitted


def messages_for(item: RankItem) -> list[dict[str, Any]]:
    """The one user message GeoRanker scores: query image, question, candidate image (if any)."""
    content: list[dict[str, Any]] = [{"type": "image"}, {"type": "text", "text": QUESTION.format(lat=item.lat, lon=item.lon)}]
    if item.candidate is not None:
        content.append({"type": "image"})
    return [{"role": "user", "content": content}]


def build_batch(processor: Any, items: Sequence[RankItem], max_side: int) -> BatchFeature:
    """Token ids, attention mask (left-padded) and pixel values for ``items``, images in message order."""
    texts = [processor.apply_chat_template(messages_for(item), tokenize=False, add_generation_prompt=True) for item in items]
    images = [fit_image(image, max_side) for item in items for image in (item.query, item.candidate) if image is not None]
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


def forward_rewards(model: PeftModel, batch: BatchFeature) -> torch.Tensor:
    """One reward per row (float32, differentiable when the model trains): value head at the last real token of
    the last layer's normed hidden state. Runs the decoder without the language-model head (no vocabulary logits)."""
    vlm = model.get_base_model()
    hidden = vlm.model(**batch, use_cache=False).last_hidden_state  # every processor output (M-RoPE needs its token types)
    mask = batch["attention_mask"]
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask.to(positions.dtype) * positions).argmax(dim=1)  # the last attended position, whichever side pads
    head = getattr(vlm, VALUE_HEAD)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return head(picked.to(head.weight.dtype)).squeeze(-1).float()


class RewardModel:
    """A loaded GeoRanker: the peft-wrapped Qwen2-VL with its value head, the processor, the device.

    ``RewardModel.load(base_dir, adapter_dir)`` for inference; ``trainable=True`` (adapter None for a fresh one,
    or a checkpoint to resume) for fine-tuning: :meth:`forward` then returns rewards with gradients.
    """

    def __init__(self, model: PeftModel, processor: Any, device: str, max_side: int) -> None:
        self.model, self.processor, self.device, self.max_side = model, processor, device, max_side
        self._lock = threading.Lock()  # one forward pass at a time; torch uses the cores (or the GPU) itself

    @classmethod
    def load(
        cls,
        base_dir: Path,
        adapter_dir: Path | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_side: int = 640,
        trainable: bool = False,
        seed: int = 0,
    ) -> RewardModel:
        """Load the base model and the adapter (blocking: seconds for a tiny model, a minute or more for 7B)."""
        chosen = pick_device(device)
        vlm, processor = load_base(base_dir, device=chosen, dtype=pick_dtype(dtype, chosen), seed=seed)
        return cls(attach_adapter(vlm, adapter_dir, trainable=trainable, seed=seed), processor, chosen, max_side)

    def batch(self, items: Sequence[RankItem]) -> BatchFeature:
        """Model inputs for ``items``, on the model's device."""
        return build_batch(self.processor, items, self.max_side).to(self.device)

    def forward(self, items: Sequence[RankItem]) -> torch.Tensor:
        """Rewards for ``items`` in one batch, with gradients if the model is in training mode."""
        return forward_rewards(self.model, self.batch(items))

    def rewards_sync(self, items: Sequence[RankItem], batch_size: int) -> list[float]:
        """Rewards for any number of items, ``batch_size`` at a time, without gradients (blocking)."""
        rewards: list[float] = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(items), batch_size):
                rewards += self.forward(items[start : start + batch_size]).tolist()
        return rewards

    def save_adapter(self, folder: Path, *, base_model_name: str | None = None) -> Path:
        """Save the adapter in GeoRanker's format (see :func:`save_adapter`)."""
        return save_adapter(self.model, folder, base_model_name=base_model_name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
