"""Gradio demo: ``python app.py [--checkpoint DIR | --model NAME] [--device auto] [--host 127.0.0.1] [--port 7860] [--share]``.

A thin UI over ``captioner.Captioner``: the model is loaded once at start and every request goes
through the same loader, preprocessing and decoder as the CLI, so the demo shows exactly what the
evaluated model does. Tab "Caption" captions an uploaded / pasted / webcam image with the chosen
decoding strategy; tab "Explain" shows, for each word of the caption, the pixels it came from (Grad-CAM,
``captioner/explain.py``); tab "Why LSTM" explains (and, when ``docs/gradflow.png`` exists, shows) why the
decoder is an LSTM and not a vanilla RNN.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from pathlib import Path

import gradio as gr

from captioner.api import Captioner
from captioner.decoding import STRATEGIES, DecodeConfig
from captioner.errors import USER_ERRORS
from captioner.explain import overlay
from captioner.fetch import MAX_IMAGE_BYTES, FetchConfig, is_url
from captioner.images import ImageLoadError
from captioner.tuning import TuneConfig

ROOT = Path(__file__).resolve().parent
GRADFLOW_PNG = ROOT / "docs" / "gradflow.png"
MAX_FILE_SIZE = MAX_IMAGE_BYTES  # uploads and image URLs share one limit (captioner/fetch.py)
PUBLIC_URLS = FetchConfig(allow_private=False)  # a public demo must not fetch from its own network (SSRF)
CONCURRENCY, QUEUE_SIZE = 2, 64  # two decodes at a time keep a small CPU box responsive; the rest wait
MAX_CAPTIONS, MAX_BEAM = 10, 10  # slider ranges; also enforced for API clients, which bypass the sliders
MAX_SPECIFICITY = 1.0  # the specificity slider's range: beyond it captions trade too much accuracy (MODEL_CARD "Specificity")


def example_images() -> list[str]:
    """Sample photos that ship inside installed packages (never dataset files, whose licence forbids it).

    Whichever of scikit-image / matplotlib is installed contributes; missing files are skipped.
    """
    wanted = {"skimage": ("data/chelsea.png", "data/astronaut.png", "data/coffee.png", "data/motorcycle_left.png"),
              "matplotlib": ("mpl-data/sample_data/grace_hopper.jpg",)}
    found = []
    for package, files in wanted.items():
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            continue
        base = Path(spec.origin).parent
        found += [str(base / f) for f in files if (base / f).is_file()]
    return found


def caption_upload(captioner: Captioner, upload: dict | None, strategy: str, temperature: float, top_p: float,
                   beam_size: float, num_return: float, guide: bool = False,
                   url: str | None = None, specificity: float | None = None,
                   by_fit: bool | None = None, neutral: bool = False) -> tuple[str, list[list], dict]:
    """One request: the best caption, the n-best table and what the CNN recognises (caption word ->
    probability, for ``gr.Label``); bad input becomes a ``gr.Error`` shown in the UI.

    The event runs with ``preprocess=False``: stock ``gr.Image`` preprocessing opens every upload with
    PIL first, so a broken file would fail there with a generic error instead of reaching
    ``captioner.images.load_image`` (EXIF, modes, bomb guard). ``upload`` is therefore gradio's file
    payload (its path already checked to lie in gradio's upload folder), and the controls arrive
    unchecked, so their bounds are enforced here for API clients too.

    Without an upload, ``url`` (the "Image URL" box) is fetched under ``PUBLIC_URLS``; text that is not
    a URL is refused, never opened as a path on the server. ``specificity`` (beam only; None: the model's
    recommended one) favours rarer words (``DecodeConfig.specificity``); ``by_fit`` (beam with a matching model)
    instead chooses it per photo among ``fit_levels(captioner)`` (``DecodeConfig.specificity_levels``), and
    None leaves that to the model's recommendation. ``neutral`` keeps words that state a person's gender out of the
    captions (``DecodeConfig.neutral``).
    """
    source = upload["path"] if upload is not None else (url or "").strip()
    if not source:
        raise gr.Error("No image: upload, paste or capture one, or give an image URL.", print_exception=False)
    if upload is None and not is_url(source):
        raise gr.Error(f"{source}: not a URL (give an http:// or https:// address)", print_exception=False)
    try:
        beams, count = int(beam_size), int(num_return)
        if beams > MAX_BEAM or count > MAX_CAPTIONS:
            raise ValueError(f"beam size is limited to {MAX_BEAM} and the number of captions to {MAX_CAPTIONS}")
        if specificity is not None and not 0 <= float(specificity) <= MAX_SPECIFICITY:
            raise ValueError(f"specificity must be between 0 and {MAX_SPECIFICITY}")
        # Greedy has exactly one answer, so the count slider only matters for sample and beam.
        # Guidance is a constrained beam search: the checkbox only acts with the beam strategy.
        config = captioner.decode_config(strategy=strategy, temperature=float(temperature), top_p=float(top_p),
                                         beam_size=beams, num_return=1 if strategy == "greedy" else count,
                                         neutral=bool(neutral), **guide_options(captioner, strategy, guide),
                                         **specificity_options(captioner, strategy, specificity, by_fit))
        features = captioner.features([source], fetch=PUBLIC_URLS)
        nbest = captioner.generate(features, config)[0]
        tags = captioner.tagger.tags(features, threshold=0.05)[0] if captioner.can_tag else []
    except ImageLoadError as err:  # name the file as the user knows it, not by gradio's cache path
        name = source if upload is None else upload.get("orig_name") or "upload"
        raise gr.Error(f"{name}: {err.reason}", print_exception=False) from None
    except (TypeError, ValueError) as err:
        raise gr.Error(str(err), print_exception=False) from None
    # a calibrated model (captioner/confidence.py) adds each caption's confidence, also beside the best caption
    table = [[i + 1, h["caption"], *([h["confidence"]] if "confidence" in h else []), h["logprob"], h["score"]]
             for i, h in enumerate(nbest)]
    best = nbest[0]["caption"]
    if "confidence" in nbest[0]:
        best = gr.Textbox(value=best, label=f"Best caption \u00b7 confidence {nbest[0]['confidence']:.2f} "
                                            "(calibrated chance that it is a good caption: docs/calibration.md)")
    return best, table, {f"{t.word} ({t.imagenet_class})": t.prob for t in tags}


def fit_levels(captioner: Captioner | None) -> tuple[float, ...]:
    """The specificities "by fit" chooses among: the model's recommended ones, else the tuning grid's; () when
    the model has no matching model to judge the fit."""
    if captioner is None or captioner.matcher is None:
        return ()
    return recommended_beam(captioner).specificity_levels or TuneConfig.specificity_levels


def guide_options(captioner: Captioner, strategy: str, guide: bool) -> dict:
    """The "Name what the CNN recognises" checkbox as decoding options: when ticked (beam search, a model with an
    ImageNet head) guidance and the tag bonus the model recommends; otherwise neither."""
    on = bool(guide) and strategy == "beam" and captioner.can_tag
    return {"guide": on} if on else {"guide": False, "tag_bonus": 0.0}


def specificity_options(captioner: Captioner, strategy: str, specificity: float | None,
                        by_fit: bool | None) -> dict:
    """The request's specificity as decoding options: levels chosen per photo when ``by_fit`` (and the model can
    judge the fit), else the slider's fixed value; nothing given: the model's recommendation."""
    if strategy != "beam" or (specificity is None and by_fit is None):
        return {}
    if by_fit and fit_levels(captioner):
        return {"specificity_levels": fit_levels(captioner)}
    return {"specificity": float(specificity if specificity is not None else recommended_beam(captioner).specificity)}


EXPLAIN_OPTIONS = {"strategy": "beam"}  # the Caption tab's default: beam search as the model's decoding.json sets it


def recommended_beam(captioner: Captioner | None) -> DecodeConfig:
    """The beam search the model's checkpoint recommends (``decoding.json``, chosen on validation), else
    ``DecodeConfig``'s: the beam and specificity sliders start there; ``None`` builds the UI without a model (tests)."""
    return captioner.decode_config(strategy="beam") if captioner is not None else DecodeConfig(strategy="beam")


