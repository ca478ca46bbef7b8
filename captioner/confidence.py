"""After decoding: how likely a caption is good, as a probability calibrated on the validation split.

What "good" means (one definition, used for fitting and for every reported number): a caption is good when
its CIDEr-D against the image's references is at least what the weaker human captions reach. Each human
reference of the fitting split is scored against the image's other references (leave one out); the
``CalibrationConfig.human_quantile`` (0.25) quantile of those scores is the threshold, so "good" reads "reaches
what three human captions in four reach". It is computed when fitting and stored with the calibration.

What the confidence is computed from (measured on Flickr8k val with the bundled model by
``benchmarks/confidence_features.py``; docs/calibration.md):
the caption's log-probability per decoding step (Spearman 0.43 with its CIDEr-D), its length in tokens
(-0.29: at the same per-step log-prob, long captions are worse), the encoder's top caption-word
probability from the ImageNet head (0.33: a photo of something the CNN knows well) and, for a model with a
matching model, the cosine between the photo and the caption there (``fill_match``; +0.37 on val with the
bundled model's default decoding: it also knows when a caption does not fit a photo unlike Flickr8k's, where
the other signals, all about the decoder's certainty, do not). The n-best's agreement
(content words the other beams share with the best) correlated 0.02 and the best-vs-second margin -0.13,
and greedy decoding (the CLI's default) has no n-best at all, so neither is used. The calibrator is a
logistic regression on these standardised features (Platt scaling with more than one input), fitted with
L-BFGS on the best captions of every decoding setting in ``CalibrationConfig.settings``.

The result lives in the checkpoint directory as ``calibration.json`` (plain JSON: features, weights,
definition, decoding settings, split, date, expected calibration error); ``checkpoint.load_checkpoint`` reads it
when present, and ``Captioner.generate`` then adds ``"confidence"`` to every n-best dict.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .decoding import DecodeConfig
from .errors import CheckpointError, DatasetError

if TYPE_CHECKING:
    from .api import Captioner
    from .guidance import Tagger
    from .matching import Matcher
    from .vocab import Vocab

CALIBRATION = "calibration.json"
FORMAT = "captioner-calibration/1"
FEATURES = {  # name -> what it is; ``caption_features`` computes them
    "per_word_logprob": "total log-probability / (tokens + 1): per decoding step, <end> included",
    "tokens": "caption length in tokens",
    "tag_prob": "the encoder ImageNet head's top caption-word probability (guidance.Tagger)",
    "match": "the matching model's cosine between the photo and the caption (matching.Matcher)",
}


@dataclass
class CalibrationConfig:
    """How ``captioner calibrate`` fits: the split, the definition of a good caption, the decoding settings."""

    split: str = "val"
    report_split: str | None = "test"  # scored with the fitted calibrator for reporting only, never fitted on
    human_quantile: float = 0.25  # "good" = CIDEr-D >= this quantile of leave-one-out human CIDEr-D
    bins: int = 10  # equal-width confidence bins of the expected calibration error and the diagram
    # The decoding users get by default, over the model's decoding.json (``Captioner.decode_config``): the CLI's
    # and the API's ({}: the model's recommended decoding, greedy without one) and the app's (beam, 3 captions, guided)
    settings: tuple[dict, ...] = field(default_factory=lambda: (
        {}, {"strategy": "beam", "num_return": 3, "guide": True}))
    batch_size: int = 250  # images decoded at once


@dataclass
class Calibration:
    """A fitted calibrator: ``sigmoid(weights . (x - mean) / std + bias)`` over ``features``, plus provenance."""

    features: list[str]
    mean: list[float]
    std: list[float]
    weights: list[float]
    bias: float
    info: dict = field(default_factory=dict)  # definition, threshold, split, settings, date, ece: for people

    def confidence(self, x: np.ndarray) -> np.ndarray:
        """(N, F) feature rows -> (N,) probabilities that each caption is good."""
        z = (np.asarray(x, dtype=np.float64) - np.array(self.mean)) / np.array(self.std)
        return 1.0 / (1.0 + np.exp(-(z @ np.array(self.weights) + self.bias)))

    def to_json(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: object, where: str) -> "Calibration":
        """Checked: a tampered or foreign file is a ``CheckpointError`` naming ``where``, never a wrong number."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CheckpointError(f"{where}: not a captioner calibration (expected \"format\": \"{FORMAT}\"); "
                                  "re-create it with `captioner calibrate`")
        try:
            features = [str(f) for f in data["features"]]
            mean, std, weights = ([float(v) for v in data[key]] for key in ("mean", "std", "weights"))
            bias, info = float(data["bias"]), dict(data.get("info", {}))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{where}: invalid calibration ({type(err).__name__}: {err}); "
                                  "re-create it with `captioner calibrate`") from None
        unknown = [f for f in features if f not in FEATURES]
        if unknown or not features or len(set(features)) != len(features):
            raise CheckpointError(f"{where}: features must be distinct names among {list(FEATURES)}, got {features}")
        if not len(mean) == len(std) == len(weights) == len(features):
            raise CheckpointError(f"{where}: features, mean, std and weights must have one entry per feature")
        if not all(math.isfinite(v) for v in [*mean, *std, *weights, bias]) or min(std) <= 0:
            raise CheckpointError(f"{where}: calibration numbers must be finite and every std > 0")
        return cls(features, mean, std, weights, bias, info)


