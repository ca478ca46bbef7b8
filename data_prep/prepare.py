"""``captioner prepare``: records from any reader -> checked images, manifest, vocabulary, report."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from captioner.errors import DatasetError, ImageLoadError
from captioner.images import load_image
from captioner.manifest import REPORT, VOCAB, Record, save_manifest, write_json_atomic
from captioner.tokenizer import tokenize
from captioner.vocab import Vocab


@dataclass
class PrepareConfig:
    """Choices that shape the vocabulary and which data is kept."""

    min_count: int = 5
    max_len: int = 30  # longer captions are truncated (in tokens) when training
    strict: bool = False  # a bad image is an error instead of a counted skip
    workers: int = 8  # threads decoding images for the check (PIL releases the GIL)


def _check_image(record: Record) -> str | None:
    try:
        load_image(record.path)
    except ImageLoadError as err:
        return err.reason
    return None


def check_images(records: list[Record], workers: int) -> list[dict]:
    """Fully decode every image once; return ``{"image", "id", "reason"}`` for the unusable ones."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(tqdm(pool.map(_check_image, records), total=len(records),
                            desc="checking images", unit="img", mininterval=2))
    return [{"image": r.path, "id": r.id, "split": r.split, "reason": why} for r, why in zip(records, reasons) if why]


def prepare(records: list[Record], out: Path, source: str, config: PrepareConfig,
            reader_skips: list[dict] | None = None) -> dict:
    """Write manifest.json, vocab.json and prepare_report.json into ``out``; return the report.

    A set with no training split at all (e.g. COCO val as ``--split-names test``, to score a model on
    someone else's annotations) gets no vocab.json: the vocabulary is the evaluated checkpoint's."""
    out.mkdir(parents=True, exist_ok=True)
    skipped = list(reader_skips or [])
    all_records = records
    empty_captions = 0
    for r in records:
        kept = [c for c in r.captions if tokenize(c)]
        empty_captions += len(r.captions) - len(kept)
        r.captions = kept
    skipped += [{"image": r.path, "id": r.id, "reason": "no usable caption"} for r in records if not r.captions]
    records = [r for r in records if r.captions]
    bad = check_images(records, config.workers)
    if bad and config.strict:
        listing = "\n".join(f"  {b['image']}: {b['reason']}" for b in bad[:20])
        raise DatasetError(f"{len(bad)} unusable image(s) (--strict):\n{listing}")
    bad_paths = {b["image"] for b in bad}
    skipped += bad
    records = [r for r in records if r.path not in bad_paths]
    has_train = any(r.split == "train" for r in all_records)
    train = [r for r in records if r.split == "train"]
    if not records:
        first = f" (e.g. {skipped[0]['image']}: {skipped[0]['reason']})" if skipped else ""
        raise DatasetError(f"no usable images: the caption file lists none, or all {len(skipped)} were skipped{first}")
    if has_train and not train:
        raise DatasetError("no usable training images: nothing to build a vocabulary from")
    vocab = Vocab.build((tokenize(c) for r in train for c in r.captions), config.min_count) if train else None
    train_tokens = Counter(t for r in train for c in r.captions for t in tokenize(c))
    unk_words = [w for w in train_tokens if vocab is not None and w not in vocab.index]
    save_manifest(out, records, source)
    if vocab is not None:
        vocab.save(out / VOCAB)
    else:
        (out / VOCAB).unlink(missing_ok=True)  # never leave an earlier prepare's vocabulary beside this manifest
    splits = sorted({r.split for r in records})
    report = {
        "source": source,
        "images": {s: sum(r.split == s for r in records) for s in splits},
        "captions": {s: sum(len(r.captions) for r in records if r.split == s) for s in splits},
        "vocab_size": len(vocab) if vocab is not None else None,
        "min_count": config.min_count,
        "max_len": config.max_len,
        "unk": {"distinct_words": len(unk_words),
                "train_token_fraction": round(sum(train_tokens[w] for w in unk_words) / max(1, sum(train_tokens.values())), 5)},
        "empty_captions_dropped": empty_captions,
        "skipped_count": len(skipped),
        "skipped_by_reason": dict(Counter(s["reason"] for s in skipped).most_common()),
        "skipped": skipped,
    }
    write_json_atomic(out / REPORT, report)
    return report
