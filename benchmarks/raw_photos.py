"""What a camera RAW file costs ``load_image``: its embedded JPEG preview against the same JPEG as a file, and a
half-size demosaic for a RAW without a preview (``captioner/raw.py``).

No camera file can be had offline, so the RAW files are DNGs written by the tests' writer (``tests/raw_fixtures.py``)
from a Flickr8k photo upscaled to a 24 MP sensor (6000x4000), with the same photo as a full-size preview, as
cameras store it. Run: ``python benchmarks/raw_photos.py IMAGE`` (needs rawpy).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from raw_fixtures import write_dng  # noqa: E402

from captioner.encoder import Preprocess  # noqa: E402
from captioner.images import load_image  # noqa: E402


def median_ms(path: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        load_image(path, Preprocess().min_side)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", help="a photo to make the files from (e.g. a Flickr8k JPEG)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    photo = Image.open(args.image).convert("RGB").resize((6000, 4000), Image.BICUBIC)
    with tempfile.TemporaryDirectory() as tmp:
        files = {"DNG with a full-size JPEG preview": write_dng(Path(tmp) / "preview.dng", photo, preview=photo),
                 "the same JPEG as a file": Path(tmp) / "photo.jpg",
                 "DNG without a preview (half-size demosaic)": write_dng(Path(tmp) / "sensor.dng", photo)}
        photo.save(files["the same JPEG as a file"], quality=92)
        for path in files.values():
            load_image(path, Preprocess().min_side)  # warm-up: imports, page cache
        for name, path in files.items():
            repeats = args.repeats if "demosaic" not in name else max(1, args.repeats // 3)
            size = path.stat().st_size / 1e6
            print(f"{name}: {median_ms(path, repeats):.1f} ms (median of {repeats}; {size:.1f} MB)")


if __name__ == "__main__":
    main()
