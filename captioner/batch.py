"""``captioner caption``: many image files -> JSONL / CSV / COCO results, resumable, errors per file."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tqdm import tqdm

from .api import Captioner, ImageResult
from .decoding import DecodeConfig
from .errors import ConfigError
from .fetch import is_url
from .images import IMAGE_EXTENSIONS, passed_over
from .manifest import SURROGATES, displayable, json_text, load_manifest
from .metadata import MetadataWriter
from .raw import RAW_INSTALL, is_raw
from .raw import available as raw_readable

FORMATS = ("jsonl", "csv", "coco")
CSV_FIELDS = ("path", "caption", "score", "logprob", "error", "confidence", "review")


@dataclass
class Inputs:
    """Expanded inputs: image files to caption, and the arguments that gave none, with why."""

    files: list[str]
    missing: dict[str, str]  # argument -> why it gave no image file
    ignored_types: dict[str, int] = field(default_factory=dict)  # files in folders not read, by extension ("": none)
    unread_raw: int = 0  # camera RAW files in folders, passed over: rawpy is not installed
    hidden: list[str] = field(default_factory=list)  # hidden and system files and folders passed over (``passed_over``)

    @property
    def ignored(self) -> int:
        """How many files in the folders were passed over (not images, not RAW)."""
        return sum(self.ignored_types.values())


def expand_inputs(items: Iterable[str]) -> Inputs:
    """Files as given; folders recursively (image extensions only); glob patterns expanded; URLs as given
    (never globbed: ``?`` is common in them; the download's errors become the URL's error row). A folder without
    any image file is reported, not passed over: it is a wrong folder, or photos in a format not read here.
    Camera RAW files in folders are read when rawpy is installed, else counted (``unread_raw``) and left out: a
    RAW+JPEG folder is still captioned through its JPEGs, and a named RAW file gets the error saying what to install.
    Hidden and system files and folders in folders (``images.passed_over``: macOS's ._ twins, Android's .thumbnails,
    Synology's @eaDir) are listed in ``hidden`` and left out; named outright, such a file is read."""
    files: list[str] = []
    missing: dict[str, str] = {}
    unread_raw = 0
    types: Counter[str] = Counter()  # the files passed over, by extension
    hidden: list[str] = []

    def unreadable(err: OSError) -> None:  # without it os.walk passes over such a folder without a word
        missing[err.filename] = f"cannot read this folder ({err.strerror}): its photos were not captioned"

    for item in items:
        if is_url(item):
            files.append(item)
            continue
        # a name that exists is that file or folder, even with pattern characters in it ("IMG [1].jpg")
        pattern = glob.has_magic(item) and not os.path.exists(item)
        matches = sorted(glob.glob(item, recursive=True)) if pattern else [item]
        if not matches or not all(os.path.exists(m) for m in matches):
            missing[item] = "no such file or folder (or the pattern matched nothing)"
            continue
        found, others, raws, hiddens = len(files), types.total(), unread_raw, len(hidden)
        for m in matches:
            if os.path.isdir(m):
                for root, dirs, names in os.walk(m, onerror=unreadable):
                    hidden += [os.path.join(root, name) for name in sorted(dirs + names) if passed_over(name)]
                    dirs[:] = sorted(d for d in dirs if not passed_over(d))
                    for name in sorted(n for n in names if not passed_over(n)):
                        path = os.path.join(root, name)
                        image = not os.path.isdir(path)  # a link to a folder is listed here and not followed
                        if image and (name.lower().endswith(IMAGE_EXTENSIONS) or (is_raw(name) and raw_readable())):
                            files.append(path)
                        elif image and is_raw(name):
                            unread_raw += 1
                        else:
                            types[os.path.splitext(name)[1].lower()] += 1
            else:
                files.append(m)
        if len(files) == found:  # only folders, and no image file in them
            raw_note = (f"; {unread_raw - raws} camera RAW file(s), read with rawpy: {RAW_INSTALL}"
                        if unread_raw > raws else "")
            raw_note += f"; {len(hidden) - hiddens} hidden or system item(s)" if len(hidden) > hiddens else ""
            missing.setdefault(item, f"{'a folder' if os.path.isdir(item) else 'only folders'} without image "
                                     f"files ({types.total() - others} other file(s){raw_note}; read here: "
                                     f"{' '.join(IMAGE_EXTENSIONS)})")
    seen: set[str] = set()
    return Inputs([f for f in files if not (f in seen or seen.add(f))], missing, dict(types), unread_raw, hidden)


def infer_format(out: Path | None, fmt: str | None) -> str:
    if fmt:
        return fmt
    if out is not None and out.suffix == ".csv":
        return "csv"
    if out is not None and out.suffix == ".json":
        return "coco"
    return "jsonl"


def _complete_text(path: Path) -> str:
    """An output file up to its last newline; a half-written last line (killed mid-write) is cut off."""
    if not path.exists():
        return ""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return data[:end].decode("utf-8", SURROGATES)


def _record(result: ImageResult, image_id: int | None, min_confidence: float | None = None) -> dict:
    """One output row; with a calibrated model it has ``confidence``, and with ``min_confidence`` a ``review``
    flag that is true when the best caption's confidence is below it."""
    if result.error:
        return {"path": result.source, "error": result.error}
    best = result.nbest[0]
    keys = ("caption", "score", "logprob", "confidence") if "confidence" in best else ("caption", "score", "logprob")
    record = {"path": result.source, **{k: best[k] for k in keys},
              "nbest": [{k: h[k] for k in keys} for h in result.nbest]}
    if min_confidence is not None:
        record["review"] = best["confidence"] < min_confidence
    if image_id is not None:
        record["image_id"] = image_id
    return record


class Sink:
    """Appends one finished record at a time (one write + flush per line) and knows what is done."""

    def __init__(self, path: Path | None, fmt: str, resume: bool) -> None:
        self.fmt, self.path = fmt, path
        self.stream_path = path if fmt != "coco" or path is None else path.with_name(path.name + ".partial.jsonl")
        self.done: dict[str, dict] = {}
        if self.stream_path is not None and self.stream_path.exists():
            if not resume:
                self.stream_path.unlink()
            else:
                self._keep_finished()
        if self.stream_path is None:
            self.handle = None
        else:
            self.stream_path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.stream_path.exists() or self.stream_path.stat().st_size == 0
            self.handle = open(self.stream_path, "a", encoding="utf-8", errors=SURROGATES, newline="")
            if fmt == "csv" and new:
                self.handle.write(",".join(CSV_FIELDS) + "\r\n")
                self.handle.flush()

    def _keep_finished(self) -> None:
        """Resume: keep the captioned images; drop error records and a half-written last one, so failed
        images are tried again and every image still appears exactly once (rewritten atomically). CSV is read
        by records, not lines: a quoted file name may hold a newline."""
        text = _complete_text(self.stream_path)
        if self.fmt == "csv":
            units = [(row, self._parse_row(row)) for row in csv.reader(io.StringIO(text, newline=""))]
        else:  # "\n" only: a JSON line may hold U+2028 or U+0085, which str.splitlines would also split at
            units = [(line, self._parse_line(line, number)) for number, line in enumerate(text.split("\n")[:-1], 1)]
        kept = [unit for unit, rec in units if rec is None or "error" not in rec]
        self.done.update((rec["path"], rec) for _, rec in units if rec is not None and "error" not in rec)
        if len(kept) != len(units):
            tmp = self.stream_path.with_name(self.stream_path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8", errors=SURROGATES, newline="") as f:
                if self.fmt == "csv":
                    csv.writer(f).writerows(kept)
                else:
                    f.write("".join(line + "\n" for line in kept))
            os.replace(tmp, self.stream_path)

    def _parse_line(self, line: str, number: int) -> dict:
        """A JSON line's record; a damaged one (not the half-written last line, which is cut off) stops the resume
        with its place: which photo it held cannot be told, and guessing could caption one twice or never."""
        try:
            record = json.loads(line)
            why = None if isinstance(record, dict) and "path" in record else "no 'path'"
        except json.JSONDecodeError as err:
            why = err.msg
        if why:
            raise ConfigError(f"{self.stream_path}:{number}: not a record of this command ({why}); remove that line "
                              "and --resume again, or run without --resume to start over")
        return record

    @staticmethod
    def _parse_row(row: list[str]) -> dict | None:
        """A CSV record's fields; None for the header and for a row that is not one of ours."""
        if row == list(CSV_FIELDS) or len(row) != len(CSV_FIELDS):
            return None
        return {k: v for k, v in zip(CSV_FIELDS, row) if v != ""}

    def write(self, record: dict) -> None:
        self.done[record["path"]] = record
        if self.fmt == "csv":
            buf = io.StringIO()
            csv.writer(buf).writerow([record.get(k, "") for k in CSV_FIELDS])
            line = buf.getvalue()
        else:
            line = json_text(record) + "\n"
        if self.handle is None:  # a terminal or pipe: an undecodable name byte is shown as U+FFFD
            print(displayable(line), end="", flush=True)
        else:
            self.handle.write(line)
            self.handle.flush()

    def close(self, complete: bool) -> None:
        """Close the stream; a complete COCO run is turned into its JSON list (an incomplete one stays
        resumable in its ``.partial.jsonl``)."""
        if self.handle is not None:
            self.handle.close()
        if complete and self.fmt == "coco" and self.path is not None:
            results = [{"image_id": r["image_id"], "caption": r["caption"]} for r in self.done.values() if "error" not in r]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False))
            os.replace(tmp, self.path)
            self.stream_path.unlink()


