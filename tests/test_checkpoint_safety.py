"""Loading a checkpoint is safe and explains itself: damaged or mismatched files give a ``CheckpointError``
naming the file, and a pickle smuggled in as weights is refused without ever running."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner.api import Captioner
from captioner.checkpoint import CheckpointError, load_checkpoint
from captioner.cli import main
from captioner.encoder import EncoderConfig, EncoderError, build_encoder


class Payload:
    """Unpickling this creates ``marker``: proof that loading ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture
def checkpoint(trained_run, tmp_path) -> Path:
    """A private, writable copy of the trained checkpoint (``best`` is a symlink; copy what it points to)."""
    target = tmp_path / "ckpt"
    shutil.copytree((trained_run / "best").resolve(), target)
    return target


def test_the_copy_loads(checkpoint):
    loaded = load_checkpoint(checkpoint)
    assert len(loaded.vocab) == loaded.config.vocab_size
    assert Captioner.from_pretrained(checkpoint, device="cpu").decoder is not None


def test_truncated_weights_name_the_file(checkpoint):
    model = checkpoint / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with pytest.raises(CheckpointError) as caught:
        Captioner.from_pretrained(checkpoint, device="cpu")
    assert str(caught.value).startswith(f"{model}: not a valid safetensors file")


def test_empty_weights_file(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(checkpoint)


def test_missing_weights_file(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_checkpoint(checkpoint)


def test_vocab_size_mismatch_is_explained(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    vocab_words = len(json.loads((checkpoint / "vocab.json").read_text())["words"])
    config["vocab_size"] = vocab_words + 7
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(checkpoint)
    message = str(caught.value)
    assert f"vocab_size {vocab_words + 7}" in message and f"{vocab_words} words" in message
    assert "different models" in message


def test_missing_vocab_is_explained(checkpoint):
    (checkpoint / "vocab.json").unlink()
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(checkpoint)
    assert str(checkpoint / "vocab.json") in str(caught.value) and "not found" in str(caught.value)


def test_missing_config_is_explained(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_checkpoint(checkpoint)


def test_corrupt_config_json(checkpoint):
    (checkpoint / "config.json").write_text('{"vocab_size": ')
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_checkpoint(checkpoint)


def test_decoder_tensors_that_do_not_fit_the_config(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["hidden"] *= 2
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="decoder tensors do not match config.json"):
        Captioner.from_pretrained(checkpoint, device="cpu")


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dumps"])
def test_pickle_disguised_as_safetensors_never_runs(checkpoint, tmp_path, writer):
    marker = tmp_path / "PWNED"
    model = checkpoint / "model.safetensors"
    if writer == "torch.save":
        torch.save({"decoder.embed.weight": Payload(marker)}, model)
    else:
        model.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError) as caught:
        Captioner.from_pretrained(checkpoint, device="cpu")
    assert str(caught.value).startswith(f"{model}: ") and "never unpickles" in str(caught.value)
    assert not marker.exists()


def test_pickle_as_trainer_state_never_runs(checkpoint, tmp_path):
    from captioner.checkpoint import load_trainer_state
    marker = tmp_path / "PWNED"
    state = checkpoint / "trainer_state.safetensors"
    state.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match="trainer_state.safetensors"):
        load_trainer_state(checkpoint)
    assert not marker.exists()


def test_pickle_payload_in_encoder_weights_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    weights = tmp_path / "evil.pth"
    torch.save({"features.0.0.weight": Payload(marker)}, weights)
    with pytest.raises(EncoderError) as caught:
        build_encoder(EncoderConfig("mobilenet_v3_small", str(weights), 64))
    assert str(caught.value).startswith(f"{weights}: not a readable state-dict file")
    assert not marker.exists()


def test_cli_bad_checkpoint_is_a_one_line_error(checkpoint, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    (checkpoint / "model.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    image = tmp_path / "x.png"
    from PIL import Image
    Image.new("RGB", (32, 32), (1, 2, 3)).save(image)
    code = main(["caption", str(image), "--checkpoint", str(checkpoint), "--device", "cpu", "--workers", "0"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"captioner caption: error: {checkpoint / 'model.safetensors'}: ")
    assert not marker.exists()


def test_cli_missing_checkpoint_directory(tmp_path, capsys):
    code = main(["caption", str(tmp_path / "x.png"), "--checkpoint", str(tmp_path / "nope"), "--device", "cpu"])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.strip() == f"captioner caption: error: {tmp_path / 'nope'}: checkpoint directory not found"


def test_export_of_two_runs_is_an_ensemble_that_loads_offline(trained_run, tmp_path):
    out = tmp_path / "ensemble"
    assert main(["export", str(trained_run / "best"), str(trained_run / "last"), "--out", str(out)]) == 0
    assert load_checkpoint(out).config.members == 2
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    assert isinstance(Captioner.from_pretrained(out).caption(np.zeros((32, 32, 3), dtype=np.uint8)), str)
