"""A genuinely full disk: training on a small tmpfs fails at start with a clear error, not after an epoch.

Mounting needs root (or CAP_SYS_ADMIN); where the mount is refused the tests skip and say so.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from captioner.checkpoint import load_checkpoint
from captioner.cli import main

from test_training import TINY


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the requested size (MB) under tmp_path; unmounted afterwards."""
    mounts: list[Path] = []

    def mount(megabytes: int) -> Path:
        point = tmp_path / f"disk{len(mounts)}"
        point.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command on this machine")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not permitted'})")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_full_disk_fails_at_start_and_trains_nothing(data_dir, small_disk, capsys):
    disk = small_disk(16)  # the tiny run's checkpoints need ~150 MB (resnet18 encoder weights are saved too)
    assert main(["train", str(data_dir), "--out", str(disk / "run"), *TINY, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "not enough free space" in err and str(disk / "run") in err
    assert not (disk / "run" / "steps.jsonl").exists() and not (disk / "run" / "last").exists()


def test_disk_that_fills_up_between_runs_is_caught_at_resume(data_dir, small_disk, capsys):
    disk = small_disk(400)
    run = disk / "run"
    assert main(["train", str(data_dir), "--out", str(run), *TINY, "--epochs", "1"]) == 0  # room enough: trains
    filler = disk / "filler"
    with open(filler, "wb") as fh:  # another program fills the disk to the last byte
        chunk = b"\0" * (1 << 20)
        try:
            while True:
                fh.write(chunk)
                fh.flush()
        except OSError:
            pass
    steps_before = (run / "steps.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", str(data_dir), "--out", str(run), "--resume", "--epochs", "2"]) == 2
    assert "not enough free space" in capsys.readouterr().err
    assert (run / "steps.jsonl").read_text() == steps_before  # nothing trained, nothing lost
    assert load_checkpoint(run / "last").config.vocab_size == len(json.loads((data_dir / "vocab.json").read_text())["words"])
    filler.unlink()
    assert main(["train", str(data_dir), "--out", str(run), "--resume", "--epochs", "2"]) == 0
