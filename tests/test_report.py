"""``captioner report`` / ``captioner caption --html``: the HTML gallery of batch results.

Unit tests of what the page is built from (escaping, entries, error rows, the score orders, pagination data,
thumbnails and links, the atomic write), the real commands on real images with the bundled model,
and headless Chromium on the written file: captions and unreadable files shown, sorting by score reorders,
injected names stay text, and 10,000 entries open on page 1 quickly.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from captioner.cli import main
from captioner.errors import ConfigError
from captioner.images import load_image
from captioner.report import (PAGE_SIZE, THUMB_SIZE, add_images, entry, orders, read_results, render, script_json,
                              sort_key, write_report)
from conftest import draw

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]
EVIL = "<img src=x onerror=window.pwned=1>.jpg"  # a legal file name (no slash) that is also HTML
SHAPES = [("red", "square", "white"), ("blue", "circle", "black"), ("green", "square", "black"),
          ("yellow", "circle", "white"), ("red", "circle", "black"), ("blue", "square", "white")]


def blob(page: str) -> dict:
    """The JSON data embedded in a written page, as the page's own script reads it."""
    match = re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S)
    return json.loads(match.group(1))


def ok(path: str, score: float, caption: str = "a dog", nbest: list | None = None) -> dict:
    return {"path": path, "caption": caption, "score": score, "logprob": score * 4, "nbest": nbest or
            [{"caption": caption, "score": score, "logprob": score * 4}]}


# ---- unit: what the page is made of -------------------------------------------------------------------------

def test_text_from_data_cannot_end_the_script_element_or_become_html():
    evil = "</script><script>window.pwned=1</script>"
    page = render([entry(ok("<script>.jpg", -1.0, caption=evil)), entry({"path": EVIL, "error": "bad <b>x</b> & y"})],
                  title="<b>title</b>")
    assert page.count("<script") == 2 and page.count("</script>") == 2  # only the page's own two
    assert "<b>title</b>" not in page and "&lt;b&gt;title&lt;/b&gt;" in page
    assert "innerHTML" not in page  # every node from data is built as text
    data = blob(page)["entries"]
    assert data[0]["caption"] == evil and data[0]["path"] == "<script>.jpg"
    assert data[1] == {"path": EVIL, "error": "bad <b>x</b> & y"}


def test_script_json_round_trips_line_separators():
    text = "a\u2028b\u2029c</script>&"
    assert json.loads(script_json({"t": text}))["t"] == text
    assert not set("<>&\u2028\u2029") & set(script_json({"t": text}))


def test_error_rows_keep_path_and_reason_only():
    assert entry({"path": "x.jpg", "error": "truncated"}) == {"path": "x.jpg", "error": "truncated"}


def test_entry_keeps_nbest_only_when_there_is_more_than_one():
    single = entry(ok("a.jpg", -0.5))
    assert single == {"path": "a.jpg", "caption": "a dog", "score": -0.5, "logprob": -2.0, "per_word": -0.6667,
                      "nbest": []}
    two = entry(ok("a.jpg", -0.5, nbest=[{"caption": "a dog", "score": -0.5, "logprob": -2.0},
                                          {"caption": "a cat", "score": -0.7, "logprob": -2.8}]))
    assert [h["caption"] for h in two["nbest"]] == ["a dog", "a cat"]


def test_sort_key_puts_least_certain_first_and_unscored_last():
    entries = [entry(ok("b.jpg", -0.2)), entry({"path": "err.jpg", "error": "x"}), entry(ok("a.jpg", -1.3)),
               entry(ok("c.jpg", -0.2))]
    assert sorted(range(4), key=lambda i: sort_key(entries[i])) == [2, 0, 3, 1]  # ties by path
    assert orders(entries) == {"per_word": [2, 0, 3, 1], "score": [2, 0, 3, 1], "logprob": [2, 0, 3, 1]}


def test_per_word_divides_by_the_tokens_and_end_so_long_captions_are_not_penalised():
    short, long = entry(ok("s.jpg", -1.0, caption="a dog")), entry(ok("l.jpg", -1.5, caption="a dog's ball is red"))
    assert short["per_word"] == round(-4.0 / 3, 4) and long["per_word"] == round(-6.0 / 7, 4)  # a dog 's ball ...
    assert sort_key(short) < sort_key(long) and sort_key(short, "logprob") > sort_key(long, "logprob")


