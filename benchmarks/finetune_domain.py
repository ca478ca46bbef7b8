"""Fine-tuning with vocabulary extension (``captioner train --init-from``): before/after on a held-out part.

Two domains, both with words the bundled model cannot say (``--domain``):

* ``icons``: the 48-px colour icons of the Adwaita icon theme (Debian package adwaita-icon-theme,
  CC-BY-SA-3.0 or LGPL-3; ``apt-get install adwaita-icon-theme``), each captioned by its own name
  ("battery-caution-charging" -> "battery caution charging icon"). A seeded cut of the names: 15% held out
  (test), 10% val (picks ``best/``), the rest fine-tuned on. Pictograms, not photos: a domain the model has
  never seen, with words ("battery", "folder", "mail") it has to learn from a few dozen uses.
* ``longtail``: every Flickr8k photo whose captions use a word outside the bundled vocabulary that Flickr8k's
  train + val captions use at least ``--min-count`` times (words below the bundled model's min count of 5 in
  its train split, or seen only in val). Photos of the train and val splits are fine-tuned on (every 10th for
  validation); those of the test split, which neither model trained on, are held out. The words are chosen
  without looking at the test photos. Each new word has only about five uses.

The script runs the CLI steps a user would:

    captioner prepare csv DOMAIN.csv --images FOLDER --out WORK/data --min-count N
    captioner features WORK/data --checkpoint fast                                      # that model's own CNN
    captioner evaluate WORK/data --split test --from-cache --checkpoint fast            # before
    captioner train WORK/data --out WORK/run --init-from fast --epochs E ...
    captioner evaluate WORK/data --split test --from-cache --checkpoint WORK/run/best   # after

and scores the run's ``last/`` too: ``best/`` is the epoch of the best val BLEU-4, and on the icons' captions
of 2-4 words BLEU-4 is 0 at every epoch, so there ``best/`` is merely epoch 1. Each model is also scored on
the whole Flickr8k test split (how much of the general skill the domain run keeps). Greedy decoding
throughout, as the training's validation. Writes benchmarks/results/finetune_DOMAIN.json:

    OMP_NUM_THREADS=1 python benchmarks/finetune_domain.py --domain icons --work /tmp/finetune_icons
    OMP_NUM_THREADS=1 python benchmarks/finetune_domain.py --domain longtail --work /tmp/finetune_longtail \\
        --min-count 5 --epochs 10 --lr 5e-4 --batch-size 64 --warmup-steps 20
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from captioner.api import resolve_model  # noqa: E402
from captioner.cli import main as captioner  # noqa: E402
from captioner.manifest import load_manifest  # noqa: E402
from captioner.tokenizer import tokenize  # noqa: E402
from captioner.vocab import Vocab  # noqa: E402


Rows = list[tuple[str, str, str]]  # (image file relative to the image folder, caption, split)
ICONS = Path("/usr/share/icons/Adwaita/48x48/legacy")


def longtail_rows(flickr8k: Path, base: Vocab, min_count: int) -> tuple[Rows, Path]:
    """The Flickr8k long-tail domain's rows (see the module docstring) and the image folder."""
    records = load_manifest(flickr8k)
    seen = [r for r in records if r.split != "test"]
    uses = Counter(t for r in seen for c in r.captions for t in tokenize(c) if t not in base.index)
    chosen = {w for w, n in uses.items() if n >= min_count}
    domain = [r for r in records if chosen & {t for c in r.captions for t in tokenize(c)}]
    held_in = sorted((r for r in domain if r.split != "test"), key=lambda r: r.id)
    split = {r.id: "val" if i % 10 == 9 else "train" for i, r in enumerate(held_in)} | {
        r.id: "test" for r in domain if r.split == "test"}
    return [(Path(r.path).name, c, split[r.id]) for r in domain for c in r.captions], Path(domain[0].path).parent


def icon_rows(folder: Path, seed: int = 0) -> tuple[Rows, Path]:
    """The icon domain's rows: each colour icon (not the monochrome ``-symbolic`` ones, not the mirrored
    ``-rtl`` copies) captioned by its name, names cut 75 / 10 / 15 % into train / val / test."""
    if not folder.is_dir():
        raise SystemExit(f"{folder}: not found; apt-get install adwaita-icon-theme")
    names = sorted(p.stem for p in folder.glob("*.png") if "symbolic" not in p.stem and not p.stem.endswith("-rtl"))
    random.Random(seed).shuffle(names)
    n_test, n_val = round(0.15 * len(names)), round(0.10 * len(names))
    split = {n: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, n in enumerate(names)}
    return [(f"{n}.png", " ".join(n.split("-")) + " icon", split[n]) for n in sorted(names)], folder