def read_calibration(directory: Path) -> Calibration | None:
    """The checkpoint's ``calibration.json``, or None when it has none (then captions carry no confidence)."""
    path = Path(directory) / CALIBRATION
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    return Calibration.from_json(data, str(path))


def caption_features(nbest: list[list[dict]], tag_prob: list[float] | None, names: list[str]) -> np.ndarray:
    """Per image an n-best of ``Captioner`` dicts (and per image the tag probability) -> (N, F) rows,
    one per caption, in n-best order."""
    rows = []
    for i, hyps in enumerate(nbest):
        for h in hyps:
            values = {"per_word_logprob": h["logprob"] / (len(h["tokens"]) + 1), "tokens": float(len(h["tokens"])),
                      "tag_prob": tag_prob[i] if tag_prob is not None else math.nan, "match": h.get("match", math.nan)}
            rows.append([values[n] for n in names])
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(names))


def tag_probs(tagger: "Tagger", features: torch.Tensor) -> list[float]:
    """(B, D) features -> per image the top caption-word probability of the encoder's ImageNet head."""
    return tagger.word_probs(features)[0].max(1).values.tolist()


def fill_match(matcher: "Matcher", nbest: list[list[dict]], features: torch.Tensor, vocab: "Vocab") -> None:
    """Give every n-best dict that has none its ``"match"`` (in place): the matching model's cosine between the
    caption and its photo, row i of the (B, D) ``features`` for ``nbest[i]``. Reranking by the matcher sets it
    already, as this rounds it (4 decimals); greedy and plain beam search do not."""
    missing = [(i, h) for i, hyps in enumerate(nbest) for h in hyps if "match" not in h]
    sims = matcher.similarity(features, vocab, [h["tokens"] for _, h in missing], [i for i, _ in missing])
    for (_, h), sim in zip(missing, sims):
        h["match"] = round(sim, 4)


def add_confidence(calibration: Calibration, nbest: list[list[dict]], tag_prob: list[float] | None) -> None:
    """Give every n-best dict its ``"confidence"`` (in place)."""
    conf = calibration.confidence(caption_features(nbest, tag_prob, calibration.features)).tolist()
    for h, c in zip((h for hyps in nbest for h in hyps), conf):
        h["confidence"] = round(c, 4)


def expected_calibration_error(confidence: np.ndarray, good: np.ndarray, bins: int = 10) -> float:
    """ECE: over ``bins`` equal-width confidence bins, |mean confidence - fraction good| weighted by the
    bin's share of captions (Guo et al., 2017). 0 is perfectly calibrated."""
    confidence, good = np.asarray(confidence, dtype=np.float64), np.asarray(good, dtype=np.float64)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return float(sum(abs(confidence[which == b].mean() - good[which == b].mean()) * (which == b).sum()
                     for b in range(bins) if (which == b).any()) / len(confidence))


