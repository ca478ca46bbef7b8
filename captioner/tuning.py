"""Between caption and evaluation: the decoding a checkpoint recommends, chosen on a validation split.

Why: beam width and length penalty move CIDEr-D as much as a training change does (the bundled model on
Flickr8k val: beam 3 -> beam 5 with length penalty 0.8 is +2.3 CIDEr-D), and the best setting differs from
model to model (self-critical training writes shorter captions than cross-entropy training). So, like Hugging
Face's ``generation_config.json``, the choice lives in the checkpoint: ``decoding.json``, written by
``captioner tune-decoding`` with the whole grid it measured, on a split that is never the test split. The API,
the CLI, ``evaluate`` and the app then decode the way the model was measured unless told otherwise
(``Captioner.decode_config``).

The rule: the highest CIDEr-D (the captioning literature's consensus metric) among the grid's settings whose
BLEU-4 is at least that of the grid's first one (plain beam search, the reference), so no setting is bought
with a worse BLEU-4; settings within ``cider_tie`` of that CIDEr-D are a tie (on 1,000 validation photos such a
difference is below one standard error), and of tied settings the one that uses the most distinct words wins:
equally good captions, less alike from photo to photo. A checkpoint with a consensus index (``captioner/consensus.py``) or a matching model
(``captioner/matching.py``) also has each beam setting measured reranked, so the choice may be a reranked one.
"""

from __future__ import annotations

import datetime
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .decoding import DecodeConfig
from .errors import CheckpointError, ConfigError, DatasetError

if TYPE_CHECKING:
    from .api import Captioner

DECODING = "decoding.json"
FORMAT = "captioner-decoding/1"
# DecodeConfig fields a checkpoint may recommend: how to search, not what to return (num_return, seed stay the caller's)
RECOMMENDABLE = ("strategy", "beam_size", "length_penalty", "no_repeat_ngram", "guide", "guide_threshold", "consensus",
                 "consensus_weight", "match_weight", "specificity", "specificity_levels", "specificity_cost", "tag_bonus")