def opening_beam_size(captioner: Captioner | None) -> int:
    """The beam slider's starting value: the width the model recommends."""
    return min(recommended_beam(captioner).beam_size, MAX_BEAM)


def explain_upload(captioner: Captioner, upload: dict | None, guide: bool = False) -> tuple[str, gr.Radio, object, list]:
    """The Explain tab: the caption (the model's recommended beam search), a word picker, the first word's map
    and every word's map (kept in the session's state, so picking a word costs nothing). Called with
    ``preprocess=False`` for the same reason as ``caption_upload``."""
    if upload is None:
        raise gr.Error("No image: upload or paste one first.", print_exception=False)
    try:
        expl = captioner.explain(upload["path"], **EXPLAIN_OPTIONS,
                                 **guide_options(captioner, EXPLAIN_OPTIONS["strategy"], guide))
    except ImageLoadError as err:
        raise gr.Error(f"{upload.get('orig_name') or 'upload'}: {err.reason}", print_exception=False) from None
    except USER_ERRORS as err:
        raise gr.Error(str(err), print_exception=False) from None
    maps = [overlay(expl, i) for i in range(len(expl.words))]
    words = gr.Radio(choices=[(w, i) for i, w in enumerate(expl.words)], value=0 if maps else None)
    return expl.caption, words, maps[0] if maps else expl.image, maps


