"""Fixtures for the app tests: ``app.py`` served for real on a free loopback port, with the tiny trained model.

Import the fixtures into a test module (``from app_fixtures import app_server, ...``); the server
runs in this process, so tests can also read its memory use.
"""

from __future__ import annotations

import importlib.util
import random
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from conftest import draw

ROOT = Path(__file__).resolve().parents[1]


def load_app() -> ModuleType:
    """Import ``app.py`` from the repository root whether or not the root is on ``sys.path``."""
    if "app" not in sys.modules:
        spec = importlib.util.spec_from_file_location("app", ROOT / "app.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["app"] = module
        spec.loader.exec_module(module)
    return sys.modules["app"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class AppServer:
    url: str
    captioner: object


@pytest.fixture(scope="module")
def app_server(trained_run: Path) -> AppServer:
    """``app.py``'s demo around the test checkpoint, launched exactly as ``main`` does but non-blocking."""
    app = load_app()
    from captioner.api import Captioner
    captioner = Captioner.from_pretrained(trained_run / "best", device="cpu")
    demo = app.build_demo(captioner)
    url = app.serve(demo, host="127.0.0.1", port=free_port(), block=False)
    yield AppServer(url, captioner)
    demo.close()


@pytest.fixture(scope="module")
def good_image(tmp_path_factory) -> Path:
    """A real JPEG of the kind the tiny model was trained on."""
    path = tmp_path_factory.mktemp("app_images") / "red_circle.jpg"
    draw("red", "circle", "white", seed=3).save(path, quality=95)
    return path


@pytest.fixture(scope="module")
def bad_image(tmp_path_factory) -> Path:
    """Random bytes with a .jpg name: what a broken or mislabelled upload looks like."""
    path = tmp_path_factory.mktemp("app_bad") / "broken.jpg"
    path.write_bytes(random.Random(0).randbytes(4096))
    return path


def client(url: str):
    """A gradio_client talking to the local server only (no Hugging Face look-ups, no progress output)."""
    from gradio_client import Client
    return Client(url, verbose=False, download_files=False)


# The API order of ``/caption``: image, strategy, temperature, top_p, beam_size, num_return.
BEAM3 = ("beam", 1.0, 1.0, 3, 3)
