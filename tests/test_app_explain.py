"""The app's Explain tab, served for real with the bundled model: the API call, and a headless browser clicking
the caption's words."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from app_fixtures import AppServer, bad_image, client, free_port, load_app  # noqa: F401 (fixtures)
from captioner.api import Captioner
from captioner.explain import overlay
from test_app import CHROMIUM, CHROMIUM_ARGS


@pytest.fixture(scope="module")
def app_server() -> AppServer:
    """The app around the bundled model: its 7x7 maps differ from word to word (the tiny test model's 2x2 do not)."""
    app = load_app()
    captioner = Captioner.from_pretrained(device="cpu")
    demo = app.build_demo(captioner)
    yield AppServer(app.serve(demo, host="127.0.0.1", port=free_port(), block=False), captioner)
    demo.close()


@pytest.fixture(scope="module")
def good_image() -> Path:
    """A photo that ships with the demo's examples (scikit-image's cat, Chelsea)."""
    found = [p for p in load_app().example_images() if p.endswith("chelsea.png")]
    if not found:
        pytest.skip("scikit-image's example photos are not installed")
    return Path(found[0])


def test_explain_api_gives_the_caption_and_a_word_per_map(app_server, good_image) -> None:
    caption, words, shown = client(app_server.url).predict(handle_file(str(good_image)), False, api_name="/explain")
    # the checkbox unticked: neither guidance nor the model's tag bonus
    expected = app_server.captioner.explain(str(good_image), **load_app().EXPLAIN_OPTIONS, guide=False, tag_bonus=0.0)
    assert caption == expected.caption
    assert [c[0] for c in words["choices"]] == expected.words and words["value"] == 0
    assert Path(shown["path"]).is_file()


def test_explain_bad_upload_is_a_clear_error(app_server, bad_image) -> None:
    with pytest.raises(AppError, match=r"broken\.jpg: not an image"):
        client(app_server.url).predict(handle_file(str(bad_image)), False, api_name="/explain")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")
def test_browser_clicking_a_word_shows_its_map(app_server, good_image) -> None:
    """Each click shows exactly that word's overlay (the PNG the browser loads, pixel for pixel)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright python package")
    expected = app_server.captioner.explain(str(good_image), **load_app().EXPLAIN_OPTIONS, guide=True)
    overlays = [np.asarray(overlay(expected, i)) for i in range(len(expected.words))]
    assert len({o.tobytes() for o in overlays}) > 1  # the clicks must change the picture for this test to mean much
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(app_server.url)
            page.get_by_role("tab", name="Explain").click()
            page.locator("#explain-image input[type=file]").set_input_files(str(good_image))
            page.wait_for_function("() => { const i = document.querySelector('#explain-image img');"
                                   " return i && i.complete && i.naturalWidth > 0; }")
            page.locator("#explain-button").click()
            words = page.locator("#explain-words label")
            words.nth(len(expected.words) - 1).wait_for()
            caption = page.locator("#explain-caption textarea, #explain-caption input").first.input_value()
            labels = [words.nth(i).inner_text().strip() for i in range(words.count())]
            page.locator("#explain-map img").wait_for()
            shown, src, before = [], page.locator("#explain-map img").get_attribute("src"), overlays[0]
            for i in reversed(range(len(labels))):  # the last word first: the first one is already shown
                words.nth(i).click()
                if not np.array_equal(overlays[i], before):  # a new picture: wait until it replaces the old one
                    page.wait_for_function("old => { const i = document.querySelector('#explain-map img');"
                                           " return i && i.complete && i.naturalWidth > 0 && i.src !== old; }", arg=src)
                src = page.locator("#explain-map img").get_attribute("src")
                shown.append(np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")))
                before = overlays[i]
        finally:
            browser.close()
    assert caption == expected.caption and labels == expected.words
    assert all(np.array_equal(s, o) for s, o in zip(shown, reversed(overlays)))
