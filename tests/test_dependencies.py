"""The dependency between the two packages points one way: ``data_prep/`` (dataset converters) imports the
library ``captioner/``, never the reverse, so the inference path loads without the dataset side and the two
cannot import each other half-initialised."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import importlib, pkgutil, sys
import captioner
for module in pkgutil.iter_modules(captioner.__path__):
    importlib.import_module("captioner." + module.name)
print(sorted(name for name in sys.modules if name.split(".")[0] == "data_prep"))
"""


def test_importing_every_library_module_loads_nothing_of_data_prep(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