@dataclass
class TuneConfig:
    """The grid ``captioner tune-decoding`` searches; its first point (first width, first penalty) is the reference."""

    split: str = "val"
    beam_sizes: tuple[int, ...] = (3, 5)
    length_penalties: tuple[float, ...] = (0.0, 0.5, 0.7, 0.8, 0.9, 1.0)
    # Every beam setting also decoded never repeating an n-gram of each of these sizes (``DecodeConfig.no_repeat_ngram``;
    # 0: allowed): an LSTM decoder sometimes says a thing twice ("a man in a black shirt is looking at a man in a
    # black shirt"), which the training captions almost never do. Each value is a decoding pass of its own.
    no_repeat_ngrams: tuple[int, ...] = (0,)
    guide: bool = False  # every setting guided (the app's default); needs the encoder's ImageNet head
    # With a consensus index beside the checkpoint (``captioner consensus-index``), every beam setting is also
    # measured reranked by each number of neighbours x weight (``captioner/consensus.py``); () skips them.
    consensus: tuple[int, ...] = (5, 10, 20, 40)
    consensus_weights: tuple[float, ...] = (0.0, 0.1, 0.3)
    # With a matching model beside the checkpoint (``captioner matching``), every beam setting is also measured
    # reranked by the model's score + each of these x the image-caption match (``captioner/matching.py``).
    match_weights: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    # Every beam setting decoded at each specificity (``DecodeConfig.specificity``: a bonus for rarer words);
    # (0.0,) leaves it off. Each value is a decoding pass of its own.
    specificities: tuple[float, ...] = (0.0, 0.15, 0.3)
    # With a matching model: every beam setting also decoded at these levels, and measured choosing a level per
    # photo (``DecodeConfig.specificity_levels``) at each cost x match weight; () skips it. The levels' count is
    # the single-photo cost (5 levels: 190 ms against 81 ms for one on the 2-core CPU); none above 0.6, where
    # about half the captions the matching model picked were no longer grammatical (MODEL_CARD "Specificity by fit").
    specificity_levels: tuple[float, ...] = (0.0, 0.15, 0.3, 0.45, 0.6)
    specificity_costs: tuple[float, ...] = (0.1, 0.15, 0.2, 0.25, 0.3)
    # With the encoder's ImageNet head: every beam setting decoded with each tag bonus (``DecodeConfig.tag_bonus``);
    # (0.0,) leaves it off. Each value is a decoding pass of its own, like a no-repeat size.
    tag_bonuses: tuple[float, ...] = (0.0,)
    # CIDEr-D (0-10 scale) below the best that still counts as a tie, broken by distinct words. 0.005 (0.5 points
    # x100): the paired standard error of the CIDEr-D difference between two close settings of the bundled model on
    # Flickr8k's 1,000 val photos was 0.43-0.72 points (MODEL_CARD "Specificity").
    cider_tie: float = 0.005
    batch_size: int = 250  # images decoded at once

    def __post_init__(self) -> None:
        if self.split == "test":
            raise ConfigError("decoding is chosen on a validation split; the test split only reports the result")
        if not self.beam_sizes or not self.length_penalties:
            raise ConfigError("the grid needs at least one beam size and one length penalty")
        for beam in self.beam_sizes:
            DecodeConfig(strategy="beam", beam_size=beam)  # same checks as decoding itself
        if any(a < 0 for a in self.length_penalties):
            raise ConfigError(f"length penalties must be >= 0, got {self.length_penalties}")
        if not self.no_repeat_ngrams:
            raise ConfigError("the grid needs at least one no-repeat n-gram size (0 for none)")
        for n in self.no_repeat_ngrams:
            DecodeConfig(strategy="beam", no_repeat_ngram=n)
        for k in self.consensus:
            for weight in self.consensus_weights:
                DecodeConfig(strategy="beam", consensus=k, consensus_weight=weight)
        for weight in self.match_weights:
            DecodeConfig(strategy="beam", match_weight=weight)
        if self.cider_tie < 0:
            raise ConfigError(f"cider_tie must be >= 0, got {self.cider_tie}")
        if not self.specificities:
            raise ConfigError("the grid needs at least one specificity (0 for none)")
        for specificity in self.specificities:
            DecodeConfig(strategy="beam", specificity=specificity)
        for cost in self.specificity_costs if self.specificity_levels else ():
            DecodeConfig(strategy="beam", specificity_levels=self.specificity_levels, specificity_cost=cost)
        if not self.tag_bonuses:
            raise ConfigError("the grid needs at least one tag bonus (0 for none)")
        for bonus in self.tag_bonuses:
            DecodeConfig(strategy="beam", tag_bonus=bonus)