def evaluate(data: Path, checkpoint: str, out: Path) -> dict:
    """``captioner evaluate --split test --from-cache`` (greedy): metrics and each image's caption."""
    out.mkdir(parents=True, exist_ok=True)
    assert captioner(["evaluate", str(data), "--split", "test", "--from-cache", "--checkpoint", checkpoint,
                      "-o", str(out / "metrics.json"), "--per-image", str(out / "captions.json")]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    return {"metrics": {k: round(metrics[k], 4) for k in ("Bleu_1", "Bleu_4", "CIDEr", "ROUGE_L")} | {"images": metrics["images"]},
            "captions": json.loads((out / "captions.json").read_text())}


def new_word_uses(captions: list[dict], new: set[str]) -> dict:
    """How often captions use a new word, and how often the image's references use it too."""
    used, right = Counter(), Counter()
    for item in captions:
        refs = {t for c in item["references"] for t in tokenize(c)}
        for word in set(tokenize(item["caption"])) & new:
            used[word] += 1
            right[word] += word in refs
    return {"images_with_a_new_word": sum(bool(set(tokenize(i["caption"])) & new) for i in captions),
            "uses": {w: {"images": n, "in_references": right[w]} for w, n in used.most_common()}}


def run(args: argparse.Namespace) -> dict:
    work = args.work
    base = Vocab.load(resolve_model(args.checkpoint) / "vocab.json")
    rows, images = icon_rows(ICONS) if args.domain == "icons" else longtail_rows(args.flickr8k, base, args.min_count)
    work.mkdir(parents=True, exist_ok=True)
    table, data, run_dir = work / "domain.csv", work / "data", work / "run"
    with open(table, "w", newline="") as fh:
        csv.writer(fh).writerows([("image", "caption", "split"), *rows])
    assert captioner(["prepare", "csv", str(table), "--images", str(images), "--out", str(data),
                      "--min-count", str(args.min_count)]) == 0
    assert captioner(["features", str(data), "--checkpoint", args.checkpoint, "--workers", "0"]) == 0
    train_flags = ["--epochs", str(args.epochs), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
                   "--warmup-steps", str(args.warmup_steps), "--workers", "0"]
    started = time.perf_counter()
    assert captioner(["train", str(data), "--out", str(run_dir), "--init-from", args.checkpoint, *train_flags]) == 0
    train_s = time.perf_counter() - started
    new = Vocab.load(run_dir / "best" / "vocab.json").words[len(base):]
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result = {"command": "OMP_NUM_THREADS=1 python benchmarks/finetune_domain.py " + " ".join(sys.argv[1:]),
              "domain": args.domain, "checkpoint": str(args.checkpoint), "min_count": args.min_count,
              "train_flags": train_flags, "train_seconds": round(train_s, 1), "new_words": new,
              "images": json.loads((data / "prepare_report.json").read_text())["images"],
              "val_bleu4_per_epoch": [round(e["Bleu_4"], 4) for e in epochs],
              "best_epoch": max(epochs, key=lambda e: e["Bleu_4"])["epoch"]}
    models = {"before": args.checkpoint, "after_best": str(run_dir / "best"), "after_last": str(run_dir / "last")}
    for name, checkpoint in models.items():
        domain = evaluate(data, checkpoint, work / f"eval_{name}")
        general = evaluate(args.flickr8k, checkpoint, work / f"eval_{name}_flickr8k")
        result[name] = {"domain_test": domain["metrics"], "flickr8k_test": general["metrics"],
                        "new_words": new_word_uses(domain["captions"], set(new)),
                        "examples": [{"image": Path(i["path"]).name, "caption": i["caption"],
                                      "reference": i["references"][0]} for i in domain["captions"][: args.examples]]}
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--domain", choices=["icons", "longtail"], default="icons")
    p.add_argument("--work", type=Path, required=True, help="folder for the domain's data directory and run")
    p.add_argument("--flickr8k", type=Path, default=REPO / "data" / "flickr8k",
                   help="prepared Flickr8k data directory with the bundled encoder's feature cache")
    p.add_argument("--checkpoint", default="fast", help="model to fine-tune")
    p.add_argument("--min-count", type=int, default=3, help="uses a new word needs (prepare; longtail: selection too)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--examples", type=int, default=12, help="held-out captions kept in the results")
    p.add_argument("-o", "--output", type=Path, help="default: benchmarks/results/finetune_DOMAIN.json")
    args = p.parse_args()
    args.output = args.output or REPO / "benchmarks" / "results" / f"finetune_{args.domain}.json"
    result = run(args)
    args.output.write_text(json.dumps(result, indent=1))
    for name in ("before", "after_best", "after_last"):
        r = result[name]
        print(f"{name}: domain test {r['domain_test']}; Flickr8k test {r['flickr8k_test']}; "
              f"{r['new_words']['images_with_a_new_word']} held-out captions use a new word (images / right): "
              + ", ".join(f"{w} {u['images']}/{u['in_references']}" for w, u in r["new_words"]["uses"].items()))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
