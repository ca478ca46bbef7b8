"""``captioner caption`` on many files: per-file errors, JSONL/CSV/COCO outputs, globs and folders, --resume,
n-best lists. Every test runs the real command on real image files with the trained test checkpoint."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from captioner.cli import main
from captioner.manifest import load_manifest
from conftest import draw

SHAPES = [("red", "square", "white"), ("blue", "circle", "black"), ("green", "square", "black"),
          ("yellow", "circle", "white")]


def caption(capsys, trained_run: Path, *argv) -> tuple[int, str, str]:
    """Run ``captioner caption`` in-process (single-process decoding unless ARGV says otherwise)."""
    code = main(["caption", "--checkpoint", str(trained_run / "best"), "--device", "cpu", "--workers", "0",
                 "--batch-size", "3", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def good_folder(folder: Path, n: int = 4) -> list[str]:
    """``n`` good images in ``folder``; their paths as ``caption FOLDER`` lists them."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        draw(*SHAPES[i % len(SHAPES)], seed=i).save(folder / f"img_{i}.jpg", quality=90)
    return [os.path.join(str(folder), f"img_{i}.jpg") for i in range(n)]


@pytest.fixture
def mixed(tmp_path) -> tuple[Path, list[str], str, str]:
    """A folder with good images, a truncated JPEG and a text file named .png."""
    folder = tmp_path / "photos"
    good = good_folder(folder)
    truncated = folder / "broken.jpg"
    draw("red", "circle", "white", size=200).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[:1500])
    (folder / "notes.png").write_text("shopping list: eggs, milk\n")
    return folder, good, str(truncated), str(folder / "notes.png")


def test_folder_with_bad_files_captions_the_good_ones_and_exits_1(mixed, trained_run, tmp_path, capsys):
    folder, good, truncated, text = mixed
    out = tmp_path / "out.jsonl"
    code, stdout, err = caption(capsys, trained_run, folder, "-o", out, "--workers", "1")  # decoding in a worker
    assert code == 1
    records = {r["path"]: r for r in jsonl(out)}
    assert set(records) == set(good) | {truncated, text}
    for path in good:
        assert records[path]["caption"].strip() and "error" not in records[path]
    assert "truncated" in records[truncated]["error"] and "not an image" in records[text]["error"]
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 2
    assert any(truncated in line and "truncated" in line for line in error_lines)
    assert any(text in line and "not an image" in line for line in error_lines)
    assert "captioned 4 of 6 image(s); 2 failed" in err
    assert stdout == ""


def test_error_lines_name_the_file_once(mixed, trained_run, tmp_path, capsys):
    _, _, truncated, text = mixed
    code, _, err = caption(capsys, trained_run, truncated, text, "-o", tmp_path / "out.jsonl")
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert lines[0].startswith(f"error: {truncated}: unreadable or corrupt image")
    assert lines[1] == f"error: {text}: not an image (Pillow cannot identify the format)"


def test_all_good_exits_0_and_jsonl_goes_to_stdout_without_o(trained_run, tmp_path, capsys):
    good = good_folder(tmp_path / "photos", 2)
    code, stdout, err = caption(capsys, trained_run, *good)
    assert code == 0
    records = [json.loads(line) for line in stdout.splitlines()]
    assert [r["path"] for r in records] == good
    assert all(r["caption"] and len(r["nbest"]) == 1 for r in records)
    assert "captioned 2 of 2 image(s); 0 failed" in err


def test_csv_output(mixed, trained_run, tmp_path, capsys):
    folder, good, truncated, _ = mixed
    out = tmp_path / "out.csv"
    code, _, _ = caption(capsys, trained_run, *good, truncated, "-o", out)
    assert code == 1
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == good + [truncated]
    assert all(r["caption"] and float(r["logprob"]) <= 0 and r["error"] == "" for r in rows[:-1])
    assert rows[-1]["caption"] == "" and "truncated" in rows[-1]["error"]


def test_coco_output_takes_image_ids_from_the_manifest(data_dir, trained_run, tmp_path, capsys):
    records = [r for r in load_manifest(data_dir) if r.split == "val"][:5]
    out = tmp_path / "results.json"
    code, _, err = caption(capsys, trained_run, *[r.path for r in records], "-o", out, "--data", data_dir)
    assert code == 0, err
    results = json.loads(out.read_text())
    assert isinstance(results, list)
    assert sorted(r["image_id"] for r in results) == sorted(r.id for r in records)
    assert all(set(r) == {"image_id", "caption"} and r["caption"] for r in results)


