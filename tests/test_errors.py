"""Errors: the project's own error types are the user's to fix and print as one line with exit status 2;
any other exception is a bug and keeps its traceback. The error types live in one module that imports
nothing, so naming them (the app does) does not load torch or the training code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data_prep.readers
from captioner import errors
from captioner.cli import main

ROOT = Path(__file__).resolve().parents[1]
BUG_SCRIPT = """
import sys
import data_prep.readers
from captioner.cli import main

def broken(*args, **kwargs):
    raise ValueError("an internal bug")

data_prep.readers.read_coco = broken
sys.exit(main(["prepare", "coco", "captions.json", "--images", ".", "--out", "out"]))
"""


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_the_error_module_imports_nothing_heavy(tmp_path):
    probe = ("import sys, captioner.errors; "
             "print(sorted(m for m in ('torch', 'captioner.train', 'captioner.api') if m in sys.modules))")
    done = run_python(probe, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("module, name", [
    ("captioner.manifest", "DatasetError"), ("captioner.vocab", "VocabError"), ("captioner.encoder", "EncoderError"),
    ("captioner.images", "ImageLoadError"), ("captioner.checkpoint", "CheckpointError"),
    ("captioner.train", "TrainingError"), ("captioner.decoding", "ConfigError"), ("captioner.config", "ConfigError"),
    ("captioner.runtime", "ConfigError"),
])
def test_each_stage_raises_the_one_shared_error_type(module, name):
    shared = getattr(errors, name)
    assert getattr(__import__(module, fromlist=[name]), name) is shared
    assert issubclass(shared, errors.CaptionerError)


def test_a_bug_prints_its_traceback_and_does_not_exit_2(tmp_path):
    done = run_python(BUG_SCRIPT, tmp_path)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.strip().endswith("ValueError: an internal bug")
    assert "captioner prepare: error" not in done.stderr


@pytest.mark.parametrize("exception", [ValueError, RuntimeError, FileNotFoundError, KeyError])
def test_main_lets_a_non_project_exception_through(exception, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise exception("an internal bug")

    monkeypatch.setattr(data_prep.readers, "read_coco", broken)
    with pytest.raises(exception, match="an internal bug"):
        main(["prepare", "coco", str(tmp_path / "c.json"), "--images", str(tmp_path), "--out", str(tmp_path / "o")])


def user_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect a user error; return its one stderr line."""
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"captioner {argv[0]}: error: ")
    return lines[0]


def test_a_malformed_device_is_one_line(capsys, tmp_path):
    line = user_error(capsys, ["caption", str(tmp_path / "x.jpg"), "--device", "gpu0"])
    assert "--device gpu0: not a device" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_absent_cuda_device_is_one_line(capsys, tmp_path):
    line = user_error(capsys, ["caption", str(tmp_path / "x.jpg"), "--device", "cuda"])
    assert "CUDA is not available" in line


def test_invalid_decoding_options_are_one_line(capsys, tmp_path):
    line = user_error(capsys, ["caption", str(tmp_path / "x.jpg"), "--device", "cpu", "--strategy", "greedy",
                               "--num-return", "2"])
    assert "greedy decoding returns one caption" in line


def test_invalid_model_sizes_are_one_line(capsys, data_dir, tmp_path):
    line = user_error(capsys, ["train", str(data_dir), "--out", str(tmp_path / "run"), "--weights", "none",
                               "--hidden", "0"])
    assert "invalid model sizes" in line


def test_a_wrong_number_of_image_folders_is_one_line(capsys, tmp_path):
    line = user_error(capsys, ["prepare", "flickr8k", str(tmp_path / "t.txt"), "--images", "a", "b", "--out", "o"])
    assert "takes one --images folder (got 2)" in line