def test_pagination_data_is_all_entries_and_the_page_size(tmp_path):
    entries = [entry(ok(f"{i}.jpg", -i / 100)) for i in range(250)]
    data = blob(render(entries))
    assert data["pageSize"] == PAGE_SIZE == 100 and len(data["entries"]) == 250
    assert data["orders"]["score"][:2] == [249, 248]


def test_csv_results_read_with_numbers(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('path,caption,score,logprob,error\r\na.jpg,a dog,-0.5,-2.0,\r\n"b,.jpg",,,,"not an image"\r\n')
    records = read_results(path)
    assert [entry(r) for r in records] == [
        {"path": "a.jpg", "caption": "a dog", "score": -0.5, "logprob": -2.0, "per_word": -0.6667, "nbest": []},
        {"path": "b,.jpg", "error": "not an image"}]


def test_jsonl_half_written_last_line_is_left_out_a_bad_middle_line_is_named(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(ok("a.jpg", -1.0)) + "\n" + '{"path": "b.jp')
    assert [r["path"] for r in read_results(path)] == ["a.jpg"]
    path.write_text('{"path": "b.jp\n' + json.dumps(ok("a.jpg", -1.0)) + "\n")
    with pytest.raises(ConfigError, match=r"c.jsonl:1: not a JSON line"):
        read_results(path)


def test_jsonl_lines_are_split_at_newlines_only(tmp_path):
    """`captioner caption` writes UTF-8 JSON lines, where U+2028 and U+0085 (in a file name) stay literal;
    str.splitlines() also splits at them, which made such a results file "not a JSON line"."""
    records = [{"path": "a\u2028b.jpg", "caption": "x"}, {"path": "c\x85d.jpg", "caption": "y"}]
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert read_results(results) == records


def test_coco_results_and_missing_files_are_clear_errors(tmp_path, capsys):
    (tmp_path / "r.json").write_text("[]")
    assert main(["report", str(tmp_path / "r.json"), "--html", str(tmp_path / "r.html")]) == 2
    assert "has no image paths" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "none.jsonl"), "--html", str(tmp_path / "r.html")]) == 2
    assert "no such results file" in capsys.readouterr().err
    (tmp_path / "photo.jsonl").write_bytes(b"\xff\xd8\xff\xe0 a JPEG, not results")
    assert main(["report", str(tmp_path / "photo.jsonl"), "--html", str(tmp_path / "r.html")]) == 2
    assert "not a UTF-8 text file" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_thumbnails_are_small_jpegs_from_the_image_loader_and_a_gone_photo_is_named(tmp_path):
    Image.new("RGB", (1200, 600), (200, 30, 30)).save(tmp_path / "big.jpg", quality=95)
    entries = [entry(ok(str(tmp_path / "big.jpg"), -1.0)), entry(ok(str(tmp_path / "gone.jpg"), -1.0)),
               entry({"path": "x.jpg", "error": "bad"})]
    add_images(entries, tmp_path)
    header, _, data = entries[0]["thumb"].partition(",")
    assert header == "data:image/jpeg;base64"
    thumb = Image.open(io.BytesIO(base64.b64decode(data)))
    assert thumb.format == "JPEG" and thumb.size == (THUMB_SIZE, THUMB_SIZE // 2)
    assert "thumb" not in entries[1] and entries[1]["thumb_error"] == "file not found"
    assert "thumb" not in entries[2]


def test_linked_images_are_relative_to_the_report_and_url_encoded(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    entries = [entry(ok(str(photos / "a #1?.jpg"), -1.0))]
    add_images(entries, tmp_path / "reports", link_images=True)
    assert entries[0]["thumb"] == "../photos/a%20%231%3F.jpg"


def test_report_resolves_relative_paths_beside_the_results_file(tmp_path, monkeypatch):
    draw("red", "square", "white").save(tmp_path / "a.jpg")
    (tmp_path / "c.jsonl").write_text(json.dumps(ok("a.jpg", -1.0)) + "\n")
    monkeypatch.chdir(ROOT)
    assert main(["report", str(tmp_path / "c.jsonl"), "--html", str(tmp_path / "r.html")]) == 0
    assert blob((tmp_path / "r.html").read_text())["entries"][0]["thumb"].startswith("data:image/jpeg;base64,")


def test_write_is_atomic_and_leaves_no_temp_file(tmp_path):
    out = tmp_path / "r.html"
    out.write_text("old report")
    write_report([ok("a.jpg", -1.0)], out, link_images=True)
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


# ---- the real commands ----------------------------------------------------------------------------------------

def sample_photos() -> list[Path]:
    """Real photos shipped inside installed packages (as app.py's examples), when installed: varied captions."""
    found = []
    for package, files in {"skimage": ("data/chelsea.png", "data/astronaut.png", "data/coffee.png"),
                           "matplotlib": ("mpl-data/sample_data/grace_hopper.jpg",)}.items():
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            found += [Path(spec.origin).parent / f for f in files if (Path(spec.origin).parent / f).is_file()]
    return found


@pytest.fixture
def photos(tmp_path) -> tuple[Path, list[str], list[str]]:
    """Generated photos (one named like HTML), any packaged sample photos, and two unreadable files; their
    paths as `caption FOLDER` lists them."""
    folder = tmp_path / "photos"
    folder.mkdir()
    names = [f"img_{i}.jpg" for i in range(len(SHAPES) - 1)] + [EVIL]
    for name, (colour, shape, background), seed in zip(names, SHAPES, range(len(SHAPES))):
        draw(colour, shape, background, size=120, seed=seed).save(folder / name, quality=90)
    for sample in sample_photos():
        load_image(sample).save(folder / (sample.stem + ".jpg"), quality=90)
        names.append(sample.stem + ".jpg")
    (folder / "broken.jpg").write_bytes((folder / "img_0.jpg").read_bytes()[:600])
    (folder / "notes.png").write_text("shopping list\n")
    return folder, [str(folder / n) for n in names], [str(folder / "broken.jpg"), str(folder / "notes.png")]


def run_caption(*argv) -> int:
    """``captioner caption`` with the bundled model (real captions whose scores differ between photos)."""
    return main(["caption", "--device", "cpu", "--workers", "0", "--batch-size", "4", *map(str, argv)])


@pytest.fixture
def captioned(photos, tmp_path, capsys) -> tuple[Path, Path, list[str], list[str]]:
    """`captioner caption FOLDER -o captions.jsonl --html report.html --strategy beam --num-return 3`."""
    folder, good, bad = photos
    out, html = tmp_path / "captions.jsonl", tmp_path / "out" / "report.html"
    code = run_caption(folder, "-o", out, "--html", html, "--strategy", "beam", "--beam-size", "3",
                       "--num-return", "3")
    err = capsys.readouterr().err
    assert code == 1 and f"wrote {html}" in err
    return out, html, good, bad


def test_caption_html_shows_every_caption_nbest_and_error_of_the_jsonl(captioned):
    out, html, good, bad = captioned
    records = {json.loads(line)["path"]: json.loads(line) for line in out.read_text().splitlines()}
    entries = {e["path"]: e for e in blob(html.read_text())["entries"]}
    assert set(entries) == set(good) | set(bad) == set(records)
    for path in good:
        assert entries[path]["caption"] == records[path]["caption"] and entries[path]["score"] == records[path]["score"]
        assert [h["caption"] for h in entries[path]["nbest"]] == [h["caption"] for h in records[path]["nbest"]]
        assert len(entries[path]["nbest"]) == 3 and entries[path]["thumb"].startswith("data:image/jpeg;base64,")
    for path in bad:
        assert entries[path]["error"] == records[path]["error"]


def test_report_command_from_jsonl_and_csv_equals_caption_html(captioned, photos, tmp_path, capsys):
    out, html, good, bad = captioned
    again = tmp_path / "again.html"
    assert main(["report", str(out), "--html", str(again)]) == 0
    assert f"wrote {again}: {len(good) + 2} image(s), 2 unreadable" in capsys.readouterr().out
    assert blob(again.read_text())["entries"] == blob(html.read_text())["entries"]
    csv_out = tmp_path / "captions.csv"
    assert run_caption(photos[0], "-o", csv_out) == 1
    assert main(["report", str(csv_out), "--html", str(tmp_path / "csv.html"), "--link-images"]) == 0
    entries = {e["path"]: e for e in blob((tmp_path / "csv.html").read_text())["entries"]}
    assert set(entries) == set(good) | set(bad)
    assert entries[good[0]]["thumb"] == "photos/img_0.jpg" and "not an image" in entries[bad[1]]["error"]


# ---- in a real browser ------------------------------------------------------------------------------------------

def card_scores(page) -> list[float]:
    """The log-prob per word shown on each captioned card of the page, in page order."""
    texts = page.locator("#gallery .card:not(.error) .score").all_inner_texts()
    return [float(re.match(r"per word (\S+)", t).group(1)) for t in texts]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")
def test_browser_shows_captions_errors_and_sorts_by_score(captioned, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright python package")
    out, html, good, bad = captioned
    entries = {e["path"]: e for e in blob(html.read_text())["entries"]}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(html.as_uri())
            page.wait_for_selector("body[data-ready='1']")
            text = page.locator("#gallery").inner_text()
            for path in good:
                assert entries[path]["caption"] in text and path in text
            for path in bad:
                assert path in text and entries[path]["error"] in text
            assert page.evaluate("() => window.pwned") is None  # the HTML-like file name stayed text
            page.wait_for_function("() => { const i = document.querySelector('#gallery img');"
                                   " return i && i.complete && i.naturalWidth > 0; }")  # an embedded thumbnail shows

            ascending = card_scores(page)  # default: least certain first
            assert ascending == sorted(ascending) and len(set(ascending)) > 1
            page.select_option("#sort", "-per_word")
            assert card_scores(page) == sorted(ascending, reverse=True)
            page.select_option("#sort", "per_word")
            page.locator("#gallery details summary").first.click()  # one n-best open in the screenshot
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)

            page.locator("#show-errors").click()
            assert page.locator("#gallery .card").count() == 2 == page.locator("#gallery .card.error").count()
            assert "page 1 of 1 (2 shown)" in page.locator("#pager-top").inner_text()
        finally:
            browser.close()
    if os.environ.get("CAPTIONER_SAVE_SCREENSHOT"):
        (ROOT / "docs" / "screenshots").mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, ROOT / "docs" / "screenshots" / "report.png")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")
def test_browser_opens_10000_photos_on_page_one_quickly(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright python package")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, shape in enumerate(SHAPES[:4]):
        draw(*shape, seed=i).save(photos / f"p{i}.jpg")
    records = [ok(str(photos / f"p{i % 4}.jpg"), -((i * 7919) % 10_000) / 1000, caption=f"caption number {i}")
               for i in range(9_990)] + [{"path": f"missing_{i}.jpg", "error": "file not found"} for i in range(10)]
    results = tmp_path / "captions.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    html = tmp_path / "report.html"
    assert main(["report", str(results), "--html", str(html), "--link-images"]) == 0
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            start = time.perf_counter()
            page.goto(html.as_uri())
            page.wait_for_selector("body[data-ready='1']", timeout=30_000)
            seconds = time.perf_counter() - start
            assert page.locator("#gallery .card").count() == PAGE_SIZE
            assert "page 1 of 100 (10000 shown)" in page.locator("#pager-top").inner_text()
            assert card_scores(page)[0] == min(r["score"] for r in records[:9_990])  # least certain first
            # ("caption number i": 3 tokens + <end>, so per word = logprob / 4 = score)
            page.locator("#pager-top .next").click()
            assert "page 2 of 100" in page.locator("#pager-top").inner_text()
            assert page.locator("#gallery .card").count() == PAGE_SIZE
            page.fill("#query", "caption number 4242")
            assert page.locator("#gallery .card").count() == 1
            page.fill("#query", "")
            page.select_option("#show", "error")
            assert page.locator("#gallery .card.error").count() == 10
        finally:
            browser.close()
    assert seconds < 5, f"10,000-entry report took {seconds:.1f} s to show page 1"
