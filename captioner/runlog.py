"""What a training run tells the person watching it: a progress bar, ``steps.jsonl`` and ``metrics.jsonl``
in the run directory, and TensorBoard scalars under ``tensorboard/``.

Kept apart from ``train.py`` so the loop reads as forward, loss, backward, clip, step, log. Under DDP only
rank 0 logs: the others get a ``RunLog`` with ``enabled=False``, which writes nothing and shows no bar.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from tqdm import tqdm

if TYPE_CHECKING:
    import torch

LOGS = ("steps.jsonl", "metrics.jsonl")


class RunLog:
    """The run directory's logs. ``open`` before the first step (it starts TensorBoard), ``close`` after."""

    def __init__(self, out: Path, enabled: bool, world: int = 1) -> None:
        self.out, self.enabled, self.world = Path(out), enabled, world
        self.tb = None
        self.bar: tqdm | None = None
        self.tokens_seen, self.t0 = 0, time.perf_counter()

    def open(self) -> None:
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.out / "tensorboard"))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def drop_after(self, step: int) -> None:
        """Resume: forget log lines of steps that were lost with the killed process (they rerun)."""
        for name in LOGS:
            path = self.out / name
            if path.exists():
                lines = [line for line in path.read_text().splitlines() if line.endswith("}")
                         and json.loads(line)["step"] <= step]
                path.write_text("".join(line + "\n" for line in lines))

    def epoch_bar(self, batches: Iterable, epoch: int, epochs: int) -> Iterator:
        """``batches`` behind a progress bar (rank 0), which ``step`` updates with the loss and tokens/s."""
        self.bar = tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", disable=not self.enabled,
                        mininterval=2)
        self.tokens_seen, self.t0 = 0, time.perf_counter()
        return iter(self.bar)

    def step(self, step: int, epoch: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, tokens: int,
             write: bool) -> None:
        """After an optimizer step: the bar's postfix, and (``write``) a ``steps.jsonl`` line + scalars. The
        tensors are read (a device sync) on rank 0 only."""
        if not self.enabled:
            return
        self.tokens_seen += tokens
        rate = self.tokens_seen * self.world / max(1e-9, time.perf_counter() - self.t0)
        self.bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:.0f}", refresh=False)
        if write:
            loss, grad_norm = loss.item(), grad_norm.item()
            record = {"step": step, "epoch": epoch, "loss": loss, "grad_norm_preclip": grad_norm, "lr": lr}
            with open(self.out / "steps.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/grad_norm_preclip", grad_norm, step)
            self.tb.add_scalar("train/lr", lr, step)

    def epoch(self, record: dict, metrics: dict, epoch: int, improved: bool) -> None:
        """After validation: a ``metrics.jsonl`` line, the val scalars and a one-line summary."""
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            self.tb.add_scalar(f"val/{key}", value, epoch)
        print(f"epoch {epoch}: val loss {metrics['val_loss']:.4f}  BLEU-1..4 " +
              " / ".join(f"{metrics[f'Bleu_{n}']:.4f}" for n in range(1, 5)) + ("  (best)" if improved else ""))