def test_coco_output_from_numeric_file_names(trained_run, tmp_path, capsys):
    folder = tmp_path / "val2014"
    folder.mkdir()
    for image_id in (42, 1337):
        draw("blue", "square", "white").save(folder / f"{image_id:012d}.jpg")
    out = tmp_path / "results.json"
    code, _, _ = caption(capsys, trained_run, folder, "-o", out, "--format", "coco")
    assert code == 0
    assert sorted(r["image_id"] for r in json.loads(out.read_text())) == [42, 1337]


def test_coco_output_without_ids_is_a_per_image_error(trained_run, tmp_path, capsys):
    good = good_folder(tmp_path / "photos", 2)
    out = tmp_path / "results.json"
    code, _, err = caption(capsys, trained_run, *good, "-o", out)
    assert code == 1
    assert json.loads(out.read_text()) == []
    assert err.count("no image id") == 2


def test_coco_format_needs_an_output_file(trained_run, tmp_path, capsys):
    good = good_folder(tmp_path / "photos", 1)
    code, _, err = caption(capsys, trained_run, *good, "--format", "coco")
    assert code == 2 and "captioner caption: error: --format coco needs -o FILE.json" in err


def test_nested_folders_and_globs(trained_run, tmp_path, capsys):
    root = tmp_path / "tree"
    (root / "a" / "b").mkdir(parents=True)
    (root / "c").mkdir()
    draw("red", "square", "white").save(root / "a" / "top.jpg")
    draw("blue", "circle", "black").save(root / "a" / "b" / "deep.png")
    draw("green", "square", "black").save(root / "c" / "upper.JPG")
    (root / "a" / "readme.txt").write_text("not an image, and not named like one")
    out = tmp_path / "folder.jsonl"
    code, _, _ = caption(capsys, trained_run, root, "-o", out)
    assert code == 0
    assert [r["path"] for r in jsonl(out)] == [os.path.join(str(root), "a", "top.jpg"),  # sorted, top-down
                                               os.path.join(str(root), "a", "b", "deep.png"),
                                               os.path.join(str(root), "c", "upper.JPG")]
    out = tmp_path / "glob.jsonl"
    code, _, _ = caption(capsys, trained_run, f"{root}/**/*.png", f"{root}/a/*.jpg", "-o", out)
    assert code == 0
    assert [r["path"] for r in jsonl(out)] == [str(root / "a" / "b" / "deep.png"), str(root / "a" / "top.jpg")]


def test_a_pattern_that_matches_nothing_is_reported(trained_run, tmp_path, capsys):
    good = good_folder(tmp_path / "photos", 1)
    code, _, err = caption(capsys, trained_run, *good, str(tmp_path / "nothing*.jpg"), "-o", tmp_path / "o.jsonl")
    assert code == 1
    assert f"error: {tmp_path / 'nothing*.jpg'}: no such file or folder" in err
    assert [r["path"] for r in jsonl(tmp_path / "o.jsonl")] == good



def test_a_folder_without_image_files_is_reported_not_passed_over(trained_run, tmp_path, capsys):
    """A wrong folder, or one of images in a format not read here (Photoshop files), must not end as a silent
    "captioned 0 of 0": the folder is an error line naming it and what is read; the other inputs are captioned.
    A pattern that also matches an empty folder is fine as long as it matched images. (A folder of camera RAW
    files without rawpy: tests/test_raw.py.)"""
    good = good_folder(tmp_path / "photos", 2)
    (tmp_path / "photos" / "empty").mkdir()
    psd = tmp_path / "designs"
    psd.mkdir()
    (psd / "poster.psd").write_bytes(b"8BPS" + b"\x00" * 64)
    code, _, err = caption(capsys, trained_run, psd, tmp_path / "photos" / "empty", f"{tmp_path}/p*", "-o",
                           tmp_path / "o.jsonl")
    assert code == 1
    assert f"error: {psd}: a folder without image files (1 other file(s); read here: .jpg" in err
    assert f"error: {tmp_path / 'photos' / 'empty'}: a folder without image files (0 other file(s)" in err
    assert err.count("error:") == 2
    assert [r["path"] for r in jsonl(tmp_path / "o.jsonl")] == good

