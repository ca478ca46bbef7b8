"""Re-estimate a packaged encoder's BatchNorm statistics for ImageNet-normalised input.

Why: resmem's ResNet-152 file keeps torchvision's ImageNet convolutions but carries BatchNorm running
statistics re-estimated for un-normalised [0, 1] pixels, so with the normalisation its own weights
need, its top-1 labels are garbage. Running a few hundred normalised training photos through the
network in train mode (no gradients, cumulative average) restores them. The result is a small
safetensors file shipped in ``captioner/weights/`` with the recipe in its metadata; ``build_encoder``
loads it over the package's statistics, and the recipe is recorded in every checkpoint's provenance.

    python -m data_prep.bn_stats data/flickr8k --encoder resnet152 --weights resmem --images 400 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import torchvision
from safetensors.torch import save_file

from captioner.encoder import (BUNDLED_WEIGHTS, PACKAGED_WEIGHTS, EncoderError, preprocess_of, weights_enum,
                               read_packaged_state, recalibrate_batchnorm)
from captioner.images import load_image
from captioner.manifest import load_manifest, split_records


def sample_train_paths(data_dir: Path, n: int, seed: int) -> list[str]:
    """``n`` training photos drawn at random (seeded) from a prepared data directory."""
    paths = sorted({r.path for r in split_records(load_manifest(data_dir), "train")})
    if len(paths) < n:
        raise EncoderError(f"{data_dir}: only {len(paths)} training images, {n} requested")
    return random.Random(seed).sample(paths, n)


def estimate(data_dir: Path, encoder: str, weights: str, images: int, seed: int, batch_size: int) -> tuple[dict, dict]:
    """(BatchNorm buffers, recipe) for a packaged encoder, from ``images`` normalised training photos."""
    entry = PACKAGED_WEIGHTS[(encoder, weights)]
    model = torchvision.models.get_model(encoder, weights=None)
    state, _, digest = read_packaged_state(entry)
    model.load_state_dict(state)
    preprocess = preprocess_of(weights_enum(encoder, entry.transforms_from), 224)
    paths = sample_train_paths(data_dir, images, seed)
    batches = (torch.stack([preprocess(load_image(p)) for p in paths[i:i + batch_size]])
               for i in range(0, len(paths), batch_size))
    seen = recalibrate_batchnorm(model, batches)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    recipe = {"images": seen, "from": f"{data_dir.name} train split, random sample (seed {seed})",
              "batch_size": batch_size, "mode": "train-mode forward, no gradients, momentum None (cumulative mean)",
              "preprocess": "resize 256, centre crop 224, ImageNet mean/std", "weights_sha256": digest,
              "command": f"python -m data_prep.bn_stats {data_dir} --encoder {encoder} --weights {weights} "
                         f"--images {images} --seed {seed} --batch-size {batch_size}"}
    return buffers, recipe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir", type=Path, help="prepared data directory (its train split is sampled)")
    p.add_argument("--encoder", default="resnet152")
    p.add_argument("--weights", default="resmem")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--out", type=Path, help="default: captioner/weights/<the entry's bn_stats file>")
    args = p.parse_args(argv)
    buffers, recipe = estimate(args.data_dir, args.encoder, args.weights, args.images, args.seed, args.batch_size)
    out = args.out or BUNDLED_WEIGHTS / PACKAGED_WEIGHTS[(args.encoder, args.weights)].bn_stats
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in buffers.items()}, str(out), metadata={"recipe": json.dumps(recipe)})
    print(f"wrote {out} ({len(buffers)} tensors from {recipe['images']} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
