"""Installed as users install it (``pip install .``, not ``-e``), the package carries the bundled model:
``Captioner.from_pretrained().caption(...)`` works from any directory, with no source tree in sight; an
editable install keeps using the source tree's ``checkpoints/``.

The wheel is built offline from a copy of the files the packaging reads (so the working tree gains no
build/ or egg-info), installed into a fresh venv that sees this interpreter's torch & co
(``--system-site-packages``), and run from an empty directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import draw

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "captioner", "data_prep", "checkpoints")  # what pyproject.toml packages
USE_IT = """
import captioner, sys
from captioner import Captioner
from captioner.api import default_checkpoint
print(captioner.__file__)
print(default_checkpoint())
print(Captioner.from_pretrained(device="cpu").caption("photo.jpg"))
"""


def run(argv: list, cwd: Path) -> subprocess.CompletedProcess:
    """A command in a clean environment: nothing points it at the source tree or another checkpoint."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CAPTIONER_CHECKPOINT")}
    done = subprocess.run(list(map(str, argv)), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """A copy of what the packaging reads: builds write into it, never into the working tree."""
    root = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, root / name)
    return root


@pytest.fixture(scope="module")
def wheel(sources, tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, sources],
        dist)
    return next(dist.glob("captioner-*.whl"))


def test_the_wheel_holds_every_package_and_every_checkpoint_directory(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for top in ("captioner", "data_prep"):  # pyproject.toml lists the packages: none may be left out
        for init in (ROOT / top).rglob("__init__.py"):
            assert init.relative_to(ROOT).as_posix() in names
    checkpoints = [d for d in (ROOT / "checkpoints").iterdir() if d.is_dir()]
    assert checkpoints
    for directory in checkpoints:
        for file in directory.iterdir():
            assert f"captioner/checkpoints/{directory.name}/{file.name}" in names


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["wheel", "editable"])
def test_an_installed_package_captions_with_the_bundled_model_from_anywhere(mode, sources, wheel, tmp_path):
    venv, work = tmp_path / "venv", tmp_path / "elsewhere"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp_path)
    python = venv / "bin" / "python"
    target = [wheel] if mode == "wheel" else ["-e", sources]
    # pip comes from the system site-packages; --ignore-installed: the editable install there must not count
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation", "--ignore-installed", "-q",
         *target], tmp_path)
    work.mkdir()
    draw("red", "circle", "white", size=224).save(work / "photo.jpg")
    module, checkpoint, caption = run([python, "-c", USE_IT], work).stdout.strip().splitlines()[-3:]
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work).stdout.strip())
    package, checkpoints = (site / "captioner", site / "captioner" / "checkpoints") if mode == "wheel" else (
        sources / "captioner", sources / "checkpoints")
    assert Path(module) == package / "__init__.py"  # this install's copy, not the working tree's
    assert Path(checkpoint).parent == checkpoints
    assert len(caption.split()) >= 2, caption