def test_resume_keeps_finished_lines_and_drops_a_half_written_one(trained_run, tmp_path, capsys):
    folder = tmp_path / "photos"
    good = good_folder(folder, 5)
    out = tmp_path / "out.jsonl"
    finished = [json.dumps({"path": p, "caption": f"kept from the first run {i}", "score": -1.0, "logprob": -1.0,
                            "nbest": []}) + "\n" for i, p in enumerate(good[:2])]
    half = json.dumps({"path": good[2], "caption": "cut off"})[:25]  # killed mid-write: no newline
    out.write_text("".join(finished) + half, encoding="utf-8")

    code, _, err = caption(capsys, trained_run, folder, "-o", out, "--resume")
    assert code == 0
    text = out.read_text(encoding="utf-8")
    assert text.startswith("".join(finished))  # finished lines untouched: not redone
    records = jsonl(out)
    assert sorted(r["path"] for r in records) == sorted(good)  # each image exactly once
    assert [r["path"] for r in records[2:]] == good[2:]
    assert all("kept from the first run" not in r["caption"] and "cut off" not in r["caption"] for r in records[2:])
    assert "captioned 5 of 5 image(s) (2 from a previous run)" in err


def test_resume_retries_images_that_failed_before(mixed, trained_run, tmp_path, capsys):
    folder, good, truncated, text = mixed
    out = tmp_path / "out.jsonl"
    assert caption(capsys, trained_run, folder, "-o", out)[0] == 1
    captioned = {r["path"]: r for r in jsonl(out) if "error" not in r}
    draw("red", "circle", "white").save(truncated)  # the user repairs the broken files ...
    draw("blue", "square", "black").save(text, format="PNG")
    code, _, err = caption(capsys, trained_run, folder, "-o", out, "--resume")  # ... and resumes
    assert code == 0, err
    records = jsonl(out)
    assert sorted(r["path"] for r in records) == sorted(good + [truncated, text])  # each image exactly once
    assert all("error" not in r for r in records)
    assert {r["path"]: r for r in records if r["path"] in captioned} == captioned  # the good ones not redone
    assert "captioned 6 of 6 image(s) (4 from a previous run); 0 failed" in err


def test_resume_of_a_finished_run_does_nothing(trained_run, tmp_path, capsys):
    good = good_folder(tmp_path / "photos", 2)
    out = tmp_path / "out.jsonl"
    assert caption(capsys, trained_run, *good, "-o", out)[0] == 0
    before = out.read_bytes()
    code, _, err = caption(capsys, trained_run, *good, "-o", out, "--resume")
    assert code == 0 and out.read_bytes() == before
    assert "(2 from a previous run)" in err


def test_without_resume_the_output_is_started_afresh(trained_run, tmp_path, capsys):
    good = good_folder(tmp_path / "photos", 2)
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"path": good[0], "caption": "stale"}) + "\n")
    assert caption(capsys, trained_run, *good, "-o", out)[0] == 0
    records = jsonl(out)
    assert [r["path"] for r in records] == good and records[0]["caption"] != "stale"


def test_resume_csv(trained_run, tmp_path, capsys):
    good = good_folder(tmp_path / "photos", 3)
    out = tmp_path / "out.csv"
    assert caption(capsys, trained_run, *good[:2], "-o", out)[0] == 0
    first = out.read_bytes()
    out.write_bytes(first + b'"' + good[2].encode() + b'",half a')  # a half-written row
    code, _, err = caption(capsys, trained_run, *good, "-o", out, "--resume")
    assert code == 0 and "(2 from a previous run)" in err
    assert out.read_bytes().startswith(first)
    with open(out, newline="", encoding="utf-8") as f:
        assert [r["path"] for r in csv.DictReader(f)] == good


def test_beam_n_best_sorted_by_score(trained_run, tmp_path, capsys):
    good = good_folder(tmp_path / "photos", 2)
    out = tmp_path / "beam.jsonl"
    code, _, _ = caption(capsys, trained_run, *good, "-o", out, "--strategy", "beam", "--beam-size", "3",
                         "--num-return", "3")
    assert code == 0
    for record in jsonl(out):
        nbest = record["nbest"]
        assert len(nbest) == 3
        scores = [h["score"] for h in nbest]
        assert scores == sorted(scores, reverse=True)
        assert record["caption"] == nbest[0]["caption"] and record["score"] == scores[0]
        assert all(set(h) == {"caption", "score", "logprob"} for h in nbest)


def test_num_return_above_beam_size_is_a_usage_error(trained_run, tmp_path, capsys):
    good = good_folder(tmp_path / "photos", 1)
    code, _, err = caption(capsys, trained_run, *good, "--strategy", "beam", "--beam-size", "2", "--num-return", "3")
    assert code == 2 and "num_return (3) cannot exceed beam_size (2)" in err


