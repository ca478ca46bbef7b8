"""The data pipeline: caption files in three formats -> manifest, vocabulary and a report of what was dropped.

Every test runs the real ``captioner prepare`` command on real files and reads what it wrote.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from captioner.cli import main
from captioner.tokenizer import detokenize, tokenize
from captioner.vocab import SPECIALS, Vocab
from conftest import FLICKR8K, draw


def prepare(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``captioner prepare ARGV``; return (exit code, stdout, stderr)."""
    code = main(["prepare", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def read(data_dir: Path, name: str):
    return json.loads((data_dir / name).read_text(encoding="utf-8"))


def splits_of(data_dir: Path) -> dict[int, str]:
    return {r["id"]: r["split"] for r in read(data_dir, "manifest.json")["records"]}


def write_coco(path: Path, images: list[dict], annotations: list[dict]) -> Path:
    path.write_text(json.dumps({"images": images, "annotations": annotations}), encoding="utf-8")
    return path


def small_coco(root: Path, captions: dict[str, list[str]]) -> tuple[Path, Path]:
    """Images ``NAME`` drawn into ``root/images`` and one COCO file with the given captions per image."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, (name, caps) in enumerate(captions.items(), 1):
        if not (images_dir / name).exists():
            draw("red", "square", "white", seed=image_id).save(images_dir / name)
        images.append({"id": image_id, "file_name": name})
        annotations += [{"id": image_id * 100 + j, "image_id": image_id, "caption": c} for j, c in enumerate(caps)]
    return write_coco(root / "captions.json", images, annotations), images_dir


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("captioner prepare: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --- COCO -------------------------------------------------------------------------------------------------------


def test_coco_one_split_per_file(coco_files, tmp_path, capsys):
    code, out, _ = prepare(capsys, "coco", coco_files["train"], coco_files["val"], "--images", coco_files["images"],
                           "--out", tmp_path, "--min-count", "1", "--split-names", "train", "val")
    assert code == 0
    report = read(tmp_path, "prepare_report.json")
    assert report["images"] == {"train": 48, "val": 16}
    assert report["captions"] == {"train": 48 * 5, "val": 16 * 5}
    assert Counter(splits_of(tmp_path).values()) == {"train": 48, "val": 16}
    assert "images per split" in out


def test_coco_split_names_rename_the_files_splits(coco_files, tmp_path, capsys):
    code, _, _ = prepare(capsys, "coco", coco_files["train"], coco_files["val"], "--images", coco_files["images"],
                         "--out", tmp_path, "--min-count", "1", "--split-names", "train", "test")
    assert code == 0
    assert read(tmp_path, "prepare_report.json")["images"] == {"test": 16, "train": 48}


def test_coco_split_names_must_match_the_files(coco_files, tmp_path, capsys):
    code, _, err = prepare(capsys, "coco", coco_files["train"], coco_files["val"], "--images", coco_files["images"],
                           "--out", tmp_path, "--split-names", "train")
    assert_one_line_error(code, err, "--split-names")


def test_coco_seeded_val_test_cut(coco_files, tmp_path, capsys):
    def cut(seed: int, out: Path) -> dict[int, str]:
        code, _, _ = prepare(capsys, "coco", coco_files["train"], "--images", coco_files["images"], "--out", out,
                             "--min-count", "1", "--val-size", "5", "--test-size", "3", "--seed", seed)
        assert code == 0
        return splits_of(out)

    first = cut(1, tmp_path / "a")
    assert Counter(first.values()) == {"train": 40, "val": 5, "test": 3}
    assert read(tmp_path / "a", "prepare_report.json")["images"] == {"test": 3, "train": 40, "val": 5}
    assert cut(1, tmp_path / "b") == first  # same seed, same cut
    assert cut(2, tmp_path / "c") != first  # another seed, another cut


def test_coco_cut_larger_than_train_is_an_error(coco_files, tmp_path, capsys):
    code, _, err = prepare(capsys, "coco", coco_files["train"], "--images", coco_files["images"], "--out", tmp_path,
                           "--val-size", "40", "--test-size", "8")
    assert_one_line_error(code, err, "--val-size", str(coco_files["train"]))


# --- Karpathy ---------------------------------------------------------------------------------------------------


def test_karpathy_json_with_restval_joining_train(tmp_path, capsys):
    images_dir = tmp_path / "images"
    entries = []
    for imgid, (folder, split) in enumerate([("train2014", "train"), ("val2014", "restval"), ("val2014", "val"),
                                             ("val2014", "test"), ("train2014", "train")]):
        (images_dir / folder).mkdir(parents=True, exist_ok=True)
        name = f"img_{imgid}.jpg"
        draw("blue", "circle", "black", seed=imgid).save(images_dir / folder / name)
        entries.append({"filepath": folder, "filename": name, "imgid": imgid, "split": split,
                        "sentences": [{"raw": f"A blue circle number {imgid}.", "tokens": []},
                                      {"raw": "a circle", "tokens": []}]})
    dataset = tmp_path / "dataset_flickr8k.json"
    dataset.write_text(json.dumps({"dataset": "flickr8k", "images": entries}))
    code, _, _ = prepare(capsys, "karpathy", dataset, "--images", images_dir, "--out", tmp_path / "data",
                         "--min-count", "1")
    assert code == 0
    records = {r["id"]: r for r in read(tmp_path / "data", "manifest.json")["records"]}
    assert {i: r["split"] for i, r in records.items()} == {0: "train", 1: "train", 2: "val", 3: "test", 4: "train"}
    assert records[1]["path"] == str(images_dir / "val2014" / "img_1.jpg")
    assert records[3]["captions"] == ["A blue circle number 3.", "a circle"]
    assert read(tmp_path / "data", "prepare_report.json")["images"] == {"test": 1, "train": 3, "val": 1}


# --- Flickr8k ---------------------------------------------------------------------------------------------------


def flickr_tree(root: Path) -> Path:
    """A tiny Flickr8k-format folder: token file, the three split files beside it, images."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    names = [f"{i}000_abc.jpg" for i in range(1, 6)]
    for i, name in enumerate(names):
        draw("green", "square", "white", seed=i).save(images_dir / name)
    lines = [f"{name}#{j}\tA green square , picture {i} caption {j} ." for i, name in enumerate(names) for j in range(5)]
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n\n")  # a trailing blank line is fine
    (root / "Flickr_8k.trainImages.txt").write_text(f"{names[0]}\n{names[1]}\n")
    (root / "Flickr_8k.devImages.txt").write_text(f"{names[2]}\n")
    (root / "Flickr_8k.testImages.txt").write_text(f"{names[3]}\n")  # names[4]: in no split
    return root / "Flickr8k.token.txt"


def test_flickr8k_token_file_with_default_split_files(tmp_path, capsys):
    token = flickr_tree(tmp_path / "flickr")
    code, _, _ = prepare(capsys, "flickr8k", token, "--images", tmp_path / "flickr" / "images",
                         "--out", tmp_path / "data", "--min-count", "1")
    assert code == 0
    report = read(tmp_path / "data", "prepare_report.json")
    assert report["images"] == {"test": 1, "train": 2, "val": 1}
    assert report["captions"] == {"test": 5, "train": 10, "val": 5}
    assert {"image": "5000_abc.jpg", "reason": "listed in no split file"} in report["skipped"]
    records = read(tmp_path / "data", "manifest.json")["records"]
    assert all(len(r["captions"]) == 5 for r in records)
    assert records[0]["captions"][0] == "A green square , picture 0 caption 0 ."
    ids = [r["id"] for r in records]
    assert ids == sorted(ids) and len(set(ids)) == 4  # stable: positions in sorted file-name order


def test_flickr8k_split_file_option_overrides_a_split(tmp_path, capsys):
    token = flickr_tree(tmp_path / "flickr")
    my_test = tmp_path / "my_test.txt"
    my_test.write_text("4000_abc.jpg\n5000_abc.jpg\n")
    code, _, _ = prepare(capsys, "flickr8k", token, "--images", tmp_path / "flickr" / "images",
                         "--out", tmp_path / "data", "--min-count", "1", "--split-file", f"test={my_test}")
    assert code == 0
    report = read(tmp_path / "data", "prepare_report.json")
    assert report["images"] == {"test": 2, "train": 2, "val": 1}
    assert report["skipped"] == []


def test_flickr8k_bad_token_line_names_file_and_line(tmp_path, capsys):
    token = flickr_tree(tmp_path / "flickr")
    lines = token.read_text().splitlines()
    lines[2] = "1000_abc.jpg 2 no tab and no hash"
    token.write_text("\n".join(lines))
    code, _, err = prepare(capsys, "flickr8k", token, "--images", tmp_path / "flickr" / "images",
                           "--out", tmp_path / "data")
    assert_one_line_error(code, err, f"{token}:3:", "NAME.jpg#N<TAB>caption")


def test_flickr8k_files_saved_with_a_byte_order_mark(tmp_path, capsys):
    """Files saved by Windows editors start with a UTF-8 BOM; it must not become part of the first name."""
    token = flickr_tree(tmp_path / "flickr")
    for path in (token, tmp_path / "flickr" / "Flickr_8k.trainImages.txt"):
        path.write_text("\ufeff" + path.read_text(), encoding="utf-8")
    code, _, _ = prepare(capsys, "flickr8k", token, "--images", tmp_path / "flickr" / "images",
                         "--out", tmp_path / "data", "--min-count", "1")
    assert code == 0
    report = read(tmp_path / "data", "prepare_report.json")
    assert report["images"] == {"test": 1, "train": 2, "val": 1}
    assert report["skipped"] == [{"image": "5000_abc.jpg", "reason": "listed in no split file"}]
    assert all(len(r["captions"]) == 5 for r in read(tmp_path / "data", "manifest.json")["records"])


@pytest.mark.slow
def test_real_flickr8k_official_splits(tmp_path, capsys):
    if not (FLICKR8K / "Flickr8k.token.txt").is_file():
        pytest.skip(f"real Flickr8k not found at {FLICKR8K} (needs Flickr8k.token.txt, split files and images/)")
    code, _, _ = prepare(capsys, "flickr8k", FLICKR8K / "Flickr8k.token.txt", "--images", FLICKR8K / "images",
                         "--out", tmp_path, "--min-count", "5")
    assert code == 0
    report = read(tmp_path, "prepare_report.json")
    assert report["images"] == {"train": 6000, "val": 1000, "test": 1000}
    assert report["captions"] == {"train": 30000, "val": 5000, "test": 5000}
    records = read(tmp_path, "manifest.json")["records"]
    assert len(records) == 8000 and all(len(r["captions"]) == 5 for r in records)
    assert all(s["reason"] != "no usable caption" and "image" in s for s in report["skipped"])
    assert not any("corrupt" in s["reason"] or "not found" in s["reason"] for s in report["skipped"])
    vocab = read(tmp_path, "vocab.json")["words"]
    assert vocab[:4] == list(SPECIALS) and 2000 < len(vocab) < 4000


# --- vocabulary and tokenizer -----------------------------------------------------------------------------------


def test_vocabulary_specials_first_min_count_and_unk_report(tmp_path, capsys):
    captions = {"a.jpg": ["A dog runs.", "the dog sits", "A zebra!"],  # dog x2, a x2, zebra x1
                "b.jpg": ["a dog and a cat", "the cat"],
                "v.jpg": ["an okapi, an okapi, an okapi"]}
    coco, images = small_coco(tmp_path, captions)
    code, _, _ = prepare(capsys, "coco", coco, "--images", images, "--out", tmp_path / "data", "--min-count", "2")
    assert code == 0
    vocab = read(tmp_path / "data", "vocab.json")
    words = vocab["words"]
    assert words[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    counts = Counter(t for caps in captions.values() for c in caps for t in tokenize(c))
    assert set(words[4:]) == {w for w, c in counts.items() if c >= 2}
    assert words[4:] == sorted(words[4:], key=lambda w: (-counts[w], w))  # most frequent first
    assert "zebra" not in words and "runs" not in words
    report = read(tmp_path / "data", "prepare_report.json")
    rare = {w for w, c in counts.items() if c < 2}
    assert report["unk"]["distinct_words"] == len(rare)
    assert report["unk"]["train_token_fraction"] == pytest.approx(len(rare) / sum(counts.values()), abs=1e-4)
    assert report["vocab_size"] == len(words)


def test_vocabulary_counts_caption_ends_and_knows_the_words_no_caption_ends_on(tmp_path):
    """``Vocab.ends`` counts the training captions ending on each word; ``non_final(rate)`` gives the words whose
    share of ends among their uses is below ``rate`` ("and", "a", an adjective), which decoding never ends on. The
    counts survive vocab.json; a vocabulary saved without them (older files) has no such words."""
    captions = [["a", "dog", "runs", "on", "the", "grass"], ["a", "black", "dog", "on", "grass"],
                ["a", "black", "and", "white", "dog"], ["the", "dog", "is", "black"], ["a", "dog"]]
    vocab = Vocab.build(captions + [[]], min_count=1)
    assert vocab.ends == {"grass": 2, "dog": 2, "black": 1}
    assert {vocab.words[i] for i in vocab.non_final(0.4)} == {"a", "runs", "on", "the", "black", "and", "white", "is"}
    assert {vocab.words[i] for i in vocab.non_final(0.3)} == {"a", "runs", "on", "the", "and", "white", "is"}
    vocab.save(tmp_path / "vocab.json")
    again = Vocab.load(tmp_path / "vocab.json")
    assert again.ends == vocab.ends and again.non_final(0.4) == vocab.non_final(0.4)
    old = json.loads((tmp_path / "vocab.json").read_text())
    del old["ends"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert Vocab.load(tmp_path / "old.json").non_final(0.4) == []


def test_vocabulary_comes_from_training_captions_only(coco_files, tmp_path, capsys):
    val = json.loads(coco_files["val"].read_text())
    val["annotations"][0]["caption"] = "a platypus " * 10  # frequent, but only in val
    val_file = write_coco(tmp_path / "val.json", val["images"], val["annotations"])
    code, _, _ = prepare(capsys, "coco", coco_files["train"], val_file, "--images", coco_files["images"],
                         "--out", tmp_path / "data", "--min-count", "1", "--split-names", "train", "val")
    assert code == 0
    assert "platypus" not in read(tmp_path / "data", "vocab.json")["words"]


@pytest.mark.parametrize("text, tokens", [
    ("A Dog RUNS", ["a", "dog", "runs"]),
    ("Two men, playing; happily!", ["two", "men", "playing", "happily"]),
    ("The dog's ball", ["the", "dog", "'s", "ball"]),
    ("A black-and-white dog", ["a", "black-and-white", "dog"]),
    ("A dog runs.", ["a", "dog", "runs"]),
    ("a u.s. flag.", ["a", "u.s", "flag"]),
    ("... !", []),
    ("", []),
])
def test_tokenize(text, tokens):
    assert tokenize(text) == tokens


def test_detokenize_attaches_clitics():
    assert detokenize(["the", "dog", "'s", "ball"]) == "the dog's ball"
    assert detokenize(["it", "does", "n't", "swim"]) == "it doesn't swim"
    assert detokenize(tokenize("A black-and-white dog's toy.")) == "a black-and-white dog's toy"
    assert detokenize([]) == ""


# --- bad images -------------------------------------------------------------------------------------------------


def bad_image_dataset(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    coco, images = small_coco(tmp_path, {"good.jpg": ["a red square"], "good2.jpg": ["a red square"],
                                         "truncated.jpg": ["a red square"], "missing.jpg": ["a red square"]})
    data = (images / "truncated.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (images / "missing.jpg").unlink()
    return coco, images, images / "truncated.jpg", images / "missing.jpg"


def test_corrupt_and_missing_images_are_skipped_and_reported(tmp_path, capsys):
    coco, images, truncated, missing = bad_image_dataset(tmp_path)
    code, out, _ = prepare(capsys, "coco", coco, "--images", images, "--out", tmp_path / "data", "--min-count", "1")
    assert code == 0
    assert "skipped 2 item(s)" in out
    report = read(tmp_path / "data", "prepare_report.json")
    assert report["images"] == {"train": 2} and report["skipped_count"] == 2
    reasons = {s["image"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {str(truncated), str(missing)}
    assert "not found" in reasons[str(missing)]
    assert "truncated" in reasons[str(truncated)] or "corrupt" in reasons[str(truncated)]
    kept = [r["path"] for r in read(tmp_path / "data", "manifest.json")["records"]]
    assert kept == [str(images / "good.jpg"), str(images / "good2.jpg")]


def test_strict_fails_naming_the_bad_images(tmp_path, capsys):
    coco, images, truncated, missing = bad_image_dataset(tmp_path)
    code, _, err = prepare(capsys, "coco", coco, "--images", images, "--out", tmp_path / "data", "--strict")
    assert code == 2
    assert "captioner prepare: error: 2 unusable image(s) (--strict)" in err
    assert str(truncated) in err and str(missing) in err
    assert not (tmp_path / "data" / "manifest.json").exists()


# --- malformed caption files ------------------------------------------------------------------------------------


def run_on_bytes(tmp_path: Path, capsys, content: bytes) -> tuple[int, str, Path]:
    path = tmp_path / "captions_train.json"
    path.write_bytes(content)
    (tmp_path / "images").mkdir(exist_ok=True)
    code, _, err = prepare(capsys, "coco", path, "--images", tmp_path / "images", "--out", tmp_path / "data")
    return code, err, path


def coco_bytes(images: list, annotations: list) -> bytes:
    return json.dumps({"images": images, "annotations": annotations}, indent=1).encode()


GOOD_IMAGES = [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}]
GOOD_ANNS = [{"id": i, "image_id": 1 + i % 2, "caption": f"caption {i}"} for i in range(5)]


def test_invalid_json_names_line_and_column(tmp_path, capsys):
    bad_line = '  {"id": 1, "image_id": 1 "caption": "a dog"}'  # a missing comma
    text = '{\n "images": [{"id": 1, "file_name": "a.jpg"}],\n "annotations": [\n' + bad_line + '\n ]\n}\n'
    code, err, path = run_on_bytes(tmp_path, capsys, text.encode())
    column = bad_line.index('"caption"') + 1
    assert_one_line_error(code, err, str(path), f"invalid JSON at line 4 column {column}")


def test_missing_key_names_key_and_index(tmp_path, capsys):
    anns = [dict(a) for a in GOOD_ANNS]
    del anns[3]["caption"]
    code, err, path = run_on_bytes(tmp_path, capsys, coco_bytes(GOOD_IMAGES, anns))
    assert_one_line_error(code, err, str(path), "annotations[3]", "'caption'")


def test_missing_top_level_key(tmp_path, capsys):
    code, err, path = run_on_bytes(tmp_path, capsys, json.dumps({"images": GOOD_IMAGES}).encode())
    assert_one_line_error(code, err, str(path), "top level", "'annotations'")


def test_wrong_type_names_field_and_types(tmp_path, capsys):
    images = [dict(i) for i in GOOD_IMAGES]
    images[1]["id"] = "2"
    code, err, path = run_on_bytes(tmp_path, capsys, coco_bytes(images, GOOD_ANNS))
    assert_one_line_error(code, err, str(path), "images[1].id should be int, got str")


def test_boolean_is_not_an_image_id(tmp_path, capsys):
    anns = [dict(a) for a in GOOD_ANNS]
    anns[0]["image_id"] = True
    code, err, path = run_on_bytes(tmp_path, capsys, coco_bytes(GOOD_IMAGES, anns))
    assert_one_line_error(code, err, str(path), "annotations[0].image_id should be int, got bool")


def test_duplicate_image_ids(tmp_path, capsys):
    images = GOOD_IMAGES + [{"id": 1, "file_name": "c.jpg"}]
    code, err, path = run_on_bytes(tmp_path, capsys, coco_bytes(images, GOOD_ANNS))
    assert_one_line_error(code, err, str(path), "images[2] repeats image id 1")


def test_annotation_for_unknown_image(tmp_path, capsys):
    anns = GOOD_ANNS + [{"id": 99, "image_id": 7, "caption": "x"}]
    code, err, path = run_on_bytes(tmp_path, capsys, coco_bytes(GOOD_IMAGES, anns))
    assert_one_line_error(code, err, str(path), "annotations[5]", "unknown image id 7")


def test_non_utf8_bytes(tmp_path, capsys):
    content = coco_bytes(GOOD_IMAGES, GOOD_ANNS).replace(b"caption 2", b"caption \xe9\xff")
    code, err, path = run_on_bytes(tmp_path, capsys, content)
    assert_one_line_error(code, err, str(path), "not UTF-8")


def test_missing_caption_file(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    code, _, err = prepare(capsys, "coco", tmp_path / "nope.json", "--images", tmp_path / "images",
                           "--out", tmp_path / "data")
    assert_one_line_error(code, err, str(tmp_path / "nope.json"), "cannot read")


# --- empty captions ---------------------------------------------------------------------------------------------


def test_empty_captions_are_dropped_and_counted(tmp_path, capsys):
    coco, images = small_coco(tmp_path, {"a.jpg": ["a red square", "", "  . "],
                                         "b.jpg": ["a red square", "red"],
                                         "c.jpg": ["", "!!"]})  # no usable caption at all
    code, _, _ = prepare(capsys, "coco", coco, "--images", images, "--out", tmp_path / "data", "--min-count", "1")
    assert code == 0
    report = read(tmp_path / "data", "prepare_report.json")
    assert report["empty_captions_dropped"] == 4
    assert report["captions"] == {"train": 3}
    assert report["skipped"] == [{"image": str(images / "c.jpg"), "id": 3, "reason": "no usable caption"}]
    records = read(tmp_path / "data", "manifest.json")["records"]
    assert [r["captions"] for r in records] == [["a red square"], ["a red square", "red"]]
