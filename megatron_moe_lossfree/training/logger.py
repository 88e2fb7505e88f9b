"""Run outputs on the logging rank: console table line, tqdm progress, TensorBoard, metrics.jsonl, and W&B
(``--wandb-project``: the TensorBoard scalars, same names and steps, as Megatron-LM does)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

from tqdm import tqdm


def truncate_jsonl(path: str, *, last_step: int) -> int:
    """Keep the rows of ``path`` up to ``last_step``; return how many rows were removed.

    Rows after ``last_step`` come from a job interrupted after its last checkpoint, and so does an
    unreadable line (a row cut short by the interruption): both are removed and counted. A fresh job
    (``last_step`` 0) therefore starts an empty file rather than appending to an old run's rows.
    """
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as fh:
        for line in fh:
            try:
                row = json.loads(line)
                keep = int(row["step"]) <= last_step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += bool(line.strip())
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            fh.writelines(kept)
        os.replace(tmp, path)
    return dropped


LOADS_FILE = "loads.jsonl"
"""``--lossfree-dump-loads``: one row per optimizer step (format: ``LossFreeConfig.dump_loads``)."""


class RunLogger:
    """Writes one run's outputs; every method is a no-op on ranks that do not log."""

    def __init__(self, out_dir: str, *, enabled: bool, total_steps: int, start_step: int,
                 tensorboard_dir: Optional[str] = None, progress: bool = True, wandb: Optional[dict] = None):
        """``wandb``: ``wandb.init`` keywords (project, name, dir, config), or None for no W&B run."""
        self.enabled = enabled
        self.out_dir = out_dir
        self.writer = None
        self.jsonl = None
        self.bar = None
        self.loads_file = None
        self.start_step = start_step
        self.wandb_run = None
        if not enabled:
            return
        if wandb is not None:
            import wandb as wandb_module  # the optional extra; arguments.py refuses --wandb-project without it

            os.makedirs(wandb["dir"], exist_ok=True)
            self.wandb_run = wandb_module.init(**wandb)
        os.makedirs(out_dir, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        # A job resumed from step S logs steps S+1 onwards again: the rows (and TensorBoard events) an
        # interrupted job wrote after its step-S checkpoint are removed, so every step appears once; a
        # fresh job (S = 0) in an old run's directory hides all of that run's steps the same way.
        # TensorBoard's own purge_step does it for the events; ``truncate_jsonl`` for the JSONL. A
        # --tensorboard-dir of the user's may be shared by runs: a fresh job leaves it as Megatron does.
        purge = start_step > 0 or tensorboard_dir is None
        self.writer = SummaryWriter(log_dir=tensorboard_dir or os.path.join(out_dir, "tensorboard"),
                                    purge_step=start_step + 1 if purge else None)
        jsonl_path = os.path.join(out_dir, "metrics.jsonl")
        dropped = truncate_jsonl(jsonl_path, last_step=start_step)
        if dropped and start_step:
            print(f"metrics.jsonl: removed {dropped} row(s) logged after step {start_step}, the step this "
                  f"job resumes from (an interrupted job's; they are logged again)", flush=True)
        elif dropped:
            print(f"metrics.jsonl: removed {dropped} row(s) of an earlier run in {out_dir} (this job starts "
                  f"at step 0 without --load; pass --load to continue that run)"
                  f"{'; TensorBoard hides its events too' if purge else ''}", flush=True)
        self.jsonl = open(jsonl_path, "a", buffering=1)
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
        tags = tensorboard_scalars(kind, scalars)
        for tag, value in tags.items():
            self.writer.add_scalar(tag, value, step)
        if self.wandb_run is not None and tags:
            self.wandb_run.log(tags, step=step)
        row = {"kind": kind, "step": step, **scalars, **(extra or {})}
        self.jsonl.write(json.dumps(row) + "\n")

    def record_loads(self, step: int, loads: dict) -> None:
        """One ``LOADS_FILE`` row; the file is opened at the first row, keeping only the rows up to the step
        this job starts from (as metrics.jsonl)."""
        if not self.enabled:
            return
        if self.loads_file is None:
            path = os.path.join(self.out_dir, LOADS_FILE)
            truncate_jsonl(path, last_step=self.start_step)
            self.loads_file = open(path, "a", buffering=1)
        self.loads_file.write(json.dumps({"step": step, **loads}) + "\n")

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
        if self.loads_file is not None:
            self.loads_file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def tensorboard_scalars(kind: str, scalars: dict) -> dict[str, float]:
    """The TensorBoard (and W&B) scalars of one ``record``: ``kind/name``, per-layer lists as
    ``kind/name/moe_layer_NN``; per-expert tables (loads, biases) and non-finite values stay in the JSONL."""
    tags = {}
    for name, value in scalars.items():
        if isinstance(value, (list, tuple)):
            if value and isinstance(value[0], (list, tuple)):
                continue
            for layer, v in enumerate(value, 1):
                tags[f"{kind}/{name}/moe_layer_{layer:02d}"] = v
        elif value is not None and math.isfinite(value):
            tags[f"{kind}/{name}"] = value
    return tags
