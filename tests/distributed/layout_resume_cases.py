"""Per-rank cases of the layout-change resume test: a checkpoint saved at one layout continues at another.

A user who changes cluster size continues training (issue 16, item 5):
- ``ep2_to_ep4``: saved at EP=2 on 2 ranks, continued at EP=4 on 4 ranks (data parallel 2 -> 4 with it);
- ``pp2_to_pp1``: saved at PP=2 on 2 ranks, continued at PP=1 on the same 2 ranks (data parallel 1 -> 2).

Jobs (``resume_cases._run_steps`` records each step: loss, all-reduced counts, biases, tokens seen, drops):
1. ``save_case`` at the original layout: the uninterrupted job, ``STEPS`` steps from fresh weights, its
   step-``SAVE_AT`` checkpoint under ``ckpt-NAME`` and its final state under ``final-NAME``;
2. ``resume_case`` at the new layout: a fresh ``setup`` with ``--load ckpt-NAME`` (dist_checkpointing
   reshards the weights, ``expert_bias`` and Adam's moments) continues to ``STEPS``, then reports the max
   |difference| of every local tensor against ``final-NAME`` resharded into the new layout.

The flags are ``resume_cases.COMMON`` with expert-level dropping, so the resumed steps depend on restored
state as at one layout: the v3 freeze point needs ``tokens_seen``, the drop fraction logged at step 3 spans
the save (the checkpoint's drop window), and Adam, the lr schedule and the data position come back through
Megatron's own state. The same assignments are dropped at every layout: the expert capacity is per
micro-batch, and micro-batches are the global samples {2j, 2j+1} at any data-parallel size
(``data.iterate_micro_batches`` gives DP rank r the contiguous share r of step s's samples
[s*GB, (s+1)*GB)). Device-level dropping is not compared across EP sizes: its budget is per device of the
EP group (ceil(cf*T*K/D), T the group's tokens), so another EP size drops other assignments by definition.
"""

from __future__ import annotations

import os

from tests.distributed.layout_cases import _diff_against_checkpoint, _setup
from tests.distributed.resume_cases import COMMON, SAVE_AT, STEPS, _run_steps

FLAGS = [*COMMON, "--lossfree-drop", "expert"]
# name: (original layout flags, world size), (new layout flags, world size)
LAYOUT_CHANGES = {
    "ep2_to_ep4": ((["--expert-model-parallel-size", "2"], 2), (["--expert-model-parallel-size", "4"], 4)),
    "pp2_to_pp1": ((["--pipeline-model-parallel-size", "2"], 2), ([], 2)),
}


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return dict(pp=ps.get_pipeline_model_parallel_world_size(), ep=ps.get_expert_model_parallel_world_size(),
                dp=ps.get_data_parallel_world_size())


def save_case(workdir: str, name: str) -> dict:
    """The uninterrupted job at the original layout; checkpoints at SAVE_AT and at the end."""
    from megatron_moe_lossfree.training.checkpoint import save_checkpoint
    from megatron_moe_lossfree.training.pretrain import plugin_state

    (original, _), _ = LAYOUT_CHANGES[name]
    trainer = _setup([*FLAGS, *original], os.path.join(workdir, f"out-{name}-full"))

    def save(root: str) -> str:
        return save_checkpoint(os.path.join(workdir, root), trainer.step, trainer.model, trainer.optimizer,
                               trainer.scheduler, plugin_state(trainer))

    records = _run_steps(trainer, SAVE_AT)
    save(f"ckpt-{name}")
    records += _run_steps(trainer, STEPS)
    save(f"final-{name}")
    trainer.logger.close()
    return dict(records=records, layout=_layout())


def resume_case(workdir: str, name: str) -> dict:
    """The resumed job at the new layout, from the original layout's step-SAVE_AT checkpoint."""
    from megatron_moe_lossfree.training.checkpoint import checkpoint_dir

    _, (new, _) = LAYOUT_CHANGES[name]
    trainer = _setup([*FLAGS, *new, "--load", os.path.join(workdir, f"ckpt-{name}")],
                     os.path.join(workdir, f"out-{name}-resumed"))
    start = dict(step=trainer.step, tokens_seen=trainer.balancer.tokens_seen, steps=trainer.balancer.steps)
    records = _run_steps(trainer, STEPS)
    diff = _diff_against_checkpoint(trainer, checkpoint_dir(os.path.join(workdir, f"final-{name}"), STEPS))
    trainer.logger.close()
    return dict(records=records, start=start, diff=diff, layout=_layout())
