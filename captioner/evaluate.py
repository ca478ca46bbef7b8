"""``captioner evaluate``: caption a split (or read a COCO results file) and score it like the papers.

Hypotheses and references go through the project's one tokenizer; the metrics are corpus BLEU-1..4
against all references, CIDEr-D and ROUGE-L with pycocoevalcap's key names and scale.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from .api import Captioner
from .captions import references
from .decoding import DecodeConfig
from .errors import DatasetError
from .manifest import REPORT, Record, load_manifest, split_records, write_json_atomic
from .metrics import score_all
from .tokenizer import tokenize


def read_results(path: Path, records: list[Record]) -> tuple[dict[int, str], list[str]]:
    """A COCO results file checked against the split: unknown or duplicate ids and missing images are
    errors (they would silently change the score); empty captions are warnings and score zero."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: results file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not a JSON results file ({err})") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of {{'image_id', 'caption'}} objects")
    split_ids = {r.id for r in records}
    captions: dict[int, str] = {}
    warnings = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("image_id"), int) or not isinstance(item.get("caption"), str):
            raise DatasetError(f"{path}: entry {i} is not {{'image_id': int, 'caption': str}}: {str(item)[:80]}")
        image_id = item["image_id"]
        if image_id not in split_ids:
            raise DatasetError(f"{path}: entry {i} has image_id {image_id}, which is not in this split")
        if image_id in captions:
            raise DatasetError(f"{path}: image_id {image_id} appears more than once")
        if not tokenize(item["caption"]):
            warnings.append(f"image_id {image_id}: empty caption (scored as empty)")
        captions[image_id] = item["caption"]
    missing = sorted(split_ids - set(captions))
    if missing:
        raise DatasetError(f"{path}: {len(missing)} of the split's {len(split_ids)} images have no caption "
                           f"(e.g. image_id {missing[:5]}); scoring a subset would not be comparable")
    return captions, warnings


def failure(record: Record, error: str) -> dict:
    """How an image that could not be captioned is listed in metrics.json."""
    return {"image_id": record.id, "path": record.path, "error": error}


def caption_split(captioner: Captioner, records: list[Record], config: DecodeConfig, batch_size: int = 32,
                  workers: int = 2, decode_batch: int = 256, *, failed: list[dict] | None = None) -> dict[int, str]:
    """Caption every image of the split with the shared batched decoding. Given a ``failed`` list, an
    unusable image is skipped and appended to it, as ``captioner caption`` does (one bad file must not cost
    a whole evaluation); without one, it is an error."""
    out: dict[int, str] = {}
    # results come in bursts of decode_batch (``stream``): the bar is redrawn per burst, not at the first result
    bar = tqdm(total=len(records), desc="captioning", unit="img", mininterval=2,
               miniters=max(1, min(decode_batch, len(records))))
    for record, result in zip(records, captioner.stream([r.path for r in records], config, batch_size, workers,
                                                        decode_batch)):
        if result.error and failed is None:
            raise DatasetError(f"cannot caption image id {record.id}: {result.error}")
        if result.error:
            failed.append(failure(record, result.error))
        else:
            out[record.id] = result.caption
        bar.update(1)
    bar.close()
    return out


def caption_split_from_cache(captioner: Captioner, data_dir: Path, records: list[Record], config: DecodeConfig,
                             batch_size: int = 256, *, failed: list[dict] | None = None) -> dict[int, str]:
    """Same decoding on the data directory's cached features (no CNN pass): for fast model selection.
    The cache must come from the checkpoint's own encoder, weights and image size. Images the cache
    could not encode are skipped and appended to ``failed`` when given; without it, they are an error."""
    from .features import FeatureCache, cache_dir

    cache = FeatureCache(cache_dir(data_dir, captioner.config.encoder))
    if failed is not None:
        failed += [failure(r, cache.failed[r.id]["error"]) for r in records if r.id in cache.failed]
        records = [r for r in records if r.id not in cache.failed]
    return caption_features(captioner, records, cache.gather([r.id for r in records]), config, batch_size)


