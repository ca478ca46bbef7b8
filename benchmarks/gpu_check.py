"""The GPU input path and CUDA graphs, checked on a lent GPU in one run (issue 14; benchmarks/README.md).

What it answers, on real Flickr8k JPEGs:
1. Captions: the GPU path (uint8 pixels normalised on the device, ``Captioner``'s default on CUDA, + CUDA
   graphs, opt-in) against the GPU path before them (float pixels, no graphs) and against captions made on a CPU
   (``--cpu-captions``, written by ``--write-cpu-captions`` on the CPU machine), greedy and the model's
   recommended decoding. All captions go to ``--out`` so BLEU can be computed where the references are.
2. Where the input time goes: the DataLoader alone with uint8 and with float pixels, and nvJPEG
   (``torchvision.io.decode_jpeg(device="cuda")``) + resize + crop on the GPU, over ``--paths`` paths.
3. ``caption(path)`` latency with the recommended decoding, graphs on and off.

    python benchmarks/gpu_check.py --write-cpu-captions captions.json --images DIR       # on the CPU machine
    python benchmarks/gpu_check.py --cpu-captions captions.json --images DIR --out DIR   # on the GPU

``benchmarks/gpu_session.sh`` prepares and runs it with the GPU benchmark in one device call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a plain checkout

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from benchmarks.run import eager_float, image_paths, warm_page_cache  # noqa: E402
from captioner.api import Captioner  # noqa: E402
from captioner.features import ImageFiles, collate_images  # noqa: E402

DECODINGS = {"greedy": {"strategy": "greedy"}, "recommended": {}}


def captions(cap: Captioner, paths: list[str], options: dict, batch: int, workers: int) -> list[str]:
    config = cap.decode_config(**options)
    return [r.caption or f"ERROR {r.error}" for r in cap.stream(paths, config, batch_size=batch, workers=workers)]


def same(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def loader_rate(cap: Captioner, paths: list[str], uint8: bool, batch: int, workers: int) -> float:
    """Images/s of the DataLoader alone (decode, resize, crop, [normalise], collate, pin), batches to the GPU."""
    loader = DataLoader(ImageFiles(paths, cap.preprocess, uint8=uint8), batch_size=batch, num_workers=workers,
                        collate_fn=collate_images, pin_memory=True, prefetch_factor=4)
    start = time.perf_counter()
    for _, pixels, _ in loader:
        pixels.to(cap.device, non_blocking=True)
    torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - start)


def nvjpeg_rate(cap: Captioner, paths: list[str], batch: int) -> dict:
    """nvJPEG decode + resize + centre crop on the GPU (file bytes read on the host first, not timed)."""
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as F
    pre = cap.preprocess
    data = [read_file(p) for p in paths]

    def run(chunk):
        imgs = decode_jpeg(chunk, device=cap.device)
        return [F.center_crop(F.resize(i, [pre.resize], antialias=True), [pre.crop, pre.crop]) for i in imgs]

    run(data[:batch])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(data), batch):
        run(data[i:i + batch])
    torch.cuda.synchronize()
    rate = len(data) / (time.perf_counter() - start)
    # the same photo through the CPU path's Pillow decode + resize + crop, for how far the pixels differ
    first = ImageFiles(paths[:1], pre, uint8=True)[0][1].to(cap.device)
    diff = (run(data[:1])[0].float() - first.float()).abs()
    return {"images_per_s": rate, "batch": batch, "pixel_mean_abs_diff_vs_pillow": diff.mean().item(),
            "pixel_max_abs_diff_vs_pillow": diff.max().item()}


def latency(cap: Captioner, paths: list[str], options: dict, calls: int) -> dict:
    for p in paths[:5]:
        cap.caption(p, **options)
    torch.cuda.synchronize()
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        cap.caption(paths[i % len(paths)], **options)
        times.append(time.perf_counter() - t0)
    return {"p50_ms": statistics.median(times) * 1e3, "p90_ms": statistics.quantiles(times, n=10)[-1] * 1e3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of real JPEGs (Flickr8k test photos)")
    parser.add_argument("--cpu-captions", type=Path, help="captions made on a CPU by --write-cpu-captions")
    parser.add_argument("--write-cpu-captions", type=Path, help="make the CPU captions and stop")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--paths", type=int, default=4096, help="paths for the input-path rates (files repeat)")
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    files = sorted(str(p) for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    names = [Path(f).name for f in files]
    if args.write_cpu_captions:
        cap = Captioner.from_pretrained(device="cpu")
        made = {key: dict(zip(names, captions(cap, files, options, 32, 1))) for key, options in DECODINGS.items()}
        args.write_cpu_captions.write_text(json.dumps(made, indent=0))
        return 0
    cap = Captioner.from_pretrained(device="cuda")
    cap.graphs = True  # "new": uint8 pixels (the CUDA default) and CUDA graphs (opt-in until this run says so)
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "precision": cap.precision,
                    "photos": len(files)}
    made: dict = {}
    cpu = json.loads(args.cpu_captions.read_text()) if args.cpu_captions else {}

    def dump() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        (args.out / "gpu_captions.json").write_text(json.dumps(made, indent=0))

    for key, options in DECODINGS.items():
        made[f"{key} new"] = captions(cap, files, options, args.batch, args.workers)
        with eager_float(cap):
            made[f"{key} before"] = captions(cap, files, options, args.batch, args.workers)
        single = [cap.caption(f, **options) for f in files[:100]]  # batch-1 graphs against the batched ones
        report[f"captions {key}"] = {
            "new == before": same(made[f"{key} new"], made[f"{key} before"]),
            "single == batched (first 100)": same(single, made[f"{key} new"][:100]),
            **({"new == cpu": same(made[f"{key} new"], [cpu[key][n] for n in names]),
                "before == cpu": same(made[f"{key} before"], [cpu[key][n] for n in names])} if cpu else {})}
        print(key, report[f"captions {key}"], flush=True)
        dump()
    report["graphs"] = {str(k): {"replays": g.replays, "failed": g.failed, "shapes": len(g._entries)}
                        for k, g in cap._graphed.items()}
    print("graphs", report["graphs"], flush=True)
    dump()
    paths, _ = image_paths(args.images, args.paths)
    warm_page_cache(paths)
    for uint8 in (True, False):
        key = f"loader alone {'uint8' if uint8 else 'float'}"
        report[key] = {"images_per_s": loader_rate(cap, paths, uint8, args.batch, args.workers),
                       "workers": args.workers, "batch": args.batch}
        print(key, report[key], flush=True)
        dump()
    try:
        report["nvjpeg"] = nvjpeg_rate(cap, paths, args.batch)
    except Exception as err:  # a torchvision without GPU decoding: say so, keep the rest
        report["nvjpeg"] = {"error": f"{type(err).__name__}: {err}"}
    print("nvjpeg", report["nvjpeg"], flush=True)
    dump()
    for key, options in DECODINGS.items():
        report[f"latency {key}"] = latency(cap, files, options, 200)
        with eager_float(cap):
            report[f"latency {key} before"] = latency(cap, files, options, 200)
        print(key, report[f"latency {key}"], "before", report[f"latency {key} before"], flush=True)
        dump()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
