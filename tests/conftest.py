"""Shared fixtures: a small COCO-format dataset made on the fly, prepared, encoded and trained once.

The images are generated shapes whose colours and forms the captions describe, so a tiny model can
really learn them; the encoder is a randomly initialised (seeded) resnet18 at 64 px (weights=none:
tests never download; its features are O(1), unlike a random mobilenet's ~1e-8).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from captioner.encoder import EncoderConfig

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")
BACKGROUNDS = {"white": (250, 250, 250), "black": (10, 10, 10)}
FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"
TEST_ENCODER = EncoderConfig(name="resnet18", weights="none", image_size=64)
LOAD_WITHOUT = """
import sys
sys.modules[sys.argv[1]] = None  # as if not installed
from captioner.images import ImageLoadError, load_image
try:
    load_image(sys.argv[2])
except ImageLoadError as err:
    print(err)
"""


def load_error_without(module: str, path: Path) -> str:
    """``load_image(path)``'s error message in a fresh process where ``module`` (an optional dependency) is missing."""
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT, module, str(path)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr
    return done.stdout


def draw(colour: str, shape: str, background: str, size: int = 80, seed: int = 0) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    x0, y0 = rng.randint(4, 20), rng.randint(4, 20)
    box = (x0, y0, x0 + rng.randint(40, 55), y0 + rng.randint(40, 55))
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLOURS[colour])
    return img


def make_coco(root: Path, n_train: int = 48, n_val: int = 16) -> dict[str, Path]:
    """Write images and official-format COCO caption files; return their paths."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    combos = [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]
    files = {}
    next_id = 1
    for split, n in (("train", n_train), ("val", n_val)):
        images, annotations = [], []
        for i in range(n):
            colour, shape, background = combos[(i * 7 + (split == "val")) % len(combos)]
            name = f"{split}_{i:04d}.jpg"
            draw(colour, shape, background, seed=next_id).save(images_dir / name, quality=95)
            images.append({"id": next_id, "file_name": name, "width": 80, "height": 80})
            for j, template in enumerate(["A {c} {s} on a {b} background.", "a {c} {s}", "The {s} is {c}.",
                                          "A {c} {s} in front of {b}", "{c} {s} , {b} background"]):
                annotations.append({"id": next_id * 10 + j, "image_id": next_id,
                                    "caption": template.format(c=colour, s=shape, b=background)})
            next_id += 1
        path = root / f"captions_{split}.json"
        path.write_text(json.dumps({"images": images, "annotations": annotations}))
        files[split] = path
    files["images"] = images_dir
    return files


@pytest.fixture(scope="session")
def coco_files(tmp_path_factory) -> dict[str, Path]:
    return make_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="session")
def data_dir(coco_files, tmp_path_factory) -> Path:
    """A prepared data directory with a complete feature cache."""
    from captioner.cli import main
    out = tmp_path_factory.mktemp("data")
    assert main(["prepare", "coco", str(coco_files["train"]), str(coco_files["val"]), "--images",
                 str(coco_files["images"]), "--out", str(out), "--min-count", "1", "--split-names", "train", "val"]) == 0
    assert main(["features", str(out), "--encoder", TEST_ENCODER.name, "--weights", "none", "--image-size", "64",
                 "--batch-size", "16", "--workers", "0"]) == 0
    return out


@pytest.fixture(scope="session")
def trained_run(data_dir, tmp_path_factory) -> Path:
    """A tiny model trained until it describes the shapes; its run directory."""
    from captioner.cli import main
    run = tmp_path_factory.mktemp("run")
    assert main(["train", str(data_dir), "--out", str(run), "--encoder", TEST_ENCODER.name, "--weights", "none",
                 "--image-size", "64", "--hidden", "64", "--embed", "32", "--dropout", "0.0", "--epochs", "25",
                 "--batch-size", "16", "--lr", "0.01", "--warmup-steps", "5", "--patience", "0", "--workers", "0"]) == 0
    return run


@pytest.fixture
def model(trained_run, tmp_path) -> Path:
    """The tiny trained model, copied so a test may add a matching model to it."""
    directory = tmp_path / "model"
    shutil.copytree(trained_run / "best", directory)
    return directory
