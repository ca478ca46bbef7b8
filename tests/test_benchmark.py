"""The benchmark script's synthetic checkpoint: an untrained model with the bundled model's shapes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from captioner.api import BUNDLED, REPO_CHECKPOINTS
from captioner.checkpoint import MODEL, load_checkpoint, read_tensors

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    """benchmarks/run.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("benchmarks_run", REPO / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def test_synthetic_checkpoint_has_the_bundled_models_shapes():
    synthetic = load_benchmark().synthetic_checkpoint()
    shapes = {k: tuple(v.shape) for k, v in read_tensors(synthetic / MODEL).items() if k.startswith("decoder.")}
    bundled = {k: tuple(v.shape) for k, v in read_tensors(REPO_CHECKPOINTS / BUNDLED / MODEL).items()
               if k.startswith("decoder.")}
    assert shapes == bundled
    decoder = [v for k, v in read_tensors(synthetic / MODEL).items() if k.startswith("decoder.")]
    assert all(torch.equal(v.half().to(v.dtype), v) for v in decoder)  # float16 values, as exported: the same CPU step
    config = load_checkpoint(synthetic).config
    assert (config.hidden, config.encoder.name, config.encoder.weights) == (1024, "mobilenet_v2", "none")
