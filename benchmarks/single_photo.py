"""Single-photo latency on a CPU: ``Captioner.caption(path)`` with the decoder step on FBGEMM's float16-weight
products (the default for exported checkpoints, ``Captioner.cpu_runtime``), on ONNX Runtime, on torch's one-thread
small-batch path (``cpu_runtime = "torch"``,
``CaptionDecoder.ONE_THREAD_ROWS``) and on all of torch's threads (``ONE_THREAD_ROWS = 0``: ``lstm_cell`` +
``nn.Linear``), interleaved in one run so all see the same machine load, next to one encoder call at batch 1;
and a check that the captions are the same every way on real test photos.

    python benchmarks/single_photo.py                  # 200 Flickr8k test photos, 5 interleaved rounds
    python benchmarks/single_photo.py --photos 50 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a plain checkout

import torch  # noqa: E402

from captioner.api import Captioner  # noqa: E402
from captioner.decoding import plain_options  # noqa: E402
from captioner.images import load_image  # noqa: E402
from captioner.model import CaptionDecoder  # noqa: E402

FLICKR8K = REPO.parent / "shared" / "data" / "flickr8k"
ONE_THREAD_ROWS = CaptionDecoder.ONE_THREAD_ROWS


def ms(values: list[float], q: float) -> str:
    return f"{statistics.quantiles(values, n=100)[q - 1] * 1e3:.1f}" if q != 50 else f"{statistics.median(values) * 1e3:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--photos", type=int, default=200, help="first N Flickr8k test photos")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds over 40 photos")
    args = parser.parse_args(argv)
    names = (FLICKR8K / "Flickr_8k.testImages.txt").read_text().split()[: args.photos]
    paths = [str(FLICKR8K / "images" / n) for n in names]
    cap = Captioner.from_pretrained(args.checkpoint, device="cpu")
    print(f"# {torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}")

    ways = {"caption fbgemm": ("fbgemm", ONE_THREAD_ROWS), "caption onnxruntime": ("onnxruntime", ONE_THREAD_ROWS), "caption torch one thread": ("torch", ONE_THREAD_ROWS),
            "caption torch all threads": ("torch", 0)}

    def way(label: str, fn):
        cap.cpu_runtime, CaptionDecoder.ONE_THREAD_ROWS = ways[label]
        try:
            return fn()
        finally:
            cap.cpu_runtime, CaptionDecoder.ONE_THREAD_ROWS = "auto", ONE_THREAD_ROWS

    changed = {}
    for name, options in (("greedy", {"strategy": "greedy"}),
                          ("beam3", plain_options(strategy="beam", beam_size=3)),
                          ("recommended", {})):  # the checkpoint's decoding.json, as the app and the CLI decode
        captions = {label: way(label, lambda: [cap.caption(p, **options) for p in paths]) for label in ways}
        first = captions["caption fbgemm"]
        changed[name] = sum(any(c[i] != first[i] for c in captions.values()) for i in range(len(paths)))
        print(f"caption(path) {name} on {len(paths)} test photos: {changed[name]} captions differ between the ways")

    steps: dict[tuple[str, int], list[float]] = {}
    hidden = cap.decoder.config.hidden
    with torch.inference_mode():
        for _ in range(args.rounds if isinstance(cap.decoder, CaptionDecoder) else 0):  # one decoder step at 1 row (greedy), 5 (a beam) ... 500 (a stream batch)
            for rows in (1, 5, 32, 500):
                tokens = torch.randint(4, cap.decoder.config.vocab_size, (rows,))
                state = (torch.randn(1, rows, hidden) * 0.3, torch.randn(1, rows, hidden))
                for label in ways:
                    step = lambda: cap.decoder.step(tokens, state)  # noqa: E731
                    way(label, step)  # builds the runtime's copy of the weights
                    t0, calls = time.perf_counter(), max(10, 400 // rows)
                    way(label, lambda: [step() for _ in range(calls)])
                    steps.setdefault((label, rows), []).append((time.perf_counter() - t0) / calls)
    for label in ways if steps else ():
        print(f"step {label[8:]:18s} " + ", ".join(f"{rows} rows {statistics.median(steps[label, rows]) * 1e3:.2f} ms"
                                                  for rows in (1, 5, 32, 500)))

    timed = paths[:40]
    pixels = [cap.preprocess(load_image(p))[None] for p in timed]
    wall: dict[str, list[float]] = {"encode b1": [], **{label: [] for label in ways}}
    for _ in range(args.rounds):  # per photo: the encoder alone, then every way, so all see the same load
        for x, p in zip(pixels, timed):
            t0 = time.perf_counter()
            cap.encode(x)
            wall["encode b1"].append(time.perf_counter() - t0)
            for label in ways:
                t0 = time.perf_counter()
                way(label, lambda: cap.caption(p, strategy="greedy"))
                wall[label].append(time.perf_counter() - t0)
    enc = statistics.median(wall["encode b1"])
    for label, values in wall.items():
        print(f"{label:26s} p10 {ms(values, 10)} ms, p50 {ms(values, 50)} ms, p90 {ms(values, 90)} ms"
              + ("" if label == "encode b1" else f"; p50 / encode b1 p50 = {statistics.median(values) / enc:.2f}"))
    print(f"# load average at end {os.getloadavg()[0]:.1f}")
    return 1 if any(changed.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
