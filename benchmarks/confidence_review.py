"""What ``captioner caption --min-confidence P`` flags: per threshold, the share of captions flagged and how many
of the flagged and of the kept ones are good (docs/calibration.md), with the checkpoint's calibration.json; and the
AUC: the chance that a good caption gets a higher confidence than a bad one (0.5: the confidence does not tell them
apart).

    OMP_NUM_THREADS=1 python benchmarks/confidence_review.py data/flickr8k --split val --thresholds 0.3 0.5

"Good" and the decoding settings are the calibration's own (``captioner/confidence.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from captioner.api import Captioner  # noqa: E402
from captioner.confidence import CalibrationConfig, score_split  # noqa: E402
from captioner.decoding import DecodeConfig  # noqa: E402
from captioner.errors import CheckpointError  # noqa: E402


def auc(conf: np.ndarray, good: np.ndarray) -> float:
    """Area under the ROC curve of ``conf`` for ``good`` (Mann-Whitney; ties count half)."""
    ranks, good = rankdata(conf), good.astype(bool)
    n_good, n_bad = good.sum(), (~good).sum()
    return float((ranks[good].sum() - n_good * (n_good + 1) / 2) / (n_good * n_bad))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--split", default="val")
    parser.add_argument("--checkpoint", help="default: the bundled model")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.5])
    args = parser.parse_args()
    torch.set_num_threads(1)
    cap = Captioner.from_pretrained(args.checkpoint, device="cpu")
    calibration = cap.calibration
    if calibration is None:
        raise CheckpointError("the checkpoint has no calibration.json: run `captioner calibrate` first")
    config = CalibrationConfig()
    for scored in score_split(cap, args.data_dir, args.split, calibration.info["threshold"], calibration.features,
                              config):
        conf = calibration.confidence(scored.x)
        print(f"{args.split}, {DecodeConfig(**scored.setting).describe()} ({len(conf)} images, {scored.good.mean():.0%} "
              f"good): AUC {auc(conf, scored.good):.3f}")
        for t in args.thresholds:
            flagged = conf < t
            print(f"  --min-confidence {t}: flags {flagged.mean():.0%}; good among flagged "
                  f"{scored.good[flagged].mean():.0%}, among kept {scored.good[~flagged].mean():.0%}")


if __name__ == "__main__":
    main()
