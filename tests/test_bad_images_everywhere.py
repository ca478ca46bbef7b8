"""Every odd or broken image file of the reliability list, through the CLI and through the running app.

tests/test_images.py covers the same files through the loader and the Python API; here the same files go
through the two other front doors, so each of them is shown to caption the good ones and to name the file
and the problem for the bad ones while the rest of the work goes on.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError

from app_fixtures import BEAM3, app_server, client  # noqa: F401 (fixture)
from test_batch_cli import caption, jsonl
from test_images import bad_files, good_files

REASONS = {  # bad file -> the words its error must contain
    "empty": "empty file", "random": "not an image", "truncated": "truncated", "bad_crc": "not an image",
    "text": "not an image", "bomb": "decompression bomb", "bomb_warning": "decompression bomb",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[dict[str, Path], dict[str, Path]]:
    """The good and bad files of tests/test_images.py, side by side in one folder."""
    folder = tmp_path_factory.mktemp("mixed")
    good = good_files(folder / "good")
    bad = {k: v for k, v in bad_files(folder / "bad").items() if k in REASONS}
    return good, bad


def test_cli_captions_every_good_file_and_names_every_bad_one(files, trained_run, tmp_path, capsys) -> None:
    good, bad = files
    folder = tmp_path / "photos"
    shutil.copytree(good["photo"].parent, folder)
    for path in bad.values():
        shutil.copy(path, folder)
    (folder / "folder.jpg").mkdir()  # a directory named like an image: a folder to search, not a file
    out = tmp_path / "out.jsonl"
    code, _, err = caption(capsys, trained_run, folder, "-o", out, "--workers", "1")
    assert code == 1  # some files failed
    records = {Path(r["path"]).name: r for r in jsonl(out)}
    assert set(records) == {p.name for p in good.values()} | {p.name for p in bad.values()}
    for path in good.values():
        assert records[path.name]["caption"].strip() and "error" not in records[path.name]
    for name, path in bad.items():
        assert REASONS[name] in records[path.name]["error"], (name, records[path.name])
        assert any(path.name in line and REASONS[name] in line for line in err.splitlines() if line.startswith("error:"))


@pytest.mark.slow
def test_app_captions_every_good_upload_and_names_every_bad_one(files, app_server) -> None:
    good, bad = files
    api = client(app_server.url)
    for path in good.values():
        best, _, _ = api.predict(handle_file(str(path)), *BEAM3, api_name="/caption")
        assert best.strip(), path
    for name, path in bad.items():
        with pytest.raises(AppError) as caught:
            api.predict(handle_file(str(path)), *BEAM3, api_name="/caption")
        assert path.name in str(caught.value) and REASONS[name] in str(caught.value), (name, str(caught.value))
    best, _, _ = api.predict(handle_file(str(good["photo"])), *BEAM3, api_name="/caption")
    assert best.strip()  # still serving after all of them
