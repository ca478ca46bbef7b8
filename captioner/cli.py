"""``captioner`` command line: prepare, features, train, caption, evaluate, gradflow, export, report, and the
commands that add to a checkpoint (scst, calibrate, tune-decoding, consensus-index, matching, realign-head)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from captioner.errors import USER_ERRORS, ConfigError


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="caption files -> manifest, vocabulary, report")
    p.add_argument("format", choices=["coco", "karpathy", "flickr8k", "csv", "folder"])
    p.add_argument("captions", nargs="+", type=Path,
                   help="coco: annotation JSON file(s); karpathy: dataset_*.json; flickr8k: Flickr8k.token.txt; "
                        "csv: a .csv/.tsv file with image,caption[,split] header; folder: photos + same-name .txt")
    p.add_argument("--images", nargs="+", type=Path,
                   help="image folder(s) (required, except for folder: the photos' own folder)")
    p.add_argument("--out", type=Path, required=True, help="data directory to write")
    p.add_argument("--min-count", type=int, default=5, help="minimum training count for a vocabulary word")
    p.add_argument("--max-len", type=int, default=30, help="captions longer than this (tokens) are truncated in training")
    p.add_argument("--split-names", nargs="+", help="coco: split of each annotation file (default train val test)")
    p.add_argument("--val-size", type=int, default=0,
                   help="coco: images cut from the first file into 'val'; csv (no split column), folder: from all")
    p.add_argument("--test-size", type=int, default=0, help="images cut into 'test' (as --val-size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the val/test cut")
    p.add_argument("--split-file", action="append", default=[], metavar="SPLIT=PATH",
                   help="flickr8k: split list (default: Flickr_8k.{train,dev,test}Images.txt beside the token file)")
    p.add_argument("--strict", action="store_true", help="fail on a bad image instead of skipping it")


def cmd_prepare(args) -> int:
    # The CLI is the one place that drives the dataset side: the library (captioner/) never imports data_prep/,
    # which imports the library, so the dependency points one way. Imported here, on use, to keep it so.
    from data_prep.custom import read_folder, read_table
    from data_prep.prepare import PrepareConfig, prepare
    from data_prep.readers import flickr8k_split_files, read_coco, read_flickr8k, read_karpathy

    skips: list[dict] = []
    if args.format in ("csv", "folder") and len(args.captions) != 1:
        raise ConfigError(f"prepare {args.format} takes one {'file' if args.format == 'csv' else 'folder'} "
                          f"(got {len(args.captions)})")
    if args.images is None and args.format != "folder":
        raise ConfigError(f"prepare {args.format} needs --images FOLDER")
    if args.format != "coco" and args.images is not None and len(args.images) != 1:
        raise ConfigError(f"prepare {args.format} takes one --images folder (got {len(args.images)})")
    if args.format == "csv":
        records, skips = read_table(args.captions[0], args.images[0], val_size=args.val_size,
                                    test_size=args.test_size, seed=args.seed)
    elif args.format == "folder":
        if args.images is not None and args.images[0].resolve() != args.captions[0].resolve():
            raise ConfigError("prepare folder reads the photos from the folder given; leave out --images")
        records, skips = read_folder(args.captions[0], val_size=args.val_size, test_size=args.test_size, seed=args.seed)
    elif args.format == "coco":
        records = read_coco(args.captions, args.images, split_names=args.split_names, val_size=args.val_size,
                            test_size=args.test_size, seed=args.seed)
    elif args.format == "karpathy":
        records = read_karpathy(args.captions[0], args.images[0])
    else:
        given = {name: Path(path) for name, _, path in (item.partition("=") for item in args.split_file)}  # SPLIT=PATH
        records, skips = read_flickr8k(args.captions[0], flickr8k_split_files(args.captions[0], given), args.images[0])
    config = PrepareConfig(min_count=args.min_count, max_len=args.max_len, strict=args.strict)
    report = prepare(records, args.out, source=f"{args.format}:{','.join(map(str, args.captions))}", config=config,
                     reader_skips=skips)
    print(f"images per split: {report['images']}; captions: {report['captions']}")
    if report["vocab_size"] is None:
        print(f"no training split: no vocabulary (evaluation uses the checkpoint's); "
              f"skipped {report['skipped_count']} item(s)")
    else:
        print(f"vocabulary: {report['vocab_size']} words (min count {args.min_count}); "
              f"{report['unk']['distinct_words']} rare words -> <unk>; skipped {report['skipped_count']} item(s)")
    if report["skipped_by_reason"]:
        print("skipped: " + "; ".join(f"{n} {why}" for why, n in list(report["skipped_by_reason"].items())[:8]))
    print(f"wrote {args.out}/manifest.json, " + ("vocab.json, " if report["vocab_size"] is not None else "")
          + "prepare_report.json")
    return 0


def _add_features(sub) -> None:
    p = sub.add_parser("features", help="encode every image once into the feature cache")
    p.add_argument("data_dir", type=Path)
    _add_encoder_args(p)
    p.add_argument("--checkpoint", help="use this checkpoint's (or bundled model's) CNN, not the encoder flags: "
                                   "for `evaluate --from-cache` and `scst` on a model whose last blocks were tuned")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="image-decoding worker processes")
    p.add_argument("--device", default="auto")


ENCODER_FLAGS = {"encoder": "name", "weights": "weights", "image_size": "image_size"}  # flag -> EncoderConfig field


def _add_encoder_args(p) -> None:
    """Encoder flags of ``features`` and ``train``, defaulting to ``config.default_encoder()`` (the shipped model's)."""
    from captioner.config import default_encoder
    d = default_encoder()
    p.add_argument("--encoder", help=f"torchvision model name (resnet50, mobilenet_v2, ...; default: {d.name})")
    p.add_argument("--weights", help="torchvision weights name (DEFAULT, IMAGENET1K_V1, ...), a local .pth file, "
                                     f"or none (default: {d.weights})")
    p.add_argument("--image-size", type=int, help=f"input size in pixels (default: {d.image_size})")


def _given(args, names) -> dict:
    """The options among ``names`` given on the command line (a left-out one is None)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _encoder_config(args):
    import dataclasses
    from captioner.config import default_encoder
    given = _given(args, ENCODER_FLAGS)
    return dataclasses.replace(default_encoder(), **{ENCODER_FLAGS[flag]: value for flag, value in given.items()})


def cmd_features(args) -> int:
    from .encoder import build_encoder
    from .features import read_failures
    from .views import make_features
    if args.checkpoint:
        from .api import resolve_model
        from .checkpoint import load_checkpoint
        if _given(args, ENCODER_FLAGS):
            raise ConfigError("--checkpoint brings its own encoder: leave out --encoder/--weights/--image-size")
        loaded = load_checkpoint(resolve_model(args.checkpoint), calibrated=False)
        config, encoder = loaded.config.encoder, loaded.encoder
    else:
        encoder, config = build_encoder(_encoder_config(args))
    directory = make_features(args.data_dir, config, encoder, args.batch_size, args.device, args.workers)
    return 1 if read_failures(directory) else 0


MODEL_FLAGS = ("cell", "layers", "hidden", "embed", "dropout", "feed_image")  # ModelConfig fields set by train
MODEL_HELP = {"cell": "recurrent cell", "layers": "recurrent layers", "hidden": "units per layer",
              "embed": "word embedding size", "feed_image": "also feed the image as the first input step"}
TRAIN_HELP = {"epochs": "length of the run; with --resume: changes the saved run's length",
              "max_steps": "stop after this many optimizer steps (0: no limit); saved with the run like --epochs",
              "clip": "maximum total gradient norm (0: no clipping)", "schedule": "after a linear warm-up",
              "patience": "epochs without a better val BLEU-4 before stopping (0: never)",
              "val_bleu_images": "val images captioned for the metrics (0: all)",
              "finetune_encoder": "train the CNN too, from the images", "workers": "image-decoding processes",
              "views": "random crops per training photo, cached once; one drawn per photo and epoch",
              "tune_blocks": "train the CNN's last N blocks (at --encoder-lr) from their cached inputs",
              "init_from": "checkpoint directory or bundled model name (fast) to fine-tune: its model and encoder, "
                           "its vocabulary extended with the data's new words (leave out the model/encoder flags)"}


def _add_config_flags(p, cls, names, helps: dict[str, str], choices: dict[str, tuple] | None = None,
                      types: dict[str, Callable] | None = None) -> None:
    """One flag per field of the dataclass ``cls`` in ``names``, with default None: the dataclass stays the
    only place a default is written (--help shows it), and a flag left out can be told from one given
    (``--resume`` keeps the run's own value). ``types`` parses a field whose default's type cannot
    (a tuple, an optional int)."""
    import dataclasses
    for f in dataclasses.fields(cls):
        if f.name in names:
            kind = ({"action": argparse.BooleanOptionalAction} if isinstance(f.default, bool)
                    else {"type": (types or {}).get(f.name, type(f.default)), "choices": (choices or {}).get(f.name)})
            p.add_argument("--" + f.name.replace("_", "-"), default=None,
                           help=f"{helps.get(f.name, '')} (default: {f.default})".lstrip(), **kind)


def _train_fields() -> list[str]:
    import dataclasses
    from captioner.train import TrainConfig
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _add_train(sub) -> None:
    from captioner.config import CELLS, ModelConfig
    from captioner.train import PRECISIONS, RESUMABLE, SCHEDULES, TrainConfig
    p = sub.add_parser("train", help="train the decoder (teacher forcing, clipped gradients); torchrun for DDP",
                       description="Every default is the shipped model's recipe "
                                   "(checkpoints/flickr8k-mobilenet_v2-lstm/MODEL_CARD.md).")
    p.add_argument("data_dir", type=Path)
    p.add_argument("--out", type=Path, required=True, help="run directory (best/, last/, metrics.jsonl)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly where it stopped, with its saved settings and length; "
                        f"only {', '.join('--' + n.replace('_', '-') for n in RESUMABLE)} may be given with it "
                        "(--epochs / --max-steps then change the run's length)")
    _add_encoder_args(p)
    _add_config_flags(p, ModelConfig, MODEL_FLAGS, MODEL_HELP, {"cell": CELLS})
    p.add_argument("--max-len", type=int, help="caption length cap (default: the prepare report's)")
    _add_config_flags(p, TrainConfig, _train_fields(), TRAIN_HELP, {"schedule": SCHEDULES, "precision": PRECISIONS})


def _model_options(args) -> dict:
    """The architecture flags given (``ModelConfig`` fields); ``Trainer`` fills in the rest."""
    return _given(args, [*MODEL_FLAGS, "max_len"])


def _train_config(args):
    """A new run's settings: given flags over ``TrainConfig``'s defaults. (--resume: ``Trainer.resume``.)"""
    from captioner.train import TrainConfig
    return TrainConfig(**_given(args, _train_fields()))


def cmd_train(args) -> int:
    from captioner.train import Trainer
    if args.resume:
        given = {**_given(args, [*_train_fields(), *ENCODER_FLAGS]), **_model_options(args)}
        trainer = Trainer.resume(args.data_dir, args.out, given)
    elif args.init_from:
        from captioner.api import resolve_model
        from captioner.checkpoint import load_checkpoint
        from captioner.finetune import check_given
        check_given(load_checkpoint(resolve_model(args.init_from)), {**_given(args, ENCODER_FLAGS), **_model_options(args)})
        trainer = Trainer(args.data_dir, args.out, _train_config(args))
    else:
        trainer = Trainer(args.data_dir, args.out, _train_config(args), model_options=_model_options(args),
                          encoder_config=_encoder_config(args))
    result = trainer.fit()
    if trainer.rank == 0:
        print(f"done: {result}; best checkpoint: {args.out / 'best'}")
    return 0


DECODE_FLAGS = ("strategy", "beam_size", "length_penalty", "num_return", "temperature", "top_k", "top_p",
                "no_repeat_ngram", "seed", "guide", "guide_threshold", "consensus",
                "consensus_weight", "match_weight", "specificity", "specificity_levels",
                "specificity_cost", "tag_bonus", "neutral", "min_end_rate")  # DecodeConfig fields given as flags
DECODE_HELP = {"strategy": "left out: the checkpoint's recommended decoding (its decoding.json, from `captioner "
                           "tune-decoding`), whose settings also fill the beam flags left out",
               "length_penalty": "alpha in logprob / len**alpha", "num_return": "n-best captions per image",
               "seed": "seed for --strategy sample",
               "guide": "beam only: the caption must name what the CNN's ImageNet head recognises (constrained beam)",
               "guide_threshold": "probability a recognised object needs before --guide requires its word",
               "consensus": "beam only: rerank the beam's captions by their CIDEr-D against the captions of this many "
                            "nearest training photos (needs `captioner consensus-index`; 0: off)",
               "consensus_weight": "weight of the model's own score beside the --consensus agreement",
               "match_weight": "beam only: rerank the beam's captions by the model's score + this x their match with "
                               "the photo (needs the checkpoint's matching model, `captioner matching`; 0: off)",
               "specificity": "beam only: rank captions by log-probability + this x each word's rarity in the training "
                              "captions: more specific, more varied words for some BLEU (0: off)",
               "specificity_levels": "beam with the matching model: comma list of specificities decoded at once; each "
                                     "photo keeps the level whose caption matches it best, less --specificity-cost x "
                                     "the level ('' for off)",
               "specificity_cost": "cosine a caption pays per unit of its --specificity-levels level",
               "tag_bonus": "beam only: rank captions higher by this x the CNN's ImageNet-head probability of each "
                            "animal or vehicle word they use: 'a cat' over 'a dog' where the head says cat (0: off)",
               "neutral": "never use words that state a person's gender (man, woman, boy, girl, his, her, ...): "
                          "'a person', 'a child', 'two people'",
               "min_end_rate": "a caption may end on a word only if at least this share of its uses in the training "
                               "captions end one: never on 'and', 'of' or a dangling adjective (0: anywhere)"}


def _add_decode_args(p) -> None:
    from captioner.decoding import STRATEGIES, DecodeConfig
    _add_config_flags(p, DecodeConfig, DECODE_FLAGS, DECODE_HELP, {"strategy": STRATEGIES},
                      {"seed": int, "specificity_levels": _numbers(float)})
    p.add_argument("--max-len", type=int, help="longest caption (default: the model's)")
    p.add_argument("--allow-unk", action="store_true", help="let <unk> appear in captions")
    p.add_argument("--checkpoint", "--model", dest="checkpoint",
                   help="checkpoint directory or a bundled model's name (fast); default: the bundled model")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="image-decoding worker processes")


def _decode_config(args, captioner):
    """Given flags over ``DecodeConfig``'s defaults; ``max_len`` defaults to the model's (``decode_config``)."""
    return captioner.decode_config(**_given(args, [*DECODE_FLAGS, "max_len"]), suppress_unk=not args.allow_unk)


def _add_caption(sub) -> None:
    from captioner.batch import FORMATS
    p = sub.add_parser("caption", help="caption image files, folders, globs and http(s) URLs")
    p.add_argument("images", nargs="+", help="image files, folders (recursive), glob patterns or http(s) URLs")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="also fetch URLs on private, loopback and link-local addresses (refused by default)")
    p.add_argument("-o", "--output", type=Path, help="output file (default: JSONL on stdout)")
    p.add_argument("--format", choices=FORMATS, help="jsonl, csv or coco (default: from the -o suffix)")
    p.add_argument("--data", type=Path, help="data directory whose manifest gives COCO image ids")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its output file")
    p.add_argument("--decode-batch", type=int, default=256,
                   help="images whose features are decoded together (larger: faster on a CPU; results are "
                        "written, and kept by --resume, in groups of this size)")
    from captioner.metadata import parse_kinds
    p.add_argument("--write-metadata", type=parse_kinds, action="extend", metavar="KIND[,KIND]",
                   help="write each caption into the photo where photo tools read it: xmp (dc:description + "
                        "alt text), exif (ImageDescription), iptc (Caption-Abstract), sidecar (photo.xmp + "
                        "photo.txt); e.g. xmp,exif (captioner/metadata.py)")
    p.add_argument("--dry-run", action="store_true", help="--write-metadata: show what would be written, write nothing")
    p.add_argument("--overwrite-existing", action="store_true",
                   help="--write-metadata: replace a description already there (default: skip that photo)")
    p.add_argument("--min-confidence", type=float, metavar="P",
                   help="flag captions whose confidence (a calibrated model's, captioner calibrate) is below P "
                        "for review: \"review\": true in the output, and a count")
    _add_ray_args(p)
    _add_html_args(p)
    _add_decode_args(p)


def _add_ray_args(p) -> None:
    from captioner.distributed import RayConfig
    d = RayConfig()
    p.add_argument("--ray", nargs="?", const=d.address, metavar="ADDRESS",
                   help="caption on a Ray cluster (pip install 'captioner[ray]'): no ADDRESS: $RAY_ADDRESS or a "
                        "cluster started on this machine, else a new local one; auto; ray://HOST:10001. Photos and "
                        "--checkpoint must be readable at the same paths on every node (captioner/distributed.py)")
    p.add_argument("--ray-actors", type=int, default=d.actors, metavar="N",
                   help="--ray: model replicas (default: one per GPU; without GPUs one per two CPUs)")


def _add_html_args(p, required: bool = False) -> None:
    p.add_argument("--html", type=Path, required=required,
                   help="write a self-contained HTML gallery of the results here (captioner/report.py)")
    p.add_argument("--link-images", action="store_true",
                   help="--html: link the photos (relative to the report) instead of embedding thumbnails; "
                        "for huge libraries (the report then only works beside the photos)")


def cmd_caption(args) -> int:
    from captioner.api import Captioner
    from captioner.batch import caption_files, expand_inputs, infer_format
    from captioner.fetch import FetchConfig
    # --ray: this copy only gives the decoding options, preprocessing and URL limits; --device is the actors'
    captioner = Captioner.from_pretrained(args.checkpoint, device="cpu" if args.ray is not None else args.device)
    captioner.fetch = FetchConfig(allow_private=args.allow_private_urls)
    config = _decode_config(args, captioner)
    stream = None
    if args.ray is not None:
        import functools
        from captioner.distributed import RayConfig, stream_on_ray
        stream = functools.partial(stream_on_ray, captioner, checkpoint=args.checkpoint, device=args.device,
                                   config=config, ray_config=RayConfig(args.ray, args.ray_actors),
                                   batch_size=args.batch_size, decode_batch=args.decode_batch)
    fmt = infer_format(args.output, args.format)
    if fmt == "coco" and args.output is None:
        raise ConfigError("--format coco needs -o FILE.json")
    writer = None
    if args.write_metadata:
        from captioner.metadata import MetadataWriter
        writer = MetadataWriter(list(dict.fromkeys(args.write_metadata)), args.dry_run, args.overwrite_existing)
    elif args.dry_run or args.overwrite_existing:
        raise ConfigError("--dry-run and --overwrite-existing only go with --write-metadata KIND")
    summary = caption_files(captioner, expand_inputs(args.images), config, out=args.output, fmt=fmt,
                            resume=args.resume, data_dir=args.data, batch_size=args.batch_size, workers=args.workers,
                            decode_batch=args.decode_batch, metadata=writer, min_confidence=args.min_confidence,
                            stream=stream)
    for line in writer.notes() if writer else []:
        print(line, file=sys.stderr)
    for failure in summary["failed"]:
        print(f"error: {failure['path']}: {failure['error']}", file=sys.stderr)
    if summary["ignored_types"]:  # so that photos in a format not read here are noticed, not silently missing
        kinds = sorted(summary["ignored_types"].items(), key=lambda kv: (-kv[1], kv[0]))
        print(f"note: {summary['ignored_non_images']} other file(s) in the folders are not read as photos ("
              + ", ".join(f"{ext or 'no extension'} {n}" for ext, n in kinds[:8]) + (", ..." if len(kinds) > 8 else "")
              + ")", file=sys.stderr)
    if summary["hidden"]:  # a photo library's system files: ._ twins (not images), thumbnails (duplicates)
        names = ", ".join(summary["hidden"][:3]) + (", ..." if len(summary["hidden"]) > 3 else "")
        print(f"note: {len(summary['hidden'])} hidden or system file(s) and folder(s) in the folders were passed over "
              f"({names}); name one to caption it", file=sys.stderr)
    if summary["unread_raw"]:
        from captioner.raw import RAW_INSTALL
        print(f"note: {summary['unread_raw']} camera RAW file(s) in the folders were not captioned: reading them "
              f"needs rawpy ({RAW_INSTALL})", file=sys.stderr)
    print(f"captioned {summary['captioned']} of {summary['images']} image(s)"
          + (f" ({summary['resumed']} from a previous run)" if summary["resumed"] else "") + "; "
          f"{len(summary['failed'])} failed" + (f"; wrote {args.output}" if args.output else ""), file=sys.stderr)
    if writer:
        print(writer.summary(), file=sys.stderr)
    if args.min_confidence is not None:
        print(f"{summary['review']} caption(s) below --min-confidence {args.min_confidence}: "
              "flagged for review (\"review\": true)", file=sys.stderr)
    if args.html:
        from captioner.report import write_report
        write_report(summary["records"], args.html, args.link_images, progress=True)
        print(f"wrote {args.html}", file=sys.stderr)
    return 1 if summary["failed"] else 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="a results file of `captioner caption` (JSONL or CSV) -> HTML gallery")
    p.add_argument("results", type=Path, help="captions.jsonl or captions.csv")
    _add_html_args(p, required=True)
    p.add_argument("--title", help="page title (default: 'captioner report: N image(s)')")


def cmd_report(args) -> int:
    from captioner.report import read_results, write_report
    counts = write_report(read_results(args.results), args.html, args.link_images,
                          results_dir=args.results.parent, title=args.title, progress=True)
    gone = counts["thumb_errors"]
    print(f"wrote {args.html}: {counts['images']} image(s), {counts['errors']} unreadable"
          + (f", {gone} without a thumbnail (moved or changed since?)" if gone else ""))
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="BLEU-1..4, CIDEr-D, ROUGE-L on a split")
    p.add_argument("data_dir", type=Path)
    p.add_argument("--split", default="test")
    p.add_argument("--results", type=Path, help="score this COCO results JSON instead of decoding")
    p.add_argument("-o", "--output", type=Path, help="write metrics.json here")
    p.add_argument("--per-image", type=Path, help="write each image's caption and references here")
    p.add_argument("--from-cache", action="store_true",
                   help="decode the data directory's cached features of the checkpoint's encoder (no CNN pass)")
    _add_decode_args(p)


def cmd_evaluate(args) -> int:
    from captioner.api import Captioner, default_checkpoint
    from collections import Counter

    from captioner.evaluate import evaluate, format_table
    captioner = config = checkpoint = None
    if args.results is None:
        checkpoint = str(args.checkpoint or default_checkpoint())
        captioner = Captioner.from_pretrained(checkpoint, device=args.device)
        config = _decode_config(args, captioner)
    summary = evaluate(args.data_dir, args.split, captioner=captioner, config=config, results=args.results,
                       per_image=args.per_image, checkpoint=checkpoint, batch_size=args.batch_size,
                       workers=args.workers, from_cache=args.from_cache)
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    for failure in summary["failed"]:
        print(f"warning: image id {failure['image_id']}: {failure['path']}: {failure['error']}; not scored",
              file=sys.stderr)
    if summary["left_out_by_prepare"]:
        reasons = Counter(s["error"] for s in summary["left_out_by_prepare"])
        print(f"warning: {summary['left_out_by_prepare_count']} image(s) of split {args.split!r} were left out by "
              f"`captioner prepare` and are not scored ({'; '.join(f'{n} {why}' for why, n in reasons.most_common(4))}; "
              f"listed in {args.data_dir / 'prepare_report.json'})", file=sys.stderr)
    print(f"{summary['images']} images of split {args.split!r}" + (f", {config.describe()}" if config else "")
          + (f"; {summary['failed_count']} could not be captioned and are not scored" if summary["failed"] else ""))
    print(format_table(summary))
    if args.output:
        from .manifest import write_json_atomic
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.output, summary)
        print(f"wrote {args.output}")
    return 1 if summary["failed"] else 0


GRADFLOW_FLAGS = ("cells", "steps", "init_scale")  # GradflowConfig fields given as flags
GRADFLOW_HELP = {"cells": "comma list", "steps": "Adam steps between the two measurements",
                 "init_scale": "multiply W_hh after init (e.g. 4 makes the vanilla RNN explode)"}


def _add_gradflow(sub) -> None:
    from captioner.gradflow import GradflowConfig, parse_cells
    p = sub.add_parser("gradflow", help="measure vanishing/exploding gradients through time for rnn/gru/lstm")
    p.add_argument("data_dir", type=Path)
    _add_config_flags(p, GradflowConfig, GRADFLOW_FLAGS, GRADFLOW_HELP, types={"cells": parse_cells})
    p.add_argument("-o", "--out", type=Path, default=Path("gradflow.png"), help="plot to write")
    p.add_argument("--json", type=Path, help="measurements to write (default: beside the plot, as .json)")


def cmd_gradflow(args) -> int:
    import json
    from captioner.gradflow import GradflowConfig, format_summary, plot_gradflow, run_gradflow
    result = run_gradflow(args.data_dir, GradflowConfig(**_given(args, GRADFLOW_FLAGS)))
    json_path = args.json or args.out.with_suffix(".json")
    json_path.write_text(json.dumps(result, indent=1))
    plot_gradflow(result, args.out)
    print(format_summary(result))
    print(f"wrote {args.out} and {json_path}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="copy a checkpoint into a self-contained directory for shipping")
    p.add_argument("checkpoints", type=Path, nargs="+",
                   help="e.g. RUN_DIR/best; several runs of one architecture become an ensemble")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                   help="storage type of the weights (loading always computes in float32)")
    p.add_argument("--with-consensus-index", action="store_true",
                   help="also copy the consensus index (it holds the training captions: mind the dataset's terms); "
                        "without it a decoding that reranks is re-chosen among the settings that need no index")


def cmd_export(args) -> int:
    import torch
    from captioner.checkpoint import export_checkpoint
    target = export_checkpoint(args.checkpoints, args.out, getattr(torch, args.dtype), args.with_consensus_index)
    size = sum(f.stat().st_size for f in target.iterdir()) / 1e6
    print(f"wrote {target} ({size:.1f} MB, {args.dtype})")
    return 0


SCST_HELP = {"init_from": "checkpoint directory or bundled model name to start from",
             "xe_weight": "add this times the cross-entropy of one training reference per image (keeps vocabulary)",
             "match_weight": "reward = CIDEr-D + this times the photo-caption cosine of a matching model",
             "matching": "checkpoint (or bundled model) whose matching model --match-weight uses; default: --init-from's",
             "batch_size": "images per step", "samples": "sampled captions per image",
             "baseline": "mean of the image's other samples, or the greedy caption's reward",
             "val_beam": "beam width of the validation decoding",
             "views": "draw one of this many cached random crops per image and epoch (the view cache of "
                      "`train --views`, at the checkpoint's --tune-blocks depth)"}


def _add_scst(sub) -> None:
    from captioner.scst import BASELINES, ScstConfig
    p = sub.add_parser("scst", help="self-critical training: optimise CIDEr-D of sampled captions (after train)",
                       description="Starts from a trained checkpoint and reads the data directory's feature cache of "
                                   "that checkpoint's encoder (made first when missing); keeps the epoch with the best "
                                   "val CIDEr-D in OUT/best.")
    p.add_argument("data_dir", type=Path)
    p.add_argument("--out", type=Path, required=True, help="run directory (best/, log.jsonl, metrics.jsonl)")
    p.add_argument("--device", default="cpu")
    _add_config_flags(p, ScstConfig, [f for f in ScstConfig.__dataclass_fields__], SCST_HELP,
                      {"baseline": BASELINES})


def cmd_scst(args) -> int:
    from captioner.scst import ScstConfig, ScstTrainer
    config = ScstConfig(**_given(args, list(ScstConfig.__dataclass_fields__)))
    result = ScstTrainer(args.data_dir, args.out, config, args.device).fit()
    print(f"done: {result}; best checkpoint: {args.out / 'best'}")
    return 0


CALIBRATE_FLAGS = ("split", "report_split", "human_quantile", "bins")  # CalibrationConfig fields given as flags
CALIBRATE_HELP = {"split": "split the calibrator is fitted on", "bins": "confidence bins of ECE and the diagram",
                  "report_split": "split scored with the fitted calibrator, for reporting only ('' for none)",
                  "human_quantile": "a caption is good when its CIDEr-D reaches this quantile of human captions'"}


def _add_calibrate(sub) -> None:
    from captioner.confidence import CalibrationConfig
    p = sub.add_parser("calibrate", help="fit the caption confidence on a split; writes CHECKPOINT/calibration.json",
                       description="Decodes the data directory's cached features of the checkpoint's encoder with the "
                                   "CLI's and the app's default decoding (captioner/confidence.py).")
    p.add_argument("data_dir", type=Path)
    p.add_argument("--checkpoint", help="checkpoint directory to calibrate (default: the bundled model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--plot", type=Path, help="also draw the reliability diagram here (e.g. docs/reliability.png)")
    _add_config_flags(p, CalibrationConfig, CALIBRATE_FLAGS, CALIBRATE_HELP)


def cmd_calibrate(args) -> int:
    from captioner.api import Captioner, resolve_model
    from captioner.confidence import CalibrationConfig, calibrate, plot_reliability, save_calibration
    from captioner.decoding import DecodeConfig
    directory = resolve_model(args.checkpoint)
    captioner = Captioner.from_pretrained(directory, device=args.device, calibrated=False)
    config = CalibrationConfig(**_given(args, CALIBRATE_FLAGS))
    calibration, curves = calibrate(captioner, args.data_dir, config)
    print(f"good caption: {calibration.info['good']}")
    for split, rows in calibration.info["ece"].items():
        for row in rows:
            print(f"{split}: {row['images']} images, {DecodeConfig(**row['setting']).describe()}: ECE {row['ece']:.4f}, "
                  f"good {row['good_fraction']:.3f}, mean confidence {row['mean_confidence']:.3f}")
    print(f"wrote {save_calibration(calibration, directory)}")
    if args.plot:
        plot_reliability(curves, config.bins, args.plot)
        print(f"wrote {args.plot}")
    return 0


TUNE_FLAGS = ("split", "beam_sizes", "length_penalties", "no_repeat_ngrams", "guide", "consensus", "consensus_weights",
              "match_weights", "specificities", "specificity_levels", "specificity_costs", "tag_bonuses", "cider_tie",
              "batch_size")  # TuneConfig fields given as flags
TUNE_HELP = {"split": "validation split to choose on (never test)", "beam_sizes": "comma list of beam widths",
             "length_penalties": "comma list of alphas in logprob / len**alpha",
             "no_repeat_ngrams": "comma list of n-gram sizes never to repeat within a caption (0: allowed)",
             "guide": "guide every setting (needs the encoder's ImageNet head)", "batch_size": "images decoded at once",
             "consensus": "with a consensus index: comma list of neighbour counts to rerank each setting with "
                          "('' for none)",
             "consensus_weights": "comma list of weights of the model's score beside the consensus",
             "match_weights": "with a matching model: comma list of weights of the image-caption match to rerank "
                              "each setting with ('' for none)",
             "specificities": "comma list of specificities (rarer-word bonus) to decode each setting with (0: none)",
             "specificity_levels": "with a matching model: comma list of specificities also decoded, then a level "
                                   "chosen per photo by its match ('' for none)",
             "specificity_costs": "comma list of cosine costs per unit of specificity for the level chosen per photo",
             "tag_bonuses": "with the encoder's ImageNet head: comma list of tag bonuses to decode each setting with "
                            "(0: none)",
             "cider_tie": "CIDEr-D (0-10) below the best that still ties; ties go to the most distinct words"}


def _numbers(kind: Callable) -> Callable[[str], tuple]:
    """A comma list flag (``3,5``) parsed into a tuple of ``kind``."""
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list of {kind.__name__}s, got {text!r}") from None
    return parse


def _add_tune_decoding(sub) -> None:
    from captioner.tuning import TuneConfig
    p = sub.add_parser("tune-decoding", help="choose a checkpoint's decoding on validation; writes CHECKPOINT/decoding.json",
                       description="Decodes the data directory's cached features of the checkpoint's encoder with every "
                                   "beam width x length penalty and records the best (captioner/tuning.py); the API, "
                                   "the CLI and the app then decode that way unless told otherwise.")
    p.add_argument("data_dir", type=Path)
    p.add_argument("--checkpoint", help="checkpoint directory to tune (default: the bundled model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dry-run", action="store_true", help="print the grid and the choice, write nothing")
    _add_config_flags(p, TuneConfig, TUNE_FLAGS, TUNE_HELP,
                      types={"beam_sizes": _numbers(int), "length_penalties": _numbers(float),
                             "no_repeat_ngrams": _numbers(int),
                             "consensus": _numbers(int), "consensus_weights": _numbers(float),
                             "match_weights": _numbers(float), "specificities": _numbers(float),
                             "specificity_levels": _numbers(float), "specificity_costs": _numbers(float),
                             "tag_bonuses": _numbers(float)})


def cmd_tune_decoding(args) -> int:
    from captioner.api import Captioner, resolve_model
    from captioner.tuning import TuneConfig, save_decoding, tune_decoding
    directory = resolve_model(args.checkpoint)
    captioner = Captioner.from_pretrained(directory, device=args.device, calibrated=False)
    config = TuneConfig(**_given(args, TUNE_FLAGS))
    result = tune_decoding(captioner, args.data_dir, config)
    print(f"{'beam':>4} {'alpha':>5} {'norep':>5} {'tags':>4} {'spec':>8} {'rerank':>12} | {'BLEU-4':>6} "
          f"{'CIDEr-D':>7} {'ROUGE-L':>7} | words  length")
    for row in result["grid"]["rows"]:
        rerank = (f"{row['consensus']} w {row['consensus_weight']}" if "consensus" in row
                  else f"match {row['match_weight']}" if "match_weight" in row else "-")
        spec = f"fit {row['specificity_cost']}" if "specificity_levels" in row else row.get("specificity", 0)
        print(f"{row['beam_size']:>4} {row['length_penalty']:>5} {row.get('no_repeat_ngram', 0):>5} "
              f"{row.get('tag_bonus', 0):>4} {spec:>8} "
              f"{rerank:>12} | {row['bleu4'] * 100:6.2f} {row['cider_d'] * 100:7.2f} {row['rouge_l'] * 100:7.2f} | "
              f"{row['distinct_words']:>5}  {row['mean_words']:.2f}")
    print(f"chosen ({result['rule']}): {result['defaults']}")
    if not args.dry_run:
        print(f"wrote {save_decoding(result, directory)}")
    return 0


def _add_explain(sub) -> None:
    from captioner.explain import add_arguments
    p = sub.add_parser("explain", help="caption a photo and draw a saliency map per word (Grad-CAM)")
    add_arguments(p)
    _add_decode_args(p)


def cmd_explain(args) -> int:
    from captioner.api import Captioner
    from captioner.explain import explain_image, save_grid, word_table
    captioner = Captioner.from_pretrained(args.checkpoint, device=args.device)
    explanation = explain_image(captioner, args.image, _decode_config(args, captioner))
    save_grid(explanation, args.output)
    print(word_table(explanation))
    print(f"wrote {args.output}")
    return 0

def _add_consensus_index(sub) -> None:
    p = sub.add_parser("consensus-index", help="index a training split for --consensus reranking; writes "
                                               "CHECKPOINT/consensus.{json,safetensors}",
                       description="Stores the split's cached features (the checkpoint's own encoder: run `captioner "
                                   "features` first) and its captions beside the checkpoint (captioner/consensus.py). "
                                   "The index holds the dataset's captions: build it into your own checkpoint "
                                   "directory; a bundled model is refused.")
    p.add_argument("data_dir", type=Path)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory to add the index to")
    p.add_argument("--split", default="train", help="the split whose photos and captions are indexed (not test)")


def cmd_consensus_index(args) -> int:
    from captioner.api import bundled_checkpoints, resolve_model
    from captioner.checkpoint import read_model_config
    from captioner.consensus import build_index, save_index
    directory = resolve_model(args.checkpoint).resolve()
    if directory.parent == bundled_checkpoints().resolve():
        raise ConfigError(f"{directory}: a bundled model ships no dataset captions; copy it (cp -r) and index the copy")
    # config.json alone: an existing index, even a broken one, is about to be replaced, not read
    index = build_index(read_model_config(directory).encoder, args.data_dir, args.split)
    print(f"wrote {save_index(index, directory)} ({len(index.captions)} photos of split {args.split!r})")
    return 0


MATCHING_HELP = {"views": "draw one of this many cached random crops per photo and epoch (the view cache of "
                          "`train --views`, at the checkpoint's --tune-blocks depth; 0: the plain feature cache)",
                 "hidden": "caption GRU width", "joint": "size of the shared space",
                 "batch_size": "pairs per step (the in-batch negatives)", "temperature": "of the contrastive loss"}


def _add_matching(sub) -> None:
    from captioner.matching import MatchingConfig
    p = sub.add_parser("matching", help="train an image-caption matching model for --match-weight reranking; writes "
                                        "CHECKPOINT/matching.{json,safetensors}",
                       description="Trains on the training split's features by the checkpoint's own encoder (its "
                                   "feature cache, or the view cache with --views) and captions, reports val recall "
                                   "(captioner/matching.py). The model holds weights, no captions.")
    p.add_argument("data_dir", type=Path)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory to add the matching model to")
    p.add_argument("--device", default="cpu", help="where the features are computed (training runs on the CPU)")
    _add_config_flags(p, MatchingConfig, [f for f in MatchingConfig.__dataclass_fields__], MATCHING_HELP)


def cmd_matching(args) -> int:
    from captioner.api import resolve_model
    from captioner.captions import encode_captions
    from captioner.checkpoint import load_checkpoint
    from captioner.errors import DatasetError
    from captioner.manifest import load_manifest, split_records
    from captioner.matching import MatchingConfig, save_matcher, train_matching
    from captioner.views import model_features
    config = MatchingConfig(**_given(args, list(MatchingConfig.__dataclass_fields__)))
    directory = resolve_model(args.checkpoint)
    loaded = load_checkpoint(directory, calibrated=False, matching=False)  # a broken matching model is replaced
    records = load_manifest(args.data_dir)
    train, val = split_records(records, "train"), split_records(records, "val")
    if not train or not val:
        raise DatasetError(f"{args.data_dir}: training a matching model needs a train and a val split")
    train_features, val_features = model_features(args.data_dir, loaded.config.encoder, loaded.encoder, config.views,
                                                  train, val, args.device)
    max_len = loaded.config.max_len
    matcher = train_matching(train_features, encode_captions(train, loaded.vocab, max_len), val_features,
                             encode_captions(val, loaded.vocab, max_len), loaded.vocab, loaded.config.encoder, config)
    print(f"wrote {save_matcher(matcher, directory)} (val caption->photo recall {matcher.recall})")
    return 0


REALIGN_HELP = {"steps": "Adam steps", "lr": "learning rate", "batch_size": "training photos per step",
                "eval_every": "val KL every this many steps (the best step is kept)", "seed": "minibatch draw seed"}


def _add_realign_head(sub) -> None:
    from captioner.realign import RealignConfig
    p = sub.add_parser("realign-head", help="re-align a tuned CNN's ImageNet head (tags, guidance) to what the untuned "
                                            "CNN recognises; writes it into CHECKPOINT",
                       description="Fits a per-channel scale and shift of the tuned features on the training photos so "
                                   "that the head's class probabilities match the untuned CNN's, keeps the step with "
                                   "the lowest val KL, folds it into the head (captioner/realign.py). Feature caches "
                                   "of both CNNs are made first where missing. Re-run `captioner calibrate` after: "
                                   "the caption confidence reads the head's tags.")
    p.add_argument("data_dir", type=Path)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory whose CNN blocks were tuned")
    p.add_argument("--device", default="auto", help="where missing feature caches are computed")
    _add_config_flags(p, RealignConfig, [f for f in RealignConfig.__dataclass_fields__], REALIGN_HELP)


def cmd_realign_head(args) -> int:
    from captioner.api import resolve_model
    from captioner.realign import RealignConfig, realign_head
    directory = resolve_model(args.checkpoint)
    report = realign_head(args.data_dir, directory, RealignConfig(**_given(args, list(RealignConfig.__dataclass_fields__))),
                          args.device)
    (kl0, kl1), (a0, a1) = report["val_kl"], report["val_top1_agreement"]
    print(f"val KL to the untuned CNN's class probabilities {kl0:.4f} -> {kl1:.4f} (step {report['step']}); "
          f"top class the untuned CNN's for {a0:.1%} -> {a1:.1%} of {report['val_photos']} val photos")
    print(f"wrote the re-aligned head into {directory}; re-run `captioner calibrate` for its caption confidence")
    return 0


COMMANDS = {"prepare": (_add_prepare, cmd_prepare), "features": (_add_features, cmd_features),
            "train": (_add_train, cmd_train), "caption": (_add_caption, cmd_caption),
            "evaluate": (_add_evaluate, cmd_evaluate), "gradflow": (_add_gradflow, cmd_gradflow),
            "export": (_add_export, cmd_export), "report": (_add_report, cmd_report), "scst": (_add_scst, cmd_scst),
            "calibrate": (_add_calibrate, cmd_calibrate), "explain": (_add_explain, cmd_explain),
            "tune-decoding": (_add_tune_decoding, cmd_tune_decoding),
            "consensus-index": (_add_consensus_index, cmd_consensus_index),
            "matching": (_add_matching, cmd_matching), "realign-head": (_add_realign_head, cmd_realign_head)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. The project's own errors are the user's to fix and print as one line (exit 2);
    any other exception is a bug and propagates with its traceback (exit 1)."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except USER_ERRORS as err:
        print(f"captioner {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
