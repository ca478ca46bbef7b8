"""Does decoding JPEGs at a reduced DCT scale (``load_image(..., min_side=...)``) change the captions?

Captions the Flickr8k test split twice with the same model -- every pixel decoded (``full_decode``) and
the product's drafted decode -- and compares them caption by caption and by corpus BLEU-4 / CIDEr-D
against the references, for greedy and beam-3 decoding. Flickr8k photos are ~500x375 and the bundled
model resizes to 256, so draft mode hardly ever triggers there (1/2 scale would give 250x188 < 256);
the script therefore also makes camera-sized copies (the same photos upscaled to 4000 pixels on the long
side, JPEG quality 90, in a temporary folder) where it does (1/8 scale), and compares those too.

    python benchmarks/draft_quality.py                      # bundled model, 1,000 test photos + 1,000 copies
    python benchmarks/draft_quality.py --upscaled 200 -o /tmp/draft.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a plain checkout

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from captioner.api import Captioner  # noqa: E402
from captioner.decoding import plain_options  # noqa: E402
from captioner.evaluate import score  # noqa: E402
from captioner.features import ImageFiles, collate_images  # noqa: E402
from data_prep.readers import read_flickr8k  # noqa: E402

FLICKR8K = REPO.parent / "shared" / "data" / "flickr8k"


def split_parser(description: str) -> argparse.ArgumentParser:
    """The options of the scripts that caption one Flickr8k split with a model (``wide_gamut``, ``stability``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--flickr8k", type=Path, default=FLICKR8K, help="folder with Flickr8k.token.txt, split lists, images/")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--limit", type=int, default=0, help="only the first N photos of the split")
    parser.add_argument("-o", "--out", type=Path, default=None, help="write all numbers as JSON")
    return parser


def split_records(args: argparse.Namespace) -> list:
    """The records of ``args.split`` (``split_parser``), the first ``args.limit`` when given."""
    lists = {"val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}
    records, _ = read_flickr8k(args.flickr8k / "Flickr8k.token.txt", {args.split: args.flickr8k / lists[args.split]},
                               args.flickr8k / "images")
    return records[: args.limit or None]


def write_report(out: Path | None, report: dict) -> None:
    if out:
        out.write_text(json.dumps(report, indent=1))
        print(f"wrote {out}")


def upscale(job: tuple[str, str, int, int]) -> None:
    """One camera-sized copy: long side ``long_side`` pixels (aspect kept), bicubic, JPEG ``quality``."""
    src, dst, long_side, quality = job
    with Image.open(src) as img:
        img = img.convert("RGB")
        scale = long_side / max(img.size)
        img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC).save(dst, quality=quality)


