"""GeoRanker as a reranking strategy, on a tiny random Qwen2-VL run through the real transformers and peft code.

No network, no GPU. A "trained" adapter is made by setting a tiny model's LoRA B and value head to seeded noise
and writing it by hand in GeoRanker's format: its published adapter_config.json and its tensor names
(transformers 4.5x-dev layout: ``base_model.model.model.layers.N...``, ``base_model.model.value_head.weight``).
"""

from __future__ import annotations

import asyncio
import threading
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file, save_file

from conftest import TINY_CLIP, run_cli
from geoagent.agent.controller import GeoAgent
from geoagent.config import RankerConfig, load_config
from geoagent.errors import ConfigError, WeightsError
from geoagent.output import print_result
from geoagent.ranker.model import RankItem, RewardModel, read_adapter_config
from geoagent.ranker.service import Ranker
from geoagent.ranker.weights import resolve_base_model
from geoagent.types import Candidate, LocateResult, Trace

pytest_plugins = ("engine.fixtures",)

PUBLISHED_CONFIG = Path(__file__).parent / "data" / "georanker-adapter_config.json"
MAX_SIDE = 112  # 4x4 blocks of 28 pixels: a handful of image tokens per photo
#: Every tensor name GeoRanker's adapter stores: LoRA on the text layers' q/k/v, and the value head.
GEORANKER_NAME = re.compile(
    r"^base_model\.model\.model\.layers\.\d+\.self_attn\.[qkv]_proj\.lora_[AB]\.weight$|^base_model\.model\.value_head\.weight$"
)


def load(folder: Path, adapter: Path | None = None, seed: int = 0) -> RewardModel:
    return RewardModel.load(folder, adapter, device="cpu", dtype="float32", max_side=MAX_SIDE, seed=seed)


