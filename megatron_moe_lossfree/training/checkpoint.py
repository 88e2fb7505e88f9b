"""Checkpoints through Megatron-Core dist_checkpointing, written atomically.

Layout (Megatron-LM's): ``SAVE/iter_0000100/`` plus ``SAVE/latest_checkpointed_iteration.txt``.
A save goes to ``iter_XXXXXXX.tmp`` and is renamed only after every rank finished, then the tracker is
replaced atomically; a crash mid-save leaves the previous checkpoint as the latest, and a directory
without dist_checkpointing's metadata is reported by name instead of being loaded.

``--load`` at a directory with no checkpoint keeps Megatron-LM's meaning (``--save D --load D`` on a first
run starts fresh), but says so in one line; ``--exit-on-missing-checkpoint`` (Megatron-LM's flag) refuses
instead, so a typo in a resume command cannot silently restart training.

A checkpoint continues at another EP or PP size (tests/distributed/test_layout_resume.py): dist_checkpointing
reshards the weights, ``expert_bias`` and Adam's moments, and the plugin's part (tokens seen, steps, the drop
window) is global, the same on every rank of any layout. Nothing here records or checks the saved layout.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Optional

import torch.distributed as dist

from megatron_moe_lossfree.errors import LossFreeConfigError

TRACKER = "latest_checkpointed_iteration.txt"


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def sharded_metadata() -> dict:
    """The metadata Megatron-LM's own checkpointing passes to ``sharded_state_dict``
    (``_build_sharded_state_dict_metadata``) that megatron-core reads: the data-parallel group with
    context parallelism. megatron-core 0.16's GPTModel needs it on an MTP stage that does not hold the
    embedding (PP > 1: the MTP layers sit on the last stage and tie a copy of the embedding)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return {}
    return {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}


def _model_sharded_state_dict(model):
    return unwrap(model).sharded_state_dict(metadata=sharded_metadata())


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, extra: dict) -> str:
    """Save model, optimizer, scheduler and ``extra`` (plugin state) for ``iteration``; returns the dir."""
    from megatron.core import dist_checkpointing

    final = checkpoint_dir(root, iteration)
    tmp = final + ".tmp"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    model_sd = _model_sharded_state_dict(model)
    state = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd),
        "scheduler": scheduler.state_dict(),
        "iteration": iteration,
        "lossfree": extra,
    }
    dist_checkpointing.save(state, tmp)
    _barrier()
    if rank0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(root, TRACKER + ".tmp"), "w") as fh:
            fh.write(str(iteration))
        os.replace(os.path.join(root, TRACKER + ".tmp"), os.path.join(root, TRACKER))
    _barrier()
    return final


def latest_iteration(root: str) -> Optional[int]:
    """The iteration named by the tracker, or None when ``root`` holds no checkpoint."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    try:
        return int(text)
    except ValueError:
        raise LossFreeConfigError(
            f"--load ({root}) has a corrupt {TRACKER} ({text!r}): write the iteration number of a complete "
            f"checkpoint into it, or remove it to start fresh") from None


def missing_checkpoint(root: str) -> Optional[str]:
    """Why ``root`` holds no checkpoint to resume from, as words after ``--load (root)``; None if it has one."""
    if not os.path.exists(root):
        return "does not exist"
    if not os.path.isdir(root):
        return "is not a directory"
    if not os.path.isfile(os.path.join(root, TRACKER)):
        return f"holds no checkpoint (no {TRACKER})"
    return None


def check_load_dir(root: str, *, exit_on_missing: bool) -> bool:
    """True when ``root`` holds a checkpoint. Otherwise refuse (``--exit-on-missing-checkpoint``) or say, on
    rank 0 only, that training starts from step 0 (Megatron-LM's behaviour, made visible)."""
    why = missing_checkpoint(root)
    if why is None:
        return True
    if exit_on_missing:
        raise LossFreeConfigError(
            f"--exit-on-missing-checkpoint is set and --load ({root}) {why}: fix the --load path, or drop "
            f"--exit-on-missing-checkpoint to start from step 0")
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"warning: --load ({root}) {why}: training starts from step 0 (add --exit-on-missing-checkpoint "
              f"to stop instead)", file=sys.stderr, flush=True)
    return False


def verify_checkpoint(path: str) -> None:
    """Refuse a checkpoint directory that dist_checkpointing did not finish writing."""
    from megatron.core import dist_checkpointing

    if not os.path.isdir(path):
        raise LossFreeConfigError(f"--load checkpoint {path} does not exist: check --load and {TRACKER}")
    if not dist_checkpointing.check_is_distributed_checkpoint(path):
        raise LossFreeConfigError(
            f"--load checkpoint {path} is truncated or incomplete (no dist_checkpointing metadata): "
            f"delete it and point {TRACKER} at an earlier complete checkpoint")


def load_checkpoint(root: str, model, optimizer, scheduler, iteration: Optional[int] = None) -> Optional[dict]:
    """Load the latest (or given) checkpoint into model/optimizer/scheduler; returns its common state."""
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root) if iteration is None else iteration
    if iteration is None:
        return None
    path = checkpoint_dir(root, iteration)
    verify_checkpoint(path)
    model_sd = _model_sharded_state_dict(model)
    template = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True)}
    try:
        state = dist_checkpointing.load(template, path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # torch's CheckpointException derives from BaseException
        raise LossFreeConfigError(
            f"--load checkpoint {path} does not match this model{_mismatch_hint(str(exc))}: use the same model "
            f"shape flags as the run that saved it (the EP and PP sizes may differ: the checkpoint is "
            f"resharded)") from None
    unwrap(model).load_state_dict(state["model"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    common = dist_checkpointing.load_common_state_dict(path)
    scheduler.load_state_dict(common["scheduler"])
    return common


def _mismatch_hint(text: str) -> str:
    """The useful line of dist_checkpointing's multi-rank error text."""
    import re

    missing = re.search(r"([\w.]+) from model not in state dict", text)
    if missing and missing.group(1).endswith("expert_bias"):
        return (" (the checkpoint has no expert_bias: it was saved without bias balancing; add "
                "--lossfree-balancing none, or start a fresh run)")
    if missing:
        return f" ({missing.group(1)} is not in the checkpoint)"
    shape = re.search(r"(Global shape mismatch[^\n]{0,200})", text)
    if shape:
        return f" ({shape.group(1)})"
    return f" ({text.strip().splitlines()[0][:200]})" if text.strip() else ""
