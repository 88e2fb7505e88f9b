"""Run outputs on the logging rank: console table line, tqdm progress, TensorBoard, metrics.jsonl."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

from tqdm import tqdm


class RunLogger:
    """Writes one run's outputs; every method is a no-op on ranks that do not log."""

    def __init__(self, out_dir: str, *, enabled: bool, total_steps: int, start_step: int,
                 tensorboard_dir: Optional[str] = None, progress: bool = True):
        self.enabled = enabled
        self.out_dir = out_dir
        self.writer = None
        self.jsonl = None
        self.bar = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=tensorboard_dir or os.path.join(out_dir, "tensorboard"))
        self.jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a", buffering=1)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, leave=False, file=sys.stderr)
        self.t_start = time.time()

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def record(self, step: int, kind: str, scalars: dict, extra: Optional[dict] = None) -> None:
        """TensorBoard scalars under ``kind/name`` (lists become per-layer series) plus one JSONL row."""
        if not self.enabled:
            return
        for name, value in scalars.items():
            if isinstance(value, (list, tuple)):
                if value and isinstance(value[0], (list, tuple)):
                    continue  # per-expert tables (loads, biases) go to the JSONL only
                for layer, v in enumerate(value, 1):
                    self.writer.add_scalar(f"{kind}/{name}/moe_layer_{layer:02d}", v, step)
            elif value is not None and math.isfinite(value):
                self.writer.add_scalar(f"{kind}/{name}", value, step)
        row = {"kind": kind, "step": step, **scalars, **(extra or {})}
        self.jsonl.write(json.dumps(row) + "\n")

    def table_line(self, step: int, total: int, m: dict) -> None:
        parts = [f"step {step:>6}/{total}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}",
                 f"tokens/s {m['tokens_per_s']:>8.0f}"]
        if m.get("maxvio_batch") is not None:
            parts.append(f"MaxVio_batch {m['maxvio_batch']:.3f}")
        if m.get("drop_fraction") is not None:
            parts.append(f"drop {100 * m['drop_fraction']:.2f}%")
        self.print(" | ".join(parts))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