WHY_LSTM = """
### Why the decoder is an LSTM

**Vanilla RNN.** `h_t = tanh(W_hh h_{t-1} + W_xh x_t)`. Backpropagation through time multiplies the
gradient by `diag(tanh'(.)) W_hh^T` at *every* step, so after `T` steps its size behaves like
`sigma_max(W_hh)^T`: below 1 it **vanishes** geometrically, above 1 it can **explode**.

**Clipping** rescales the total gradient norm to a maximum before each update. That tames the
exploding case (no single step can throw the weights away) but does nothing for a vanishing gradient.

**LSTM.** The cell state is updated additively, `c_t = f_t * c_{t-1} + i_t * g_t`, so
`dc_t/dc_{t-1} = diag(f_t)`: an element-wise gate, no repeated matrix product. With forget gates
near 1 the gradient reaches early steps almost unchanged.

This matters here because the image enters the decoder only through the LSTM's **initial state**:
every word's loss has to flow back to step 0 to teach the model what the image shows.
"""

GRADFLOW_MISSING = ("*The measured plot is not generated yet.* Create it with\n\n"
                    "`captioner gradflow DATA_DIR --out docs/gradflow.png --json docs/gradflow.json`\n\n"
                    "(DATA_DIR: a prepared data directory) and restart the app.")


