"""geoagent batch --engine ray on a two-node Ray cluster on this machine (ray.cluster_utils: a head and a second
raylet, each started in its own working folder, which its workers inherit): every worker's preflight is heard,
an SQLite cache is refused across nodes, a Redis cache is shared by the workers of two runs."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from conftest import run_cli, start_cli, write_world_config
from redisd import RedisServer
from standin import StandinConfig, WorldJudge
from test_batch import journal, path_list, prediction
from test_cache import answer_keys, error_lines, requests_and_hits, with_cache

AGENT = {"strategy": "tournament", "country_prior": True, "reasoning": False}


@dataclass
class TwoNodes:
    address: str
    head: str  # node ids
    second: str
    head_dir: Path  # each node's working folder (its workers' too)
    second_dir: Path


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    """Two Ray nodes of one CPU each; the head started in one folder, the second node in another."""
    root = tmp_path_factory.mktemp("nodes")
    head_dir, second_dir = root / "head", root / "second"
    head_dir.mkdir()
    second_dir.mkdir()
    here = os.getcwd()
    try:
        os.chdir(head_dir)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        os.chdir(second_dir)
        second = cluster.add_node(num_cpus=1)
    finally:
        os.chdir(here)
    cluster.wait_for_nodes()
    try:
        yield TwoNodes(cluster.address, cluster.head_node.node_id, second.node_id, head_dir, second_dir)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def ray_batch(listing: Path, out: Path, config: Path, nodes: TwoNodes, *flags: str, workers: int = 2):
    env = {"RAY_ADDRESS": nodes.address, "GEOAGENT_RAY_WORKERS": str(workers)}
    return run_cli("batch", str(listing), "--out", str(out), "--config", str(config), "--engine", "ray", *flags, cwd=nodes.head_dir, env=env)


def test_a_worker_that_cannot_read_the_index_is_named_and_no_photo_is_tried(world, standin, two_nodes, tmp_path):
    """Must show: the index is `idx`, a path that exists on the head node's folder only (as a node without the
    shared mount): the preflight's one error line names the second node's worker, none names the head's, the
    run fails, and no photo is tried (no model request, an empty journal)."""
    server = standin(judge=WorldJudge(world.truth))
    (two_nodes.head_dir / "idx").symlink_to(world.root / "index")
    config = write_world_config(tmp_path / "g.toml", world, server, tmp_path / "cache", **AGENT)
    config.write_text(config.read_text().replace(f'index = "{world.root / "index"}"', 'index = "idx"'))
    listing = path_list(tmp_path / "photos.txt", [q.path for q in world.queries[:4]])
    out = tmp_path / "r.jsonl"
    proc = ray_batch(listing, out, config, two_nodes, "--no-cache")
    assert proc.returncode != 0, proc.stderr  # the index problem's own exit code, as on one machine
    [line] = error_lines(proc)
    assert line.startswith("error: worker") and " of 2 (node " in line and f"(node {two_nodes.second[:12]} at " in line, line
    assert two_nodes.head[:12] not in line and "idx" in line, line
    assert server.chat_requests() == []
    assert not out.exists() or journal(out) == []


def test_an_sqlite_cache_across_nodes_is_refused_and_a_redis_cache_is_shared_by_two_runs(world, standin, two_nodes, tmp_path):
    """On two nodes the default SQLite cache is refused in one line naming both nodes and `[cache] url` (exit
    2, no request). Must show: with `[cache] url` on a Redis server, a Ray run (two workers, one per node),
    then another into another folder: the second sends 0 model requests and writes identical predictions."""
    server = standin(judge=WorldJudge(world.truth))
    config = write_world_config(tmp_path / "g.toml", world, server, tmp_path / "cache", **AGENT)
    listing = path_list(tmp_path / "photos.txt", [q.path for q in world.queries[2::6][:4]])
    refused = ray_batch(listing, tmp_path / "refused.jsonl", config, two_nodes)
    assert refused.returncode == 2, refused.stderr
    [line] = error_lines(refused)
    assert line.startswith(f"error: the SQLite cache {tmp_path / 'cache'} is not one file on every node: this run's workers are on 2 nodes ("), line
    assert two_nodes.head[:12] in line and two_nodes.second[:12] in line and '[cache] url = "redis://' in line, line
    assert server.chat_requests() == []

    redis_server = RedisServer(tmp_path / "redis").start()
    try:
        with_cache(config, url=redis_server.url)
        outs = [tmp_path / "one" / "r.jsonl", tmp_path / "two" / "r.jsonl"]
        runs = []
        for out in outs:
            out.parent.mkdir()
            runs.append(ray_batch(listing, out, config, two_nodes))
            assert runs[-1].returncode == 0, runs[-1].stderr
            if len(runs) == 1:
                sent = len(server.chat_requests())
        assert sent > 0 and len(server.chat_requests()) == sent
        requests, hits = requests_and_hits(runs[1].stderr)
        assert requests == 0 and hits > 0
        assert len(journal(outs[1])) == 4
        assert sorted(map(prediction, journal(outs[1]))) == sorted(map(prediction, journal(outs[0])))
    finally:
        redis_server.kill()


# --- the merge of worker reports (no cluster needed) -----------------------------------------------------


def test_worker_reports_are_merged_once_each_naming_the_workers_that_found_them():
    """Three workers: a problem all found is reported as it is; one only worker 3 found names worker 3 and its
    node; a warning two found names both; an SQLite cache on NFS for worker 2 is refused naming it."""
    from geoagent.agent.controller import Readiness
    from geoagent.batch.engines.ray import WorkerReport, merge_reports
    from geoagent.config import Settings
    from geoagent.errors import ConfigError, InputError

    def report(node: str, problems: list, warnings: list[str], fs: str = "ext4") -> WorkerReport:
        return WorkerReport(Readiness(problems=problems, warnings=warnings), node, "10.0.0." + node[-1], fs)

    shared = ConfigError("backend 'sim': no model 'x'")
    reports = [
        report("a" * 32 + "1", [shared], ["slow disk"]),
        report("b" * 32 + "2", [ConfigError(str(shared))], ["slow disk"], fs="nfs4"),
        report("b" * 32 + "2", [ConfigError(str(shared)), InputError("idx: no index here")], []),
    ]
    merged = merge_reports(reports, Settings())
    assert [str(p) for p in merged.problems] == [
        "backend 'sim': no model 'x'",
        f"worker 3 of 3 (node {'b' * 12} at 10.0.0.2): idx: no index here",
        f"the SQLite cache cache is on a network filesystem (nfs4) for worker 2 of 3 (node {'b' * 12} at 10.0.0.2), "
        'where SQLite\'s locking does not hold; set [cache] url = "redis://HOST:6379/0" to a Redis server every node '
        "reaches (or run without --engine ray)",
    ]
    assert isinstance(merged.problems[1], InputError)  # the kind (and so the exit code) is kept
    assert merged.warnings == [f"workers 1, 2 of 3 (node {'a' * 12} at 10.0.0.1; node {'b' * 12} at 10.0.0.2): slow disk"]
    assert merge_reports(reports, Settings(cache={"url": "redis://127.0.0.1:1/0"})).problems[2:] == []  # Redis: no SQLite refusal


def test_the_filesystem_of_a_cache_folder_is_read_from_the_mount_table(tmp_path):
    """The longest mount point above the folder (or its nearest existing parent) gives the type; an escaped
    space in a mount point is read as a space."""
    from geoagent.vlm.cache.sqlite import filesystem_type

    shared = tmp_path / "my share"
    shared.mkdir()
    mounts = "\n".join([
        "overlay / overlay rw 0 0",
        f"{tmp_path} {tmp_path} ext4 rw 0 0",
        f"{str(shared).replace(' ', chr(92) + '040')} {str(shared).replace(' ', chr(92) + '040')} nfs4 rw 0 0",
    ])
    assert filesystem_type(shared / "cache" / "not-yet", mounts) == "nfs4"
    assert filesystem_type(tmp_path / "cache", mounts) == "ext4"
    assert filesystem_type(Path("/usr"), mounts) == "overlay"


def test_redis_lost_mid_run_on_ray_is_said_once_by_the_driver(world, standin, two_nodes, tmp_path):
    """The workers' own output never reaches the user: when the shared Redis dies mid-run, the driver says once
    that caching stopped (one line, no traceback), and the run still locates every photo (exit 0)."""
    server = standin(judge=WorldJudge(world.truth), config=StandinConfig(latency_s=0.1))
    config = write_world_config(tmp_path / "g.toml", world, server, tmp_path / "cache", **AGENT)
    redis_server = RedisServer(tmp_path / "redis").start()
    try:
        with_cache(config, url=redis_server.url)
        listing = path_list(tmp_path / "photos.txt", [q.path for q in world.queries[1::4][:10]])
        out = tmp_path / "r.jsonl"
        env = {**os.environ, "RAY_ADDRESS": two_nodes.address, "GEOAGENT_RAY_WORKERS": "2"}
        proc = start_cli("batch", str(listing), "--out", str(out), "--config", str(config), "--engine", "ray",
                         cwd=two_nodes.head_dir, env=env, stdout=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.monotonic() + 300
        while len(answer_keys(redis_server)) < 5 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        redis_server.kill()
        _, stderr = proc.communicate(timeout=600)
    finally:
        redis_server.kill()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert len(journal(out)) == 10 and all("error" not in entry for entry in journal(out))
    said = [line for line in stderr.splitlines() if "caching stopped" in line]
    assert len(said) == 1 and said[0].startswith(f"warning: cache {redis_server.url}: "), stderr
