"""``captioner evaluate``: decode a split with a checkpoint or score a COCO results file, with strict checks
on what is scored and a metrics.json that records how the numbers were made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captioner.cli import main
from captioner.manifest import load_manifest, split_records

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr", "ROUGE_L")


def evaluate(capsys, data_dir: Path, *argv) -> tuple[int, str, str]:
    code = main(["evaluate", str(data_dir), "--split", "val", "--device", "cpu", "--workers", "0", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def val_records(data_dir: Path):
    return split_records(load_manifest(data_dir), "val")


def write_results(path: Path, items: list[dict]) -> Path:
    path.write_text(json.dumps(items), encoding="utf-8")
    return path


def first_references(data_dir: Path) -> list[dict]:
    return [{"image_id": r.id, "caption": r.captions[0]} for r in val_records(data_dir)]


def test_decoding_a_split_writes_metrics_json(data_dir, trained_run, tmp_path, capsys):
    out = tmp_path / "m.json"
    checkpoint = trained_run / "best"
    code, stdout, _ = evaluate(capsys, data_dir, "--checkpoint", checkpoint, "-o", out)
    assert code == 0
    metrics = json.loads(out.read_text())
    for key in METRICS:
        assert isinstance(metrics[key], float)
    for key in METRICS[:4] + ("ROUGE_L",):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["CIDEr"] >= 0.0
    assert metrics["images"] == len(val_records(data_dir)) == 16
    assert metrics["split"] == "val"
    assert metrics["checkpoint"] == str(checkpoint)
    assert metrics["decoding"]["strategy"] == "greedy" and metrics["decoding"]["max_len"] >= 1
    assert metrics["results"] is None and metrics["warnings"] == []
    assert "16 images of split 'val', greedy" in stdout and "BLEU-1" in stdout and f"wrote {out}" in stdout


def test_decoding_settings_are_recorded(data_dir, trained_run, tmp_path, capsys):
    out = tmp_path / "m.json"
    code, _, _ = evaluate(capsys, data_dir, "--checkpoint", trained_run / "best", "-o", out, "--strategy", "beam",
                          "--beam-size", "2", "--length-penalty", "0.5", "--max-len", "8")
    assert code == 0
    decoding = json.loads(out.read_text())["decoding"]
    assert decoding["strategy"] == "beam" and decoding["beam_size"] == 2
    assert decoding["length_penalty"] == 0.5 and decoding["max_len"] == 8


def test_results_equal_to_a_reference_score_bleu_one(data_dir, tmp_path, capsys):
    results = write_results(tmp_path / "results.json", first_references(data_dir))
    out = tmp_path / "m.json"
    code, _, err = evaluate(capsys, data_dir, "--results", results, "-o", out)
    assert code == 0, err
    metrics = json.loads(out.read_text())
    assert metrics["Bleu_1"] == pytest.approx(1.0)
    assert metrics["Bleu_4"] == pytest.approx(1.0)
    assert metrics["results"] == str(results)
    assert metrics["checkpoint"] is None and metrics["decoding"] is None


def test_results_missing_images_is_an_error(data_dir, tmp_path, capsys):
    items = first_references(data_dir)
    dropped = items.pop(3)["image_id"]
    results = write_results(tmp_path / "results.json", items)
    code, _, err = evaluate(capsys, data_dir, "--results", results, "-o", tmp_path / "m.json")
    assert code == 2
    assert err.startswith(f"captioner evaluate: error: {results}: 1 of the split's 16 images have no caption")
    assert str(dropped) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.json").exists()


def test_results_with_an_unknown_image_id_is_an_error(data_dir, tmp_path, capsys):
    items = first_references(data_dir) + [{"image_id": 987654, "caption": "a red square"}]
    results = write_results(tmp_path / "results.json", items)
    code, _, err = evaluate(capsys, data_dir, "--results", results)
    assert code == 2
    assert err.strip() == (f"captioner evaluate: error: {results}: entry 16 has image_id 987654, "
                           "which is not in this split")


def test_results_with_an_image_of_another_split_is_an_error(data_dir, tmp_path, capsys):
    train_id = next(r.id for r in load_manifest(data_dir) if r.split == "train")
    items = first_references(data_dir)
    items[0]["image_id"] = train_id
    code, _, err = evaluate(capsys, data_dir, "--results", write_results(tmp_path / "r.json", items))
    assert code == 2 and f"image_id {train_id}, which is not in this split" in err


def test_results_with_a_duplicate_image_id_is_an_error(data_dir, tmp_path, capsys):
    items = first_references(data_dir)
    items.append(dict(items[0]))
    code, _, err = evaluate(capsys, data_dir, "--results", write_results(tmp_path / "r.json", items))
    assert code == 2 and f"image_id {items[0]['image_id']} appears more than once" in err


@pytest.mark.parametrize("content, message", [
    ('{"image_id": 1, "caption": "x"}', "expected a JSON list"),
    ('[{"image_id": "1", "caption": "x"}]', "entry 0 is not {'image_id': int, 'caption': str}"),
    ('[{"image_id": 1, "caption": "x"', "not a JSON results file"),
])
def test_malformed_results_file(data_dir, tmp_path, capsys, content, message):
    path = tmp_path / "r.json"
    path.write_text(content)
    code, _, err = evaluate(capsys, data_dir, "--results", path)
    assert code == 2 and err.startswith(f"captioner evaluate: error: {path}: ") and message in err


def test_results_file_not_found(data_dir, tmp_path, capsys):
    code, _, err = evaluate(capsys, data_dir, "--results", tmp_path / "nope.json")
    assert code == 2 and "results file not found" in err


def test_empty_caption_is_warned_and_still_scored(data_dir, tmp_path, capsys):
    items = first_references(data_dir)
    items[0]["caption"] = ""
    items[1]["caption"] = " . "
    out = tmp_path / "m.json"
    code, _, err = evaluate(capsys, data_dir, "--results", write_results(tmp_path / "r.json", items), "-o", out)
    assert code == 0
    metrics = json.loads(out.read_text())
    assert len(metrics["warnings"]) == 2
    assert f"warning: image_id {items[0]['image_id']}: empty caption" in err
    assert metrics["images"] == 16
    assert 0.0 < metrics["Bleu_1"] < 1.0  # scored, with the two empty captions counting against it


def test_per_image_file(data_dir, tmp_path, capsys):
    items = first_references(data_dir)
    per_image = tmp_path / "per_image.json"
    code, _, _ = evaluate(capsys, data_dir, "--results", write_results(tmp_path / "r.json", items),
                          "--per-image", per_image)
    assert code == 0
    rows = json.loads(per_image.read_text())
    records = val_records(data_dir)
    assert [row["image_id"] for row in rows] == [r.id for r in records]
    for row, record in zip(rows, records):
        assert row["caption"] == record.captions[0]
        assert row["references"] == record.captions and row["path"] == record.path


def test_unknown_split_is_an_error(data_dir, tmp_path, capsys):
    code = main(["evaluate", str(data_dir), "--split", "test", "--results", str(tmp_path / "r.json")])
    _, err = capsys.readouterr()
    assert code == 2 and "split 'test' has no images; the manifest has ['train', 'val']" in err