def caption_features(captioner: Captioner, records: list[Record], feats: torch.Tensor, config: DecodeConfig,
                     batch_size: int = 256) -> dict[int, str]:
    """Captions of these records' (N, D) features, in batches: one decoding for the cache and in-training val."""
    return {r.id: n[0]["caption"] for r, n in zip(records, nbest_features(captioner, feats, config, batch_size))}


def nbest_features(captioner: Captioner, feats: torch.Tensor, config: DecodeConfig,
                   batch_size: int = 256) -> list[list[dict]]:
    """``Captioner.generate`` over (N, D) features, ``batch_size`` rows at a time: per row its n-best."""
    return [n for i in range(0, len(feats), batch_size) for n in captioner.generate(feats[i:i + batch_size], config)]


def left_out_by_prepare(data_dir: Path, split: str) -> list[dict]:
    """Images of ``split`` that ``captioner prepare`` left out of the manifest (missing or unreadable photos),
    as its report lists them: a set where only some photos are present is scored on the ones there are."""
    path = Path(data_dir) / REPORT
    try:
        skipped = json.loads(path.read_text(encoding="utf-8")).get("skipped", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [{"image_id": s.get("id"), "path": s.get("image"), "error": s.get("reason")}
            for s in skipped if isinstance(s, dict) and s.get("split") == split]


def score(records: list[Record], captions: dict[int, str]) -> dict[str, float]:
    """Tokenise hypotheses and references the same way and compute every metric."""
    refs = references(records)
    hyps = {r.id: tokenize(captions[r.id]) for r in records}
    return score_all(refs, hyps)


def format_table(metrics: dict[str, float]) -> str:
    """Paper-style table: BLEU and ROUGE-L x100, CIDEr-D x100 (as papers print it)."""
    keys = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr", "ROUGE_L"]
    names = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D", "ROUGE-L"]
    head = " | ".join(f"{n:>7}" for n in names)
    row = " | ".join(f"{metrics[k] * 100:7.1f}" for k in keys)
    return f"{head}\n{row}"


def evaluate(data_dir: Path, split: str, captioner: Captioner | None = None, config: DecodeConfig | None = None,
             results: Path | None = None, per_image: Path | None = None, checkpoint: str | None = None,
             batch_size: int = 32, workers: int = 2, from_cache: bool = False) -> dict:
    """Metrics dict (pycocoevalcap keys, 0-1 BLEU) plus counts, decoding settings and provenance.

    Images that could not be captioned are left out of the scores and listed under ``failed``
    (``{"image_id", "path", "error"}``); ``images`` counts the scored ones."""
    records = split_records(load_manifest(data_dir), split)
    warnings: list[str] = []
    failed: list[dict] = []
    if results is not None:
        captions, warnings = read_results(results, records)
    elif from_cache:
        captions = caption_split_from_cache(captioner, data_dir, records, config, failed=failed)
    else:
        captions = caption_split(captioner, records, config, batch_size, workers, failed=failed)
    records = [r for r in records if r.id in captions]
    if not records:
        raise DatasetError(f"none of the {len(failed)} images of split {split!r} could be captioned "
                           f"(first: {failed[0]['path']}: {failed[0]['error']})")
    metrics = score(records, captions)
    lengths = [len(tokenize(c)) for c in captions.values()]
    left_out = left_out_by_prepare(data_dir, split)
    summary = {**metrics, "images": len(records), "failed_count": len(failed), "failed": failed,
               "left_out_by_prepare_count": len(left_out), "left_out_by_prepare": left_out,
               "split": split, "data_dir": str(data_dir),
               "checkpoint": checkpoint, "results": str(results) if results else None, "from_cache": from_cache,
               "decoding": config.to_json() if config else None, "warnings": warnings,
               "mean_caption_length": sum(lengths) / max(1, len(lengths)),
               "distinct_captions": len(set(captions.values())),
               "vocabulary_used": len(Counter(t for c in captions.values() for t in tokenize(c)))}
    if per_image is not None:
        write_json_atomic(Path(per_image), [{"image_id": r.id, "path": r.path, "caption": captions[r.id],
                                             "references": r.captions} for r in records])
    return summary
