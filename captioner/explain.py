"""Why each word: a saliency map per generated word, traced from the word back to the photo's pixels.

Method: Grad-CAM (Selvaraju et al., 2017) on the CNN's last convolutional block. ``A`` (C, h, w) is the
activation the pooled image feature is averaged from; for the caption's word ``t``,
``alpha_tc = mean_hw d log p(w_t | w_<t, image) / d A_c`` and the map is ``ReLU(sum_c alpha_tc A_c)``,
upsampled to the square the CNN saw and placed on the photo. Why Grad-CAM: the image reaches this decoder
only through the pooled feature in the LSTM's initial state, so there is no attention to read; the
gradient through that state is the model's own account of what drove each word, and it costs one CNN
pass with autograd plus one small decoder backward per caption (occlusion would need a CNN pass per patch).

Geometry: the CNN sees a centre crop of the resized photo (``Preprocess``). Maps are returned on the
photo itself (scaled down to ``ExplainConfig.max_side``); ``crop_box`` is that square in the photo's
pixels, and the maps are 0 outside it, where the model saw nothing.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from .decoding import DecodeConfig
from .encoder import Encoder, Preprocess
from .errors import ConfigError, EncoderError
from .images import ImageSource, load_image

if TYPE_CHECKING:
    from .api import Captioner


@dataclass
class ExplainConfig:
    """How explanations are drawn; the maps themselves have no free parameter."""

    max_side: int = 512  # the returned photo and its maps: longer side at most this many pixels
    alpha: float = 0.6  # overlay opacity where the map is 1 (it fades with the map)
    colormap: str = "jet"  # a matplotlib colormap name
    tile: int = 256  # grid: longer side of each tile
    columns: int = 4  # grid: tiles per row


@dataclass
class Explanation:
    """One caption with a saliency map per word."""

    caption: str
    words: list[str]  # the caption's tokens, one map each
    maps: np.ndarray  # (len(words), H, W) float32 in [0, 1] on ``image``; each word's peak is 1 (all 0: no support)
    logprobs: list[float]  # log p(word | the words before it, image)
    image: Image.Image  # the photo as the model loaded it (EXIF-rotated RGB), scaled to ``max_side``
    crop_box: tuple[int, int, int, int]  # (left, top, right, bottom) on ``image``: the square the CNN saw


def crop_box(width: int, height: int, pre: Preprocess) -> tuple[float, float, float, float]:
    """The square of a ``width`` x ``height`` photo that ``pre`` hands to the CNN, in the photo's pixels.

    Mirrors torchvision's arithmetic: the shorter side is resized to ``pre.resize`` (the longer to
    ``int(resize * long / short)``), then ``int(round((size - crop) / 2))`` pixels are cut off left and top.
    """
    if width <= height:
        new_w, new_h = pre.resize, int(pre.resize * height / width)
    else:
        new_w, new_h = int(pre.resize * width / height), pre.resize
    left, top = int(round((new_w - pre.crop) / 2.0)), int(round((new_h - pre.crop) / 2.0))
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + pre.crop) * sx, (top + pre.crop) * sy


class GradCam:
    """The encoder's backbone as (last conv activation, pooled feature), and Grad-CAM over that pair.

    The activation is the output of the graph node right before the backbone's last global average
    pooling (torch.fx, so no hooks: requests running the same encoder in other threads are unaffected);
    the extractor shares the encoder's weights.
    """

    def __init__(self, encoder: Encoder) -> None:
        nodes = get_graph_node_names(encoder.backbone)[1]  # eval-mode graph, in execution order
        pools = [i for i, name in enumerate(nodes) if "avg" in name and "pool" in name]
        if not pools or pools[-1] == 0:
            raise EncoderError(f"saliency maps need a backbone that average-pools a convolutional map; "
                               f"{type(encoder.backbone).__name__} has no such pooling")
        self.layer = nodes[pools[-1] - 1]
        self.extractor = create_feature_extractor(encoder.backbone, {self.layer: "maps", nodes[-1]: "features"})

    def __call__(self, pixels: torch.Tensor, decoder: nn.Module, tokens: list[int],
                 start_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, 3, H, W) pixels and a caption's token ids (no <start>/<end>) -> per word a Grad-CAM map
        (n, h, w), not normalised, and its log-probability (n,)."""
        n = len(tokens)
        with torch.enable_grad():
            out = self.extractor(pixels.float().requires_grad_())  # grad on the input: frozen weights still trace
            acts, features = out["maps"], out["features"].flatten(1)  # (1, C, h, w), (1, D)
            # One row per word, each running the whole caption teacher-forced: row t's objective is word t,
            # so one backward gives every word's gradient with respect to the feature (n, D).
            rows = features.detach().expand(n, -1).clone().requires_grad_()
            state = decoder.init_state(rows)
            ids = torch.tensor([start_id] + tokens, device=pixels.device)
            picked = []
            for t in range(n):
                logits, state = decoder.step(ids[t].expand(n), state)  # (n, V)
                picked.append(torch.log_softmax(logits.float(), -1)[t, ids[t + 1]])
            logprobs = torch.stack(picked)  # (n,)
            (grad_features,) = torch.autograd.grad(logprobs.sum(), rows)  # (n, D)
            (grads,) = torch.autograd.grad(features, acts, grad_features[:, None], is_grads_batched=True)
            grads = grads[:, 0]  # (n, C, h, w): every word's feature gradient through the pooling, one batched pass
        weights = grads.mean((2, 3))  # (n, C)
        cams = torch.relu(torch.einsum("nc,chw->nhw", weights, acts[0].detach()))  # (n, h, w)
        return cams, logprobs.detach()