def fit_logistic(x: np.ndarray, good: np.ndarray, names: list[str]) -> Calibration:
    """Logistic regression of ``good`` (0/1) on standardised ``x`` (N, F) by L-BFGS (a convex problem).
    A feature with the same value for every caption says nothing and is left out."""
    if good.min() == good.max():
        raise DatasetError(f"cannot calibrate: every one of the {len(good)} captions is "
                           f"{'good' if good.min() else 'bad'}; use a larger split or another --human-quantile")
    varies = np.ptp(x, 0) > 0
    if not varies.any():
        raise DatasetError(f"cannot calibrate: all {len(good)} captions have the same {', '.join(names)}")
    x, names = x[:, varies], [n for n, v in zip(names, varies) if v]
    mean, std = x.mean(0), x.std(0)
    xs = torch.tensor((x - mean) / std)  # (N, F)
    target = torch.tensor(good, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, target)
        value.backward()
        return value

    opt.step(loss)
    return Calibration(list(names), mean.tolist(), std.tolist(), w.detach().tolist(), float(b.item()))


def human_threshold(records: list, quantile: float) -> float:
    """The ``quantile`` of the human references' leave-one-out CIDEr-D (each scored against the image's others)."""
    from .captions import references

    from .metrics import CiderD

    refs = {i: r for i, r in references(records).items() if len(r) >= 2}
    if not refs:
        raise DatasetError("cannot calibrate: no image of the split has two or more reference captions")
    scores = []
    for k in range(max(len(r) for r in refs.values())):
        others = {i: [x for j, x in enumerate(r) if j != k] for i, r in refs.items() if k < len(r)}
        scorer = CiderD(others)
        scores += [scorer.score(i, refs[i][k]) for i in others]
    return float(np.quantile(scores, quantile))


@dataclass
class Scored:
    """The best captions of one split and setting: their feature rows and whether each is good."""

    setting: dict
    x: np.ndarray  # (N, F)
    good: np.ndarray  # (N,)


def score_split(captioner: "Captioner", data_dir: Path, split: str, threshold: float, names: list[str],
                config: CalibrationConfig) -> list[Scored]:
    """Decode the split's cached features with every distinct setting; the best caption of each image, labelled."""
    from .captions import references
    from .features import FeatureCache, cache_dir
    from .manifest import load_manifest, split_records
    from .tokenizer import tokenize

    from .metrics import CiderD

    cache = FeatureCache(cache_dir(data_dir, captioner.config.encoder))
    records = [r for r in split_records(load_manifest(data_dir), split) if r.id not in cache.failed]
    scorer = CiderD(references(records))
    out, seen = [], []
    for setting in config.settings:
        decode = captioner.decode_config(**setting)
        same_best = {**decode.to_json(), "num_return": 1}  # a beam's best caption does not depend on num_return
        if same_best in seen:  # e.g. the CLI's and the app's defaults once the model recommends guided beam search
            continue
        seen.append(same_best)
        best: list[list[dict]] = []
        tag_prob: list[float] = []
        for i in range(0, len(records), config.batch_size):
            feats = cache.gather([r.id for r in records[i:i + config.batch_size]])  # (B, D)
            # the signals are computed here, once: not the confidence of the calibration being replaced
            batch = [[n[0]] for n in captioner.generate(feats, decode, confidence=False)]
            if "match" in names:
                fill_match(captioner.matcher, batch, feats, captioner.vocab)
            best += batch
            if "tag_prob" in names:
                tag_prob += tag_probs(captioner.tagger, feats)
        good = np.array([scorer.score(r.id, tokenize(n[0]["caption"])) >= threshold for r, n in zip(records, best)])
        out.append(Scored(decode.to_json(), caption_features(best, tag_prob or None, names), good.astype(np.float64)))
    return out