def build_demo(captioner: Captioner) -> gr.Blocks:
    """The two-tab UI around an already loaded model, queued; ``launch`` it or call ``serve``."""
    with gr.Blocks(title="Image captioner (CNN + LSTM)", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as demo:  # uploads would otherwise pile up for the server's lifetime
        gr.Markdown("# Image captioner\nCNN image features set the initial state of an LSTM that writes the caption.")
        with gr.Tab("Caption"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", sources=["upload", "clipboard", "webcam"],
                                     label="Image", elem_id="image")
                    image_url = gr.Textbox(label="Image URL", placeholder="https://... (used when no image is given)",
                                           max_lines=1, elem_id="image-url")
                    if examples := example_images():
                        gr.Examples(examples=[[p] for p in examples], inputs=[image], label="Example images")
                with gr.Column():
                    strategy = gr.Radio(list(STRATEGIES), value="beam", label="Strategy",
                                        info="greedy: most likely word each step; sample: random; beam: best sequences")
                    temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature",
                                            info="sample only: < 1 safer, > 1 more varied")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p",
                                      info="sample only: keep the smallest word set with this probability (1 = off)")
                    beam_size = gr.Slider(1, MAX_BEAM, value=opening_beam_size(captioner), step=1, label="Beam size",
                                          info="beam only; starts at the width this model was tuned for")
                    num_return = gr.Slider(1, MAX_CAPTIONS, value=3, step=1, label="Number of captions",
                                           info="sample / beam (at most the beam size); greedy gives one")
                    specificity = gr.Slider(0.0, MAX_SPECIFICITY, value=recommended_beam(captioner).specificity,
                                            step=0.05, label="Specificity", elem_id="specificity",
                                            info="beam only: favour rarer, more specific words (0 = off); "
                                                 "more varied captions, slightly less accurate on average",
                                            interactive=not recommended_beam(captioner).specificity_levels)
                    by_fit = gr.Checkbox(value=bool(recommended_beam(captioner).specificity_levels),
                                         label="Specificity by fit", elem_id="specificity-fit",
                                         interactive=bool(fit_levels(captioner)),
                                         info="beam only: decode at several specificities and keep, per photo, the "
                                              "caption that the matching model finds fits it best (the slider is "
                                              "then unused; needs the model's matching model)")
                    guide = gr.Checkbox(value=True, label="Name what the CNN recognises", elem_id="guide",
                                        info="beam only: the caption must use the word of an animal or vehicle "
                                             "the CNN's ImageNet classifier is sure of (constrained beam search) and "
                                             "leans to those it finds likely (the model's tag bonus); models "
                                             "without the classifier ignore it")
                    neutral = gr.Checkbox(value=False, label="Gender-neutral words", elem_id="neutral",
                                          info="never guess a person's gender: 'a person', 'a child', 'two people' "
                                               "instead of man, woman, boy, girl, his, her")
                    button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                with gr.Column(scale=2):
                    caption = gr.Textbox(label="Best caption", elem_id="caption", interactive=False)
                    calibrated = getattr(captioner, "calibration", None) is not None  # None: UI-only (tests)
                    nbest = gr.Dataframe(headers=["#", "caption", *(["confidence"] if calibrated else []), "log-prob",
                                                  "score"],
                                         datatype=["number", "str", *(["number"] if calibrated else []), "number",
                                                   "number"], label="N-best",
                                         column_widths=["8%", "46%", "14%", "16%", "16%"] if calibrated
                                         else ["8%", "58%", "17%", "17%"], wrap=True,
                                         interactive=False, elem_id="nbest")
                    tags = gr.Label(label="Recognised by the CNN (caption word, ImageNet class)", num_top_classes=5,
                                    elem_id="tags")
            by_fit.change(lambda fit: gr.Slider(interactive=not fit), inputs=[by_fit], outputs=[specificity],
                          api_name=False)
            button.click(functools.partial(caption_upload, captioner),
                         inputs=[image, strategy, temperature, top_p, beam_size, num_return, guide, image_url,
                                 specificity, by_fit, neutral],
                         outputs=[caption, nbest, tags], api_name="caption", preprocess=False)
        with gr.Tab("Explain"):
            gr.Markdown("Which pixels made the model say each word: click a word of the caption to see its "
                        "Grad-CAM map (red: most support; the dimmed border was cropped away before the CNN).")
            with gr.Row():
                with gr.Column():
                    explain_image = gr.Image(type="filepath", sources=["upload", "clipboard"], label="Image",
                                             elem_id="explain-image")
                    explain_guide = gr.Checkbox(value=True, label="Name what the CNN recognises",
                                                elem_id="explain-guide")
                    explain_button = gr.Button("Explain", variant="primary", elem_id="explain-button")
                with gr.Column(scale=2):
                    explain_caption = gr.Textbox(label="Caption", interactive=False, elem_id="explain-caption")
                    explain_words = gr.Radio(label="Words of the caption", elem_id="explain-words")
                    explain_map = gr.Image(label="Where the word comes from", interactive=False, format="png",
                                           elem_id="explain-map")
            explain_maps = gr.State([], time_to_live=3600)
            explain_button.click(functools.partial(explain_upload, captioner), inputs=[explain_image, explain_guide],
                                 outputs=[explain_caption, explain_words, explain_map, explain_maps],
                                 api_name="explain", preprocess=False)
            explain_words.change(lambda i, maps: maps[i] if i is not None and i < len(maps) else None,
                                 inputs=[explain_words, explain_maps], outputs=[explain_map], api_name=False)
        with gr.Tab("Why LSTM"):
            if GRADFLOW_PNG.is_file():
                gr.Image(str(GRADFLOW_PNG), label="Gradient norm through time (captioner gradflow)",
                         interactive=False, elem_id="gradflow")
            gr.Markdown(WHY_LSTM)
            if not GRADFLOW_PNG.is_file():
                gr.Markdown(GRADFLOW_MISSING)
    return demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)


def serve(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          block: bool = True) -> str:
    """Launch with the limits that protect the server (upload size); returns the local URL.

    ``block=False`` returns right after start-up, for tests and notebooks.
    """
    _, url, _ = demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE,
                            prevent_thread_lock=not block, quiet=not block)
    return url


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Gradio demo of the CNN + LSTM image captioner.")
    parser.add_argument("--checkpoint", "--model", type=Path, default=None, dest="checkpoint",
                        help="checkpoint directory or a bundled model's name (fast); default: $CAPTIONER_CHECKPOINT "
                             "or the bundled model")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (0.0.0.0 exposes the demo to the network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        captioner = Captioner.from_pretrained(args.checkpoint, device=args.device)
    except USER_ERRORS as err:
        print(f"app.py: error: {err}", file=sys.stderr)
        return 2
    serve(build_demo(captioner), args.host, args.port, args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
