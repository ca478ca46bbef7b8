"""``captioner caption --ray``: the batch step of the data flow spread over a Ray cluster.

The stages of ``Captioner.stream``, each where it scales:

    file list (driver) -> decode + preprocess (Ray tasks on any CPU of the cluster: ``ImageFiles``, i.e.
    ``load_image`` + the checkpoint's ``Preprocess``) -> encode + decode captions (a pool of Ray actors, one
    model each, one GPU each when the cluster has GPUs) -> rows (driver: ``batch.caption_files``' own sink,
    so a Ray run writes the rows a local run writes and ``--resume`` skips the same done photos).

The driver writes each batch as it arrives, so a killed run loses at most the batches not yet written.
Every node reads the photos and the checkpoint at the driver's paths (relative ones are made absolute
first): a shared filesystem, or the same copy on every node. A bundled model's name (``fast``) resolves
on each node to its own installed copy. Ray is an optional extra (``pip install -e ".[ray]"``), imported
here only, and only when ``--ray`` is given.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch

from .api import MODELS, Captioner, ImageResult, bundled_checkpoints, resolve_model
from .decoding import DecodeConfig
from .encoder import Preprocess
from .errors import CaptionerError, ConfigError
from .features import ImageFiles
from .fetch import FetchConfig, is_url

if TYPE_CHECKING:
    import ray.data


@dataclass
class RayConfig:
    """Where and how wide a ``--ray`` run goes."""

    address: str = ""  # "": ray.init()'s own choice ($RAY_ADDRESS, a cluster started on this machine, else a new
    #                    local instance); "auto": a running cluster; "ray://HOST:10001": Ray Client; "HOST:6379"
    actors: int = 0  # model replicas; 0: one per GPU of the cluster, or (no GPUs) one per two CPUs, so that
    #                  the other half of the CPUs decode JPEGs


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError("--ray needs Ray on this machine and on the cluster: pip install 'captioner[ray]' "
                          "(or pip install -e \".[ray]\" in a source tree)") from None
    return ray


@contextlib.contextmanager
def connected(config: RayConfig):
    """Use the Ray connection this process already has (the tests' local instance), else open one from
    ``config.address`` and close it afterwards."""
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    _check_reachable(config.address)
    try:
        ray.init(address=config.address or None, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise ConfigError(f"--ray {config.address or '(local)'}: cannot connect to a Ray cluster "
                          f"({str(err).splitlines()[0][:300]})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail at once on a HOST:PORT (or ray://HOST:PORT) that nothing answers at. Why: Ray itself retries
    such an address for minutes (here: still waiting after 250 s on 127.0.0.1:1)."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit():
        return  # "" or "auto": Ray looks for a cluster itself and says so quickly when there is none
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as err:
        raise ConfigError(f"--ray {address}: nothing answers at {host}:{port} ({err}); start the cluster "
                          "(`ray start --head`) or check the address") from None


def _worker_checkpoint(checkpoint: str | None) -> str | None:
    """What each actor loads: the model the driver loads, as an absolute path (workers need not share the
    driver's cwd or environment: ``$CAPTIONER_CHECKPOINT``), except a bundled model asked for by name or by
    default, which every node resolves to its own installed copy."""
    path = resolve_model(checkpoint).resolve()
    if path.parent == bundled_checkpoints().resolve() and (checkpoint is None or checkpoint in MODELS):
        return checkpoint
    return str(path)


def _decode_images(batch: dict[str, np.ndarray], preprocess: Preprocess,
                   fetch: FetchConfig) -> dict[str, np.ndarray]:
    """Ray task: a batch of files -> (B, 3, H, W) float32 pixels and per-file errors ("" when usable).
    An unusable file keeps its row (zero pixels) so that it comes back as an error row."""
    files = [str(f) for f in batch["file"]]
    images = ImageFiles(files, preprocess, fetch=fetch)  # the one decode + preprocess of the batch command
    blank = np.zeros((3, preprocess.crop, preprocess.crop), np.float32)  # an unusable file's pixels
    pixels, errors = [], []
    for i, file in enumerate(files):
        _, image, error = images[i]
        pixels.append(blank if image is None else image.numpy())
        errors.append("" if error is None else error.removeprefix(f"{file}: "))
    return {"path": batch["path"], "pixels": np.stack(pixels), "error": np.array(errors, dtype=object)}


class _CaptionActor:
    """Ray actor: one model, loaded once; a batch of pixels -> each usable image's n-best as JSON."""

    def __init__(self, checkpoint: str | None, device: str, config: DecodeConfig, batch_size: int) -> None:
        self.captioner = Captioner.from_pretrained(checkpoint, device=device)
        self.config, self.batch_size = config, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        good = np.flatnonzero(batch["error"] == "")
        nbest = np.full(len(batch["error"]), "", dtype=object)
        if len(good):
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][good]))  # (G, 3, H, W)
            features = torch.cat([self.captioner.encode(chunk) for chunk in pixels.split(self.batch_size)])
            for row, hyps in zip(good, self.captioner.generate(features, self.config)):
                nbest[row] = json.dumps(hyps, ensure_ascii=False)
        return {"path": batch["path"], "error": batch["error"], "nbest": nbest}