def picture(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")


ITEMS = [
    RankItem(picture(0), 48.8566, 2.3522, picture(1)),
    RankItem(picture(0), -33.8688, 151.2093, picture(2)),
    RankItem(picture(0), 35.6762, 139.6503, None),  # a candidate without a photo: query and coordinates alone
]


@dataclass
class Trained:
    source: RewardModel  # the model the adapter was written from
    adapter: Path  # written by hand in GeoRanker's format
    names: set[str]


@pytest.fixture(scope="module")
def trained(tiny_qwen2vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    source = load(tiny_qwen2vl)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in source.model.named_parameters():
            if "lora_B" in name or "value_head" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    # GeoRanker's names, spelled out here (not by the code under test): transformers 4.5x-dev had no language_model.
    tensors = {
        re.sub(r"^base_model\.model\.model\.language_model\.", "base_model.model.model.", name): tensor.contiguous()
        for name, tensor in get_peft_model_state_dict(source.model).items()
    }
    folder = tmp_path_factory.mktemp("georanker") / "checkpoints"
    folder.mkdir()
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    shutil.copy(PUBLISHED_CONFIG, folder / "adapter_config.json")
    return Trained(source, folder, set(tensors))


def test_the_hand_written_adapter_has_georankers_tensor_names_only(trained):
    """Guards the fixture itself: LoRA on every text layer's q/k/v (A and B) plus the value head, nothing else."""
    assert trained.names and all(GEORANKER_NAME.match(name) for name in trained.names)
    assert sum(".lora_A." in name for name in trained.names) == sum(".lora_B." in name for name in trained.names) == 3 * 2
    assert "base_model.model.value_head.weight" in trained.names


def test_rewards_are_deterministic_for_a_seed(tiny_qwen2vl):
    """The same seed gives the same fresh model and rewards; another seed another value head and other rewards."""
    first, again, other = (load(tiny_qwen2vl, seed=seed).rewards_sync(ITEMS, 8) for seed in (0, 0, 1))
    assert first == again
    assert first != pytest.approx(other, abs=1e-6)


def test_an_adapter_in_georankers_names_loads_unchanged_and_reproduces_the_rewards(trained, tiny_qwen2vl):
    """Every LoRA tensor and the value head land on the model (peft alone would skip the 4.5x names silently)."""
    expected = trained.source.rewards_sync(ITEMS, 8)
    untrained = load(tiny_qwen2vl).rewards_sync(ITEMS, 8)
    assert expected != pytest.approx(untrained, abs=1e-3)  # the adapter matters, so a skipped tensor would show
    loaded = load(tiny_qwen2vl, trained.adapter, seed=7)  # another seed: nothing may come from initialisation
    assert loaded.rewards_sync(ITEMS, 8) == pytest.approx(expected, abs=1e-5)
    assert loaded.rewards_sync(ITEMS, 1) == pytest.approx(expected, abs=1e-5)  # batching (left padding) changes nothing


def test_a_saved_adapter_keeps_georankers_names_and_config_and_reloads_to_the_same_rewards(trained, tiny_qwen2vl, tmp_path):
    """What we save is what GeoRanker's tooling reads: the same tensor names, the published config's keys."""
    loaded = load(tiny_qwen2vl, trained.adapter)
    saved = loaded.save_adapter(tmp_path / "adapter")
    assert set(load_file(saved / "adapter_model.safetensors")) == trained.names
    config = json.loads((saved / "adapter_config.json").read_text())
    published = json.loads(PUBLISHED_CONFIG.read_text())
    assert set(config) <= set(published)
    assert {k: config[k] for k in ("r", "lora_alpha", "lora_dropout", "modules_to_save", "peft_type")} == {
        k: published[k] for k in ("r", "lora_alpha", "lora_dropout", "modules_to_save", "peft_type")
    }
    assert sorted(config["target_modules"]) == sorted(published["target_modules"])
    assert load(tiny_qwen2vl, saved).rewards_sync(ITEMS, 8) == pytest.approx(trained.source.rewards_sync(ITEMS, 8), abs=1e-5)


def test_an_adapter_whose_tensors_match_no_parameter_is_refused(trained, tiny_qwen2vl, tmp_path):
    """A foreign or renamed adapter fails with a line naming the file, instead of loading as if untrained."""
    foreign = shutil.copytree(trained.adapter, tmp_path / "foreign")
    tensors = load_file(foreign / "adapter_model.safetensors")
    tensors = {name.replace(".layers.", ".decoder_blocks."): tensor for name, tensor in tensors.items()}
    save_file(tensors, foreign / "adapter_model.safetensors")
    with pytest.raises(WeightsError, match=r"adapter_model\.safetensors: 12 tensors match no parameter"):
        load(tiny_qwen2vl, foreign)


def test_the_published_config_is_read_as_georankers_lora_recipe(tmp_path):
    """The loader accepts GeoRanker's adapter_config.json as published (auto_mapping, peft 0.15 fields)."""
    shutil.copy(PUBLISHED_CONFIG, tmp_path / "adapter_config.json")
    config = read_adapter_config(tmp_path)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.05)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj"}
    assert config.modules_to_save == ["value_head"]
    assert config.base_model_name_or_path == "Qwen/Qwen2-VL-7B-Instruct"


def test_a_hugging_face_base_model_neither_local_nor_cached_fails_fast_offline(tmp_path, monkeypatch):
    """Offline and not in the cache: one line saying what to do, before torch or transformers would load."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsError, match=r"Qwen/Qwen2-VL-7B-Instruct is not available \(huggingface.co is unreachable\).*huggingface-cli download"):
        resolve_base_model("Qwen/Qwen2-VL-7B-Instruct")
    with pytest.raises(ConfigError, match="no model folder at"):
        resolve_base_model(str(tmp_path / "nowhere"))


async def test_photos_in_flight_are_scored_in_one_pass_and_a_candidate_without_photo_is_said_so(trained, tiny_qwen2vl, world):
    """Photos that ask while the model is busy go through it together in the next pass; rewards are as if scored
    alone; votes follow them."""
    model = load(tiny_qwen2vl, trained.adapter)
    calls: list[int] = []
    busy, release = threading.Event(), threading.Event()
    scored_alone = model.rewards_sync

    def counting(items: list[RankItem], batch_size: int) -> list[float]:
        calls.append(len(items))
        if len(calls) == 1:  # the first pass holds the model until both photos have queued behind it
            busy.set()
            release.wait(timeout=60)
        return scored_alone(items, batch_size)

    model.rewards_sync = counting  # type: ignore[method-assign]
    ranker = Ranker(model, batch_size=4)
    refs = world.references[:3]
    pool = [Candidate(id=f"r{i}", lat=s.lat, lon=s.lon, source="index", image_path=str(s.path)) for i, s in enumerate(refs)]
    pool.append(Candidate(id="tokyo", lat=35.68, lon=139.65, source="gazetteer"))
    blocker = asyncio.create_task(ranker.votes(picture(9), pool[:1]))
    await asyncio.to_thread(busy.wait, 60)
    first_task = asyncio.create_task(ranker.votes(picture(10), pool))
    second_task = asyncio.create_task(ranker.votes(picture(11), pool[:2]))
    while len(ranker._queue) < 2:  # both photos' candidates are waiting for the model
        await asyncio.sleep(0.01)
    release.set()
    await blocker
    first, second = await first_task, await second_task
    assert calls == [1, len(pool) + 2]
    assert first.without_photo == ["tokyo"] and second.without_photo == []
    fitted = Image.open(refs[0].path).convert("RGB")
    fitted.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
    alone = scored_alone([RankItem(picture(10), 35.68, 139.65, None), RankItem(picture(10), refs[0].lat, refs[0].lon, fitted)], 1)
    assert [first.rewards["tokyo"], first.rewards["r0"]] == pytest.approx(alone, abs=1e-5)
    order = sorted(first.rewards, key=lambda cid: -first.rewards[cid])
    assert [first.votes[cid] for cid in order] == [1.0, 2 / 3, 1 / 3, 0.0]


def test_explain_lists_rewards_highest_first_and_says_which_had_no_photo():
    """--explain's reward table: every candidate's reward, and the photo-less one marked as such."""
    candidates = [Candidate(id="a.jpg", lat=1, lon=2, source="index", rank=1), Candidate(id="gaz", lat=3, lon=4, source="gazetteer", rank=2)]
    trace = Trace(strategy="georanker", rewards={"gaz": -0.25, "a.jpg": 1.5}, rewards_without_photo=["gaz"])
    result = LocateResult(image="q.jpg", lat=1, lon=2, country=None, place=None, confidence=1, candidates=candidates, trace=trace)
    console = Console(record=True, width=200)
    print_result(console, result, explain=True)
    text = console.export_text()
    assert "GeoRanker rewards" in text
    lines = [line for line in text.splitlines() if "1.5000" in line or "-0.2500" in line]
    assert len(lines) == 2 and "a.jpg" in lines[0] and "candidate photo" in lines[0] and "no candidate photo" not in lines[0]
    assert "gaz" in lines[1] and "no candidate photo" in lines[1]


def write_config(path: Path, world, tiny_qwen2vl: Path, adapter: Path | None) -> Path:
    """The test world with strategy georanker, votes-only fusion, no VLM questions at all."""
    adapter_line = f'adapter = "{adapter}"\n' if adapter is not None else ""
    path.write_text(
        f'[retrieval]\nclip_model = "{TINY_CLIP}"\nclip_pretrained = "none"\nindex = "{world.root / "index"}"\ntop_k = 6\n'
        '[agent]\nstrategy = "georanker"\ncountry_prior = false\nreasoning = false\nearly_exit = false\n'
        "fusion_votes = 1.0\nfusion_retrieval = 0.0\nfusion_prior = 0.0\nfusion_proximity = 0.0\nfusion_consensus = 0.0\n"
        f'[ranker]\nbase_model = "{tiny_qwen2vl}"\n{adapter_line}device = "cpu"\nbatch_size = 4\nmax_image_side = {MAX_SIDE}\n'
    )
    return path


def test_locate_with_georanker_orders_candidates_by_reward_and_explains_them(trained, tiny_qwen2vl, world, tmp_path):
    """`locate --strategy georanker --json --explain`: with votes-only fusion the ranking is the rewards' order."""
    config = write_config(tmp_path / "geoagent.toml", world, tiny_qwen2vl, trained.adapter)
    query = str(world.queries[0].path)
    done = run_cli("locate", query, "--config", str(config), "--strategy", "georanker", "--json", "--explain", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    rewards = result["trace"]["rewards"]
    ranked = [c["id"] for c in result["candidates"]]
    assert len(ranked) == 6 and set(rewards) == set(ranked)
    assert ranked == sorted(rewards, key=lambda cid: -rewards[cid])
    assert result["stats"]["stages"]["rerank"] == "ran" and result["stats"]["vlm_calls"] == 0
    assert [result["trace"]["fusion"][cid]["votes"] for cid in ranked] == pytest.approx([1 - r / 5 for r in range(6)], abs=1e-4)


async def test_preflight_checks_the_rankers_weights_not_a_vlm_backend(trained, tiny_qwen2vl, world_retriever, world, tmp_path):
    """No adapter: one clear line, exit 2; with it, the ranker loads and no backend is asked (none is running)."""
    settings = load_config(write_config(tmp_path / "geoagent.toml", world, tiny_qwen2vl, None))
    async with GeoAgent(settings, retriever=world_retriever) as agent:
        readiness = await agent.preflight()
    assert [(str(p), p.exit_code) for p in readiness.problems] == [
        ("ranker.adapter is not set: strategy 'georanker' needs a GeoRanker adapter folder (e.g. the checkpoints/ folder of "
         "github.com/Applied-Machine-Learning-Lab/GeoRanker, or one `geoagent ranker train` wrote)", 2)
    ]
    settings.ranker.adapter = trained.adapter
    async with GeoAgent(settings, retriever=world_retriever) as agent:
        readiness = await agent.preflight()
    assert readiness.problems == [] and readiness.warnings == []


async def test_without_the_extra_the_strategy_names_it(trained, tiny_qwen2vl, monkeypatch):
    """Without peft installed, the ranker says which extra to install (exit 2), not an ImportError."""
    monkeypatch.setitem(sys.modules, "peft", None)
    config = RankerConfig(base_model=str(tiny_qwen2vl), adapter=trained.adapter, device="cpu")
    with pytest.raises(ConfigError, match=r"needs the optional extra 'ranker' \(missing: peft\); pip install 'geoagent-vlm\[ranker\]'") as caught:
        await Ranker.load(config)
    assert caught.value.exit_code == 2


def test_the_weights_are_checked_before_torch_or_transformers_is_imported(tmp_path):
    """A missing adapter is reported by a process that never imported the heavy libraries: fast, whatever the model."""
    code = (
        "import sys\n"
        "from geoagent.config import RankerConfig\n"
        "from geoagent.ranker.service import shared_model\n"
        "try:\n"
        f"    shared_model(RankerConfig(adapter={str(tmp_path / 'none')!r}))\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.stdout.splitlines() == [f"ConfigError ranker.adapter: no adapter folder at {tmp_path / 'none'}", "[]"], done.stderr


def test_the_ranker_section_is_validated_when_read(tmp_path):
    """Bad [ranker] values are caught by the configuration, cheaply (no model is touched)."""
    assert RankerConfig(adapter="~/georanker").adapter == Path("~/georanker").expanduser()
    with pytest.raises(ValueError, match="dtype"):
        RankerConfig(dtype="float16")
    with pytest.raises(ValueError, match="base_model"):
        RankerConfig(base_model="  ")
