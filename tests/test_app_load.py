"""The app under concurrent load: good and bad uploads mixed, every answer right, no memory creep."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError

from app_fixtures import BEAM3, app_server, bad_image, client, good_image  # noqa: F401 (fixtures)

N_GOOD, N_BAD = 20, 5
TIME_LIMIT_S = 120
RSS_GROWTH_LIMIT_MB = 300


def rss_mb() -> float:
    """Resident memory of this process, which also runs the server."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def call(url: str, path: str) -> tuple[str, str]:
    """('ok', caption) or ('error', message): one client per request, like separate browser sessions."""
    try:
        best, _, _ = client(url).predict(handle_file(path), *BEAM3, api_name="/caption")
        return "ok", best
    except AppError as err:
        return "error", str(err)


@pytest.mark.slow
def test_concurrent_good_and_bad_requests(app_server, good_image, bad_image) -> None:
    assert call(app_server.url, str(good_image))[0] == "ok"  # warm-up: model, allocator, first upload
    baseline = rss_mb()
    every = (N_GOOD + N_BAD) // N_BAD
    jobs = [str(bad_image if i % every == every - 1 else good_image) for i in range(N_GOOD + N_BAD)]  # interleaved
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [(path, pool.submit(call, app_server.url, path)) for path in jobs]
        results = [(path, f.result(timeout=max(1.0, TIME_LIMIT_S - (time.monotonic() - start))))
                   for path, f in futures]
    elapsed = time.monotonic() - start
    assert elapsed < TIME_LIMIT_S

    good = [r for p, r in results if p == str(good_image)]
    bad = [r for p, r in results if p == str(bad_image)]
    assert all(kind == "ok" and text.strip() for kind, text in good), good
    assert all(kind == "error" and "broken.jpg: not an image" in text for kind, text in bad), bad

    assert call(app_server.url, str(good_image))[0] == "ok"  # still serving
    growth = rss_mb() - baseline
    assert growth < RSS_GROWTH_LIMIT_MB, f"RSS grew by {growth:.0f} MB under load"