def test_a_folder_of_iphone_photos_is_captioned_heic_included(trained_run, tmp_path, capsys):
    """HEIC is what an iPhone library holds: a folder scan must find .heic/.HEIC files, not skip them silently,
    and caption them as it captions the same photo saved as JPEG."""
    pillow_heif = pytest.importorskip("pillow_heif")
    folder = tmp_path / "iphone"
    folder.mkdir()
    photo = draw("blue", "circle", "black", size=300, seed=3)
    photo.save(folder / "IMG_0001.jpg", quality=95)
    pillow_heif.from_pillow(photo).save(folder / "IMG_0002.HEIC", quality=95)
    out = tmp_path / "out.jsonl"
    code, _, err = caption(capsys, trained_run, folder, "-o", out)
    assert code == 0, err
    rows = jsonl(out)
    assert [Path(r["path"]).name for r in rows] == ["IMG_0001.jpg", "IMG_0002.HEIC"]
    assert rows[0]["caption"] == rows[1]["caption"]


def test_progress_is_drawn_per_burst_of_results_not_at_the_first_one(trained_run, tmp_path, capsys):
    """``stream`` yields results in bursts of --decode-batch, each after the decoder's pause. A bar drawn at the first
    result showed that one image's rate: "1/1000 [00:15<4:18:23, 15.52s/img]" for a one-minute run."""
    import time

    from captioner.api import Captioner
    from captioner.batch import caption_files, expand_inputs
    cap = Captioner.from_pretrained(trained_run / "best", device="cpu")
    config = cap.decode_config(strategy="greedy")
    photos = good_folder(tmp_path / "photos", 6)

    def paused(todo: list[str]):
        for i, result in enumerate(cap.stream(todo, config, decode_batch=3)):
            if i % 3 == 0:
                time.sleep(1.1)  # longer than the bar's redraw interval (1 s), as a real burst takes
            yield result

    capsys.readouterr()
    caption_files(cap, expand_inputs(photos), config, out=tmp_path / "o.jsonl", fmt="jsonl", decode_batch=3,
                  stream=paused)
    drawn = capsys.readouterr().err.replace("\r", "\n")
    assert " 3/6 " in drawn and " 1/6 " not in drawn and " 4/6 " not in drawn


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_file_names_that_are_not_utf8_or_hold_a_newline_are_written_resumed_and_reported(trained_run, tmp_path,
                                                                                          capsys, suffix):
    """Old Windows systems and cameras wrote Latin-1 names ("caf\\xe9.jpg"), which reach Python with a lone surrogate:
    writing its row raised UnicodeEncodeError and ended the run. A CSV name holding a newline (quoted over two
    lines) was not found again by --resume, so the photo was captioned twice."""
    import shutil

    from captioner.report import read_results
    folder = tmp_path / "photos"
    good_folder(folder, 1)
    names = (b"img_0.jpg", b"caf\xe9.jpg", b"new\nline.jpg")
    for name in names[1:]:
        shutil.copy(folder / "img_0.jpg", os.path.join(os.fsencode(folder), name))
    out = tmp_path / f"out{suffix}"
    code, _, err = caption(capsys, trained_run, folder, "-o", out)
    assert code == 0 and "captioned 3 of 3 image(s); 0 failed" in err
    code, _, err = caption(capsys, trained_run, folder, "-o", out, "--resume")
    assert code == 0 and "captioned 3 of 3 image(s) (3 from a previous run)" in err
    assert {r["path"] for r in read_results(out)} == {os.path.join(str(folder), os.fsdecode(n)) for n in names}
    page = tmp_path / "report.html"
    assert main(["report", str(out), "--html", str(page), "--link-images"]) == 0
    assert "caf%E9.jpg" in page.read_text(encoding="utf-8")  # the link is the name's own bytes
    assert main(["report", str(out), "--html", str(page)]) == 0  # thumbnails embedded, the name as \udce9 in JSON
    assert "caf\\udce9.jpg" in page.read_text(encoding="utf-8")


def test_a_folder_that_cannot_be_read_is_an_error_line_not_silently_skipped(trained_run, tmp_path, capsys,
                                                                            monkeypatch):
    """A photo library with a subfolder this user may not read (a NAS share, another user's folder): os.walk
    passed over it without a word, so its photos were silently missing from the results. (The tests run as root,
    who may read anything: the refusal is simulated where os.walk lists a folder.)"""
    good = good_folder(tmp_path / "photos", 2)
    locked = tmp_path / "photos" / "private"
    locked.mkdir()
    draw("red", "square", "white").save(locked / "secret.jpg")
    listing = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out.jsonl"
    code, _, err = caption(capsys, trained_run, tmp_path / "photos", "-o", out)
    assert code == 1
    assert f"error: {locked}: cannot read this folder (Permission denied): its photos were not captioned" in err
    assert [r["path"] for r in jsonl(out)] == good


