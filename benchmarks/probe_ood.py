"""Out-of-domain probe: does a caption name the main subject of everyday photos that are not Flickr8k?

The photos ship inside installed packages (``benchmarks/probe_set.json``: file, licence source, and
the words a good caption must use one of). Every model x decoding setting captions every photo; a
hit is a caption containing one of the photo's words. Why a probe and not a metric: Flickr8k BLEU
does not move when a model calls an eagle "a dog", a user does.

    python benchmarks/probe_ood.py --model fast --model resnet152 -o benchmarks/results/probe.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from captioner.api import Captioner  # noqa: E402
from captioner.decoding import plain_options  # noqa: E402
from captioner.tokenizer import tokenize  # noqa: E402

SETTINGS = {  # name -> decoding options
    "beam3": plain_options(strategy="beam", beam_size=3),
    "beam3+guide": plain_options(strategy="beam", beam_size=3, guide=True),
    "default": {},  # the model's decoding.json (captioner tune-decoding), as the API and the CLI decode
}


def probe_photos(spec: Path = REPO / "benchmarks" / "probe_set.json") -> list[dict]:
    """The probe's photos with their absolute paths (a photo whose package is missing is skipped)."""
    photos = []
    for item in json.loads(spec.read_text())["photos"]:
        found = importlib.util.find_spec(item["package"])
        if found is None or not found.submodule_search_locations:
            print(f"skipped {item['file']}: package {item['package']} not installed", file=sys.stderr)
            continue
        photos.append({**item, "path": str(Path(list(found.submodule_search_locations)[0]) / item["file"])})
    return photos


def run(models: list[str], photos: list[dict]) -> list[dict]:
    rows = []
    for model in models:
        cap = Captioner.from_pretrained(model)
        paths = [p["path"] for p in photos]
        tags = cap.tags(paths)
        for setting, options in SETTINGS.items():
            captions = cap.caption(paths, **options)
            for photo, caption, tag in zip(photos, captions, tags):
                hit = bool(set(tokenize(caption)) & set(photo["mention"]))
                rows.append({"model": model, "setting": setting, "photo": photo["file"], "caption": caption,
                             "hit": hit, "tags": [f"{t['word']} {t['prob']:.2f}" for t in tag[:3]]})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="model name or checkpoint directory (repeatable)")
    p.add_argument("-o", "--output", type=Path)
    args = p.parse_args()
    rows = run(args.model or [None], probe_photos())
    for model in dict.fromkeys(r["model"] for r in rows):
        for setting in SETTINGS:
            sel = [r for r in rows if r["model"] == model and r["setting"] == setting]
            print(f"{model or 'default'} {setting}: {sum(r['hit'] for r in sel)}/{len(sel)} photos named")
    for r in rows:
        print(f"{'HIT ' if r['hit'] else 'miss'} {r['model'] or 'default'} {r['setting']:12s} {r['photo']:40s} "
              f"{r['caption']}  [{', '.join(r['tags'])}]")
    if args.output:
        args.output.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