def _cluster_size(ray) -> tuple[int, int]:
    """(CPUs, GPUs) of the cluster now."""
    resources = ray.cluster_resources()
    return max(1, int(resources.get("CPU", 1))), int(resources.get("GPU", 0))


def build_dataset(ray, local: Captioner, paths: Sequence[str], checkpoint: str | None, device: str,
                  config: DecodeConfig, ray_config: RayConfig, batch_size: int,
                  decode_batch: int) -> "ray.data.Dataset":
    """The lazy pipeline: rows of ``{"path", "error", "nbest"}`` (``nbest`` a JSON list, "" on error).
    ``local``: the driver's copy of the model, whose preprocessing and URL limits the workers use."""
    cpus, gpus = _cluster_size(ray)
    actors = ray_config.actors or gpus or max(1, cpus // 2)
    items = [{"path": str(p), "file": str(p) if is_url(p) else os.path.abspath(p)} for p in paths]
    # Decoding tasks may use every CPU (the actors hold theirs). Giving the task pool a size other than the
    # actor pool's also keeps Ray Data from fusing the two stages into the actors, which would leave the
    # CPUs the actors do not hold idle (a GPU actor's stage is never fused: its resources differ).
    return (ray.data.from_items(items)
            .map_batches(_decode_images, batch_size=batch_size, compute=ray.data.TaskPoolStrategy(size=cpus),
                         fn_kwargs={"preprocess": local.preprocess, "fetch": local.fetch})
            .map_batches(_CaptionActor, batch_size=decode_batch, num_cpus=1, num_gpus=1 if gpus else 0,
                         compute=ray.data.ActorPoolStrategy(size=actors),
                         fn_constructor_kwargs={"checkpoint": _worker_checkpoint(checkpoint), "device": device,
                                                "config": config, "batch_size": batch_size}))


def stream_on_ray(local: Captioner, paths: Sequence[str], checkpoint: str | None, device: str,
                  config: DecodeConfig, ray_config: RayConfig, batch_size: int = 32,
                  decode_batch: int = 256) -> Iterator[ImageResult]:
    """``Captioner.stream`` on a Ray cluster: one ``ImageResult`` per path, in the order batches finish.
    Each actor loads ``checkpoint`` on ``device``; ``local`` is the driver's copy of the same checkpoint."""
    if not paths:
        return
    with connected(ray_config) as ray:
        ray.data.DataContext.get_current().enable_progress_bars = False  # the caption command shows its own
        dataset = build_dataset(ray, local, paths, checkpoint, device, config, ray_config, batch_size,
                                decode_batch)
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                for path, error, nbest in zip(batch["path"], batch["error"], batch["nbest"]):
                    yield ImageResult(str(path), json.loads(nbest) if nbest else [], error or None)
        except ray.exceptions.RayError as err:
            user_error = _user_error(err)
            if user_error is None:
                raise
            raise user_error from None


def _user_error(err: Exception) -> CaptionerError | None:
    """The project's own error raised on a worker (a checkpoint path a node cannot read, ...) as one line;
    Ray's wrapper keeps only its traceback text. None: not ours, a bug that keeps its traceback."""
    ours = [line.split(": ", 1)[1] for line in str(err).splitlines()
            if line.startswith("captioner.errors.") and ": " in line]
    return CaptionerError(f"on a Ray worker: {ours[-1]}") if ours else None
