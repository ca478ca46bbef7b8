"""Do two models with *different* CNNs caption better together than either alone?

``captioner export A B`` ensembles decoders that share one encoder. This measures the case it cannot
build: members whose image features come from different CNNs (e.g. the bundled MobileNetV2 model and a
ResNet-152 run), each member starting its LSTM from its own encoder's feature, next-word probabilities
averaged as ``EnsembleDecoder`` does. It reads each checkpoint's feature cache (``captioner features
--checkpoint``), so no CNN runs, and scores with the project's metrics on a split (validation by default:
levers are chosen there, never on test).

    python benchmarks/cross_encoder_ensemble.py data/flickr8k checkpoints/flickr8k-mobilenet_v2-lstm \
        runs/r152-scst/best --split val --beam-size 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from captioner.api import Captioner  # noqa: E402
from captioner.decoding import DecodeConfig  # noqa: E402
from captioner.evaluate import caption_features, score  # noqa: E402
from captioner.features import FeatureCache, cache_dir  # noqa: E402
from captioner.manifest import load_manifest, split_records  # noqa: E402
from captioner.model import EnsembleDecoder  # noqa: E402


class MixedEnsemble(EnsembleDecoder):
    """``EnsembleDecoder`` (its ``step`` averages the members' probabilities) whose members each start from
    their own slice of the concatenated features."""

    def __init__(self, members: list[nn.Module], dims: list[int]) -> None:
        nn.Module.__init__(self)  # members given, not built from one config
        self.config, self.members, self.dims = members[0].config, nn.ModuleList(members), dims
        self.n_states = 2 if self.config.cell == "lstm" else 1

    def init_state(self, features: torch.Tensor) -> tuple:
        parts = features.split(self.dims, dim=1)
        return tuple(s for m, f in zip(self.members, parts) for s in m.init_state(f))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("checkpoints", nargs="+", help="two or more checkpoints sharing one vocabulary")
    parser.add_argument("--split", default="val")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=250)
    args = parser.parse_args()
    torch.manual_seed(0)
    models = [Captioner.from_pretrained(c, device="cpu", precision="fp32", calibrated=False) for c in args.checkpoints]
    if any(m.vocab.words != models[0].vocab.words for m in models):
        sys.exit("the checkpoints' vocabularies differ: their next-word probabilities cannot be averaged")
    records = split_records(load_manifest(args.data_dir), args.split)
    ids = [r.id for r in records]
    feats = [FeatureCache(cache_dir(args.data_dir, m.config.encoder)).gather(ids) for m in models]
    config = DecodeConfig(strategy="beam", beam_size=args.beam_size, length_penalty=0.0,
                          max_len=models[0].decode_config().max_len)
    first = models[0]
    ensemble = Captioner(first.encoder, MixedEnsemble([m.decoder for m in models], [f.shape[1] for f in feats]),
                         first.vocab, first.config, "cpu", "fp32")
    runs = {Path(c).as_posix(): (m, f) for c, m, f in zip(args.checkpoints, models, feats)}
    runs["ensemble"] = (ensemble, torch.cat(feats, dim=1))
    for name, (captioner, features) in runs.items():
        captions = caption_features(captioner, records, features, config, args.batch_size)
        metrics = score(records, captions)
        words = {w for c in captions.values() for w in c.split()}
        print(f"{name:45s} BLEU-4 {metrics['Bleu_4'] * 100:5.2f}  CIDEr-D {metrics['CIDEr'] * 100:5.2f}  "
              f"distinct words {len(words)}", flush=True)


if __name__ == "__main__":
    main()
