"""``captioner caption --ray``: the rows of a local run, from a Ray Data pipeline (decoding tasks, one model
per actor), on a local Ray instance started once for this module (2 CPUs, no dashboard, a small object
store). The bundled model is used by name, so the actors resolve it themselves as cluster nodes do."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from captioner.cli import main
from conftest import draw

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]' (the [test] extra has it)")

REPO = Path(__file__).resolve().parents[1]
SHAPES = [("red", "square", "white"), ("blue", "circle", "black"), ("green", "square", "black"),
          ("yellow", "circle", "white")]


def test_an_address_nothing_answers_at_is_one_line_error_at_once(tmp_path):
    """Before the module's instance starts (tests run in file order): Ray alone would retry for minutes."""
    assert not ray.is_initialized()
    draw("red", "square", "white").save(tmp_path / "a.jpg")
    started = time.monotonic()
    code, err = run(tmp_path / "a.jpg", "--ray", "127.0.0.1:1")
    assert code == 2 and time.monotonic() - started < 30
    assert err.strip().splitlines()[-1].startswith("captioner caption: error: --ray 127.0.0.1:1: nothing answers at")


@pytest.fixture(scope="module")
def cluster() -> str:
    """A local Ray instance for this module; its address, for CLI runs in other processes."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 ** 2, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def run(*argv) -> tuple[int, str]:
    """``captioner caption`` in this process; (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["caption", "--workers", "0", *map(str, argv)])
    return code, err.getvalue()


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def finished_rows(path: Path) -> list[dict]:
    """The rows written completely so far (a killed writer may leave half a line)."""
    data = path.read_bytes() if path.exists() else b""
    return [json.loads(line) for line in data[:data.rfind(b"\n") + 1].decode("utf-8").splitlines()]


def captioned(records: list[dict]) -> int:
    return sum("error" not in r for r in records)


def photo_folder(folder: Path, n: int) -> tuple[list[str], list[str]]:
    """``n`` good photos, a truncated JPEG and a text file named .png: (good paths, bad paths)."""
    folder.mkdir(parents=True)
    for i in range(n):
        draw(*SHAPES[i % len(SHAPES)], seed=i).save(folder / f"img_{i:02d}.jpg", quality=90)
    good = [os.path.join(str(folder), f"img_{i:02d}.jpg") for i in range(n)]
    truncated = folder / "broken.jpg"
    draw("red", "circle", "white", size=200).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[:1500])
    (folder / "notes.png").write_text("shopping list: eggs, milk\n")
    return good, [str(truncated), str(folder / "notes.png")]


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory) -> dict:
    """One folder captioned locally, and on Ray by a CLI process killed once it has captioned a photo, then resumed.

    One photo per actor call, so that rows arrive one at a time and the kill lands mid-run."""
    root = tmp_path_factory.mktemp("ray_runs")
    good, bad = photo_folder(root / "photos", 24)
    flags = ["--device", "cpu", "--batch-size", "1", "--decode-batch", "1"]
    local_code, local_err = run(root / "photos", "-o", root / "local.jsonl", *flags)

    out, log = root / "ray.jsonl", root / "killed_stderr.txt"
    with open(log, "w") as stderr:
        cli = [sys.executable, "-m", "captioner.cli", "caption", str(root / "photos"), "-o", str(out)]
        killed = subprocess.Popen([*cli, "--ray", cluster, *flags], cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=stderr, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 180
        while killed.poll() is None and not captioned(finished_rows(out)) and time.monotonic() < deadline:
            time.sleep(0.02)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    before_kill = finished_rows(out)
    code, err = run(root / "photos", "-o", out, "--ray", cluster, "--resume", *flags)  # in this process: faster
    return {"good": good, "bad": bad, "before_kill": before_kill, "killed_log": log.read_text()[-3000:],
            "local": {"code": local_code, "err": local_err, "rows": rows(root / "local.jsonl")},
            "ray": {"code": code, "err": err, "rows": rows(out)}}


def test_killed_ray_run_resumes_and_captions_each_photo_exactly_once(runs):
    written, total = len(runs["before_kill"]), len(runs["good"]) + len(runs["bad"])
    assert 0 < written < total, f"the kill should land mid-run ({written} rows); its log: {runs['killed_log']}"
    assert f"({captioned(runs['before_kill'])} from a previous run)" in runs["ray"]["err"]  # errors: tried again
    assert sorted(r["path"] for r in runs["ray"]["rows"]) == sorted(runs["good"] + runs["bad"])


def test_ray_run_writes_the_captions_of_a_local_run(runs):
    local = {r["path"]: r for r in runs["local"]["rows"]}
    on_ray = {r["path"]: r for r in runs["ray"]["rows"]}
    for path in runs["good"]:
        assert on_ray[path]["caption"] == local[path]["caption"] and on_ray[path]["caption"].strip()
        assert [h["caption"] for h in on_ray[path]["nbest"]] == [h["caption"] for h in local[path]["nbest"]]
        assert on_ray[path]["logprob"] == pytest.approx(local[path]["logprob"], abs=1e-3)


def test_ray_run_reports_bad_files_as_a_local_run_does(runs):
    local = {r["path"]: r for r in runs["local"]["rows"]}
    on_ray = {r["path"]: r for r in runs["ray"]["rows"]}
    for path in runs["bad"]:
        assert on_ray[path] == local[path] and on_ray[path]["error"]
    assert runs["ray"]["code"] == runs["local"]["code"] == 1
    errors = sorted(line for line in runs["ray"]["err"].splitlines() if line.startswith("error: "))
    assert errors == sorted(line for line in runs["local"]["err"].splitlines() if line.startswith("error: "))
    assert len(errors) == 2