def calibrate(captioner: "Captioner", data_dir: Path, config: CalibrationConfig) -> tuple[Calibration, dict]:
    """Fit on ``config.split`` and report ECE there and on ``config.report_split``; returns the calibration and,
    per split and setting, the (confidence, good) arrays behind the reliability diagram."""
    from .manifest import load_manifest, split_records

    # tag_prob needs the ImageNet head, match the matching model
    names = [n for n in FEATURES if (n != "tag_prob" or captioner.can_tag) and (n != "match" or captioner.matcher)]
    threshold = human_threshold(split_records(load_manifest(data_dir), config.split), config.human_quantile)
    fit_on = score_split(captioner, data_dir, config.split, threshold, names, config)
    calibration = fit_logistic(np.concatenate([s.x for s in fit_on]), np.concatenate([s.good for s in fit_on]), names)
    scored = {config.split: fit_on}
    if config.report_split:
        scored[config.report_split] = score_split(captioner, data_dir, config.report_split, threshold, names, config)
    curves: dict[str, list[dict]] = {}
    ece: dict[str, list[dict]] = {}
    used = [names.index(n) for n in calibration.features]  # columns the fit kept
    for split, per_setting in scored.items():
        for s in per_setting:
            conf = calibration.confidence(s.x[:, used])
            curves.setdefault(split, []).append({"setting": s.setting, "confidence": conf, "good": s.good})
            ece.setdefault(split, []).append({"setting": s.setting, "images": len(s.good),
                                              "ece": round(expected_calibration_error(conf, s.good, config.bins), 4),
                                              "good_fraction": round(float(s.good.mean()), 4),
                                              "mean_confidence": round(float(conf.mean()), 4)})
    calibration.info = {
        "good": f"CIDEr-D against the image's references >= {threshold:.4f}, the {config.human_quantile} quantile "
                f"of leave-one-out human CIDEr-D on {config.split!r}",
        "threshold": round(threshold, 6), "human_quantile": config.human_quantile,
        "features": {n: FEATURES[n] for n in calibration.features}, "fitted_on": config.split, "data_dir": str(data_dir),
        "settings": [s.setting for s in fit_on],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bins": config.bins, "ece": ece}
    return calibration, curves


def save_calibration(calibration: Calibration, directory: Path) -> Path:
    """Write ``calibration.json`` into the checkpoint directory atomically."""
    from .manifest import write_json_atomic
    path = Path(directory) / CALIBRATION
    write_json_atomic(path, calibration.to_json())
    return path


def plot_reliability(curves: dict[str, list[dict]], bins: int, out: Path) -> None:
    """Draw ``reliability_figure`` into ``out`` (PNG)."""
    fig = reliability_figure(curves, bins)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def reliability_figure(curves: dict[str, list[dict]], bins: int):
    """Reliability diagram: per split and setting, fraction good against mean confidence in each bin, the
    diagonal (perfect calibration), and below it how many captions fall into each bin. Legend entries are
    wrapped: a decoding's description runs past 150 characters, and one unwrapped line squeezed the plot into a
    sliver of the figure."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 7), height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    edges = np.linspace(0, 1, bins + 1)
    for split, per_setting in curves.items():
        for c in per_setting:
            conf, good = c["confidence"], c["good"]
            which = np.minimum((conf * bins).astype(int), bins - 1)
            used = [b for b in range(bins) if (which == b).any()]
            name = f"{split}, {DecodeConfig(**c['setting']).describe()}"
            ece = expected_calibration_error(conf, good, bins)
            top.plot([conf[which == b].mean() for b in used], [good[which == b].mean() for b in used], marker="o",
                     linestyle="-" if split == next(iter(curves)) else "--",
                     label=textwrap.fill(f"{name} (ECE {ece:.3f})", 70))
            bottom.stairs(np.bincount(which, minlength=bins), edges, label=name)
    top.set(ylabel="fraction of captions that are good", xlim=(0, 1), ylim=(0, 1),
            title="Caption confidence: reliability diagram")
    top.legend(fontsize=8, loc="lower right")
    bottom.set(xlabel="confidence (bin)", ylabel="captions")
    fig.tight_layout()
    return fig
