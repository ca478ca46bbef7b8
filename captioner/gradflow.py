"""Gradient flow through time in our own decoders: the lecture's BPTT lesson, measured.

Backpropagation through a vanilla RNN multiplies the gradient by ``diag(tanh') W_hh^T`` at every
step, so ``||dL/dh_t||`` shrinks (or grows) geometrically with the distance from the loss; clipping
the total gradient norm tames the exploding case; the LSTM's additive cell path
``c_t = f * c_{t-1} + i * g`` lets gradient reach early steps. Here the loss is taken at the LAST
step of long teacher-forced captions only, so ``||dL/dh_0|| / ||dL/dh_T||`` says how much of it
flows all the way back. Each cell is measured at initialisation and after a few Adam steps,
trained once without and once with clipping from the same initial weights.
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .captions import encode_captions
from .config import CELLS, ModelConfig
from .encoder import EncoderConfig
from .features import FeatureCache
from .manifest import VOCAB, load_manifest, split_records
from .model import CaptionDecoder
from .train import train_step
from .vocab import Vocab

SYNTHETIC_VOCAB = 200  # vocabulary size of the random captions used when there is no data directory


@dataclass
class GradflowConfig:
    """Sizes are equal across cells so the recurrence is the only difference between them."""

    cells: tuple[str, ...] = ("rnn", "gru", "lstm")
    steps: int = 50  # Adam steps between the two measurements
    batch_size: int = 32  # captions per training step and in the measured batch
    max_len: int = 30  # caption words kept: the measured sequence has up to max_len + 1 steps
    hidden: int = 256
    embed: int = 256
    lr: float = 1e-3
    clip: float = 5.0  # max total gradient norm of the clipped run
    seed: int = 0
    init_scale: float = 1.0  # multiplies W_hh after PyTorch's init: small -> vanishing, large -> exploding
    feature_dim: int = 1280  # only for the random features that stand in for a missing cache


@dataclass
class GradflowData:
    """Training captions, one feature row per image, and the long-caption batch that is measured."""

    features: torch.Tensor  # (n_images, D) float32
    tokens: torch.Tensor  # (M, L) <start> w.. <end> <pad>..
    pair_image: torch.Tensor  # (M,) row of ``features`` for each caption
    probe: torch.Tensor  # (B, T + 1) the longest captions, cut to the shortest of them
    probe_features: torch.Tensor  # (B, D) their images' features
    vocab_size: int
    features_source: str


def build_decoder(cell: str, vocab_size: int, feature_dim: int, config: GradflowConfig) -> CaptionDecoder:
    """A seeded decoder with no dropout (so measurements are deterministic) and W_hh scaled by init_scale."""
    torch.manual_seed(config.seed)
    model_config = ModelConfig(vocab_size=vocab_size, cell=cell, hidden=config.hidden, embed=config.embed,
                               dropout=0.0, max_len=config.max_len,
                               encoder=EncoderConfig(name="gradflow", weights="none", feature_dim=feature_dim))
    decoder = CaptionDecoder(model_config)
    with torch.no_grad():
        decoder.rnn.weight_hh_l0.mul_(config.init_scale)
    return decoder


def hidden_grad_norms(decoder: CaptionDecoder, features: torch.Tensor, tokens: torch.Tensor) -> list[float]:
    """``||dL/dh_t||`` of the top layer for t = 0..T, with L the cross-entropy of the last step only.

    ``tokens`` (B, T + 1): T teacher-forced inputs, the last column is the target. The decoder runs
    one step at a time and the gradient is taken w.r.t. every step's state tensor, which gives the
    total derivative through all later steps (the output sequence of one whole-sequence call would
    only carry the direct path to that step's logits). It runs on a float64 copy so gradients that
    vanish below float32's range (~1e-38) stay measurable.
    """
    probe = copy.deepcopy(decoder).double().eval()
    state = probe.init_state(features.double())
    hidden = [state[0]]  # (layers, B, H) per step; h_0 is the image's initial state
    for t in range(tokens.shape[1] - 1):
        _, state = probe._run(probe.embed(tokens[:, t]).unsqueeze(1), state)
        hidden.append(state[0])
    loss = nn.functional.cross_entropy(probe.out(state[0][-1]), tokens[:, -1])
    return [g[-1].norm().item() for g in torch.autograd.grad(loss, hidden)]


def sigma_max(decoder: CaptionDecoder) -> float | None:
    """Largest singular value of the vanilla RNN's W_hh: below 1 gradients must vanish, well above they may explode.

    None for the gated cells, whose stacked gate matrices have no such single-number reading.
    """
    if decoder.config.cell != "rnn":
        return None
    return torch.linalg.matrix_norm(decoder.rnn.weight_hh_l0.detach(), ord=2).item()


def train(decoder: CaptionDecoder, data: GradflowData, config: GradflowConfig,
          clip: float) -> tuple[list[float], list[float]]:
    """Teacher-forced Adam steps on random training captions; returns per-step losses and PRE-clip grad norms.

    Each is ``captioner train``'s own step (``train_step``), clipped to ``clip`` (0: not clipped). The
    batch order is seeded, so the clipped and unclipped runs see the same batches.
    """
    optimizer = torch.optim.Adam(decoder.parameters(), lr=config.lr)
    batches = torch.Generator().manual_seed(config.seed)
    losses, norms = [], []
    decoder.train()
    for _ in range(config.steps):
        idx = torch.randint(len(data.tokens), (config.batch_size,), generator=batches)
        loss, norm, _ = train_step(decoder, optimizer, data.features[data.pair_image[idx]], data.tokens[idx], clip)
        losses.append(loss.item())
        norms.append(norm.item())
    return losses, norms


def _measure(decoder: CaptionDecoder, data: GradflowData) -> dict:
    norms = hidden_grad_norms(decoder, data.probe_features, data.probe)
    return {"grad_norms": norms, "ratio": norms[0] / norms[-1], "sigma_max": sigma_max(decoder)}


def measure_cell(cell: str, data: GradflowData, config: GradflowConfig) -> dict:
    """Gradient flow at init, then after training without and with clipping (both from the same init)."""
    initial = build_decoder(cell, data.vocab_size, data.features.shape[1], config)
    result = {"init": _measure(initial, data)}
    for name, clip in (("noclip", 0.0), ("clip", config.clip)):
        decoder = copy.deepcopy(initial)
        losses, norms = train(decoder, data, config, clip)
        result[name] = {**_measure(decoder, data), "losses": losses, "train_grad_norms": norms}
    return result


def _cached_features(data_dir: Path, image_ids: list[int]) -> tuple[torch.Tensor | None, str]:
    """Features of these images from the first complete cache under DATA_DIR/features, else why there is none."""
    reasons = []
    for directory in sorted(d for d in (data_dir / "features").glob("*") if d.is_dir()):
        try:
            cache = FeatureCache(directory)
            rows = cache.rows(image_ids)
        except (OSError, ValueError, KeyError) as err:  # incomplete, stale or unreadable: say so, fall back
            reasons.append(str(err))
            continue
        return torch.from_numpy(cache.features[rows].astype("float32")), f"feature cache {directory}"
    return None, "; ".join(reasons) or f"no feature cache under {data_dir / 'features'}"


def load_data(data_dir: Path | None, config: GradflowConfig) -> GradflowData:
    """Train-split captions of a data directory (random captions if None) and their image features.

    Features come from a complete feature cache when there is one; otherwise random normal vectors
    stand in, which is enough here: the lesson is about the recurrence, not the image.
    """
    gen = torch.Generator().manual_seed(config.seed)
    if data_dir is None:
        n = 4 * config.batch_size
        tokens = torch.randint(4, SYNTHETIC_VOCAB, (n, config.max_len + 2), generator=gen)
        tokens[:, 0], tokens[:, -1] = Vocab.specials.start, Vocab.specials.end
        pair_image, vocab_size, features, source = torch.arange(n), SYNTHETIC_VOCAB, None, "no data directory"
    else:
        train_records = split_records(load_manifest(data_dir), "train")
        vocab = Vocab.load(data_dir / VOCAB)
        captions = encode_captions(train_records, vocab, config.max_len)
        tokens, pair_image, vocab_size = captions.tokens, captions.pair_image, len(vocab)
        features, source = _cached_features(data_dir, captions.image_ids)
    if features is None:
        source = f"random normal features ({source})"
        features = torch.randn(int(pair_image.max()) + 1, config.feature_dim, generator=gen)
    lengths = (tokens != Vocab.specials.pad).sum(1)
    longest = lengths.argsort(descending=True, stable=True)[: config.batch_size]
    probe = tokens[longest, : int(lengths[longest].min())]
    return GradflowData(features, tokens, pair_image, probe, features[pair_image[longest]], vocab_size, source)


def run_gradflow(data_dir: Path | None, config: GradflowConfig) -> dict:
    """Measure every configured cell on one data directory; the JSON-ready result."""
    data = load_data(data_dir, config)
    print(f"features: {data.features_source}")
    print(f"measured batch: {len(data.probe)} longest training captions, T = {data.probe.shape[1] - 1} steps; "
          f"training: {config.steps} Adam steps on {len(data.tokens)} captions")
    cells = {}
    for cell in config.cells:
        print(f"  {cell} ...", flush=True)
        cells[cell] = measure_cell(cell, data, config)
    return {"config": asdict(config), "data_dir": None if data_dir is None else str(data_dir),
            "features": data.features_source, "steps_T": data.probe.shape[1] - 1, "cells": cells}


def plot_gradflow(result: dict, png_path: Path) -> None:
    """Left: ||dL/dh_t|| against t per cell (init dashed, trained solid/dotted). Right: pre-clip grad norm per step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (flow, train_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, (cell, runs) in enumerate(result["cells"].items()):
        color = f"C{k}"
        for name, style in (("init", "--"), ("noclip", ":"), ("clip", "-")):
            norms = runs[name]["grad_norms"]
            flow.plot(range(len(norms)), [math.log10(max(n, 1e-300)) for n in norms], style, color=color,
                      label=f"{cell} {name}")
        for name, style in (("noclip", ":"), ("clip", "-")):
            norms = runs[name]["train_grad_norms"]
            train_ax.plot(range(1, len(norms) + 1), norms, style, color=color, label=f"{cell} {name}")
    flow.set(xlabel="time step t", ylabel="log10 ||dL/dh_t||",
             title=f"gradient reaching h_t from the loss at t = T = {result['steps_T']}")
    train_ax.axhline(result["config"]["clip"], color="grey", lw=0.8)
    train_ax.set(xlabel="training step", ylabel="total gradient norm before clipping", yscale="log",
                 title=f"training (grey: clip = {result['config']['clip']})")
    for ax in (flow, train_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=3)
    fig.suptitle(f"gradient flow; {result['features']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def format_summary(result: dict) -> str:
    """One row per cell: how much gradient reaches h_0, the worst training gradient, sigma_max(W_hh)."""
    def sigma(run: dict) -> str:
        return "-" if run["sigma_max"] is None else f"{run['sigma_max']:.2f}"

    lines = [f"ratio = ||dL/dh_0|| / ||dL/dh_T||, T = {result['steps_T']}; max pre-clip grad norm over training",
             f"{'cell':<5} {'ratio init':>11} {'ratio noclip':>13} {'ratio clip':>11} "
             f"{'max|g| noclip':>14} {'max|g| clip':>12} {'sigma_max(W_hh) init/noclip/clip':>33}"]
    for cell, runs in result["cells"].items():
        sigmas = "/".join(sigma(runs[name]) for name in ("init", "noclip", "clip"))
        lines.append(f"{cell:<5} {runs['init']['ratio']:>11.2e} {runs['noclip']['ratio']:>13.2e} "
                     f"{runs['clip']['ratio']:>11.2e} {max(runs['noclip']['train_grad_norms']):>14.2f} "
                     f"{max(runs['clip']['train_grad_norms']):>12.2f} {sigmas:>33}")
    return "\n".join(lines)


def parse_cells(text: str) -> tuple[str, ...]:
    """``--cells rnn,lstm`` -> ('rnn', 'lstm')."""
    cells = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in cells if c not in CELLS]
    if unknown or not cells:
        raise argparse.ArgumentTypeError(f"cells must be a comma list of {CELLS}, got {text!r}")
    return cells
