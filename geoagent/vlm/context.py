"""How many tokens a chat request takes, so an Ollama context window (``num_ctx``) can be sized to hold it.

Ollama's default context (2048-4096 tokens) is smaller than a pairwise question with three images for many
vision models, and Ollama cuts an oversized prompt from the start, silently: the query photo goes first.
:class:`ContextWindow` sizes ``num_ctx`` from an upper-bound estimate per image-encoder family, learns from the
``prompt_eval_count`` the server reports, and notices when a prompt was cut anyway. Changing ``num_ctx`` makes
Ollama reload the model, so the window moves in coarse steps and only ever grows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from geoagent.vlm.types import ChatRequest

#: num_ctx moves in steps this coarse: every change makes Ollama reload the model.
CONTEXT_STEP = 2048
#: Never ask for less than Ollama's usual default: a smaller window saves little and costs a reload.
MIN_CONTEXT = 4096
#: Characters per text token, on the safe side (English prose runs about 4).
CHARS_PER_TOKEN = 3
#: Chat-template markers around each message (role headers, separators).
TOKENS_PER_MESSAGE = 8
#: The template's fixed opening and the assistant turn's header.
TEMPLATE_TOKENS = 32
#: A reply that read at least this close to the whole window was cut (Ollama keeps exactly num_ctx tokens).
CUT_SLACK_TOKENS = 16

#: What to change when a prompt does not fit; the same words for every backend.
CONTEXT_FIXES = (
    'set agent.image_layout = "composite" (one picture per question), lower agent.max_image_side, '
    "or give the model a larger context"
)

ImageTokens = Callable[[int, int], int]

LLAVA_TILE = 336
LLAVA_TILE_TOKENS = 576  # (336 / 14) ** 2 patches of a CLIP ViT-L/14-336 view
#: LLaVA 1.6's "anyres" grids (width, height): the image is tiled at the best fit, plus one overview tile.
LLAVA_NEXT_GRIDS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
MERGED_PATCH = 28  # Qwen2-VL and Pixtral: 14-px patches merged 2 x 2 into one token
QWEN_VL_MARKERS = 2  # <|vision_start|> and <|vision_end|>
MINICPM_V_SLICE = 448
MINICPM_V_SLICE_TOKENS = 64
MINICPM_V_MAX_SLICES = 9
LLAMA4_TILE = 336
LLAMA4_TILE_TOKENS = 144  # 24 x 24 patches, pixel-shuffled by 2
#: OpenAI (GPT-4o): an image sent with ``detail: "low"`` is one 512-px view of 85 tokens; high detail adds 170 per
#: 512-px tile of the image fitted in 2048 px and shortened to 768 px on its short side.
OPENAI_BASE_TOKENS = 85
OPENAI_TILE_TOKENS = 170
OPENAI_TILE = 512
LOW_DETAIL_TOKENS = OPENAI_BASE_TOKENS


def fixed(tokens: int) -> ImageTokens:
    """An encoder that spends the same tokens on any image (it resizes to one square view)."""
    return lambda width, height: tokens


def llava_next_tokens(width: int, height: int) -> int:
    """LLaVA 1.6: 576 tokens per 336-px tile of the best-fitting grid, plus a 576-token overview; at most 2,880."""
    best, best_effective, best_waste = LLAVA_NEXT_GRIDS[0], -1, math.inf
    for grid_w, grid_h in LLAVA_NEXT_GRIDS:  # LLaVA's select_best_resolution
        scale = min(grid_w / width, grid_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = grid_w * grid_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (grid_w, grid_h), effective, waste
    tiles = (best[0] // LLAVA_TILE) * (best[1] // LLAVA_TILE)
    return LLAVA_TILE_TOKENS * (1 + tiles)


def qwen_vl_tokens(width: int, height: int) -> int:
    """Qwen2/2.5-VL: one token per 28 x 28 pixels (sides rounded up to 28), between two markers."""
    return math.ceil(width / MERGED_PATCH) * math.ceil(height / MERGED_PATCH) + QWEN_VL_MARKERS


def pixtral_tokens(width: int, height: int) -> int:
    """Mistral Small 3.x (Pixtral encoder): one token per 28 x 28 pixels, plus a break token ending each row."""
    return math.ceil(height / MERGED_PATCH) * (math.ceil(width / MERGED_PATCH) + 1)


def minicpm_v_tokens(width: int, height: int) -> int:
    """MiniCPM-V 2.6: 64 tokens for the overview and 64 per 448-px slice (at most 9, one more for the grid's fit)."""
    slices = math.ceil(width * height / MINICPM_V_SLICE**2)
    if slices <= 1:
        return MINICPM_V_SLICE_TOKENS
    return MINICPM_V_SLICE_TOKENS * (1 + min(MINICPM_V_MAX_SLICES, slices + 1))


def llama4_tokens(width: int, height: int) -> int:
    """Llama 4: 144 tokens per 336-px tile, plus a 144-token overview when there is more than one tile."""
    tiles = math.ceil(width / LLAMA4_TILE) * math.ceil(height / LLAMA4_TILE)
    return LLAMA4_TILE_TOKENS * (tiles + (tiles > 1))


def openai_image_tokens(width: int, height: int, detail: str = "high", base: int = OPENAI_BASE_TOKENS, tile: int = OPENAI_TILE_TOKENS) -> int:
    """OpenAI's count for one image: ``base`` at low detail; else ``base`` plus ``tile`` per 512-px tile after fitting
    the image in 2048 x 2048 and scaling its short side down to 768 (GPT-4o: 85 and 170; GPT-4o mini: 2833 and 5667)."""
    if detail == "low":
        return base
    scale = min(1.0, 2048 / max(width, height))
    width, height = width * scale, height * scale
    scale = min(1.0, 768 / min(width, height))
    tiles = math.ceil(width * scale / OPENAI_TILE) * math.ceil(height * scale / OPENAI_TILE)
    return base + tile * tiles


#: Tokens per image for each encoder family (upper bounds: a window too big costs memory, one too small the photo).
IMAGE_TOKENS: dict[str, ImageTokens] = {
    "llava-next": llava_next_tokens,  # LLaVA 1.6: Ollama's llava:7b/13b/34b
    "llava": fixed(LLAVA_TILE_TOKENS),  # LLaVA 1.5 and kin: bakllava, llava-llama3, llava-phi3
    "gemma3": fixed(256),  # SigLIP at 896 px, pooled to 256 soft tokens
    "qwen-vl": qwen_vl_tokens,
    "mistral3": pixtral_tokens,
    "minicpm-v": minicpm_v_tokens,
    "moondream": fixed(729),  # SigLIP at 378 px: 27 x 27 patches
    "mllama": fixed(16),  # Llama 3.2 Vision reads the image by cross-attention: one <|image|> token, and markers
    "llama4": llama4_tokens,
}
#: When nothing tells the family: the largest common encoder, so the query photo is never the one cut.
DEFAULT_FAMILY = "llava-next"

#: Ollama architectures (details.family, model_info general.architecture) that name a vision encoder themselves.
_ARCHITECTURES = {
    "gemma3": "gemma3", "qwen2vl": "qwen-vl", "qwen25vl": "qwen-vl", "qwen3vl": "qwen-vl", "mllama": "mllama",
    "mistral3": "mistral3", "llama4": "llama4",
}  # fmt: skip
#: Model-name fragments, most specific first, for models with a separate CLIP projector (families: [..., "clip"]).
_NAMES = (
    ("bakllava", "llava"), ("llava-llama3", "llava"), ("llava-phi3", "llava"), ("llava", "llava-next"),
    ("minicpm-v", "minicpm-v"), ("moondream", "moondream"), ("gemma3", "gemma3"), ("qwen2.5vl", "qwen-vl"),
    ("qwen2.5-vl", "qwen-vl"), ("qwen2-vl", "qwen-vl"), ("qwen3-vl", "qwen-vl"), ("llama3.2-vision", "mllama"),
    ("mistral-small3", "mistral3"), ("llama4", "llama4"),
)  # fmt: skip


def image_family(model: str, architectures: Sequence[str] = ()) -> str:
    """The encoder family of ``model``: from Ollama's reported architecture, else its name, else the default."""
    for architecture in architectures:
        if architecture.lower() in _ARCHITECTURES:
            return _ARCHITECTURES[architecture.lower()]
    name = model.lower().rsplit("/", 1)[-1]
    return next((family for fragment, family in _NAMES if fragment in name), DEFAULT_FAMILY)


def estimate_prompt_tokens(request: ChatRequest, family: str, detail: Mapping[str, str | None] | None = None) -> int:
    """An upper-bound token count for ``request``'s prompt (text and images), not counting the reply.

    ``detail``: the ``image_url.detail`` sent per image role; an image sent at low detail costs LOW_DETAIL_TOKENS.
    """
    image_tokens = IMAGE_TOKENS.get(family, IMAGE_TOKENS[DEFAULT_FAMILY])
    total = TEMPLATE_TOKENS
    for message in request.messages:
        total += TOKENS_PER_MESSAGE + math.ceil(len(message.text) / CHARS_PER_TOKEN)
        total += sum(
            LOW_DETAIL_TOKENS if detail and detail.get(image.role) == "low" else image_tokens(image.width, image.height)
            for image in message.images
        )
    return total


def round_up(tokens: int, step: int = CONTEXT_STEP) -> int:
    return -(-tokens // step) * step


class ContextWindow:
    """One backend's ``num_ctx``: big enough for every prompt sent, stable between requests, never shrinking.

    ``override`` (the profile's ``context_tokens``) is sent as it is. Otherwise the window is the estimate
    (scaled up by what responses showed the estimate missed) plus room for the reply, rounded up to
    :data:`CONTEXT_STEP`, and at least :data:`MIN_CONTEXT` and the model's own ``num_ctx`` parameter.
    """

    def __init__(self, model: str, override: int | None = None) -> None:
        self.override = override
        self.family = image_family(model)
        self.floor = MIN_CONTEXT
        self.trained: int | None = None  # the model's trained context length: Ollama caps num_ctx there
        self.scale = 1.0  # observed / estimated prompt size, the largest seen
        self.current = 0

    def learn_model(self, model: str, details: Mapping[str, Any], model_info: Mapping[str, Any], parameters: str) -> None:
        """What ``/api/show`` says: the architecture (hence the image encoder), the model's num_ctx and trained length."""
        architecture = str(model_info.get("general.architecture") or "")
        families = [architecture, str(details.get("family") or ""), *(details.get("families") or [])]
        self.family = image_family(model, [f for f in families if f])
        configured = re.search(r"^\s*num_ctx\s+(\d+)", parameters or "", re.MULTILINE)
        if configured:
            self.floor = max(self.floor, int(configured.group(1)))
        trained = model_info.get(f"{architecture}.context_length")
        if isinstance(trained, int) and trained > 0:
            self.trained = trained

    def size_for(self, request: ChatRequest) -> int:
        """The num_ctx to send with ``request``."""
        if self.override is not None:
            return self.override
        prompt = math.ceil(estimate_prompt_tokens(request, self.family) * self.scale)
        self.current = max(self.current, self.floor, round_up(prompt + request.max_tokens))
        return min(self.current, self.trained) if self.trained else self.current

    def observe(self, request: ChatRequest, sent: int, prompt_eval_count: int) -> bool:
        """Learn from a response's ``prompt_eval_count``; True when it shows the prompt was cut to fit ``sent``.

        A prompt served partly from Ollama's cache reports fewer tokens, so small counts teach nothing.
        """
        window = min(sent, self.trained) if self.trained else sent
        if prompt_eval_count >= window - CUT_SLACK_TOKENS:
            if self.override is None:  # the prompt is longer than thought: grow for the questions to come
                self.current = max(self.current, round_up(2 * window))
            return True
        estimate = estimate_prompt_tokens(request, self.family)
        self.scale = max(self.scale, prompt_eval_count / estimate)
        return False


class ContextWindowWarning(UserWarning):
    """A prompt was cut to fit the model's context: the answer is a guess."""
