"""Speed and memory benchmarks of captioner: encoder, batch captioning, single-image latency, training.

Why these five numbers: the CNN forward is the floor every other path is compared with. Batch captioning
(``Captioner.stream``) should run close to that floor, because JPEG decoding happens in worker processes
and the LSTM decoder is small; the single-image call is what the demo pays per request; and training from
the feature cache should be far faster than the tutorial recipe that recomputes the frozen CNN every step.
Each measurement warms up, repeats, reports medians and its own peak memory, and prints PASS/MISS
against the targets. Results go to ``benchmarks/results/<device>.json`` and a Markdown table in
``benchmarks/README.md``.

    python benchmarks/run.py [--device auto] [--quick] [--checkpoint DIR|synthetic]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import atexit
import itertools
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a plain checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from captioner.api import BUNDLED, REPO_CHECKPOINTS, Captioner, default_checkpoint  # noqa: E402
from captioner.decoding import DecodeConfig, plain_options  # noqa: E402
from captioner.encoder import Encoder, EncoderConfig, Preprocess, build_encoder  # noqa: E402
from captioner.images import load_image  # noqa: E402
from captioner.model import CaptionDecoder  # noqa: E402
from captioner.model import RUNTIMES  # noqa: E402
from captioner.runtime import autocast, loader_workers  # noqa: E402
from captioner.train import TrainConfig, build_optimizer, lr_factor, train_step, trim_padding  # noqa: E402

FLICKR8K = REPO.parent / "shared" / "data" / "flickr8k"
EPOCH_CAPTIONS = 30_000  # Flickr8k train split: 6,000 images x 5 captions
TARGETS = {  # name -> (minimum or maximum, bound); checked on the ratios below
    "stream_greedy_vs_encoder": (">=", 0.85),
    "stream_beam3_vs_encoder": (">=", 0.70),
    "latency_p50_vs_encoder_b1": ("<=", 1.30),
    "train_cache_vs_recompute": (">=", 20.0),
    "stream_camera_vs_flickr8k": (">=", 0.60),
}


@dataclass
class Budget:
    """How long each measurement runs: warm-up calls, then repeats until both minimums are met."""

    warmup: int
    min_repeats: int
    max_repeats: int
    seconds: float  # minimum measured time per timing loop
    stream_images: int
    stream_repeats: int
    latency_calls: int
    recompute_steps: int
    stream_batch: int = 32  # also the encoder's large batch
    camera_images: int = 0  # camera-photo passes: this many paths (0: stream_images)
    train_batch: int = TrainConfig.batch_size


FULL = Budget(warmup=3, min_repeats=5, max_repeats=500, seconds=10.0, stream_images=384, stream_repeats=3,
              latency_calls=100, recompute_steps=4)
# --quick only checks that everything runs: smaller batches too, so it fits in ~2 minutes on a busy 2-core box.
QUICK = Budget(warmup=1, min_repeats=1, max_repeats=20, seconds=0.0, stream_images=8, stream_repeats=1,
               latency_calls=3, recompute_steps=1, stream_batch=4, train_batch=8)


# ---------------------------------------------------------------------------------------------- memory
def _status_kb(pid: int | str, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _children(pid: int) -> list[int]:
    """Direct child processes (DataLoader workers): the cheap per-thread ``children`` lists when the
    kernel has them, else a scan of /proc (a few ms, so the sampler only rescans once a second)."""
    lists = list(Path(f"/proc/{pid}/task").glob("*/children"))
    if lists:
        return [int(c) for f in lists for c in f.read_text().split()]
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return kids


def _pss_kb(pids: list[int]) -> int:
    """Summed PSS. PSS, not RSS: forked workers share the parent's pages copy-on-write, and RSS would
    count torch's libraries once per worker."""
    total = 0
    for pid in pids:
        try:
            total += sum(int(line.split()[1]) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                         if line.startswith("Pss:"))
        except (OSError, ValueError, IndexError):
            continue
    return total


