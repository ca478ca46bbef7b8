"""The Gradio app served for real on loopback: API calls through gradio_client, and one headless-browser run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
import torch
from PIL import Image

from captioner.tokenizer import tokenize

from app_fixtures import BEAM3, ROOT, app_server, bad_image, client, good_image, load_app  # noqa: F401 (fixtures)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]


def test_caption_and_nbest_for_a_real_image(app_server, good_image) -> None:
    best, table, tags = client(app_server.url).predict(handle_file(str(good_image)), *BEAM3, api_name="/caption")
    assert isinstance(best, str) and best.strip()
    assert table["headers"] == ["#", "caption", "log-prob", "score"]
    rows = table["data"]
    assert [r[0] for r in rows] == [1, 2, 3]
    assert rows[0][1] == best
    assert best == app_server.captioner.caption(str(good_image), strategy="beam", beam_size=3)  # same API, same answer
    expected = app_server.captioner.tags(str(good_image))
    assert [c["label"] for c in tags.get("confidences") or []] == [f"{t['word']} ({t['imagenet_class']})" for t in expected]


def test_guided_caption_through_the_app_equals_the_api(app_server, good_image) -> None:
    best, _, _ = client(app_server.url).predict(handle_file(str(good_image)), *BEAM3, True, api_name="/caption")
    assert best == app_server.captioner.caption(str(good_image), strategy="beam", beam_size=3, guide=True)


def test_specific_caption_through_the_app_equals_the_api(app_server, good_image) -> None:
    best, table, _ = client(app_server.url).predict(handle_file(str(good_image)), *BEAM3, False, "", 0.8,
                                                    api_name="/caption")
    nbest = app_server.captioner.caption(str(good_image), strategy="beam", beam_size=3, num_return=3,
                                         specificity=0.8)
    assert best == nbest[0]["caption"] and [r[-1] for r in table["data"]] == [c["score"] for c in nbest]


def test_gender_neutral_box_reaches_the_decoder(app_server, good_image, monkeypatch) -> None:
    """The "Gender-neutral words" box is the event's last input. The test model's shape words state no gender,
    so its best caption's own words stand in for the gendered ones: the neutral caption must avoid them."""
    cap = app_server.captioner
    plain = cap.caption(str(good_image), strategy="beam", beam_size=3, specificity=0.0)
    monkeypatch.setitem(cap.__dict__, "gendered", torch.tensor(cap.vocab.ids(tokenize(plain)[1:2])))
    best, _, _ = client(app_server.url).predict(handle_file(str(good_image)), *BEAM3, False, "", 0.0, False, True,
                                                api_name="/caption")
    assert best == cap.caption(str(good_image), strategy="beam", beam_size=3, specificity=0.0, neutral=True)
    assert best != plain


def test_bad_upload_is_a_clear_error_and_the_server_keeps_serving(app_server, bad_image, good_image) -> None:
    api = client(app_server.url)
    with pytest.raises(AppError, match=r"broken\.jpg: not an image"):
        api.predict(handle_file(str(bad_image)), *BEAM3, api_name="/caption")
    best, _, _ = api.predict(handle_file(str(good_image)), "greedy", 1.0, 1.0, 3, 5, api_name="/caption")
    assert best.strip()


def test_oversized_upload_is_refused_by_the_server(app_server, good_image, tmp_path) -> None:
    """The 20 MB limit is enforced by the server on the upload itself, whatever the client sends."""
    import httpx
    big = tmp_path / "huge.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(21 * 1024 * 1024))
    with open(big, "rb") as fh:
        reply = httpx.post(f"{app_server.url.rstrip('/')}/gradio_api/upload", files={"files": ("huge.png", fh)},
                           timeout=60)
    assert reply.status_code == 413 and "20" in reply.text  # refused, and the reply names the limit
    with pytest.raises(Exception, match="(?i)size|large|413"):
        client(app_server.url).predict(handle_file(str(big)), *BEAM3, api_name="/caption")
    best, _, _ = client(app_server.url).predict(handle_file(str(good_image)), *BEAM3, api_name="/caption")
    assert best.strip()  # still serving