def tune_decoding(captioner: "Captioner", data_dir: Path, config: TuneConfig) -> dict:
    """Decode ``config.split`` from the checkpoint's own feature cache with every setting of the grid and
    return the ``decoding.json`` content: the chosen ``defaults``, the rule, and every row measured."""
    from .evaluate import nbest_features, score
    from .features import FeatureCache, cache_dir
    from .manifest import load_manifest, split_records
    from .matching import pick_levels

    records = split_records(load_manifest(data_dir), config.split)
    if not records:
        raise DatasetError(f"{data_dir}: no images in split {config.split!r}")
    cache = FeatureCache(cache_dir(data_dir, captioner.config.encoder))
    records = [r for r in records if r.id not in cache.failed]  # as ``evaluate --from-cache`` leaves them out
    feats = cache.gather([r.id for r in records])
    reranked = [(k, w) for k in config.consensus for w in config.consensus_weights] if captioner.consensus else []
    matched = config.match_weights if captioner.matcher else ()
    bonuses = config.tag_bonuses if captioner.can_tag else (0.0,)
    rows = []

    def row(setting: dict, nbest: list[list[dict]]) -> dict:
        captions = {r.id: n[0]["caption"] for r, n in zip(records, nbest)}
        metrics = score(records, captions)
        words = [c.split() for c in captions.values()]
        return {**setting, "bleu4": round(metrics["Bleu_4"], 5), "cider_d": round(metrics["CIDEr"], 5),
                "rouge_l": round(metrics["ROUGE_L"], 5), "distinct_words": len({w for c in words for w in c}),
                "mean_words": round(sum(map(len, words)) / len(words), 3), "images": len(records)}

    levels = config.specificity_levels if matched else ()
    decoded = [*config.specificities, *(s for s in levels if s not in config.specificities)]
    for beam, alpha, norepeat, bonus in itertools.product(config.beam_sizes, config.length_penalties,
                                                          config.no_repeat_ngrams, bonuses):
        base = {"strategy": "beam", "beam_size": beam, "length_penalty": alpha, "guide": config.guide,
                **({"no_repeat_ngram": norepeat} if norepeat else {}), **({"tag_bonus": bonus} if bonus else {})}
        by_level = {}  # (match weight, specificity) -> the reranked n-best
        for specificity in decoded:
            setting = {**base, "specificity": specificity} if specificity else base
            search = DecodeConfig(**{"max_len": captioner.config.max_len, **setting}, num_return=beam)
            nbest = nbest_features(captioner, feats, search, config.batch_size)  # the whole beam, best first: once
            rows.append(row(setting, nbest))
            for k, weight in reranked:  # the same beams reranked: what ``--consensus k`` returns
                rows.append(row({**setting, "consensus": k, "consensus_weight": weight},
                                captioner.consensus.rerank(nbest, feats, k, weight)))
            for weight in matched:  # and by their match with the photo: what ``--match-weight`` returns
                by_level[weight, specificity] = captioner.matcher.rerank(nbest, feats, captioner.vocab, weight)
                rows.append(row({**setting, "match_weight": weight}, by_level[weight, specificity]))
        for weight, cost in itertools.product(matched, config.specificity_costs) if levels else ():
            # a level per photo from the same beams: what ``--specificity-levels ... --specificity-cost`` returns
            rows.append(row({**base, "match_weight": weight, "specificity_levels": list(levels),
                             "specificity_cost": cost},
                            pick_levels([by_level[weight, s] for s in levels], levels, cost)))
    return {"format": FORMAT, "defaults": choose(rows, config.cider_tie),
            "rule": "highest CIDEr-D among settings with BLEU-4 >= the first setting's (plain beam search); "
                    f"within {config.cider_tie} of it a tie, won by the most distinct words",
            "split": config.split, "data_dir": str(data_dir), "grid": asdict(config) | {"rows": rows},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def choose(rows: list[dict], cider_tie: float = 0.0) -> dict:
    """The rule over measured grid rows (the first is the reference) -> the recommended options."""
    eligible = [r for r in rows if r["bleu4"] >= rows[0]["bleu4"]]
    best = max(r["cider_d"] for r in eligible)
    chosen = max((r for r in eligible if r["cider_d"] >= best - cider_tie),
                 key=lambda r: (r["distinct_words"], r["cider_d"]))
    return {k: chosen[k] for k in RECOMMENDABLE if k in chosen}


def without_consensus(result: dict) -> dict:
    """``decoding.json``'s content for a copy of the checkpoint without its consensus index (``captioner
    export``): the rule re-applied to the grid's rows that need no index (a hand-written file without a grid
    just loses its consensus options)."""
    rows = [r for r in result.get("grid", {}).get("rows", []) if not r.get("consensus")]
    defaults = choose(rows, result["grid"].get("cider_tie", 0.0)) if rows else {k: v for k, v in result["defaults"].items()
                                          if k not in ("consensus", "consensus_weight")}
    return {**result, "defaults": defaults, "note": "chosen without the consensus index, which was not exported"}


def save_decoding(result: dict, directory: Path) -> Path:
    """Write ``decoding.json`` into the checkpoint directory atomically."""
    from .manifest import write_json_atomic
    path = Path(directory) / DECODING
    write_json_atomic(path, result)
    return path


def read_decoding(directory: Path) -> dict:
    """The checkpoint's recommended decoding options (``{}`` when it has no ``decoding.json``); a file that is
    not one, or whose options decoding would refuse, is an error naming it."""
    path = Path(directory) / DECODING
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f'expected "format": "{FORMAT}"')
        defaults = data["defaults"]
        unknown = set(defaults) - set(RECOMMENDABLE)
        if unknown:
            raise ValueError(f"options a checkpoint cannot set: {sorted(unknown)}")
        DecodeConfig(**defaults)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, KeyError, TypeError, AttributeError,
            ConfigError) as err:
        raise CheckpointError(f"{path}: not a valid decoding recommendation ({type(err).__name__}: {err}); "
                              f"delete it or re-create it with `captioner tune-decoding`") from None
    return dict(defaults)
