"""Embedding photos on a Ray cluster (``RAY_ADDRESS``, else a local instance), for ``index build --engine ray``
and ``batch --engine ray``.

``ray.data`` maps :class:`ClipEmbedder`, an actor holding the CLIP model (one GPU each when the cluster has
GPUs), over batches of photo paths. For an index build, :class:`RayEmbedding` reads the build's list of photos
to embed with ``ray.data``, keeps their order, and hands the vectors back to the driver (this process), which
writes the index exactly as a local build does (:func:`geoagent.retrieval.index.build_index`): the same files.
Ray is imported here only; importing this module without the ray extra is a ConfigError saying how to get it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from geoagent import errors
from geoagent.config import RetrievalConfig
from geoagent.errors import ConfigError, GeoAgentError, InputError
from geoagent.retrieval.embedder import embedder_spec
from geoagent.retrieval.index import unreadable_reason

if TYPE_CHECKING:
    from PIL import Image

try:
    import ray
    import ray.data
except ImportError:  # pragma: no cover - the floors job runs without the extra
    raise ConfigError("--engine ray needs the ray extra: pip install 'geoagent-vlm[ray]'") from None

EMBEDDERS_ENV = "GEOAGENT_RAY_EMBEDDERS"  # how many CLIP actors an index build starts (default: embedder_pool's)
CPUS_PER_EMBEDDER = 4  # CPUs (torch threads: Ray sets OMP_NUM_THREADS) of one CLIP actor on a cluster without GPUs
NODE_ID_LABEL = "ray.io/node-id"  # every node's label: the listing is read where it lies, on the driver's node
READER_CPUS = 1  # left to ray.data's read tasks: a pool holding every CPU would starve them (and hang)


def connect() -> None:
    """Join the cluster at ``RAY_ADDRESS``, or start a local instance on this machine's CPUs."""
    if ray.is_initialized():
        return
    quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}  # stderr is the progress bar's
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
    else:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, **quiet)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def count_from_env(name: str, default: int) -> int:
    """A whole number of actors (1 or more) from the variable ``name``, else ``default``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{name}={raw!r}: not a whole number of workers (1 or more)")
    return int(raw)


def embedder_pool(resources: dict[str, float]) -> tuple[int, dict[str, float]]:
    """How many CLIP actors an index build starts on a cluster with ``resources``, and what each holds: the
    GPUs shared out (one each by default), else the CPUs but ``READER_CPUS`` (``CPUS_PER_EMBEDDER`` each by
    default); ``GEOAGENT_RAY_EMBEDDERS`` sets the count."""
    gpus = int(resources.get("GPU", 0))
    if gpus:
        count = count_from_env(EMBEDDERS_ENV, gpus)
        return count, {"num_gpus": min(1.0, gpus / count)}
    cpus = max(1.0, resources.get("CPU", 1) - READER_CPUS)
    count = count_from_env(EMBEDDERS_ENV, max(1, int(cpus // CPUS_PER_EMBEDDER)))
    return count, {"num_cpus": cpus / count}


class ClipEmbedder:
    """The ``map_batches`` actor: opens a batch of photos (column ``path``) and embeds them with the configured
    CLIP model. A photo that cannot be opened gets ``embedded = False`` and its ``problem``."""

    def __init__(self, retrieval: RetrievalConfig) -> None:
        from geoagent.retrieval.embedder import Embedder

        self.embedder = Embedder.load(retrieval)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from geoagent.images import open_image

        images, problems = [], []
        for path in batch["path"]:
            try:
                images.append(open_image(str(path)))
                problems.append("")
            except InputError as exc:
                problems.append(unreadable_reason(exc))
        embedded = np.array([not problem for problem in problems], bool)
        out = np.zeros((len(problems), self.embedder.dim), np.float32)
        if images:
            out[embedded] = self.embedder.embed_images_sync(images, len(images))
        return {"path": batch["path"], "vector": out, "embedded": embedded, "problem": np.array(problems, dtype=object)}


def _paths(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Lines of a build's listing (JSON strings) as photo paths."""
    return {"path": np.array([json.loads(line) for line in batch["text"]], dtype=object)}


class RayEmbedding:
    """A :class:`~geoagent.retrieval.index.PhotoEmbedding` on Ray: the driver loads no model; ``ray.data``
    reads the listing (on the driver's node, where it lies: in the index's staging folder) and the CLIP
    actors embed it in batches, streamed back in the listing's order (bounded memory, whatever the size)."""

    def __init__(self, retrieval: RetrievalConfig) -> None:
        self.retrieval = retrieval
        self.spec = embedder_spec(retrieval)
        connect()
        self.actors, self.each = embedder_pool(ray.cluster_resources())

    def embed_listed(self, listing: Path, batch_size: int) -> Iterator[np.ndarray | str]:
        here = {NODE_ID_LABEL: ray.get_runtime_context().get_node_id()}
        dataset = (
            ray.data.read_text(str(listing.resolve()), label_selector=here)
            .map_batches(_paths, batch_format="numpy")
            .map_batches(
                ClipEmbedder,
                fn_constructor_kwargs={"retrieval": self.retrieval},
                batch_size=batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=self.actors),
                **self.each,
            )
        )
        dataset.context.execution_options.preserve_order = True  # rows come back in the listing's order
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                for vector, embedded, problem in zip(batch["vector"], batch["embedded"], batch["problem"]):
                    yield vector if embedded else str(problem)
        except ray.exceptions.RayError as exc:
            raise ray_error(exc) from None

    def embed_images_sync(self, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        """A few open images embedded by one Ray task holding the model (the driver loads none)."""
        try:
            return np.asarray(ray.get(_embed_images.options(**self.each).remote(self.retrieval, images, batch_size)))
        except ray.exceptions.RayError as exc:
            raise ray_error(exc) from None


@ray.remote
def _embed_images(retrieval: RetrievalConfig, images: list[Image.Image], batch_size: int) -> np.ndarray:
    from geoagent.retrieval.embedder import Embedder

    return Embedder.load(retrieval).embed_images_sync(images, batch_size)


#: How a Ray error's text names the exception an actor or task raised: ``geoagent.errors.WeightsError: ...``.
_RAISED = re.compile(r"^(?:geoagent\.errors\.)?(?P<kind>\w+Error): (?P<message>.+)$", re.MULTILINE)


def ray_error(exc: ray.exceptions.RayError) -> GeoAgentError:
    """A failed Ray actor or task as one line: the GeoAgent error it raised (missing weights, ...), found in
    the error's text (an actor that died in its constructor keeps no exception object), else its first line."""
    for match in _RAISED.finditer(str(exc)):
        kind = getattr(errors, match["kind"], None)
        if isinstance(kind, type) and issubclass(kind, GeoAgentError):
            return kind(match["message"].strip())
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ConfigError(f"a Ray actor failed: {first}")
