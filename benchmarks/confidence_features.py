"""Which signals say a caption is good? Spearman correlation of candidate confidence features with each best
caption's CIDEr-D, on a split's cached features (the choice behind ``captioner/confidence.py``; docs/calibration.md).

    OMP_NUM_THREADS=1 python benchmarks/confidence_features.py data/flickr8k --split val

Candidates: the log-probability per decoding step, the total log-probability, the length, the encoder head's
top caption-word and top ImageNet-class probabilities, the matching model's cosine between photo and caption (for a
model with one), and, for beam search's n-best, the agreement (share of the best caption's content words the other
beams use) and the margin (total log-prob, best minus second).
Decoding: ``CalibrationConfig.settings`` (the CLI's and the app's defaults).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from captioner.api import Captioner  # noqa: E402
from captioner.captions import references  # noqa: E402
from captioner.confidence import CalibrationConfig, fill_match  # noqa: E402
from captioner.features import FeatureCache, cache_dir  # noqa: E402
from captioner.manifest import load_manifest, split_records  # noqa: E402
from captioner.metrics import CiderD  # noqa: E402
from captioner.tokenizer import tokenize  # noqa: E402

FUNCTION_WORDS = frozenset("a an the is are of in on with and to at his her its their while into".split())


def agreement(nbest: list[dict]) -> float:
    """Mean share of the best caption's content words that each other hypothesis also uses."""
    best = set(nbest[0]["tokens"]) - FUNCTION_WORDS
    others = [len(best & set(h["tokens"])) / max(1, len(best)) for h in nbest[1:]]
    return float(np.mean(others)) if others else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--split", default="val")
    parser.add_argument("--checkpoint", help="default: the bundled model")
    parser.add_argument("-o", "--output", type=Path, help="also write the correlations as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cap = Captioner.from_pretrained(args.checkpoint, device="cpu", calibrated=False)
    cache = FeatureCache(cache_dir(args.data_dir, cap.config.encoder))
    records = [r for r in split_records(load_manifest(args.data_dir), args.split) if r.id not in cache.failed]
    features = cache.gather([r.id for r in records])  # (N, D)
    scorer = CiderD(references(records))
    words, classes = cap.tagger.word_probs(features)  # (N, V), (N, 1000)
    results = {}
    for setting in CalibrationConfig().settings:
        config = cap.decode_config(**setting)
        nbest = []
        for i in range(0, len(records), 250):
            part = cap.generate(features[i:i + 250], config)
            if cap.matcher is not None:
                fill_match(cap.matcher, part, features[i:i + 250], cap.vocab)
            nbest += part
        cider = [scorer.score(r.id, tokenize(n[0]["caption"])) for r, n in zip(records, nbest)]
        candidates = {
            "per_word_logprob": [n[0]["logprob"] / (len(n[0]["tokens"]) + 1) for n in nbest],
            "logprob": [n[0]["logprob"] for n in nbest],
            "tokens": [len(n[0]["tokens"]) for n in nbest],
            "tag_prob": words.max(1).values.tolist(),
            "class_prob": classes.max(1).values.tolist()}
        if cap.matcher is not None:
            candidates["match"] = [n[0]["match"] for n in nbest]
        if config.num_return > 1:
            candidates["nbest_agreement"] = [agreement(n) for n in nbest]
            candidates["nbest_margin"] = [n[0]["logprob"] - n[1]["logprob"] for n in nbest]
        name = config.describe()
        results[name] = {k: round(float(spearmanr(v, cider).statistic), 3) for k, v in candidates.items()}
        print(f"{args.split}, {name}: Spearman with CIDEr-D over {len(records)} images")
        for k, rho in results[name].items():
            print(f"  {k:18s} {rho:+.3f}")
    if args.output:
        args.output.write_text(json.dumps({"split": args.split, "spearman": results}, indent=1))


if __name__ == "__main__":
    main()