@pytest.mark.parametrize("options, reason", [(("beam", 1.0, 1.0, 2, 5), r"num_return \(5\) cannot exceed beam_size"),
                                             (("beam", 1.0, 1.0, 500, 1), "beam size is limited to 10"),
                                             (("sample", 0.0, 1.0, 3, 1), "need temperature > 0"),
                                             (("beam", 1.0, 1.0, 3, 1, False, "", 5.0),
                                              "specificity must be between 0 and 1.0")])
def test_invalid_options_are_reported(app_server, good_image, options, reason) -> None:
    """API clients bypass the sliders' ranges; the handler still refuses, with the reason."""
    with pytest.raises(AppError, match=reason):
        client(app_server.url).predict(handle_file(str(good_image)), *options, api_name="/caption")


def test_why_lstm_tab_shows_the_plot_only_when_it_exists(monkeypatch, tmp_path) -> None:
    app = load_app()
    png = tmp_path / "gradflow.png"
    Image.new("RGB", (8, 8)).save(png)
    for path, has_plot in ((png, True), (tmp_path / "absent.png", False)):
        monkeypatch.setattr(app, "GRADFLOW_PNG", path)
        blocks = app.build_demo(None).blocks.values()
        plots = [b for b in blocks if isinstance(b, gr.Image) and b.elem_id == "gradflow"]
        notes = [b for b in blocks if isinstance(b, gr.Markdown) and "captioner gradflow" in (b.value or "")]
        assert (len(plots), len(notes)) == ((1, 0) if has_plot else (0, 1))


def test_example_images_are_real_files() -> None:
    for path in load_app().example_images():
        assert Path(path).is_file() and "flickr" not in path.lower()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")
def test_browser_bad_then_good_upload(app_server, bad_image, good_image, tmp_path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright python package")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(app_server.url)
            upload = page.locator("#image input[type=file]")
            upload.set_input_files(str(bad_image))
            page.locator("#image img").first.wait_for(state="attached")  # upload finished (nothing to show)
            page.locator("#caption-button").click()
            page.get_by_text("broken.jpg: not an image").first.wait_for()  # the error toast

            upload.set_input_files(str(good_image))
            page.wait_for_function("() => { const i = document.querySelector('#image img');"
                                   " return i && i.complete && i.naturalWidth > 0; }")  # good upload shown
            page.locator("#caption-button").click()
            box = page.locator("#caption textarea, #caption input").first
            page.wait_for_function("el => el.value.trim().length > 0", arg=box.element_handle())
            text = box.input_value()
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert text.strip()
    assert shot.stat().st_size > 0
    if os.environ.get("CAPTIONER_SAVE_SCREENSHOT"):
        (ROOT / "docs" / "screenshots").mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, ROOT / "docs" / "screenshots" / "app.png")


def test_an_iphone_heic_upload_is_captioned(app_server, good_image, tmp_path) -> None:
    """Phones upload HEIC: the app reads it with the one loader (pillow-heif), as the API does the same file."""
    pillow_heif = pytest.importorskip("pillow_heif")
    heic = tmp_path / "IMG_0003.HEIC"
    with Image.open(good_image) as img:
        pillow_heif.from_pillow(img.convert("RGB")).save(heic, quality=95)
    best, _, _ = client(app_server.url).predict(handle_file(str(heic)), *BEAM3, api_name="/caption")
    assert best.strip() and best == app_server.captioner.caption(str(heic), strategy="beam", beam_size=3)


def test_a_camera_raw_upload_is_captioned_from_its_preview(app_server, good_image, tmp_path) -> None:
    """A photographer uploads the RAW file: gradio keeps its name, so the app reads it as the API does, from the
    preview the camera embedded (captioner/raw.py; which part of the file is read: tests/test_raw.py)."""
    rawpy = pytest.importorskip("rawpy")
    from raw_fixtures import write_dng
    with Image.open(good_image) as img:
        photo = img.convert("RGB")
    raw = write_dng(tmp_path / "DSC_0007.NEF", Image.new("RGB", (320, 240), (128, 128, 128)), preview=photo)
    with rawpy.imread(str(raw)) as opened:
        preview = opened.extract_thumb().data
    best, _, _ = client(app_server.url).predict(handle_file(str(raw)), *BEAM3, api_name="/caption")
    cap = app_server.captioner
    assert best.strip() and best == cap.caption(preview, strategy="beam", beam_size=3)