def image_ids(paths: list[str], data_dir: Path | None) -> dict[str, int]:
    """COCO image ids: from the manifest when given, else from all-digit file names (COCO's own naming)."""
    if data_dir is not None:
        by_path = {os.path.realpath(r.path): r.id for r in load_manifest(data_dir)}
        return {p: by_path[os.path.realpath(p)] for p in paths if os.path.realpath(p) in by_path}
    return {p: int(Path(p).stem) for p in paths if Path(p).stem.isdigit()}


def caption_files(captioner: Captioner, inputs: Inputs, config: DecodeConfig, out: Path | None, fmt: str,
                  resume: bool = False, data_dir: Path | None = None, batch_size: int = 32, workers: int = 2,
                  decode_batch: int = 256, metadata: MetadataWriter | None = None,
                  stream: Callable[[list[str]], Iterator[ImageResult]] | None = None,
                  min_confidence: float | None = None) -> dict:
    """Caption every input not already in the output; return a summary with counts and failures.
    With ``metadata``, each captioned photo gets its caption written into / beside it before its record is
    written, and the record lists what was written (``"metadata"``); write errors count as failures.
    ``stream``: where the results come from instead of ``captioner.stream`` (``--ray``: a Ray cluster);
    rows, resume and failures stay this function's, so both write the same output.
    ``min_confidence`` flags rows whose caption's confidence is below it (``"review": true``; counted as ``review``);
    it needs a calibrated model (``captioner calibrate``)."""
    if min_confidence is not None and not 0 <= min_confidence <= 1:
        raise ConfigError(f"--min-confidence is a probability: give a value in [0, 1], not {min_confidence}")
    if min_confidence is not None and captioner.calibration is None:
        raise ConfigError("--min-confidence needs a calibrated model: this checkpoint has no calibration.json "
                          "(create it with `captioner calibrate DATA_DIR --checkpoint DIR`)")
    sink = Sink(out, fmt, resume)
    ids = image_ids(inputs.files, data_dir) if fmt == "coco" else {}
    todo = [p for p in inputs.files if p not in sink.done]
    failures = [{"path": m, "error": why} for m, why in inputs.missing.items()]
    # results come in bursts of decode_batch: a bar redrawn at the first result would show one image's rate (1 in
    # 15 s: "4:18:23" left of a 1-minute run); redrawn per burst it shows the real one
    bar = tqdm(total=len(todo), desc="captioning", unit="img", mininterval=1,
               miniters=max(1, min(decode_batch, len(todo))), disable=out is None)
    complete = False
    try:
        results = stream(todo) if stream else captioner.stream(todo, config, batch_size, workers, decode_batch)
        for result in results:
            if result.error is None and fmt == "coco" and result.source not in ids:
                result = ImageResult(result.source, [], "no image id (give --data DATA_DIR, or use COCO's numeric file names)")
            record = _record(result, ids.get(result.source), min_confidence)
            if metadata is not None and "error" not in record:
                record["metadata"] = metadata.write(result.source, record["caption"])
            sink.write(record)
            bar.update(1)
        complete = True
    finally:
        bar.close()
        sink.close(complete)
    failures += [{"path": r["path"], "error": r["error"]} for r in sink.done.values() if "error" in r]
    failures += metadata.failures() if metadata is not None else []
    return {"images": len(inputs.files), "captioned": sum("error" not in r for r in sink.done.values()),
            "resumed": len(inputs.files) - len(todo), "failed": failures, "ignored_non_images": inputs.ignored,
            "unread_raw": inputs.unread_raw, "ignored_types": inputs.ignored_types, "hidden": inputs.hidden,
            "review": sum(r.get("review") in (True, "True") for r in sink.done.values()),  # CSV rows read back: str
            "records": [*sink.done.values(), *failures[:len(inputs.missing)]]}  # every input once, for --html