def make_camera_copies(paths: list[str], folder: Path, long_side: int = 4000, quality: int = 90) -> list[str]:
    """Upscaled copies of ``paths`` in ``folder`` (made once; existing files are reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = [str(folder / Path(p).name) for p in paths]
    jobs = [(p, o, long_side, quality) for p, o in zip(paths, out) if not Path(o).is_file()]
    if jobs:
        with multiprocessing.Pool(2) as pool:
            pool.map(upscale, jobs, chunksize=8)
    return out


def drafted_count(paths: list[str], min_side: int) -> int:
    """How many files ``load_image(min_side=...)`` decodes at a reduced scale (from the headers, no decoding)."""
    n = 0
    for p in paths:
        with Image.open(p) as img:
            size = img.size
            img.draft(img.mode, (min_side, min_side))
            n += img.size != size
    return n


def features(cap: Captioner, paths: list[str], full_decode: bool) -> tuple[torch.Tensor, float]:
    """(N, D) features of the files, decoded fully or drafted, and the seconds the pass took."""
    loader = DataLoader(ImageFiles(paths, cap.preprocess, full_decode), batch_size=32, collate_fn=collate_images)
    out, t0 = [], time.perf_counter()
    for _, pixels, errors in loader:
        if errors:
            raise RuntimeError(errors[0][1])
        out.append(cap.encode(pixels))
    return torch.cat(out), time.perf_counter() - t0


def captions(cap: Captioner, feats: torch.Tensor, options: dict) -> list[str]:
    """Decoded in pools of 256 images, as ``Captioner.stream`` does (same numbers)."""
    config = cap.decode_config(**options)
    return [n[0]["caption"] for i in range(0, len(feats), 256) for n in cap.generate(feats[i:i + 256], config)]


def compare(cap: Captioner, records, paths: list[str], label: str) -> dict:
    drafted = drafted_count(paths, cap.preprocess.min_side)
    full, t_full = features(cap, paths, full_decode=True)
    draft, t_draft = features(cap, paths, full_decode=False)
    out = {"images": len(paths), "drafted": drafted, "decode_encode_s": {"full": t_full, "draft": t_draft},
           "feature_max_abs_diff": float((full - draft).abs().max()),
           "feature_rel_l2": float((full - draft).norm() / full.norm())}
    for name, options in (("greedy", {"strategy": "greedy"}), ("beam3", plain_options(strategy="beam", beam_size=3))):
        a, b = captions(cap, full, options), captions(cap, draft, options)
        ma = score(records, {r.id: c for r, c in zip(records, a)})
        mb = score(records, {r.id: c for r, c in zip(records, b)})
        out[name] = {"same_caption": sum(x == y for x, y in zip(a, b)) / len(a),
                     "bleu4": {"full": ma["Bleu_4"], "draft": mb["Bleu_4"]},
                     "cider": {"full": ma["CIDEr"], "draft": mb["CIDEr"]}, "captions": {"full": a, "draft": b}}
    print(f"{label}: {len(paths)} images, {drafted} decoded at a reduced scale; decode+encode "
          f"{t_full:.1f} s full, {t_draft:.1f} s draft; feature rel. L2 diff {out['feature_rel_l2']:.4f}")
    for name in ("greedy", "beam3"):
        r = out[name]
        print(f"  {name}: same caption {r['same_caption']:.1%}; BLEU-4 full {r['bleu4']['full'] * 100:.2f} "
              f"draft {r['bleu4']['draft'] * 100:.2f}; CIDEr-D full {r['cider']['full'] * 100:.1f} "
              f"draft {r['cider']['draft'] * 100:.1f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--flickr8k", type=Path, default=FLICKR8K, help="folder with Flickr8k.token.txt, split lists, images/")
    parser.add_argument("--upscaled", type=int, default=1000, help="camera-sized copies of the first N test photos (0: none)")
    parser.add_argument("--copies-dir", type=Path, default=None, help="keep the copies here (default: a temp dir, removed)")
    parser.add_argument("-o", "--out", type=Path, default=None, help="write all numbers and captions as JSON")
    args = parser.parse_args(argv)
    records, _ = read_flickr8k(args.flickr8k / "Flickr8k.token.txt", {"test": args.flickr8k / "Flickr_8k.testImages.txt"},
                               args.flickr8k / "images")
    cap = Captioner.from_pretrained(args.checkpoint, device="cpu")
    report = {"flickr8k": compare(cap, records, [r.path for r in records], "Flickr8k test (500x375)")}
    if args.upscaled:
        folder = args.copies_dir or Path(tempfile.mkdtemp(prefix="captioner-camera-"))
        try:
            subset = records[: args.upscaled]
            t0 = time.perf_counter()
            copies = make_camera_copies([r.path for r in subset], folder)
            print(f"made {len(copies)} camera-sized copies in {folder} ({time.perf_counter() - t0:.0f} s)")
            report["upscaled"] = compare(cap, subset, copies, "upscaled copies (4000 px, q90)")
            orig = report["flickr8k"]["greedy"]["captions"]["full"][: len(subset)]
            for kind in ("full", "draft"):
                same = sum(a == b for a, b in zip(orig, report["upscaled"]["greedy"]["captions"][kind])) / len(subset)
                report["upscaled"]["greedy"][f"same_as_original_{kind}"] = same
                print(f"  greedy, upscaled {kind} decode vs. the original 500x375 photo: same caption {same:.1%}")
        finally:
            if args.copies_dir is None:
                shutil.rmtree(folder, ignore_errors=True)
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
