"""``captioner train --init-from``: a trained model learns a new domain's words, keeping what it knew.

The base model is the session's tiny shapes model (``trained_run``: "a red square ..."). The new domain
describes red and blue shapes with words it has never seen ("scarlet", "navy"), in a CSV data directory.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from captioner.api import Captioner
from captioner.checkpoint import load_checkpoint
from captioner.cli import main
from captioner.errors import ConfigError
from captioner.finetune import init_decoder
from captioner.train import TrainConfig, Trainer
from captioner.vocab import Vocab

from conftest import BACKGROUNDS, SHAPES, TEST_ENCODER, draw, make_coco

NEW_WORDS = {"red": "scarlet", "blue": "navy"}
FINETUNE = ["--batch-size", "16", "--workers", "0", "--warmup-steps", "3", "--log-every", "1", "--lr", "0.005"]


def _domain_csv(root: Path, n_train: int = 24, n_val: int = 8) -> tuple[Path, Path]:
    """Red and blue shapes captioned with the new colour words; an image,caption,split CSV and its image folder."""
    images = root / "images"
    images.mkdir(parents=True)
    combos = [(c, s, b) for c in NEW_WORDS for s in SHAPES for b in BACKGROUNDS]
    rows = []
    for i in range(n_train + n_val):
        colour, shape, background = combos[i % len(combos)]
        name = f"d{i:03d}.jpg"
        draw(colour, shape, background, seed=1000 + i).save(images / name, quality=95)
        word = NEW_WORDS[colour]
        split = "train" if i < n_train else "val"
        rows += [(name, f"a {word} {shape} on a {background} background", split), (name, f"a {word} {shape}", split)]
    table = root / "domain.csv"
    with open(table, "w", newline="") as fh:
        csv.writer(fh).writerows([("image", "caption", "split"), *rows])
    return table, images


@pytest.fixture(scope="module")
def domain_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("domain")
    table, images = _domain_csv(root)
    out = root / "data"
    assert main(["prepare", "csv", str(table), "--images", str(images), "--out", str(out), "--min-count", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def finetuned(trained_run, domain_dir, tmp_path_factory) -> Path:
    """The shapes model fine-tuned on the new domain: the run directory."""
    run = tmp_path_factory.mktemp("finetuned")
    assert main(["train", str(domain_dir), "--out", str(run), "--init-from", str(trained_run / "best"), "--epochs", "12",
                 *FINETUNE]) == 0
    return run


def test_extended_vocabulary_keeps_every_old_id_and_appends_new_words():
    base = Vocab.build([["a", "red", "square"], ["a", "red", "circle"]], min_count=1)
    data = Vocab.build([["a", "scarlet", "square"], ["a", "scarlet", "circle"], ["navy"]], min_count=1)
    run = base.extended(data)
    assert run.words[: len(base)] == base.words
    assert run.words[len(base):] == ["scarlet", "navy"]  # the data's order: by training count
    assert run.counts["scarlet"] == 2 and run.counts["red"] == 2
    assert run.ends == {"square": 1, "circle": 1, "navy": 1}  # end counts too: the old words' then the new ones'


def test_a_run_vocabulary_is_the_checkpoints_then_the_new_words(finetuned, trained_run, domain_dir):
    base = load_checkpoint(trained_run / "best").vocab
    run = load_checkpoint(finetuned / "best").vocab
    assert run.words[: len(base)] == base.words
    assert set(run.words[len(base):]) == {"scarlet", "navy"}  # "square", "on", ... were known already
    assert set(Vocab.load(domain_dir / "vocab.json").words) < set(run.words)


def test_new_rows_start_as_unk_and_every_old_row_is_the_checkpoints(trained_run, domain_dir):
    loaded = load_checkpoint(trained_run / "best")
    vocab = loaded.vocab.extended(Vocab.load(domain_dir / "vocab.json"))
    _, decoder = init_decoder(loaded, vocab)
    old, unk, n = loaded.decoder_state, loaded.vocab.specials.unk, len(loaded.vocab)
    state = decoder.state_dict()
    for name in ("embed.weight", "out.weight", "out.bias"):
        assert torch.equal(state[name][:n], old[name]), name
    for name in ("embed.weight", "out.weight"):
        assert torch.equal(state[name][n:], old[name][unk].expand_as(state[name][n:])), name
    assert all(torch.equal(state[k], v) for k, v in old.items() if k not in ("embed.weight", "out.weight", "out.bias"))
    # the new words share <unk>'s probability: together exactly its logit, so old words keep their odds
    logits = decoder.step(torch.tensor([vocab.specials.start]), decoder.init_state(torch.randn(1, decoder.config.feature_dim)))[0][0]
    assert torch.allclose(torch.logsumexp(logits[n:], 0), logits[unk], atol=1e-5)


def test_the_fine_tuned_model_loads_and_uses_the_new_words(finetuned, tmp_path):
    captioner = Captioner.from_pretrained(finetuned / "best", device="cpu")
    paths = []
    for colour in NEW_WORDS:
        paths.append(tmp_path / f"{colour}.png")
        draw(colour, "square", "white", seed=7).save(paths[-1])
    for caption in captioner.caption([str(p) for p in paths]):  # the tiny random-CNN model tells colours apart poorly
        assert set(caption.split()) & set(NEW_WORDS.values()), caption


def test_architecture_or_encoder_flags_that_differ_from_the_checkpoint_are_refused(trained_run, domain_dir, tmp_path,
                                                                                  capsys):
    args = ["train", str(domain_dir), "--out", str(tmp_path / "run"), "--init-from", str(trained_run / "best")]
    assert main([*args, "--encoder", "resnet50", "--hidden", "64"]) == 2
    err = capsys.readouterr().err
    assert "encoder 'resnet50' (the checkpoint's: 'resnet18')" in err and "--hidden" not in err  # 64 is the model's
    assert not (tmp_path / "run").exists()


def test_a_feature_cache_of_another_encoder_is_refused(trained_run, domain_dir, finetuned, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(domain_dir, data)
    index = data / "features" / TEST_ENCODER.cache_key() / "index.json"  # built by the fine-tuning run
    meta = json.loads(index.read_text())
    meta["encoder"]["preprocess"]["resize"] += 8  # same folder name, other pixels
    index.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="another encoder or preprocessing"):
        Trainer(data, tmp_path / "run", TrainConfig(init_from=str(trained_run / "best"), workers=0))


def test_resume_of_an_init_from_run_continues_exactly(trained_run, domain_dir, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = [str(domain_dir), "--init-from", str(trained_run / "best"), "--epochs", "2", *FINETUNE]
    assert main(["train", *common, "--out", str(full)]) == 0
    assert main(["train", *common, "--out", str(part), "--max-steps", "5"]) == 0  # 48 pairs / 16: 3 steps an epoch
    assert main(["train", str(domain_dir), "--out", str(part), "--resume", "--max-steps", "0"]) == 0
    losses = [[json.loads(line)["loss"] for line in (run / "steps.jsonl").read_text().splitlines()] for run in (full, part)]
    assert len(losses[0]) == 6 and losses[1] == losses[0]
    a, b = load_checkpoint(part / "last").decoder_state, load_checkpoint(full / "last").decoder_state
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_training_on_a_test_only_data_directory_is_one_clear_error(tmp_path, capsys):
    files = make_coco(tmp_path / "src", n_train=0, n_val=4)
    data = tmp_path / "data"
    assert main(["prepare", "coco", str(files["val"]), "--images", str(files["images"]), "--out", str(data),
                 "--split-names", "test"]) == 0
    capsys.readouterr()
    assert main(["train", str(data), "--out", str(tmp_path / "run"), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{data}: training needs a 'train' and a 'val' split, this data has images in test (4);" in err
    assert "vocab.json" not in err  # what it said before: "vocabulary file not found"
