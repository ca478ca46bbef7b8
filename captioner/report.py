"""``captioner report`` / ``captioner caption --html``: batch results -> one self-contained HTML gallery.

The last step of the batch flow, for a person rather than a program: every photo beside its caption (and
its n-best with scores), the unreadable files with their reasons, sortable by score so the captions the
model is least sure of come first and are the ones reviewed.

Choices, and why:

- **One file, no network.** CSS and JavaScript are inline and nothing is fetched, so the page opens from a
  mail attachment, an air-gapped machine or a CI artifact exactly as it opened here.
- **Thumbnails embedded by default** (base64 JPEG, longest side ``THUMB_SIZE`` px, ~4-8 KB each, made by the
  project's one image loader so they show the pixels the model saw: EXIF-rotated, any mode -> RGB). The
  report then survives being moved away from the photos. For a huge library ``link=True`` (CLI
  ``--link-images``) writes relative links from the report's folder instead: the page stays small and opens
  instantly, but only beside the photos.
- **Data as one JSON blob, rendered 100 per page in JavaScript.** 10,000 photos as static HTML are 10,000
  decoded images and a DOM the browser chokes on; here only the visible page exists, images are
  ``loading="lazy"``, and sorting / filtering are array operations.
- **Escaping**: the blob is JSON with ``<``, ``>``, ``&`` written as ``\\u003c`` etc. (so ``</script>`` inside
  a caption or a file name cannot end the script element), and the page builds every node with
  ``textContent`` / attributes, never ``innerHTML`` from data: a file called ``<script>.jpg`` is just text.
- **Atomic write** (temp file + ``os.replace``), as every other output of the project: a crash never
  leaves half a report.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import urllib.parse
from pathlib import Path
from typing import Iterable

from .errors import CaptionerError, ConfigError
from .fetch import SCHEMES
from .images import load_image
from .manifest import SURROGATES, json_text
from .tokenizer import tokenize

THUMB_SIZE = 192  # longest side of an embedded thumbnail, px (cards are 192 px wide)
THUMB_QUALITY = 72
SORT_FIELDS = ("per_word", "score", "logprob")  # the page's "least certain first" orders
CONFIDENCE = "confidence"  # also offered when the model was calibrated (captioner/confidence.py)
PAGE_SIZE = 100  # cards rendered at once; the measured 10,000-photo page stays interactive (tests/test_report.py)


def _number(value) -> float | None:
    """A score from JSON (float) or CSV (string); missing, empty or non-finite -> None."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def read_results(path: str | Path) -> list[dict]:
    """The records of a ``captioner caption`` output: JSONL (the default) or CSV, by suffix.

    A COCO results JSON has no file paths, so it cannot make a gallery; that is said instead of guessed.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such results file (write one with `captioner caption ... -o {path.name}`)")
    try:
        return _read_results(path)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None


def _read_results(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", errors=SURROGATES, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and "path" not in rows[0]:
            raise ConfigError(f"{path}: not a `captioner caption` CSV (no 'path' column)")
        return [{k: v for k, v in row.items() if v not in ("", None)} for row in rows]
    if path.suffix == ".json":
        raise ConfigError(f"{path}: a COCO results file has no image paths; report the JSONL or CSV output "
                          "(`captioner caption ... -o captions.jsonl`)")
    records = []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")  # not splitlines(): a JSON line may hold U+2028 or U+0085 (in a file name)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                break  # a half-written last line of an interrupted run: the finished ones still make a report
            raise ConfigError(f"{path}:{number}: not a JSON line ({err.msg})") from None
        if not isinstance(record, dict) or "path" not in record:
            raise ConfigError(f"{path}:{number}: not a `captioner caption` record (no 'path')")
        records.append(record)
    return records


def per_word(caption: str, logprob: float | None) -> float | None:
    """Log-prob per decoding step (the caption's tokens + ``<end>``, the length the decoder counts).

    Why the default sort: ``score`` is the decoder's ranking score, ``logprob / len**alpha``, and with the
    default ``--length-penalty 0`` it *is* the total log-prob, which calls every long caption uncertain and
    every short one certain. Per step, a long fluent caption and a short one compare fairly, and the ones
    the model guessed at come first.
    """
    if logprob is None:
        return None
    return round(logprob / (len(tokenize(caption)) + 1), 4)


def entry(record: dict) -> dict:
    """One gallery entry from one results record: path, caption, score, logprob, per_word, n-best, error.

    ``score`` is the best caption's ranking score (log-prob / length**alpha), ``logprob`` its total
    log-probability, ``per_word`` that per decoding step (``per_word()``: the review order), ``confidence`` the
    calibrated probability that it is good (None unless the model was calibrated: ``captioner/confidence.py``),
    ``review`` set when ``caption --min-confidence`` flagged it.
    """
    path = str(record["path"])
    if record.get("error"):
        return {"path": path, "error": str(record["error"])}
    fields = ("score", "logprob", CONFIDENCE)
    nbest = [{"caption": str(h.get("caption", "")), **{k: _number(h.get(k)) for k in fields if k in h}}
             for h in record.get("nbest") or [] if isinstance(h, dict)]
    first = nbest[0] if nbest else {}
    best = {"caption": str(record.get("caption", first.get("caption", ""))),
            "score": _number(record.get("score", first.get("score"))),
            "logprob": _number(record.get("logprob", first.get("logprob")))}
    if CONFIDENCE in record or CONFIDENCE in first:  # a calibrated model's results only
        best[CONFIDENCE] = _number(record.get(CONFIDENCE, first.get(CONFIDENCE)))
    best["per_word"] = per_word(best["caption"], best["logprob"])
    review = {"review": True} if record.get("review") in (True, "True") else {}  # CSV gives the string
    return {"path": path, **best, **review, "nbest": nbest if len(nbest) > 1 else []}


def sort_key(item: dict, field: str = "per_word") -> tuple:
    """Least certain first: ascending ``field``; entries without it (errors, unscored CSV rows) last."""
    value = item.get(field)
    return (value is None, value if value is not None else 0.0, item["path"])


def orders(entries: list[dict]) -> dict[str, list[int]]:
    """Index orders the page offers, computed here once (tested in Python; the page only reads them)."""
    index = range(len(entries))
    fields = SORT_FIELDS + ((CONFIDENCE,) if any(e.get(CONFIDENCE) is not None for e in entries) else ())
    return {field: sorted(index, key=lambda i: sort_key(entries[i], field)) for field in fields}


def resolve(path: str, results_dir: Path | None) -> Path:
    """An image path as recorded (relative to where ``caption`` ran): as is, else beside the results file."""
    p = Path(path)
    if p.is_absolute() or p.exists() or results_dir is None:
        return p
    beside = results_dir / p
    return beside if beside.exists() else p


def thumbnail(path: Path, size: int = THUMB_SIZE) -> str:
    """A ``data:image/jpeg;base64,...`` thumbnail through ``load_image`` (JPEGs decoded drafted at ~size)."""
    img = load_image(path, min_side=size)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=THUMB_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def link(path: Path, report_dir: Path) -> str:
    """A URL to the image relative to the report's folder (percent-encoded: '#', '?', spaces are safe)."""
    target = path.resolve()
    try:
        rel = os.path.relpath(target, report_dir.resolve())
    except ValueError:  # another drive on Windows: no relative path exists
        return target.as_uri()
    return urllib.parse.quote(os.fsencode(Path(rel).as_posix()))  # bytes: a non-UTF-8 name's own, percent-encoded


def add_images(entries: list[dict], report_dir: Path, link_images: bool = False,
               results_dir: Path | None = None, progress: bool = False) -> None:
    """Give every captioned entry ``thumb`` (embedded or linked); a photo gone since is a ``thumb_error``."""
    todo = [e for e in entries if "error" not in e]
    if progress and not link_images:
        from tqdm import tqdm
        todo = tqdm(todo, desc="thumbnails", unit="img", mininterval=1)
    for item in todo:
        if urllib.parse.urlsplit(item["path"]).scheme.lower() in SCHEMES:  # a web image: the page loads it
            item["thumb"] = item["path"]
            continue
        path = resolve(item["path"], results_dir)
        if link_images:
            item["thumb"] = link(path, report_dir)
            continue
        try:
            item["thumb"] = thumbnail(path)
        except CaptionerError as err:
            item["thumb_error"] = getattr(err, "reason", str(err))


def script_json(data: object) -> str:
    """JSON that is safe inside ``<script>``: no ``<``, ``>``, ``&`` or line separators left literal."""
    text = json_text(data, separators=(",", ":"))  # a name that is not UTF-8 as \udcXX escapes
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def render(entries: list[dict], title: str = "captioner report", page_size: int = PAGE_SIZE) -> str:
    """The whole page as a string: template + the escaped data blob."""
    import html
    data = {"entries": entries, "orders": orders(entries), "pageSize": page_size,
            "hasConfidence": any(e.get(CONFIDENCE) is not None for e in entries)}
    head, tail = _TEMPLATE.split("__DATA__")  # split first: a title can never be mistaken for the marker
    return head.replace("__TITLE__", html.escape(title)) + script_json(data) + tail


def write_atomic(path: Path, text: str) -> None:
    """Write through a temp file + rename: a crash never leaves half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_report(records: Iterable[dict], out: str | Path, link_images: bool = False,
                 results_dir: Path | None = None, title: str | None = None, progress: bool = False) -> dict:
    """Records (as ``captioner caption`` writes them) -> ``out``; returns counts for the command's summary."""
    out = Path(out)
    entries = [entry(r) for r in records]
    add_images(entries, out.parent, link_images, results_dir, progress)
    write_atomic(out, render(entries, title or f"captioner report: {len(entries)} image(s)"))
    return {"images": len(entries), "errors": sum("error" in e for e in entries),
            "thumb_errors": sum("thumb_error" in e for e in entries)}


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f4f4f5;color:#18181b}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:10px 16px;z-index:1}
h1{font-size:18px;margin:0 0 6px}
.controls{display:flex;flex-wrap:wrap;gap:10px;align-items:center;font-size:14px}
.controls input[type=search]{width:240px}
#summary{font-size:13px;color:#52525b;margin-bottom:6px}
#summary button{font-size:13px}
#gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px;padding:16px}
.card{background:#fff;border:1px solid #e4e4e7;border-radius:8px;padding:10px;overflow:hidden}
.card.error{border-color:#f87171;background:#fef2f2}
.thumb{width:100%;height:160px;object-fit:contain;background:#fafafa;display:block}
.nothumb{height:160px;display:flex;align-items:center;justify-content:center;color:#a1a1aa;font-size:12px;
 background:#fafafa;text-align:center;padding:4px}
.caption{font-weight:600;margin:8px 0 4px;overflow-wrap:anywhere}
.score{font-size:12px;color:#52525b}
.path{font-size:11px;color:#71717a;overflow-wrap:anywhere;margin-top:4px}
.reason{color:#b91c1c;font-size:13px;margin-top:6px;overflow-wrap:anywhere}
details{font-size:12px;margin-top:4px}
details ol{padding-left:18px;margin:4px 0}
.pager{display:flex;gap:8px;align-items:center;justify-content:center;padding:0 16px 16px;font-size:14px}
.low{color:#b45309}
.conf{font-size:13px;font-weight:600;color:#15803d}
.conf.low{color:#b45309}
</style></head>
<body>
<header>
<h1>__TITLE__</h1>
<div id="summary"></div>
<div class="controls">
<label>sort <select id="sort">
<option value="per_word">least certain first (log-prob per word)</option>
<option value="-per_word">most certain first (log-prob per word)</option>
<option value="score">least certain first (decoder score)</option>
<option value="logprob">least certain first (total log-prob)</option>
<option value="confidence">least confident first (calibrated confidence)</option>
<option value="-confidence">most confident first (calibrated confidence)</option>
<option value="file">file order</option>
</select></label>
<label>show <select id="show">
<option value="all">all</option><option value="ok">captioned</option><option value="error">unreadable</option>
<option value="review">flagged for review</option>
</select></label>
<label>confidence &le; <input id="maxconf" type="number" step="0.05" min="0" max="1" placeholder="any" style="width:70px"></label>
<label>per word &le; <input id="maxscore" type="number" step="0.1" placeholder="any" style="width:80px"></label>
<label><input id="query" type="search" placeholder="filter caption or path"></label>
</div></header>
<div class="pager" id="pager-top"></div>
<main id="gallery"></main>
<div class="pager" id="pager-bottom"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const E = DATA.entries, PAGE = DATA.pageSize;
const state = {sort: "per_word", show: "all", query: "", maxScore: null, maxConf: null, page: 0, view: []};
const $ = (id) => document.getElementById(id);
function el(tag, cls, text) {  // every node from data is built here: text only, never parsed as HTML
  const n = document.createElement(tag);
  if (cls) n.className = cls;
  if (text !== undefined && text !== null) n.textContent = String(text);
  return n;
}
const fmt = (x) => (x === null || x === undefined) ? "n/a" : Number(x).toFixed(3);
function order() {
  if (state.sort === "file") return E.map((_, i) => i);
  if (DATA.orders[state.sort]) return DATA.orders[state.sort];
  const field = state.sort.slice(1), asc = DATA.orders[field];
  const has = (i) => E[i][field] !== null && E[i][field] !== undefined;
  return asc.filter(has).reverse().concat(asc.filter((i) => !has(i)));  // most certain first, unscored still last
}
function keep(e) {
  if (state.show === "ok" && e.error) return false;
  if (state.show === "error" && !e.error) return false;
  if (state.show === "review" && !e.review) return false;
  const c = e.confidence;
  if (state.maxConf !== null && !(c !== null && c !== undefined && c <= state.maxConf)) return false;
  const w = e.per_word;
  if (state.maxScore !== null && !(w !== null && w !== undefined && w <= state.maxScore)) return false;
  if (state.query) {
    const hay = (e.path + "\\n" + (e.caption || "") + "\\n" + (e.error || "")).toLowerCase();
    if (!hay.includes(state.query)) return false;
  }
  return true;
}
function card(e) {
  const c = el("div", e.error ? "card error" : "card");
  if (e.error) {
    c.appendChild(el("div", "nothumb", "unreadable"));
    c.appendChild(el("div", "reason", e.error));
  } else {
    if (e.thumb) {
      const img = el("img", "thumb");
      img.loading = "lazy"; img.decoding = "async"; img.alt = e.caption; img.src = e.thumb;
      c.appendChild(img);
    } else {
      c.appendChild(el("div", "nothumb", "no thumbnail: " + (e.thumb_error || "")));
    }
    c.appendChild(el("div", "caption", e.caption));
    if (e.confidence !== null && e.confidence !== undefined) {
      c.appendChild(el("div", e.review ? "conf low" : "conf", "confidence " + fmt(e.confidence) +
                       (e.review ? " \\u00b7 review" : "")));
    }
    c.appendChild(el("div", "score", "per word " + fmt(e.per_word) + " \\u00b7 log-prob " + fmt(e.logprob) +
                     " \\u00b7 score " + fmt(e.score)));
    if (e.nbest && e.nbest.length) {
      const d = el("details"); d.appendChild(el("summary", null, e.nbest.length + "-best"));
      const ol = el("ol");
      for (const h of e.nbest) {
        const conf = (h.confidence !== null && h.confidence !== undefined) ? "confidence " + fmt(h.confidence) + ", " : "";
        ol.appendChild(el("li", null, h.caption + " (" + conf + "log-prob " + fmt(h.logprob) + ", score " + fmt(h.score) + ")"));
      }
      d.appendChild(ol); c.appendChild(d);
    }
  }
  c.appendChild(el("div", "path", e.path));
  return c;
}
function pager(box) {
  box.replaceChildren();
  const pages = Math.max(1, Math.ceil(state.view.length / PAGE));
  const prev = el("button", "prev", "\\u2190 previous"), next = el("button", "next", "next \\u2192");
  prev.disabled = state.page === 0; next.disabled = state.page >= pages - 1;
  prev.onclick = () => { state.page--; draw(); };
  next.onclick = () => { state.page++; draw(); };
  box.append(prev, el("span", "pageinfo", "page " + (state.page + 1) + " of " + pages +
             " (" + state.view.length + " shown)"), next);
}
function draw() {
  const g = $("gallery"), start = state.page * PAGE;
  const frag = document.createDocumentFragment();
  for (const i of state.view.slice(start, start + PAGE)) frag.appendChild(card(E[i]));
  g.replaceChildren(frag);
  pager($("pager-top")); pager($("pager-bottom"));
  document.body.dataset.ready = "1";
}
function update() {
  state.view = order().filter((i) => keep(E[i]));
  state.page = 0;
  draw();
}
function summary() {
  const errors = E.filter((e) => e.error).length, s = $("summary");
  s.appendChild(el("span", null, E.length + " image(s), " + (E.length - errors) + " captioned, " +
                   errors + " unreadable "));
  if (errors) {
    const b = el("button", null, "list the unreadable files");
    b.id = "show-errors";
    b.onclick = () => { $("show").value = "error"; state.show = "error"; update(); };
    s.appendChild(b);
  }
}
$("sort").onchange = (ev) => { state.sort = ev.target.value; update(); };
$("show").onchange = (ev) => { state.show = ev.target.value; update(); };
$("maxscore").oninput = (ev) => {
  const v = parseFloat(ev.target.value);
  state.maxScore = isNaN(v) ? null : v;
  update();
};
$("maxconf").oninput = (ev) => {
  const v = parseFloat(ev.target.value);
  state.maxConf = isNaN(v) ? null : v;
  update();
};
if (!DATA.hasConfidence) {  // an uncalibrated model's results: no confidence to sort or filter by
  for (const o of [...$("sort").options]) if (o.value.endsWith("confidence")) o.remove();
  $("maxconf").parentElement.remove();
}
$("query").oninput = (ev) => { state.query = ev.target.value.trim().toLowerCase(); update(); };
summary();
update();
</script>
</body></html>
"""