def place(cams: torch.Tensor, size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """(n, h, w) maps -> (n, H, W) on a ``size`` = (W, H) photo: upsampled (bilinear) into ``box``, 0
    outside, each divided by its peak."""
    left, top, right, bottom = box
    inside = nn.functional.interpolate(cams[:, None].float().cpu(), size=(bottom - top, right - left),
                                       mode="bilinear", align_corners=False)[:, 0]  # (n, box_h, box_w)
    maps = torch.zeros(len(cams), size[1], size[0])
    maps[:, top:bottom, left:right] = inside
    peak = maps.flatten(1).amax(1).clamp(min=torch.finfo(torch.float32).tiny)  # (n,)
    return (maps / peak[:, None, None]).numpy().astype(np.float32)


def explain_image(captioner: "Captioner", image: ImageSource, config: DecodeConfig,
                  settings: ExplainConfig | None = None) -> Explanation:
    """Caption one image exactly as ``Captioner.caption`` does (its best caption) and explain every word."""
    settings = settings or ExplainConfig()
    pre = captioner.preprocess
    photo = load_image(image, pre.min_side, captioner.fetch)  # a URL is fetched as ``Captioner.features`` does
    pixels = pre(photo)[None].to(captioner.device)  # (1, 3, crop, crop)
    best = captioner.generate(captioner.encode(pixels), config, confidence=False)[0][0]
    tokens = [captioner.vocab.index[w] for w in best["tokens"]]
    scale = min(1.0, settings.max_side / max(photo.size))
    shown = photo if scale == 1.0 else photo.resize((max(1, round(photo.width * scale)),
                                                     max(1, round(photo.height * scale))), Image.BILINEAR)
    box = tuple(round(v * scale) for v in crop_box(*photo.size, pre))
    if not tokens:
        return Explanation(best["caption"], [], np.zeros((0, shown.height, shown.width), np.float32), [], shown, box)
    cams, logprobs = captioner.gradcam(pixels, captioner.decoder, tokens, captioner.vocab.specials.start)
    return Explanation(best["caption"], list(best["tokens"]), place(cams, shown.size, box),
                       [round(float(v), 4) for v in logprobs], shown, box)


def overlay(explanation: Explanation, index: int, settings: ExplainConfig | None = None) -> Image.Image:
    """The photo with word ``index``'s map as a heat map: opacity grows with the map, so the photo shows
    through where the word found nothing; outside the CNN's square the photo is dimmed (never seen)."""
    import matplotlib

    settings = settings or ExplainConfig()
    photo = np.asarray(explanation.image, dtype=np.float32) / 255.0  # (H, W, 3)
    m = explanation.maps[index][..., None]  # (H, W, 1)
    heat = matplotlib.colormaps[settings.colormap](explanation.maps[index])[..., :3]  # (H, W, 3)
    out = photo * (1 - settings.alpha * m) + heat * settings.alpha * m
    left, top, right, bottom = explanation.crop_box
    seen = np.zeros(m.shape, dtype=bool)
    seen[top:bottom, left:right] = True
    out = np.where(seen, out, out * 0.4)
    return Image.fromarray((out * 255).round().astype(np.uint8))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


def grid(explanation: Explanation, settings: ExplainConfig | None = None) -> Image.Image:
    """The photo and one overlay per word, each titled, under the caption: what ``captioner explain`` writes."""
    settings = settings or ExplainConfig()
    scale = settings.tile / max(explanation.image.size)
    tw, th = max(1, round(explanation.image.width * scale)), max(1, round(explanation.image.height * scale))
    tiles = [("photo", explanation.image)] + [(f"{w}  p={np.exp(p):.2f}", overlay(explanation, i, settings))
                                             for i, (w, p) in enumerate(zip(explanation.words, explanation.logprobs))]
    cols = min(settings.columns, len(tiles))
    rows = -(-len(tiles) // cols)
    title_h, head_h, pad = 22, 30, 6
    sheet = Image.new("RGB", (cols * (tw + pad) + pad, head_h + rows * (th + title_h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 6), explanation.caption or "(empty caption)", fill="black", font=_font(18))
    for k, (title, tile) in enumerate(tiles):
        x, y = pad + (k % cols) * (tw + pad), head_h + (k // cols) * (th + title_h + pad)
        draw.text((x, y + 2), title, fill="black", font=_font(15))
        sheet.paste(tile.resize((tw, th), Image.BILINEAR), (x, y + title_h))
    return sheet


def save_grid(explanation: Explanation, path: Path, settings: ExplainConfig | None = None) -> None:
    """Write ``grid`` to ``path`` (format from the suffix), with a one-line error when that is impossible."""
    try:
        grid(explanation, settings).save(path)
    except (ValueError, OSError) as err:  # unknown suffix, missing folder, read-only file
        raise ConfigError(f"{path}: cannot write the explanation image ({err})") from None


def word_table(explanation: Explanation) -> str:
    """One line per word: the word, its log-probability and where its map peaks (x, y on the photo)."""
    lines = [f"caption: {explanation.caption}"]
    for word, logprob, m in zip(explanation.words, explanation.logprobs, explanation.maps):
        y, x = np.unravel_index(int(m.argmax()), m.shape)
        lines.append(f"  {word:<14} log-prob {logprob:7.3f}  peak at x={x}, y={y}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``captioner explain``'s own arguments (the decoding flags come from ``cli._add_decode_args``)."""
    p.add_argument("image", help="the photo to caption and explain")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="image to write (PNG, JPEG, ...): the photo and one overlay per word, word as title")
