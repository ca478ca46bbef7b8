"""What one demo request costs: ``Captioner.caption(path)`` p50 per decoding setting the app offers.

The app's default is beam 3 with guidance (the constrained beam search runs two beams of 3 per image,
plus the ImageNet head); greedy and plain beam 3 are measured in the same run, interleaved photo by
photo so all see the same machine load, and the app's default without the model's tag bonus (what the bonus
costs).

    python benchmarks/demo_latency.py [--checkpoint fast] [--photos 60] [--cpu-runtime torch]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from captioner.api import Captioner  # noqa: E402
from captioner.decoding import plain_options  # noqa: E402
from captioner.model import RUNTIMES  # noqa: E402

FLICKR8K = REPO.parent / "shared" / "data" / "flickr8k"
SETTINGS = {"greedy": dict(strategy="greedy"),
            "beam3": plain_options(strategy="beam", beam_size=3),
            "beam3+guide": plain_options(strategy="beam", beam_size=3, guide=True),
            "app default (the model's decoding.json, guided)": dict(strategy="beam", guide=True),
            "app default without a tag bonus": dict(strategy="beam", guide=True, tag_bonus=0.0)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--photos", type=int, default=60, help="first N official Flickr8k test photos")
    p.add_argument("--cpu-runtime", choices=RUNTIMES, default="auto", help="who runs the decoder step on a CPU")
    args = p.parse_args()
    names = (FLICKR8K / "Flickr_8k.testImages.txt").read_text().split()[: args.photos]
    paths = [str(FLICKR8K / "images" / n) for n in names]
    cap = Captioner.from_pretrained(args.checkpoint)
    cap.cpu_runtime = args.cpu_runtime
    for options in SETTINGS.values():  # warm-up
        cap.caption(paths[0], **options)
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for path in paths:
        for name, options in SETTINGS.items():
            t0 = time.perf_counter()
            cap.caption(path, **options)
            times[name].append(time.perf_counter() - t0)
    for name, values in times.items():
        print(f"{name}: p50 {statistics.median(values) * 1e3:.1f} ms, p90 "
              f"{statistics.quantiles(values, n=10)[-1] * 1e3:.1f} ms over {len(values)} photos")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
