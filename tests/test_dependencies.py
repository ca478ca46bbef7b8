"""The dependency between the two packages points one way: ``data_prep/`` (dataset converters) imports the
library ``captioner/``, never the reverse, so the inference path loads without the dataset side and the two
cannot import each other half-initialised."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import importlib, pkgutil, sys
import captioner
for module in pkgutil.iter_modules(captioner.__path__):
    importlib.import_module("captioner." + module.name)
print(sorted(name for name in sys.modules if name.split(".")[0] == "data_prep"))
"""


def test_importing_every_library_module_loads_nothing_of_data_prep(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


CAPTION_PROBE = """
import sys
from PIL import Image
from captioner.cli import main
Image.new("RGB", (640, 480), (90, 140, 60)).save("photo.jpg")
code = main(["caption", "photo.jpg", "-o", "out.jsonl"])
print(code, sorted({name.split(".")[0] for name in sys.modules} & {"nltk", "scipy"}))
"""


def test_captioning_photos_imports_neither_nltk_nor_scipy(tmp_path):
    """`captioner caption` (default decoding: guided beam, matching, confidence) never tokenises, so it must not
    pay for importing nltk, whose package import pulls scipy.stats (1.25-1.56 s on the 2-core CPU)."""
    done = subprocess.run([sys.executable, "-c", CAPTION_PROBE], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0 []"
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert row["path"] == "photo.jpg" and row["caption"]
