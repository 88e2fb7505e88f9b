"""Per-rank cases of the multi-rank resume tests (run by ``harness.launch_cases``).

One rank-side function runs both jobs of a layout, one after the other, in the same gloo world:
1. the uninterrupted job: fresh weights (the seed makes them the same on every layout), ``STEPS`` steps,
   a checkpoint at ``SAVE_AT`` and another at the end;
2. the resumed job: a fresh ``setup`` with ``--load`` (parallel state destroyed and rebuilt in between,
   as a restarted job would), which continues from ``SAVE_AT`` to ``STEPS``.
Each job reports, for every step it ran, the loss, every layer's all-reduced counts and every layer's
bias after the step; the resumed job also reports the max |difference| of every local tensor against the
uninterrupted job's final checkpoint. The test requires all of it to be exactly equal.

The flags make the resumed part depend on each piece of restored state:
- ``--lossfree-rate-schedule v3`` with the freeze point at 3 steps of tokens: step 4 must NOT move the bias,
  which holds only if ``tokens_seen`` (512 at the save) was restored; from 0 it would move;
- token dropping with exempt sequences (device-level at EP 2, expert-level at PP 2, which has one device):
  which sequences are exempt depends on the step and the global sample ids, so a resumed run that
  restarted its step or data position would drop other tokens and change counts and loss;
- the drop fraction is logged at steps 1, 3 and 4 only, so the window of step 3 spans the save at step 2:
  the resumed job's must include step 2's drops, carried in the checkpoint (``plugin_state``);
- Adam, the learning-rate schedule and the data position come back through Megatron's own state;
- with MTP at PP 2 (the MTP layer on the last stage, with its own router and a tied copy of the
  embedding), the MTP router's counts and bias are among the compared ones.
"""

from __future__ import annotations

import os

import torch

from tests.distributed.layout_cases import _diff_against_checkpoint, _setup

STEPS = 4
SAVE_AT = 2
TOKENS_PER_STEP = 8 * 32  # global batch x sequence length of layout_cases.TINY_MODEL
FREEZE_AFTER_TOKENS = 3 * TOKENS_PER_STEP  # rate u for steps 1-3 (tokens seen 0, 256, 512), 0 for step 4
LOG_DROPS_AT = (1, 3, 4)  # steps whose drop fraction is read (a window of 1, 2 and 1 steps)

COMMON = ["--train-iters", str(STEPS), "--lossfree-rate-schedule", "v3",
          "--lossfree-freeze-bias-after-tokens", str(FREEZE_AFTER_TOKENS),
          "--lossfree-capacity-factor", "1.0", "--lossfree-exempt-fraction", "0.25"]
RESUME_LAYOUTS = {
    "ep2_device_drop": ["--expert-model-parallel-size", "2", "--lossfree-drop", "device"],
    "pp2_expert_drop": ["--pipeline-model-parallel-size", "2", "--lossfree-drop", "expert"],
    # MTP on the last stage: its router's bias, its copy of the embedding and Adam's state come back too
    "pp2_mtp_expert_drop": ["--pipeline-model-parallel-size", "2", "--mtp-num-layers", "1",
                            "--lossfree-drop", "expert"],
}


def _run_steps(trainer, until: int) -> list:
    """Train until optimizer step ``until``; one record per step run."""
    from megatron_moe_lossfree.training.metrics_log import drop_metrics

    records = []
    while trainer.step < until:
        loss = trainer.train_step()
        routers = trainer.balancer.routers
        records.append(dict(
            step=trainer.step, loss=loss, tokens_seen=trainer.balancer.tokens_seen,
            drop_fraction=drop_metrics(trainer)["drop_fraction"] if trainer.step in LOG_DROPS_AT else None,
            counts={r.metric_layer_number(): c.tolist() for r, c in zip(routers, trainer.balancer.last_counts)},
            expert_bias={r.metric_layer_number(): r.expert_bias.tolist() for r in routers}))
    return records


def resume_case(workdir: str, name: str) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_moe_lossfree.training.checkpoint import TRACKER, save_checkpoint
    from megatron_moe_lossfree.training.pretrain import plugin_state

    flags = COMMON + RESUME_LAYOUTS[name]
    ckpt = os.path.join(workdir, f"ckpt-{name}")

    def save(trainer) -> str:
        return save_checkpoint(ckpt, trainer.step, trainer.model, trainer.optimizer, trainer.scheduler,
                               plugin_state(trainer))

    full = _setup(flags, os.path.join(workdir, f"out-{name}-full"))
    uninterrupted = _run_steps(full, SAVE_AT)
    save(full)
    uninterrupted += _run_steps(full, STEPS)
    final = save(full)
    full.logger.close()
    ps.destroy_model_parallel()

    # Only the step-SAVE_AT checkpoint may be visible to the resumed job: hide the final one.
    if torch.distributed.get_rank() == 0:
        os.rename(final, final + ".hidden")
        with open(os.path.join(ckpt, TRACKER), "w") as f:
            f.write(str(SAVE_AT))
    torch.distributed.barrier()
    resumed = _setup([*flags, "--load", ckpt], os.path.join(workdir, f"out-{name}-resumed"))
    start = dict(step=resumed.step, tokens_seen=resumed.balancer.tokens_seen, steps=resumed.balancer.steps)
    records = _run_steps(resumed, STEPS)
    torch.distributed.barrier()
    diff = _diff_against_checkpoint(resumed, final + ".hidden")
    resumed.logger.close()
    return dict(uninterrupted=uninterrupted, resumed=records, start=start, diff=diff,
                pp=ps.get_pipeline_model_parallel_world_size(), ep=ps.get_expert_model_parallel_world_size())
