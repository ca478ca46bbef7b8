"""Does reading a Display P3 photo as if it were sRGB change its caption, and does converting it fix that?

iPhones save photos in Display P3 with the profile embedded. This makes such photos from a Flickr8k split: each
photo converted from sRGB to Display P3 (LittleCMS, perceptual; the profile written from its definition by
``tests/icc_fixtures.py``) and saved twice with the same pixels, JPEG quality 95: once with the profile (what
a phone writes; ``load_image`` converts it back to sRGB) and once without (what every reader that ignores
profiles sees, as ``load_image`` did before colour management). Both are captioned with the model's default
decoding and greedy, and compared with the captions of the original photos, caption by caption and by corpus
BLEU-4 / CIDEr-D against the references; beside them the original pixels re-saved the same way (sRGB, quality
95), whose differences are what re-encoding alone costs. Also the cost of the conversion per photo.

``--format avif`` saves AVIFs instead (quality 95), described as Display P3 by an nclx colour description rather
than a profile, as Android phones and AVIF encoders do (primaries 12, sRGB's transfer), against the same file
described as BT.709 / sRGB (what a reader that ignores nclx sees).

    python benchmarks/wide_gamut.py                      # bundled model, the 1,000 val photos
    python benchmarks/wide_gamut.py --limit 200 -o /tmp/p3.json
    python benchmarks/wide_gamut.py --format avif --limit 300
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]  # runnable from a plain checkout

from PIL import Image, ImageCms  # noqa: E402

from captioner.api import Captioner  # noqa: E402
from captioner.evaluate import score  # noqa: E402
from captioner.images import load_image  # noqa: E402
from draft_quality import captions, features, split_parser, split_records, write_report  # noqa: E402
from icc_fixtures import DISPLAY_P3, SRGB_CURVE, matrix_profile, with_nclx  # noqa: E402

P3 = matrix_profile(DISPLAY_P3, SRGB_CURVE, "Display P3")


def make_p3_copies(paths: list[str], folder: Path, fmt: str = "jpeg") -> tuple[list[str], list[str], list[str]]:
    """(tagged, untagged, resaved) copies: the same Display P3 pixels with and without their colour space said (a
    profile in a JPEG, an nclx description in an AVIF), and the original sRGB pixels saved the same way."""
    to_p3 = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.ImageCmsProfile(io.BytesIO(P3)),
                                    "RGB", "RGB", renderingIntent=ImageCms.Intent.PERCEPTUAL)
    copies: dict[str, list[str]] = {kind: [] for kind in ("p3", "untagged", "resaved")}
    for kind in copies:
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for path in paths:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        p3 = ImageCms.applyTransform(rgb, to_p3)
        p3.info.pop("icc_profile", None)  # the transform attaches P3's profile, which AVIF's writer would embed
        for kind, pixels in (("p3", p3), ("untagged", p3), ("resaved", rgb)):
            out = folder / kind / Path(path).with_suffix(f".{fmt}").name
            copies[kind].append(str(out))
            if fmt == "avif":
                data = io.BytesIO()
                pixels.save(data, "AVIF", quality=95)
                out.write_bytes(with_nclx(data.getvalue(), 12, 13) if kind == "p3" else data.getvalue())
            else:
                pixels.save(out, "JPEG", quality=95, **({"icc_profile": P3} if kind == "p3" else {}))
    return copies["p3"], copies["untagged"], copies["resaved"]


def load_ms(paths: list[str], min_side: int) -> float:
    """Mean milliseconds of ``load_image`` over ``paths`` (files already in the page cache)."""
    for p in paths:
        load_image(p, min_side=min_side)
    t0 = time.perf_counter()
    for p in paths:
        load_image(p, min_side=min_side)
    return (time.perf_counter() - t0) / len(paths) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = split_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--format", choices=("jpeg", "avif"), default="jpeg", help="how the copies are saved")
    args = parser.parse_args(argv)
    records = split_records(args)
    cap = Captioner.from_pretrained(args.checkpoint, device="cpu")
    folder = Path(tempfile.mkdtemp(prefix="captioner-p3-"))
    try:
        originals = [r.path for r in records]
        tagged, untagged, resaved = make_p3_copies(originals, folder, args.format)
        sets = {"original": originals, "srgb_resaved": resaved, "p3_converted": tagged, "p3_read_as_srgb": untagged}
        timing = {k: load_ms(sets[k][:200], cap.preprocess.min_side) for k in ("p3_converted", "p3_read_as_srgb")}
        feats = {k: features(cap, v, full_decode=False)[0] for k, v in sets.items()}
        report = {"split": args.split, "images": len(records), "format": args.format, "load_ms": timing}
        print(f"{args.split}: {len(records)} photos as {args.format}; load_image per photo: {timing['p3_converted']:.1f} ms with the "
              f"profile converted, {timing['p3_read_as_srgb']:.1f} ms without a profile")
        for name, options in (("default", {}), ("greedy", {"strategy": "greedy"})):
            caps = {k: captions(cap, f, options) for k, f in feats.items()}
            out = report[name] = {}
            for kind, texts in caps.items():
                metrics = score(records, {r.id: c for r, c in zip(records, texts)})
                same = sum(a == b for a, b in zip(caps["original"], texts)) / len(texts)
                out[kind] = {"same_as_original": same, "bleu4": metrics["Bleu_4"], "cider": metrics["CIDEr"]}
                print(f"  {name:8s} {kind:16s} same caption as the original {same:6.1%}  BLEU-4 "
                      f"{metrics['Bleu_4'] * 100:.2f}  CIDEr-D {metrics['CIDEr'] * 100:.1f}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
