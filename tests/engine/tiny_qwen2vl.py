"""A tiny random-weight Qwen2-VL built locally, with no hub download: config, weights, tokenizer, processor.

The weights are noise, but everything around them is the real thing: Qwen2-VL's model class, its image processor
(resize to multiples of 28 pixels, one token per 28x28 block), its chat template and its special tokens. So a
server that loads the folder behaves as it would with the real model, except that the answers are garbage.

Used by the engine tests (served by ``transformers serve``) and meant for GeoRanker's tests too:
``build_tiny_qwen2vl(folder, seed=0)`` writes a folder that ``from_pretrained`` and ``AutoProcessor`` load.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Qwen2-VL's chat template, as shipped with Qwen/Qwen2-VL-*-Instruct: one vision block per image, in order.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: The special tokens Qwen2-VL's template, processor and config name, in Qwen's order.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Text the byte-level BPE is trained on: enough to give it a few hundred merges of the words prompts use.
TRAINING_TEXT = (
    "Where was this photo taken? Answer with one JSON object and nothing else.",
    "Which of the two candidate places, A or B, matches the query photo better?",
    "The country, the region, the city, the street, the coast, the mountains, the desert, the forest.",
    '{"winner": "A", "confidence": 0.7, "reason": "the road signs and the vegetation"}',
    '{"country": "France", "probability": 0.4}, {"lat": 48.85, "lon": 2.35}',
    "You are a helpful assistant. Look at the images in order: the query first, then A, then B.",
)

#: Sizes: small enough to load and answer in well under a second on a laptop CPU, real enough to run.
TEXT_HIDDEN = 64
TEXT_LAYERS = 2
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
VISION_EMBED = 32
VISION_DEPTH = 2
VISION_HEADS = 4
VOCAB_TRAINED = 400

#: Qwen2-VL's image geometry: 14-pixel patches merged 2x2, so one language token per 28x28 pixels.
PATCH_SIZE = 14
MERGE_SIZE = 2
TOKEN_PIXELS = PATCH_SIZE * MERGE_SIZE
#: Qwen2-VL's own defaults (4 to 1280 image tokens): the engine counts image tokens as the real model does.
MIN_PIXELS = 56 * 56
MAX_PIXELS = TOKEN_PIXELS * TOKEN_PIXELS * 1280


def _train_tokenizer():
    """A byte-level BPE with Qwen2's pre-tokenizer, trained on a few sentences; specials first, as in Qwen."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TRAINED,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 4, trainer=trainer)
    return tokenizer


def build_tiny_qwen2vl(
    folder: Path | str, seed: int = 0, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> Path:
    """Write a tiny random-weight Qwen2-VL (weights, config, tokenizer, processor, chat template) to ``folder``.

    Deterministic for a seed; needs no network. Returns ``folder``, loadable with
    ``Qwen2VLForConditionalGeneration.from_pretrained`` / ``AutoProcessor.from_pretrained`` or servable with
    ``transformers serve``.
    """
    import torch
    from transformers import (
        Qwen2Tokenizer,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    trained = json.loads(_train_tokenizer().to_str())
    vocab: dict[str, int] = trained["model"]["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=32768,
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    image_processor = Qwen2VLImageProcessor(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=PATCH_SIZE, merge_size=MERGE_SIZE
    )
    video_processor = Qwen2VLVideoProcessor(patch_size=PATCH_SIZE, merge_size=MERGE_SIZE)
    processor = Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, chat_template=CHAT_TEMPLATE
    )

    head_dim = TEXT_HIDDEN // TEXT_HEADS
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 2 * TEXT_HIDDEN,
            "num_hidden_layers": TEXT_LAYERS,
            "num_attention_heads": TEXT_HEADS,
            "num_key_value_heads": TEXT_KV_HEADS,
            "max_position_embeddings": 32768,
            # mrope splits each head's rotary half into (time, height, width) sections, as Qwen2-VL does.
            "rope_parameters": {"rope_type": "default", "mrope_section": _mrope_section(head_dim // 2),
                                "rope_theta": 1000000.0},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": VISION_DEPTH,
            "embed_dim": VISION_EMBED,
            "hidden_size": TEXT_HIDDEN,
            "num_heads": VISION_HEADS,
            "mlp_ratio": 2,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _mrope_section(half_head_dim: int) -> list[int]:
    """(time, height, width) sizes summing to half a head, in Qwen2-VL's proportions (16, 24, 24 of 64)."""
    time = half_head_dim // 4
    height = (half_head_dim - time) // 2
    return [time, height, half_head_dim - time - height]


#: Larger than any max_tokens a test asks for: the end-of-answer token is never allowed, so every answer is
#: exactly max_tokens long and takes as long as the caller asks.
NEVER_STOP = 1_000_000


def copy_answering_at_length(source: Path | str, folder: Path | str) -> Path:
    """A copy of a built model whose answers always run to ``max_tokens`` (``min_new_tokens`` in its generation
    config), so a test can make a request last as long as it needs, e.g. to kill the engine in the middle of one."""
    import shutil

    from transformers import GenerationConfig

    folder = Path(folder)
    shutil.copytree(source, folder, dirs_exist_ok=True)
    generation = GenerationConfig.from_pretrained(folder)
    generation.min_new_tokens = NEVER_STOP
    generation.save_pretrained(folder)
    return folder