class PeakMemory:
    """Peak memory of one measurement, not of the process so far.

    VmHWM is a process-lifetime peak, so it is reset first by writing 5 to ``/proc/self/clear_refs``
    (Linux >= 4.0); if that is refused, RSS is sampled instead. Worker processes are sampled every 0.1 s.
    On CUDA the caching allocator's peak is reset and read too.
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.result = device, {}

    def __enter__(self) -> "PeakMemory":
        self.base_kb = _status_kb("self", "VmRSS") or 0
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.hwm_ok = True
        except OSError:
            self.hwm_ok = False
        self.own_peak_kb, self.kids_peak_kb, self._stop = self.base_kb, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def _sample(self) -> None:
        kids: list[int] = []
        for tick in itertools.count():
            if self._stop.wait(0.1):
                return
            if tick % 10 == 0:
                kids = _children(os.getpid())
            self.own_peak_kb = max(self.own_peak_kb, _status_kb("self", "VmRSS") or 0)
            self.kids_peak_kb = max(self.kids_peak_kb, _pss_kb(kids))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        peak = (_status_kb("self", "VmHWM") if self.hwm_ok else None) or self.own_peak_kb
        self.result = {"peak_rss_mb": round(peak / 1024, 1), "rss_delta_mb": round((peak - self.base_kb) / 1024, 1),
                       "workers_peak_pss_mb": round(self.kids_peak_kb / 1024, 1)}
        if self.device.type == "cuda":
            self.result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)


# ---------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Wall and main-process CPU seconds per call. ``cpu_util`` (CPU s per wall s, at most the thread
    count) tells the reader whether a slow measurement computed or waited: for ``stream`` a low value
    means the model sat idle waiting for JPEG-decoding workers."""

    wall: list[float]
    cpu: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    def summary(self) -> dict:
        return {"median_s": self.median, "repeats": len(self.wall),
                "cpu_util": round(sum(self.cpu) / max(1e-9, sum(self.wall)), 2)}


