"""Files beside a checkpoint that pair tensors with JSON: a consensus index, a matching model.

Why one writer and one reader: the pair must never mismatch silently. The tensors are written first (to a
temporary name, then renamed); the JSON, written last and atomically, names their SHA-256, so a crash between
the two leaves a pair that ``read_pair`` refuses rather than one that loads the wrong weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .encoder import sha256_of


def write_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written to a temporary name and renamed over ``path``: never half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)  # safetensors creates it owner-only; a checkpoint is shared and shipped like model.safetensors
    os.replace(tmp, path)


def write_pair(directory: Path, tensors_name: str, json_name: str, tensors: dict[str, torch.Tensor],
               data: dict) -> Path:
    """Write ``tensors``, then ``data`` with the tensor file's SHA-256 added."""
    from .manifest import write_json_atomic
    directory = Path(directory)
    write_tensors_atomic(directory / tensors_name, tensors)
    write_json_atomic(directory / json_name, {**data, "sha256": sha256_of(directory / tensors_name)})
    return directory / json_name


def read_pair(directory: Path, tensors_name: str, json_name: str,
              fmt: str) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The JSON and the tensors (None when there is no JSON). Raises ``OSError``, ``ValueError`` (also
    ``json.JSONDecodeError``), ``KeyError`` or ``SafetensorError`` for a broken or mismatched pair: the caller
    names its file."""
    path = Path(directory) / json_name
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != fmt:
        raise ValueError(f'expected "format": "{fmt}"')
    if sha256_of(Path(directory) / tensors_name) != data["sha256"]:
        raise ValueError(f"{tensors_name} is not the file {json_name} was written with")
    return data, load_file(str(Path(directory) / tensors_name))
