"""geoagent batch --engine ray on a local Ray instance (started once for the module, joined through RAY_ADDRESS):
the local engine's predictions, and a profile's max_concurrency held across workers at the stand-in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from conftest import run_cli, write_world_config
from test_batch import journal, path_list, prediction
from test_packaging import run_cli_without
from standin import StandinConfig, WorldJudge

RAY_CPUS = 2
AGENT = {"strategy": "tournament", "country_prior": True, "reasoning": True}


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local Ray instance for the module's batches to join (starting one per batch would cost seconds each)."""
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def ray_batch(listing: Path, out: Path, config: Path, address: str, workers: int, cwd: Path):
    env = {"RAY_ADDRESS": address, "GEOAGENT_RAY_WORKERS": str(workers)}
    return run_cli("batch", str(listing), "--out", str(out), "--config", str(config), "--engine", "ray", cwd=cwd, env=env)


def test_the_ray_engine_gives_the_local_engines_predictions_and_holds_each_servers_slots(world, standin, ray_address, tmp_path):
    """The same photos (a photo that cannot be opened among them) through --engine local, against one stand-in,
    and through --engine ray (two workers, embedding by ray.data) against a profile over two stand-ins
    (base_url = [a, b], max_concurrency = 2: 2 slots each; each worker's own client holds 2 per server, so the
    two together could hold 4), each run with its own cache: the same journal, prediction for prediction, and
    the same questions, asked once each. Each server's limit is held cluster-wide: neither stand-in ever holds
    more than 2 requests at once, both reach 2 (the slots are used), and both answer part of the run."""
    local_server = standin(judge=WorldJudge(world.truth))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    listing = path_list(tmp_path / "photos.txt", [*(q.path for q in world.queries[::5][:8]), broken])
    local_config = write_world_config(tmp_path / "local.toml", world, local_server, tmp_path / "local-cache", **AGENT)
    local = run_cli("batch", str(listing), "--out", str(tmp_path / "local.jsonl"), "--config", str(local_config), cwd=tmp_path)
    assert local.returncode == 1, local.stderr  # the broken photo

    servers = [standin(judge=WorldJudge(world.truth), config=StandinConfig(latency_s=0.05)) for _ in range(2)]
    backend = {"base_url": [s.url for s in servers], "max_concurrency": 2}
    config = write_world_config(tmp_path / "ray.toml", world, servers[0], tmp_path / "ray-cache", backend=backend, **AGENT)
    proc = ray_batch(listing, tmp_path / "ray.jsonl", config, ray_address, 2, tmp_path)
    assert proc.returncode == 1 and f"{broken}: not an image" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    ray_entries = journal(tmp_path / "ray.jsonl")
    assert sorted(map(prediction, ray_entries)) == sorted(map(prediction, journal(tmp_path / "local.jsonl")))
    assert sum(len(s.chat_requests()) for s in servers) == len(local_server.chat_requests())  # the same questions, once each
    assert [s.max_busy for s in servers] == [2, 2] and all(s.chat_requests() for s in servers)


def test_the_ray_engine_without_the_ray_extra_says_how_to_install_it(world, tmp_path):
    """No ray installed: one line naming `pip install 'geoagent-vlm[ray]'`, exit 2, no journal started."""
    proc = run_cli_without("ray", "batch", str(world.root / "queries"), "--out", str(tmp_path / "r.jsonl"), "--engine", "ray", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: --engine ray needs the ray extra: pip install 'geoagent-vlm[ray]'"
    ]
    assert "Traceback" not in proc.stderr and not (tmp_path / "r.jsonl").exists()


def test_a_worker_count_that_is_not_a_number_is_one_clear_line(monkeypatch):
    """GEOAGENT_RAY_WORKERS=two names the variable and the value; unset, it is one worker per cluster CPU."""
    from geoagent.batch.engines.ray import worker_count
    from geoagent.errors import ConfigError

    monkeypatch.setenv("GEOAGENT_RAY_WORKERS", "two")
    with pytest.raises(ConfigError, match=r"^GEOAGENT_RAY_WORKERS='two': not a whole number of workers \(1 or more\)$"):
        worker_count({"CPU": 4.0})
    monkeypatch.setenv("GEOAGENT_RAY_WORKERS", "0")
    with pytest.raises(ConfigError, match="not a whole number"):
        worker_count({"CPU": 4.0})
    monkeypatch.delenv("GEOAGENT_RAY_WORKERS")
    assert worker_count({"CPU": 4.0}) == 4


def test_a_retriever_with_a_deferred_embedder_searches_given_vectors_without_loading_a_model(world, tmp_path):
    """What the Ray batch workers use (their photos come embedded by ray.data): the index is opened and checked
    against the configured embedder's spec, no CLIP model is loaded until a photo must be embedded here, and
    then it is, giving the eager retriever's vector. A mismatched embedder still fails at load."""
    import asyncio

    import numpy as np

    from conftest import TINY_CLIP, world_retrieval_config
    from geoagent.config import RetrievalConfig
    from geoagent.images import open_image
    from geoagent.retrieval.index import IndexMismatchError
    from geoagent.retrieval.retriever import Retriever

    config = RetrievalConfig(**world_retrieval_config(world))
    lazy = Retriever.load_sync(config, defer_embedder=True)
    eager = Retriever.load_sync(config)
    assert lazy._embedder is None
    vector = np.asarray(eager.table.vectors[3])
    assert [c.id for c in lazy.search_sync(vector, 5)] == [c.id for c in eager.search_sync(vector, 5)]
    assert lazy._embedder is None  # searching by vector loaded nothing

    image = open_image(world.queries[0].path)
    assert np.allclose(asyncio.run(lazy.embed(image)), asyncio.run(eager.embed(image)), atol=1e-6)
    assert lazy._embedder is not None

    other = RetrievalConfig(clip_model=TINY_CLIP, clip_pretrained="none", seed=1, index=config.index)
    with pytest.raises(IndexMismatchError, match="built with embedder"):
        Retriever.load_sync(other, defer_embedder=True)


