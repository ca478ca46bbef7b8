"""Device and precision choices shared by training, the API, the CLI and the app."""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import ConfigError


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; an explicit device that is absent is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"--device {device}: not a device ({err}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA GPUs that support it, fp16 on older ones, fp32 on CPU."""
    if precision != "auto":
        if precision != "fp32" and device.type != "cuda":
            raise ConfigError(f"--precision {precision} needs a CUDA device (got {device})")
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(precision: str, device: torch.device, cache: bool = True):
    """Mixed-precision context for the forward pass (a no-op for fp32). ``cache=False`` re-casts the weights
    at every use instead of caching the casts, as code recorded in a CUDA graph must (``captioner/graphs.py``)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def loader_workers(requested: int, device: torch.device) -> int:
    """Image-decoding worker processes worth starting: all requested on a GPU; on a CPU only as many as
    there are cores beyond torch's intra-op threads. Why: a decoding process that has to share a core
    with the CNN's threads stalls them at every parallel operator (2 cores, 2 threads: 0.81x of the
    encoder's speed with 2 workers, 0.84x decoding in between batches)."""
    if device.type != "cpu":
        return requested
    return max(0, min(requested, (os.cpu_count() or 1) - torch.get_num_threads()))
