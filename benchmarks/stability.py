"""How often does a photo's caption change when the photo is only re-saved as a JPEG?

A photo shared through a messaging app or re-exported by a photo manager comes back re-compressed; a caption
people can trust should not change with it. This captions a Flickr8k split as it is and re-saved by Pillow at
JPEG quality 95 (invisible) and 75 (a messaging app's), with the model's default decoding and greedy, and counts
the photos whose caption changed; also the CNN features' relative change, and the same with test-time
augmentation (features averaged over the photo and its mirror image), the usual remedy for such noise.

    python benchmarks/stability.py                       # bundled model, the 1,000 val photos (~10 min on 2 cores)
    python benchmarks/stability.py --limit 200 -o /tmp/stability.json
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # runnable from a plain checkout

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from captioner.api import Captioner  # noqa: E402
from captioner.evaluate import score  # noqa: E402
from captioner.images import load_image  # noqa: E402
from draft_quality import captions, split_parser, split_records, write_report  # noqa: E402

QUALITIES = (95, 75)


def resaved(path: str, quality: int) -> bytes:
    """The photo's pixels saved again as a JPEG of ``quality`` (Pillow's defaults otherwise: 4:2:0)."""
    out = io.BytesIO()
    with Image.open(path) as img:
        img.convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


def features(cap: Captioner, sources: list, batch: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) features of each photo and of its mirror image."""
    pre, plain, mirrored = cap.preprocess, [], []
    for i in range(0, len(sources), batch):
        pixels = torch.stack([pre(load_image(s, pre.min_side)) for s in sources[i:i + batch]])
        plain.append(cap.encode(pixels))
        mirrored.append(cap.encode(torch.flip(pixels, dims=[3])))
    return torch.cat(plain), torch.cat(mirrored)


def main(argv: list[str] | None = None) -> int:
    args = split_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    records = split_records(args)
    cap = Captioner.from_pretrained(args.checkpoint, device="cpu")
    paths = [r.path for r in records]
    sets = {"original": features(cap, paths), **{f"q{q}": features(cap, [resaved(p, q) for p in paths])
                                                for q in QUALITIES}}
    base = sets["original"][0]
    report = {"split": args.split, "images": len(records), "feature_change": {
        k: float(((v[0] - base).norm(dim=1) / base.norm(dim=1)).mean()) for k, v in sets.items() if k != "original"}}
    report["feature_change"]["another_photo"] = float(((base[1:] - base[:-1]).norm(dim=1)
                                                       / base[1:].norm(dim=1)).mean())
    print(f"{args.split}, {len(records)} photos; features' mean relative change: "
          + ", ".join(f"{k} {v:.3f}" for k, v in report["feature_change"].items()))
    for name, options in (("default", {}), ("greedy", {"strategy": "greedy"})):
        for views in ("photo", "photo+mirror"):
            pick = (lambda f: f[0]) if views == "photo" else (lambda f: (f[0] + f[1]) / 2)
            texts = {k: captions(cap, pick(f), options) for k, f in sets.items()}
            metrics = score(records, {r.id: c for r, c in zip(records, texts["original"])})
            row = {"bleu4": metrics["Bleu_4"], "cider": metrics["CIDEr"],
                   "distinct_words": len({w for c in texts["original"] for w in c.split()}),
                   **{f"same_after_{k}": sum(a == b for a, b in zip(texts["original"], t)) / len(records)
                      for k, t in texts.items() if k != "original"}}
            report[f"{name}, {views}"] = row
            print(f"  {name:8s} {views:13s} BLEU-4 {row['bleu4'] * 100:.2f}  CIDEr-D {row['cider'] * 100:.2f}  "
                  f"{row['distinct_words']} words; same caption after re-saving: "
                  + ", ".join(f"{k} {row[f'same_after_{k}']:.1%}" for k in sets if k != "original"), flush=True)
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