# --- index build --engine ray ------------------------------------------------------------------------------


def test_index_build_on_ray_writes_the_index_the_local_build_writes(world, ray_address, tmp_path):
    """`index build --engine ray` (ray.data reading the gallery, two CLIP actors, a photo that cannot be opened
    among the references) against the local build of the same CSV: the same rows (ids, paths, coordinates,
    countries, places, clusters), vectors allclose, the same neighbours for every query, and the broken photo
    reported skipped in the same words."""
    import numpy as np

    from conftest import TINY_CLIP
    from geoagent.retrieval.index import ReferenceIndex

    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    gallery = tmp_path / "gallery.csv"
    rows = [f"{s.path},{s.lat},{s.lon}" for s in world.references]
    gallery.write_text("path,lat,lon\n" + "\n".join([*rows[:40], "broken.jpg,10.0,20.0", *rows[40:]]) + "\n")
    config = tmp_path / "g.toml"
    config.write_text(f'[retrieval]\nclip_model = "{TINY_CLIP}"\nclip_pretrained = "none"\nbatch_size = 16\n')

    def build(engine: str, env: dict[str, str] | None = None):
        out = tmp_path / engine
        proc = run_cli("index", "build", str(gallery), "--out", str(out), "--config", str(config), "--engine", engine, cwd=tmp_path, env=env)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        return ReferenceIndex.open(out), proc.stdout.replace(str(out), "OUT").splitlines()

    local, local_said = build("local")
    on_ray, ray_said = build("ray", {"RAY_ADDRESS": ray_address, "GEOAGENT_RAY_EMBEDDERS": "2"})
    assert ray_said == local_said and "  skipped broken.jpg: not an image (or a format Pillow cannot read)" in local_said
    assert local_said[0] == f"indexed {len(world.references)} photos into OUT ({len(world.references)} embedded, 0 reused; flat), skipped 1"
    assert on_ray.manifest.count == local.manifest.count == len(world.references)
    assert on_ray.manifest.embedder == local.manifest.embedder
    assert list(on_ray.entries) == list(local.entries)
    assert np.array_equal(on_ray.rows[["lat", "lon", "cluster", "country", "key"]], local.rows[["lat", "lon", "cluster", "country", "key"]])
    assert np.allclose(on_ray.table.vectors, local.table.vectors, atol=1e-6)
    queries = np.asarray(local.table.vectors[::7]) + 0.05
    for query in queries / np.linalg.norm(queries, axis=1, keepdims=True):
        assert on_ray.table.search(query, 5)[0].tolist() == local.table.search(query, 5)[0].tolist()


def test_the_ray_index_build_holds_the_gpus_or_leaves_a_cpu_for_reading(monkeypatch):
    """One CLIP actor per GPU when the cluster has GPUs; without, CPUS_PER_EMBEDDER CPUs each, one CPU left to
    ray.data's readers (a pool holding every CPU starves them and the build hangs); GEOAGENT_RAY_EMBEDDERS
    sets the count, sharing the same resources out."""
    from geoagent.retrieval.ray_build import embedder_pool

    monkeypatch.delenv("GEOAGENT_RAY_EMBEDDERS", raising=False)
    assert embedder_pool({"CPU": 32.0, "GPU": 4.0}) == (4, {"num_gpus": 1})
    assert embedder_pool({"CPU": 17.0}) == (4, {"num_cpus": 4.0})
    assert embedder_pool({"CPU": 2.0}) == (1, {"num_cpus": 1.0})
    monkeypatch.setenv("GEOAGENT_RAY_EMBEDDERS", "8")
    assert embedder_pool({"CPU": 32.0, "GPU": 4.0}) == (8, {"num_gpus": 0.5})
    assert embedder_pool({"CPU": 2.0}) == (8, {"num_cpus": 0.125})


def test_index_build_with_an_unknown_engine_names_the_ones_there_are(world, tmp_path):
    proc = run_cli("index", "build", str(world.references_csv), "--out", str(tmp_path / "i"), "--engine", "spark", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --engine: no engine 'spark' (available: local, ray)", proc.stderr
    assert not (tmp_path / "i").exists()


def test_a_ray_build_embeds_a_few_open_images_as_the_local_model_does(world, ray_address):
    """What a build measures after embedding (main's near-duplicate calibration: copies of a sample) goes
    through the PhotoEmbedding too: on Ray, one task with the model gives the local model's vectors."""
    import numpy as np

    from conftest import world_retrieval_config
    from geoagent.config import RetrievalConfig
    from geoagent.images import open_image
    from geoagent.retrieval.embedder import Embedder
    from geoagent.retrieval.ray_build import RayEmbedding

    config = RetrievalConfig(**world_retrieval_config(world))
    images = [open_image(q.path) for q in world.queries[:5]]
    assert np.allclose(RayEmbedding(config).embed_images_sync(images), Embedder.load(config).embed_images_sync(images), atol=1e-6)
