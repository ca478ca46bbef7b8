"""Re-aligning the ImageNet head to a tuned CNN (``captioner/realign.py``, ``captioner realign-head``)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from captioner.checkpoint import load_checkpoint
from captioner.cli import main
from captioner.realign import RealignConfig, fit_channel_affine, fold

from test_views import _train


def test_fold_is_the_head_on_scaled_and_shifted_features():
    torch.manual_seed(0)
    linear = nn.Linear(12, 7)
    scale, shift, x = torch.rand(12) + 0.5, torch.randn(12), torch.randn(5, 12)
    with torch.no_grad():
        torch.testing.assert_close(fold(linear, scale, shift)(x), linear(x * scale + shift), rtol=1e-5, atol=1e-5)


def _drifted(n: int, seed: int, scale: torch.Tensor, shift: torch.Tensor, linear: nn.Linear):
    """Untuned features, the head's probabilities on them (the teacher), and tuned features that drifted per
    channel: untuned = tuned * scale + shift."""
    untuned = torch.randn(n, scale.shape[0], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        teacher = torch.softmax(linear(untuned), -1)
    return (untuned - shift) / scale, teacher


def test_fit_undoes_a_per_channel_drift():
    torch.manual_seed(0)
    linear = nn.Linear(16, 10)
    with torch.no_grad():
        linear.weight.mul_(8)  # confident classes: a drift moves them
    true_scale, true_shift = torch.rand(16) * 1.5 + 0.5, torch.randn(16) * 0.5
    tuned, teacher = _drifted(3000, 1, true_scale, true_shift, linear)
    val_tuned, val_teacher = _drifted(500, 2, true_scale, true_shift, linear)
    scale, shift, report = fit_channel_affine(linear, tuned, teacher, val_tuned, val_teacher,
                                              RealignConfig(steps=1500, lr=1e-2))
    before, after = report["val_kl"]
    assert before > 0.3 and after < 0.02 * before
    assert report["val_top1_agreement"][1] > 0.95 > report["val_top1_agreement"][0]
    torch.testing.assert_close(scale, true_scale, atol=0.15, rtol=0)


def test_a_head_that_did_not_drift_is_kept_as_it_is():
    """Nothing to fix: the untouched head (step 0) has val KL 0, and what is kept is never worse on val."""
    linear = nn.Linear(16, 10)
    tuned, teacher = _drifted(600, 1, torch.ones(16), torch.zeros(16), linear)
    val_tuned, val_teacher = _drifted(200, 2, torch.ones(16), torch.zeros(16), linear)
    scale, shift, report = fit_channel_affine(linear, tuned, teacher, val_tuned, val_teacher, RealignConfig(steps=50,
                                                                                                           eval_every=10))
    assert report["val_kl"][0] < 1e-6 and report["val_kl"][1] <= report["val_kl"][0]
    torch.testing.assert_close(scale, torch.ones(16), atol=1e-2, rtol=0)
    torch.testing.assert_close(shift, torch.zeros(16), atol=1e-2, rtol=0)


def test_realign_head_writes_only_the_head_and_a_record(data_dir, tmp_path, capsys):
    """On a model whose last block was tuned: the head's two tensors change, every other tensor is bit-identical,
    the encoder's provenance records the fit (val KL not worse), the checkpoint loads with the new head, and a second
    run gives the same head (it starts from the base weights' head, not from the one it wrote)."""
    loaded = _train(data_dir, tmp_path / "run", "--tune-blocks", "1", "--views", "1", "--encoder-lr", "1e-2")
    directory = loaded.directory
    before = load_file(str(directory / "model.safetensors"))
    assert main(["realign-head", str(data_dir), "--checkpoint", str(directory), "--steps", "200",
                 "--lr", "1e-2", "--device", "cpu"]) == 0
    assert "val KL to the untuned CNN's class probabilities" in capsys.readouterr().out
    after = load_file(str(directory / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"encoder.head.weight", "encoder.head.bias"} and before.keys() == after.keys()
    record = json.loads((directory / "config.json").read_text())["encoder"]["provenance"]["head_realigned"]
    assert record["val_kl"][1] <= record["val_kl"][0] and record["train_photos"] > 0
    assert "tuned" in json.loads((directory / "config.json").read_text())["encoder"]["provenance"]
    reloaded = load_checkpoint(directory)
    assert torch.equal(reloaded.encoder.head.weight.data.to(after["encoder.head.weight"].dtype),
                       after["encoder.head.weight"])
    assert main(["realign-head", str(data_dir), "--checkpoint", str(directory), "--steps", "200",
                 "--lr", "1e-2", "--device", "cpu"]) == 0
    again = load_file(str(directory / "model.safetensors"))
    assert all(torch.equal(after[k], again[k]) for k in after)
    assert main(["export", str(directory), "--out", str(tmp_path / "shipped")]) == 0  # what ships keeps head and record
    shipped = load_file(str(tmp_path / "shipped" / "model.safetensors"))
    torch.testing.assert_close(shipped["encoder.head.weight"].float(), after["encoder.head.weight"].float(),
                               rtol=1e-3, atol=1e-3)  # float16 storage
    assert "head_realigned" in json.loads((tmp_path / "shipped" / "config.json").read_text())["encoder"]["provenance"]


def test_a_model_whose_cnn_was_not_tuned_is_refused(data_dir, model, capsys):
    assert main(["realign-head", str(data_dir), "--checkpoint", str(model), "--device", "cpu"]) == 2
    assert "was not tuned" in capsys.readouterr().err


def test_bad_settings_are_refused():
    with pytest.raises(Exception, match="realign"):
        RealignConfig(steps=0)
