"""Does the saliency map of "dog" point at the dog? Composites of two Flickr8k photos, side by side.

Each composite puts a photo whose reference captions talk about a dog next to one whose references name
no animal, on a side drawn at random (seeded). Both are centre-cropped to squares and set side by side on
a square canvas, padded above and below with the ImageNet mean grey, so the CNN's centre crop sees both
halves (a 2:1 composite would be cut down to its middle). When the generated caption says dog/dogs/puppy,
the map of that word is scored: its share of mass on the dog half (> 0.5 is a hit) and whether its peak
lies there (the pointing game). Control: the same share for the caption's other words, which name no dog.

    OMP_NUM_THREADS=1 python benchmarks/saliency_composite.py --split val -n 200
    OMP_NUM_THREADS=1 python benchmarks/saliency_composite.py --split test -n 200

Writes ``benchmarks/results/saliency_composite_<split>.json`` (summary + one row per composite).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from captioner.api import Captioner  # noqa: E402
from captioner.encoder import IMAGENET_MEAN  # noqa: E402
from captioner.manifest import load_manifest, split_records  # noqa: E402
from captioner.tokenizer import tokenize  # noqa: E402

DOG_WORDS = {"dog", "dogs", "puppy", "puppies"}
ANIMAL_WORDS = DOG_WORDS | {"animal", "animals", "cat", "cats", "kitten", "horse", "horses", "pony", "cow", "cows",
                            "bull", "sheep", "goat", "goats", "bird", "birds", "duck", "ducks", "camel", "elephant",
                            "deer", "pig", "chicken", "lamb", "calf", "bear", "monkey", "squirrel", "fish"}
MIN_DOG_REFERENCES = 3  # of a photo's (five) reference captions, at least this many mention a dog


def pools(records) -> tuple[list, list]:
    """(dog photos, photos with no animal in any reference) of a split."""
    dogs, others = [], []
    for record in records:
        words = [set(tokenize(c)) for c in record.captions]
        if sum(bool(w & DOG_WORDS) for w in words) >= MIN_DOG_REFERENCES:
            dogs.append(record)
        elif not any(w & ANIMAL_WORDS for w in words):
            others.append(record)
    return dogs, others


def composite(dog_path: str, other_path: str, dog_left: bool, side: int) -> Image.Image:
    """A (2 side) x (2 side) canvas: the two photos as side x side squares in the middle band."""
    grey = tuple(round(255 * m) for m in IMAGENET_MEAN)
    canvas = Image.new("RGB", (2 * side, 2 * side), grey)
    tiles = [ImageOps.fit(Image.open(p).convert("RGB"), (side, side), Image.BILINEAR) for p in (dog_path, other_path)]
    left, right = tiles if dog_left else tiles[::-1]
    canvas.paste(left, (0, side // 2))
    canvas.paste(right, (side, side // 2))
    return canvas


def half_share(m, dog_left: bool) -> float:
    """The share of a (H, W) map's mass on the dog's half (0.5 when the map is empty)."""
    total = float(m.sum())
    half = m[:, : m.shape[1] // 2] if dog_left else m[:, m.shape[1] // 2:]
    return float(half.sum()) / total if total > 0 else 0.5


def run(captioner: Captioner, split: str, data_dir: Path, n: int, seed: int, side: int, options: dict) -> dict:
    dogs, others = pools(split_records(load_manifest(data_dir), split))
    rng = random.Random(seed)
    rng.shuffle(dogs)
    rows, start = [], time.time()
    for i in range(n):
        dog, other, dog_left = dogs[i % len(dogs)], rng.choice(others), rng.random() < 0.5
        image = composite(dog.path, other.path, dog_left, side)
        expl = captioner.explain(image, **options)
        row = {"dog_photo": Path(dog.path).name, "other_photo": Path(other.path).name, "dog_left": dog_left,
               "caption": expl.caption}
        said = [k for k, w in enumerate(expl.words) if w in DOG_WORDS]
        if said:
            m = expl.maps[said[0]]
            peak_x = int(m.max(axis=0).argmax())
            row.update(word=expl.words[said[0]], dog_half_share=round(half_share(m, dog_left), 4),
                       peak_on_dog_half=(peak_x < m.shape[1] // 2) == dog_left,
                       other_words_share=round(statistics.mean(
                           [half_share(expl.maps[k], dog_left) for k in range(len(expl.words))
                            if expl.words[k] not in DOG_WORDS] or [0.5]), 4))
        rows.append(row)
    scored = [r for r in rows if "dog_half_share" in r]
    shares = [r["dog_half_share"] for r in scored]
    summary = {
        "split": split, "composites": n, "seed": seed, "tile_side": side, "decoding": options or "greedy (default)",
        "dog_photos_available": len(dogs), "other_photos_available": len(others),
        "captions_saying_dog": len(scored),
        "hit_rate": round(sum(s > 0.5 for s in shares) / len(scored), 4) if scored else None,
        "pointing_game_rate": round(sum(r["peak_on_dog_half"] for r in scored) / len(scored), 4) if scored else None,
        "mean_dog_half_share": round(statistics.mean(shares), 4) if scored else None,
        "median_dog_half_share": round(statistics.median(shares), 4) if scored else None,
        "control_other_words_mean_share": round(statistics.mean(r["other_words_share"] for r in scored), 4)
        if scored else None,
        "seconds": round(time.time() - start, 1),
    }
    return {"summary": summary, "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", default="val", help="manifest split the photos come from (val, test)")
    p.add_argument("-n", type=int, default=200, help="composites")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--side", type=int, default=224, help="pixels per photo square")
    p.add_argument("--data", type=Path, default=REPO / "data" / "flickr8k", help="prepared data directory")
    p.add_argument("--checkpoint", help="model name or checkpoint directory (default: the bundled model)")
    p.add_argument("--strategy", choices=["greedy", "beam"], default="greedy", help="decoding of the explained caption")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("-o", "--output", type=Path, help="default: benchmarks/results/saliency_composite_<split>.json")
    args = p.parse_args()
    options = {"strategy": args.strategy, "beam_size": args.beam_size} if args.strategy == "beam" else {}
    result = run(Captioner.from_pretrained(args.checkpoint), args.split, args.data, args.n, args.seed, args.side,
                 options)
    out = args.output or REPO / "benchmarks" / "results" / f"saliency_composite_{args.split}.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