def timed(fn: Callable[[], object], budget: Budget, device: torch.device, warmup: int | None = None,
          min_repeats: int | None = None, max_repeats: int | None = None) -> Timing:
    """Seconds per call after warm-up; repeats until ``min_repeats`` calls and ``budget.seconds`` are done."""
    for _ in range(budget.warmup if warmup is None else warmup):
        fn()
        sync(device)
    timing = Timing([], [])
    need = budget.min_repeats if min_repeats is None else min_repeats
    most = budget.max_repeats if max_repeats is None else max_repeats
    start = time.perf_counter()
    while len(timing.wall) < most and (len(timing.wall) < need or time.perf_counter() - start < budget.seconds):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        timing.wall.append(time.perf_counter() - t0)
        timing.cpu.append(time.process_time() - c0)
    return timing


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# ---------------------------------------------------------------------------------------------- inputs
def image_paths(directory: Path | None, n: int, seed: int = 0) -> tuple[list[str], str]:
    """``n`` real JPEGs (Flickr8k by default), or generated 500x375 JPEGs when there are none."""
    if directory and directory.is_dir():
        files = sorted(p for p in directory.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        if files:
            random.Random(seed).shuffle(files)
            return [str(p) for p in (files * (n // len(files) + 1))[:n]], str(directory)
    out = Path(tempfile.mkdtemp(prefix="captioner-bench-img-"))
    atexit.register(shutil.rmtree, out, True)
    rng = np.random.default_rng(seed)
    for i in range(min(n, 256)):
        base = np.linspace(0, 255, 500, dtype=np.float32)[None, :, None] * rng.uniform(0.2, 1, 3)
        img = Image.fromarray(np.broadcast_to(base, (375, 500, 3)).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x, y = rng.integers(0, 450), rng.integers(0, 330)
            draw.ellipse((x, y, x + rng.integers(20, 120), y + rng.integers(20, 120)), fill=tuple(rng.integers(0, 255, 3)))
        img.save(out / f"gen_{i:04d}.jpg", quality=90)
    files = sorted(str(p) for p in out.iterdir())
    return (files * (n // len(files) + 1))[:n], f"generated ({out})"


def warm_page_cache(paths: list[str]) -> None:
    """Read every file once so the numbers measure decoding, not the first disk read."""
    for p in set(paths):
        Path(p).read_bytes()


def synthetic_checkpoint(like: Path = REPO_CHECKPOINTS / BUNDLED) -> Path:
    """An untrained checkpoint built from ``like``'s config.json (default: the bundled model), so it has the
    same shapes and compute, without needing its weights.

    Untrained, its captions never emit <end>, so they all run to ``max_len``: decoding costs are an
    upper bound (a trained model stops after ~12 words)."""
    from captioner.checkpoint import CONFIG, save_checkpoint
    from captioner.config import ModelConfig
    from captioner.vocab import SPECIALS, Vocab
    bundled = json.loads((like / CONFIG).read_text())
    bundled.pop("format", None)
    config = ModelConfig.from_json(bundled)
    encoder, enc_cfg = build_encoder(EncoderConfig(config.encoder.name, "none", config.encoder.image_size))
    config = dataclasses.replace(config, encoder=enc_cfg)
    vocab = Vocab(list(SPECIALS) + [f"w{i}" for i in range(config.vocab_size - len(SPECIALS))])
    torch.manual_seed(0)
    root = tempfile.mkdtemp(prefix="captioner-bench-ckpt-")
    atexit.register(shutil.rmtree, root, True)
    target = Path(root) / "synthetic"
    decoder = CaptionDecoder(config)
    with torch.no_grad():  # float16 values, as `captioner export` stores the bundled model: the same CPU step runs
        for weight in decoder.parameters():
            weight.copy_(weight.half())
    save_checkpoint(target, config, vocab, decoder, encoder)
    return target


def caption_lengths(n: int, max_len: int, seed: int = 0) -> list[int]:
    """Token counts (with <start>/<end>) of ``n`` captions: Flickr8k's when present, else ~N(11, 4) words."""
    token_file = FLICKR8K / "Flickr8k.token.txt"
    rng = random.Random(seed)
    if token_file.is_file():
        words = [sum(any(c.isalnum() for c in w) for w in line.split("\t", 1)[-1].split())
                 for line in token_file.read_text().splitlines() if line.strip()]
    else:
        words = [max(1, round(rng.gauss(11, 4))) for _ in range(n)]
    return [min(w, max_len) + 2 for w in rng.choices(words, k=n)]


# ---------------------------------------------------------------------------------------------- benchmarks
def bench_encoder(encoder: Encoder, size: int, batch: int, precision: str, device: torch.device,
                  budget: Budget, plain: bool = False) -> dict:
    """(1) images/s of one CNN pass on preprocessed pixels already on the device: ``Encoder.encode`` as the
    pipeline runs it (on a CPU channels-last, a few images per call), or with ``plain`` the bare module call."""
    pixels = torch.randn(batch, 3, size, size, device=device)
    run = encoder if plain else encoder.encode

    def forward() -> None:
        with torch.inference_mode(), autocast(precision, device):
            run(pixels)

    with PeakMemory(device) as mem:
        timing = timed(forward, budget, device)
    return {"batch": batch, "call": "forward" if plain else "encode", "images_per_s": batch / timing.median,
            **timing.summary(), **mem.result}


def stream_configs(cap: Captioner) -> dict[str, DecodeConfig]:
    """(2)'s decodings: plain greedy and plain beam 3 (what the targets were set for), sampling, and the model's
    recommended decoding (``decoding.json``: what ``captioner caption`` and the API do by default)."""
    return {"greedy": cap.decode_config(strategy="greedy"),
            "beam3": cap.decode_config(**plain_options(strategy="beam", beam_size=3)),
            "sample": cap.decode_config(strategy="sample", seed=0),
            "default": cap.decode_config()}


def bench_stream(cap: Captioner, paths: list[str], config: DecodeConfig, workers: int, budget: Budget) -> dict:
    """(2) JPEG on disk -> caption text through ``Captioner.stream``, whole-run images/s."""
    def run(subset: list[str]) -> list[int]:
        lengths = []
        for result in cap.stream(subset, config, batch_size=budget.stream_batch, workers=workers):
            if result.error:
                raise RuntimeError(result.error)
            lengths.append(len(result.nbest[0]["tokens"]))
        return lengths

    run(paths[: budget.stream_batch])  # warm-up: allocator, kernels, first-batch code paths
    lengths: list[int] = []
    with PeakMemory(cap.device) as mem:
        timing = timed(lambda: lengths.extend(run(paths)), budget, cap.device, warmup=0,
                       min_repeats=budget.stream_repeats)
    return {"strategy": config.strategy, "beam_size": config.beam_size if config.strategy == "beam" else None,
            "decoding": config.describe(),
            "images": len(paths), "batch": budget.stream_batch, "workers": loader_workers(workers, cap.device),
            "images_per_s": len(paths) / timing.median, **timing.summary(),
            "mean_caption_words": statistics.fmean(lengths), **mem.result}


@contextlib.contextmanager
def eager_float(cap: Captioner) -> Iterator[None]:
    """The GPU path as it was before uint8 pixels and CUDA graphs (``Captioner.device_pixels``, ``.graphs``)."""
    saved = cap.device_pixels, cap.graphs
    cap.device_pixels = cap.graphs = False
    try:
        yield
    finally:
        cap.device_pixels, cap.graphs = saved


def bench_latency(cap: Captioner, paths: list[str], budget: Budget) -> dict:
    """(3) one greedy ``Captioner.caption(path)`` call per image; p50/p95 over distinct files. Greedy, not the
    model's recommended decoding, so the number compares across models and with the earlier runs; what the
    app's decoding costs: ``benchmarks/demo_latency.py``."""
    calls = itertools.cycle(paths)
    with PeakMemory(cap.device) as mem:
        timing = timed(lambda: cap.caption(next(calls), strategy="greedy"), budget, cap.device, min_repeats=budget.latency_calls)
    return {"p50_s": percentile(timing.wall, 50), "p95_s": percentile(timing.wall, 95), **timing.summary(),
            **mem.result}


def camera_photos(paths: list[str], distinct: int, long_side: int = 4000, quality: int = 90) -> tuple[list[str], str]:
    """``paths`` replaced by camera-sized JPEGs: the first ``distinct`` photos upscaled (bicubic, aspect kept)
    to ``long_side`` pixels on the long side (500x375 -> 4000x3000, 12 MP) and saved at JPEG ``quality``
    in a temporary folder removed at exit; the list cycles over them like ``paths`` cycles its files."""
    out = Path(tempfile.mkdtemp(prefix="captioner-bench-camera-"))
    atexit.register(shutil.rmtree, out, True)

    def make(i: int, src: str) -> str:
        with Image.open(src) as img:
            img = img.convert("RGB")
            scale = long_side / max(img.size)
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        img.save(out / f"camera_{i:03d}.jpg", quality=quality)
        return str(out / f"camera_{i:03d}.jpg")

    sources = list(dict.fromkeys(paths))[:distinct]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # Pillow resizes and encodes without the GIL
        made = list(pool.map(make, range(len(sources)), sources))
    return ((made * (len(paths) // len(made) + 1))[: len(paths)],
            f"{len(made)} photos upscaled to {long_side} px long side, q{quality} ({out})")


def _stream_pass(cap: Captioner, paths: list[str], config: DecodeConfig, batch: int, workers: int) -> float:
    """Seconds for one ``Captioner.stream`` pass over ``paths``."""
    t0 = time.perf_counter()
    for result in cap.stream(paths, config, batch_size=batch, workers=workers):
        if result.error:
            raise RuntimeError(result.error)
    return time.perf_counter() - t0


def bench_camera(cap: Captioner, paths: list[str], workers: int, budget: Budget) -> dict:
    """(5) the photos people really have: 12 MP camera JPEGs through greedy ``stream`` and ``caption(path)``.

    The camera ``stream`` passes alternate with passes over the Flickr8k-size originals they were made from
    (order swapped every round), so both see the same machine load; the ratio is the median of the rounds'
    ratios. Large JPEGs are decoded at a reduced DCT scale (``load_image``'s ``min_side``)."""
    config, flickr = cap.decode_config(strategy="greedy"), paths[: budget.camera_images or budget.stream_images]
    camera, source = camera_photos(flickr, distinct=max(4, len(flickr) // 12))
    warm_page_cache(camera)
    print(f"# camera photos: {source}")
    for subset in (flickr, camera):  # warm-up
        _stream_pass(cap, subset[: budget.stream_batch], config, budget.stream_batch, workers)
    rounds, seconds = 2 * budget.stream_repeats - 1, {"flickr8k": [], "camera": []}
    with PeakMemory(cap.device) as mem:
        for r in range(rounds):
            for name in (("flickr8k", "camera") if r % 2 == 0 else ("camera", "flickr8k")):
                subset = flickr if name == "flickr8k" else camera
                seconds[name].append(_stream_pass(cap, subset, config, budget.stream_batch, workers))
    rate = {name: len(flickr) / statistics.median(s) for name, s in seconds.items()}
    return {"images": source, "rounds": rounds,
            "stream": {"images": len(camera), "batch": budget.stream_batch, "workers": loader_workers(workers, cap.device),
                       "images_per_s": rate["camera"], "seconds": seconds["camera"], **mem.result},
            "flickr8k_stream": {"images": len(flickr), "images_per_s": rate["flickr8k"], "seconds": seconds["flickr8k"]},
            "stream_vs_flickr8k": statistics.median(f / c for f, c in zip(seconds["flickr8k"], seconds["camera"])),
            "latency": bench_latency(cap, camera, budget)}


class _PairImages(Dataset):
    """The tutorial recipe's dataset: caption row i -> (decoded, preprocessed image, i)."""

    def __init__(self, paths: list[str], preprocess: Preprocess) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.preprocess(load_image(self.paths[i])), i


def bench_training(cap: Captioner, paths: list[str], workers: int, budget: Budget) -> dict:
    """(4) decoder-only steps on in-memory cached features (as ``Trainer`` does) vs recomputing the frozen
    CNN from JPEGs every step (the common tutorial recipe); same model, batch size and optimizer step: the
    Trainer's own ``train_step`` with ``TrainConfig``'s defaults (optimizer, clipping, lr schedule)."""
    device, precision, config = cap.device, cap.precision, TrainConfig(batch_size=budget.train_batch)
    torch.manual_seed(0)
    decoder = CaptionDecoder(cap.config).to(device).train()
    optimizer = build_optimizer(decoder, config)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    max_len = cap.config.max_len
    lengths = caption_lengths(EPOCH_CAPTIONS, max_len)
    tokens = torch.zeros(EPOCH_CAPTIONS, max_len + 2, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens[row, :n] = torch.randint(4, cap.config.vocab_size, (n,))
        tokens[row, 0], tokens[row, n - 1] = cap.vocab.specials.start, cap.vocab.specials.end
    pair_image = torch.arange(EPOCH_CAPTIONS) // 5
    features = torch.randn(EPOCH_CAPTIONS // 5, cap.config.feature_dim)  # the cache, gathered into memory
    order = torch.randperm(EPOCH_CAPTIONS).split(budget.train_batch)
    steps, total = itertools.count(), config.epochs * len(order)

    def optimise(feats: torch.Tensor, toks: torch.Tensor) -> None:
        lrs = [config.lr * lr_factor(next(steps), total, config, 1.0)]
        loss, _, _ = train_step(decoder, optimizer, feats.to(device, non_blocking=True),
                                trim_padding(toks).to(device, non_blocking=True), config.clip, lrs, scaler, precision)
        loss.item()  # Trainer logs it every step

    batches = itertools.cycle(order)

    def cached_step() -> None:
        idx = next(batches)
        optimise(features[pair_image[idx]], tokens[idx])

    with PeakMemory(device) as mem_cache:
        cache = timed(cached_step, budget, device, min_repeats=max(5, budget.min_repeats))
    cache_rate = budget.train_batch / cache.median

    encoder = cap.encoder.eval().requires_grad_(False)
    need = budget.train_batch * (budget.recompute_steps + 1)
    loader = DataLoader(_PairImages((paths * (need // len(paths) + 1))[:need], cap.preprocess),
                        batch_size=budget.train_batch, shuffle=True, num_workers=workers, drop_last=True,
                        pin_memory=device.type == "cuda")
    it: Iterator = iter(loader)

    def recompute_step() -> None:
        pixels, idx = next(it)
        with torch.no_grad(), autocast(precision, device):
            feats = encoder.encode(pixels.to(device, non_blocking=True)).float()
        optimise(feats, tokens[idx])

    with PeakMemory(device) as mem_recompute:
        recompute = timed(recompute_step, budget, device, warmup=1, min_repeats=budget.recompute_steps,
                          max_repeats=budget.recompute_steps)
    del it
    recompute_rate = budget.train_batch / recompute.median
    return {
        "batch": budget.train_batch, "epoch_captions": EPOCH_CAPTIONS, "workers": workers,
        "cache": {"captions_per_s": cache_rate, "epoch_s": EPOCH_CAPTIONS / cache_rate, **cache.summary(),
                  **mem_cache.result},
        "recompute": {"captions_per_s": recompute_rate, "epoch_s": EPOCH_CAPTIONS / recompute_rate,
                      **recompute.summary(), **mem_recompute.result},
        "speedup": cache_rate / recompute_rate,
    }


# ---------------------------------------------------------------------------------------------- report
def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "load_avg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def check(ratios: dict[str, float]) -> dict[str, dict]:
    out = {}
    for name, value in ratios.items():
        op, bound = TARGETS[name]
        ok = value >= bound if op == ">=" else value <= bound
        out[name] = {"value": round(value, 3), "target": f"{op} {bound}", "pass": ok}
    return out


def _mem(r: dict) -> str:
    extra = f" + workers {r['workers_peak_pss_mb']:.0f}" if r.get("workers_peak_pss_mb") else ""
    cuda = f", CUDA {r['cuda_peak_mb']:.0f}" if "cuda_peak_mb" in r else ""
    return f"{r['peak_rss_mb']:.0f} (Δ{r['rss_delta_mb']:+.0f}){extra}{cuda}"


def table(report: dict) -> str:
    """The Markdown results table (also what the README shows between the result markers)."""
    m, r, t = report["machine"], report["results"], report["targets"]

    def verdict(name: str) -> str:
        if name not in t:
            return ""
        return f"{t[name]['value']:.2f}× ({t[name]['target']}×) **{'PASS' if t[name]['pass'] else 'MISS'}**"

    rows = ["| measurement | result | vs target | peak memory MB |", "|---|---|---|---|"]
    for key, res in r.get("encoder", {}).items():
        call = res.get("call", "forward")
        rows.append(f"| (1) encoder {key.removesuffix(' forward')} `{call}` | {res['images_per_s']:.1f} img/s "
                    f"({res['median_s'] * 1e3:.1f} ms/batch) | | {_mem(res)} |")
    names = {"greedy": "stream_greedy_vs_encoder", "beam3": "stream_beam3_vs_encoder"}
    for key, res in r.get("stream", {}).items():
        label = f"default ({res['decoding']})" if key == "default" else key
        rows.append(f"| (2) `stream` {label}, batch {res['batch']}, {res['workers']} workers | "
                    f"{res['images_per_s']:.1f} img/s ({res['mean_caption_words']:.1f} words/caption) | "
                    f"{verdict(names.get(key, ''))} | {_mem(res)} |")
    for key in ("latency", "latency float pixels, no graphs"):
        if key in r:
            res = r[key]
            label = key.removeprefix("latency").strip()
            rows.append(f"| (3) `caption(path)` latency{', ' + label if label else ''} | p50 {res['p50_s'] * 1e3:.1f} ms, "
                        f"p95 {res['p95_s'] * 1e3:.1f} ms | {verdict('latency_p50_vs_encoder_b1') if not label else ''} "
                        f"| {_mem(res)} |")
    if "camera" in r:
        cam, res = r["camera"], r["camera"]["stream"]
        rows.append(f"| (5) camera photos ({cam['images'].split(' (')[0]}) `stream` greedy, batch {res['batch']}, "
                    f"{res['workers']} workers | {res['images_per_s']:.1f} img/s (Flickr8k-size, alternating passes: "
                    f"{cam['flickr8k_stream']['images_per_s']:.1f}) | {verdict('stream_camera_vs_flickr8k')} | {_mem(res)} |")
        res = cam["latency"]
        rows.append(f"| (5) camera photos `caption(path)` latency | p50 {res['p50_s'] * 1e3:.1f} ms, "
                    f"p95 {res['p95_s'] * 1e3:.1f} ms | | {_mem(res)} |")
    if "training" in r:
        tr = r["training"]
        for key, label in (("cache", "from feature cache"), ("recompute", "recompute CNN per step")):
            res = tr[key]
            rows.append(f"| (4) training {label}, batch {tr['batch']} | {res['captions_per_s']:.0f} captions/s, "
                        f"{res['epoch_s']:.0f} s/epoch | {verdict('train_cache_vs_recompute') if key == 'cache' else ''} "
                        f"| {_mem(res)} |")
    head = (f"{'QUICK (not comparable) — ' if report['quick'] else ''}{m['device']}, {m['cpu']}, {m['cores']} cores, "
            f"torch {m['torch']} with {m['torch_threads']} threads{', ' + m['gpu'] if 'gpu' in m else ''}, "
            f"precision {report['precision']}{', CUDA graphs' if report.get('cuda_graphs') else ''}; "
            f"checkpoint `{report['checkpoint']}`; images: {report['images']}; load average at start "
            f"{m['load_avg_start']:.2f}; {report['date']}.")
    if m["load_avg_start"] > 0.5 * m["cores"]:
        head += (f"\n\n**Warning: the machine was busy (load {m['load_avg_start']:.1f} on {m['cores']} cores); "
                 "these numbers are not representative.**")
    return head + "\n\n" + "\n".join(rows)


def write_readme(readme: Path, device: str, text: str) -> None:
    """Replace the block between ``<!-- results:DEV -->`` and ``<!-- /results:DEV -->`` (appended if absent)."""
    start, end = f"<!-- results:{device} -->", f"<!-- /results:{device} -->"
    body = readme.read_text() if readme.is_file() else "# captioner benchmarks\n"
    block = f"{start}\n{text}\n{end}"
    if start in body and end in body:
        before, rest = body.split(start, 1)
        body = before + block + rest.split(end, 1)[1]
    else:
        body = body.rstrip("\n") + f"\n\n## Results: {device}\n\n{block}\n"
    readme.write_text(body)


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--quick", action="store_true", help="tiny counts, for checking the script (numbers are noise)")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint directory (default: the bundled model); 'synthetic' builds an untrained one")
    parser.add_argument("--images", type=Path, default=FLICKR8K / "images", help="folder of JPEGs (else generated)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for stream and the recompute recipe")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--only", default="encoder,stream,latency,camera,training", help="comma-separated subset")
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--stream-images", type=int, default=None,
                        help="paths per stream pass (default 384; a GPU needs >= 4,000 so start-up does not hide it)")
    parser.add_argument("--stream-batch", type=int, default=None, help="stream's encoder batch (default 32)")
    parser.add_argument("--camera-images", type=int, default=None,
                        help="paths per camera-photo pass (default: --stream-images); a twelfth of them are made")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="Captioner.graphs: the encoder on few images and greedy decoding from CUDA graphs")
    parser.add_argument("--seconds", type=float, default=None,
                        help="minimum seconds per timing loop (default 10; fewer suffice on a GPU)")
    parser.add_argument("--cpu-runtime", choices=RUNTIMES, default="auto",
                        help="who runs the LSTM decoder's step on a CPU (Captioner.cpu_runtime)")
    parser.add_argument("--readme", type=Path, default=None,
                        help="README to update (default benchmarks/README.md; with --quick only when given)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget, only = (QUICK if args.quick else FULL), set(args.only.split(","))
    overrides = {"seconds": args.seconds, "stream_images": args.stream_images, "stream_batch": args.stream_batch,
                 "camera_images": args.camera_images}
    budget = dataclasses.replace(budget, **{k: v for k, v in overrides.items() if v is not None})
    checkpoint = synthetic_checkpoint() if args.checkpoint == "synthetic" else Path(args.checkpoint or default_checkpoint())
    if not checkpoint.is_dir():
        parser.error(f"{checkpoint}: no checkpoint; pass --checkpoint DIR (e.g. a run's best/) or --checkpoint synthetic")
    cap = Captioner.from_pretrained(checkpoint, device=args.device)
    cap.graphs = args.cuda_graphs and cap.device.type == "cuda"
    cap.cpu_runtime = args.cpu_runtime
    device, size = cap.device, cap.config.encoder.image_size
    paths, source = image_paths(args.images, max(budget.stream_images, budget.train_batch * (budget.recompute_steps + 1)))
    warm_page_cache(paths)
    report: dict = {"quick": args.quick, "cuda_graphs": cap.graphs, "cpu_runtime": cap.cpu_runtime, "checkpoint": "synthetic (untrained)" if args.checkpoint == "synthetic" else str(checkpoint),
                    "encoder": cap.config.encoder.name, "precision": cap.precision, "images": source,
                    "date": time.strftime("%Y-%m-%d %H:%M"), "budget": asdict(budget), "machine": machine(device),
                    "results": {}}
    results, ratios = report["results"], {}
    print(f"# {report['machine']}\n# checkpoint {report['checkpoint']}, precision {cap.precision}, images {source}")

    def show(name: str, value: dict) -> None:
        def rounded(x):
            return {k: rounded(v) for k, v in x.items()} if isinstance(x, dict) else round(x, 4) if isinstance(x, float) else x
        print(f"{name}: {json.dumps(rounded(value))}", flush=True)

    if only & {"encoder", "stream", "latency"}:
        enc = results["encoder"] = {}
        name = cap.config.encoder.name
        plain = copy.deepcopy(cap.encoder).to(memory_format=torch.contiguous_format)  # PyTorch's default layout
        for batch in (1, budget.stream_batch):
            enc[f"{name} b{batch} forward"] = bench_encoder(plain, size, batch, cap.precision, device, budget, plain=True)
            show(f"encoder {name} b{batch} forward", enc[f"{name} b{batch} forward"])
            enc[f"{name} b{batch}"] = bench_encoder(cap.encoder, size, batch, cap.precision, device, budget)
            show(f"encoder {name} b{batch}", enc[f"{name} b{batch}"])
        del plain
        if "encoder" in only and name != "resnet50":
            resnet, _ = build_encoder(EncoderConfig("resnet50", "none", size))
            resnet = resnet.for_inference(device)
            for batch in (1, budget.stream_batch):
                enc[f"resnet50 b{batch}"] = bench_encoder(resnet, size, batch, cap.precision, device, budget)
                show(f"encoder resnet50 b{batch}", enc[f"resnet50 b{batch}"])
            del resnet
        base_b1 = enc[f"{cap.config.encoder.name} b1"]
        base_big = enc[f"{cap.config.encoder.name} b{budget.stream_batch}"]
    if "stream" in only:
        stream = results["stream"] = {}
        for key, config in stream_configs(cap).items():
            stream[key] = bench_stream(cap, paths[: budget.stream_images], config, args.workers, budget)
            show(f"stream {key}", stream[key])
        if device.type == "cuda":  # the path before uint8 pixels and CUDA graphs, in the same run
            with eager_float(cap):
                stream["greedy float pixels, no graphs"] = bench_stream(cap, paths[: budget.stream_images],
                                                                       cap.decode_config(strategy="greedy"),
                                                                       args.workers, budget)
            show("stream greedy float pixels, no graphs", stream["greedy float pixels, no graphs"])
        ratios["stream_greedy_vs_encoder"] = stream["greedy"]["images_per_s"] / base_big["images_per_s"]
        ratios["stream_beam3_vs_encoder"] = stream["beam3"]["images_per_s"] / base_big["images_per_s"]
    if "latency" in only:
        results["latency"] = bench_latency(cap, paths, budget)
        show("latency", results["latency"])
        ratios["latency_p50_vs_encoder_b1"] = results["latency"]["p50_s"] / base_b1["median_s"]
        if device.type == "cuda":
            with eager_float(cap):
                results["latency float pixels, no graphs"] = bench_latency(cap, paths, budget)
            show("latency float pixels, no graphs", results["latency float pixels, no graphs"])
    if "camera" in only:
        results["camera"] = bench_camera(cap, paths, args.workers, budget)
        show("camera", results["camera"])
        ratios["stream_camera_vs_flickr8k"] = results["camera"]["stream_vs_flickr8k"]
    if "training" in only:
        results["training"] = bench_training(cap, paths, args.workers, budget)
        show("training", results["training"])
        ratios["train_cache_vs_recompute"] = results["training"]["speedup"]
    report["machine"]["load_avg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    report["targets"] = check(ratios)
    for name, res in report["targets"].items():
        print(f"{'PASS' if res['pass'] else 'MISS'}  {name} = {res['value']:.2f} (target {res['target']})")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"{device.type}{'.quick' if args.quick else ''}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    readme = args.readme or (None if args.quick else REPO / "benchmarks" / "README.md")
    if readme is not None:
        write_readme(readme, device.type, table(report))
        print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