def test_a_file_whose_name_looks_like_a_pattern_is_that_file(trained_run, tmp_path, capsys):
    """"IMG [1].jpg" exists: it was globbed as a pattern ("IMG 1.jpg"), matched nothing and was reported missing.
    A pattern that names no existing file is still a pattern."""
    folder = tmp_path / "photos"
    good = good_folder(folder, 2)
    bracketed = folder / "IMG [1].jpg"
    draw("red", "square", "white").save(bracketed)
    code, _, err = caption(capsys, trained_run, bracketed, f"{folder}/img_[0-1].jpg", "-o", tmp_path / "o.jsonl")
    assert code == 0, err
    assert [r["path"] for r in jsonl(tmp_path / "o.jsonl")] == [str(bracketed), *good]


def test_jfif_photos_are_read_and_the_files_passed_over_are_named_by_type(trained_run, tmp_path, capsys):
    """Chrome on Windows saves JPEGs as .jfif: a folder scan skipped them without a word. Other files in the folders
    (videos, sidecars) are now counted by extension in one note, so a photo format not read here is noticed."""
    folder = tmp_path / "downloads"
    folder.mkdir()
    draw("red", "square", "white").save(folder / "a.jfif", "JPEG")
    draw("blue", "circle", "black").save(folder / "b.jpg")
    for name in ("c.MOV", "d.mov", "notes.txt"):
        (folder / name).write_bytes(b"x")
    code, _, err = caption(capsys, trained_run, folder, "-o", tmp_path / "o.jsonl")
    assert code == 0, err
    assert [Path(r["path"]).name for r in jsonl(tmp_path / "o.jsonl")] == ["a.jfif", "b.jpg"]
    assert "note: 3 other file(s) in the folders are not read as photos (.mov 2, .txt 1)" in err


def test_resume_stops_at_a_damaged_middle_line_naming_it(trained_run, tmp_path, capsys):
    """A line torn in the middle of a results file (a disk error, two runs writing one file): --resume ended in a
    JSONDecodeError traceback. It stops with the file and line instead, and leaves the file as it was."""
    folder = tmp_path / "photos"
    good_folder(folder, 3)
    out = tmp_path / "out.jsonl"
    assert caption(capsys, trained_run, folder, "-o", out)[0] == 0
    lines = out.read_text(encoding="utf-8").split("\n")
    lines.insert(1, '{"path": "/elsewhere/x.jpg", "capt')
    out.write_text("\n".join(lines), encoding="utf-8")
    before = out.read_bytes()
    code, _, err = caption(capsys, trained_run, folder, "-o", out, "--resume")
    assert code == 2 and f"{out}:2: not a record of this command" in err and "without --resume" in err
    assert out.read_bytes() == before


def test_a_photo_librarys_hidden_and_system_files_are_passed_over(trained_run, tmp_path, capsys):
    """A photo library's folders hold more than its photos: macOS writes a ._ twin of every photo onto a FAT or
    exFAT drive (not an image: one error line each, exit 1), Android keeps DCIM/.thumbnails and Synology @eaDir
    folders of smaller copies (each captioned again as if another photo). A folder scan now passes over hidden
    and system entries, says so in one note, and still reads what is named outright."""
    library = tmp_path / "library"
    photo = good_folder(library / "DCIM" / "Camera", n=1)[0]
    (library / "DCIM" / "Camera" / "._img_0.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X" + bytes(4000))
    good_folder(library / "DCIM" / ".thumbnails", n=2)
    good_folder(library / "@eaDir" / "img_0.jpg", n=1)
    code, _, err = caption(capsys, trained_run, library, "-o", tmp_path / "o.jsonl")
    assert code == 0, err
    assert [r["path"] for r in jsonl(tmp_path / "o.jsonl")] == [photo]
    assert "note: 3 hidden or system file(s) and folder(s) in the folders were passed over" in err
    assert "captioned 1 of 1 image(s); 0 failed" in err
    code, _, err = caption(capsys, trained_run, library / "DCIM" / ".thumbnails", "-o", tmp_path / "thumbs.jsonl")
    assert code == 0 and len(jsonl(tmp_path / "thumbs.jsonl")) == 2, err  # named outright: read
    only_hidden = tmp_path / "only-hidden"
    good_folder(only_hidden / ".cache", n=1)
    code, _, err = caption(capsys, trained_run, only_hidden)
    assert code == 1 and "a folder without image files (0 other file(s); 1 hidden or system item(s)" in err
