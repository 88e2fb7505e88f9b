"""Per-rank case functions of the layout-equivalence tests (run by ``harness.launch_cases``).

Recipe (the oracle is one process on the same global batch from the same initial weights):
1. ``reference_case`` (1 rank): build the tiny model, save it at step 0, then -- like every layout --
   load those step-0 weights, train ``STEPS`` optimizer steps and save the result at step ``STEPS``.
2. ``layout_case`` (N ranks): load the step-0 weights under the layout (dist_checkpointing reshards),
   train ``STEPS`` steps on the same global batches (``iterate_micro_batches`` gives each DP rank its
   contiguous share), then load the reference's final checkpoint into this layout's shards and report
   the per-tensor max |difference| of every local parameter and buffer (expert_bias included), the
   losses and the all-reduced expert counts of every step.
Results are plain dicts (picklable); the tests compare them with stated tolerances.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

STEPS = 2
# Adam's eps for these runs (Megatron's default is 1e-8). Adam's first update is lr * g / (|g| + eps):
# for the few elements whose gradient is a cancellation residue (|g| ~ 1e-9 where typical |g| ~ 3e-3),
# fp32 summation order alone moves that update by up to ~0.1 lr. Measured with eps 1e-8: one process
# with micro-batch 1 vs 2 differs by 8.5e-5 on 2 of 829,528 weights (the TP2 layout by 9.4e-5, on the
# same tensor). With eps 1e-6 the update is Lipschitz in g (lr / eps = 1e3), rounding stays ~1e-6,
# and a real layout bug (a wrong shard or reduction) still moves thousands of weights by ~lr.
ADAM_EPS = 1e-6

# A tiny GPT-MoE: layer 1 dense, layers 2-4 MoE (8 experts, top-2, a shared expert), fp32.
# --clip-grad 1.0 keeps Megatron's distributed grad-norm (TP/PP/EP-aware) in the comparison.
TINY_MODEL = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "128",
    "--moe-ffn-hidden-size", "64", "--num-experts", "8", "--moe-router-topk", "2",
    "--moe-shared-expert-intermediate-size", "64", "--moe-first-dense-layers", "1",
    "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8", "--vocab-size", "4096",
    "--lr", "1e-3", "--clip-grad", "1.0", "--train-iters", str(STEPS), "--eval-iters", "0",
    "--log-interval", "1", "--no-progress", "--lossfree-update-rate", "1e-2",
]


def _parse(flags: Sequence[str], out: str):
    from megatron_moe_lossfree.training.arguments import parse_args

    return parse_args([*TINY_MODEL, *flags, "--out", out])


def _routers_by_layer(trainer) -> dict:
    return {r.layer_number: r for r in trainer.balancer.routers}


def _train(trainer) -> dict:
    """``STEPS`` optimizer steps; losses (None off the last stage) and each step's global counts."""
    from megatron_moe_lossfree.training.metrics_log import step_metrics

    losses, counts, maxvio = [], [], []
    for _ in range(STEPS):
        losses.append(trainer.train_step())
        counts.append({r.layer_number: c.tolist() for r, c in zip(trainer.balancer.routers,
                                                                    trainer.balancer.last_counts)})
        logged = step_metrics(trainer)  # the training log's own path (PP assembly included)
        maxvio.append((logged["maxvio_batch"], logged["maxvio_batch_layers"]))
    biases = {n: r.expert_bias.tolist() for n, r in _routers_by_layer(trainer).items()}
    return {"losses": losses, "counts": counts, "expert_bias": biases, "maxvio_batch": maxvio}


def _diff_against_checkpoint(trainer, path: str) -> dict:
    """Max |this rank's tensor - the checkpoint's matching shard| for every local state-dict tensor."""
    from megatron.core import dist_checkpointing

    from megatron_moe_lossfree.training.checkpoint import sharded_metadata, unwrap

    module = unwrap(trainer.model)
    mine = {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    loaded = dist_checkpointing.load({"model": module.sharded_state_dict(metadata=sharded_metadata())}, path)["model"]
    diffs = {}
    for key, value in mine.items():
        other = loaded[key]
        if other.shape != value.shape:
            raise AssertionError(f"{key}: checkpoint shard {tuple(other.shape)} vs local {tuple(value.shape)}")
        diffs[key] = float((value.double() - other.double()).abs().max()) if value.numel() else 0.0
    return diffs


def _setup(flags: Sequence[str], out: str):
    from megatron_moe_lossfree.training.pretrain import setup

    args = _parse(flags, out)
    trainer = setup(args)
    for part in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        for group in part.optimizer.param_groups:
            group["eps"] = ADAM_EPS
    return trainer


def warm_up() -> None:
    """Start-up work of every rank (timed apart from the cases): CPU runtime and the heavy imports."""
    from megatron_moe_lossfree.megatron import cpu_runtime

    cpu_runtime.activate()
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.models.gpt.gpt_model  # noqa: F401
    import megatron.core.optimizer  # noqa: F401

    import megatron_moe_lossfree.training.pretrain  # noqa: F401


def _load_weights(trainer, path: str) -> None:
    """Model weights only (buffers such as expert_bias included) from ``path``, resharded to this layout.

    The optimizer stays fresh on both sides: Megatron 0.16 cannot round-trip Adam's state at step 0
    (``FP32Optimizer.sharded_state_dict`` keeps the shared step only ``if step:``, and 0 is falsy).
    """
    from megatron.core import dist_checkpointing

    from megatron_moe_lossfree.training.checkpoint import sharded_metadata, unwrap

    module = unwrap(trainer.model)
    state = dist_checkpointing.load({"model": module.sharded_state_dict(metadata=sharded_metadata())}, path)["model"]
    module.load_state_dict(state, strict=True)


def reference_case(workdir: str, variant: Sequence[str] = ()) -> dict:
    """One process: step-0 checkpoint of fresh weights, then the reference run from it."""
    from megatron.core import parallel_state as ps

    from megatron_moe_lossfree.training.checkpoint import checkpoint_dir, save_checkpoint
    from megatron_moe_lossfree.training.pretrain import plugin_state

    init = _setup(list(variant), os.path.join(workdir, "out-init"))
    save_checkpoint(os.path.join(workdir, "init"), 0, init.model, init.optimizer, init.scheduler,
                    plugin_state(init))
    init.logger.close()
    ps.destroy_model_parallel()

    trainer = _setup(list(variant), os.path.join(workdir, "out-reference"))
    _load_weights(trainer, checkpoint_dir(os.path.join(workdir, "init"), 0))
    result = _train(trainer)
    final = save_checkpoint(os.path.join(workdir, "reference"), STEPS, trainer.model, trainer.optimizer,
                            trainer.scheduler, plugin_state(trainer))
    assert final == checkpoint_dir(os.path.join(workdir, "reference"), STEPS)
    # The comparison mechanism itself: the reference against its own checkpoint differs by exactly 0.
    result["self_diff"] = _diff_against_checkpoint(trainer, final)
    trainer.logger.close()
    return result


def layout_case(workdir: str, name: str, flags: Sequence[str], variant: Sequence[str] = ()) -> dict:
    """This layout from the reference's step-0 weights; its diffs to the reference's final weights."""
    from megatron.core import parallel_state as ps

    from megatron_moe_lossfree.training.checkpoint import checkpoint_dir

    trainer = _setup([*variant, *flags], os.path.join(workdir, f"out-{name}"))
    _load_weights(trainer, checkpoint_dir(os.path.join(workdir, "init"), 0))
    result = _train(trainer)
    result["diff"] = _diff_against_checkpoint(trainer, checkpoint_dir(os.path.join(workdir, "reference"), STEPS))
    result["layout"] = dict(tp=ps.get_tensor_model_parallel_world_size(),
                            pp=ps.get_pipeline_model_parallel_world_size(),
                            ep=ps.get_expert_model_parallel_world_size(),
                            etp=ps.get_expert_tensor_parallel_world_size(),
                            dp=ps.get_data_parallel_world_size())
    trainer.logger.close()
    return result


def last_stage_losses(per_rank: list) -> Optional[list]:
    """The losses every last-pipeline-stage rank reported (they must agree); None if none did."""
    reported = [r["losses"] for r in per_rank if r["losses"][0] is not None]
    if not reported:
        return None
    for other in reported[1:]:
        assert other == reported[0], f"last-stage ranks disagree on the loss: {reported}"
    return reported[0]


def variant_launcher(root: str, variants: dict, cases: Sequence[tuple], by_name: dict, record, label: str):
    """For the rule-variant layout tests (quantile, 2025-2026 balancers): ``launch(world)`` runs, once, the
    1-rank references of every variant (``reference-<v>``) or the ``<v>-<layout>`` cases of that world size
    (after the references, whose step-0 and final checkpoints they read), and returns their results."""
    from tests.distributed import harness
    from tests.distributed.harness import Case
    from tests.distributed.test_layouts import layout_flags

    results = {}

    def launch(world: int) -> dict:
        if world not in results:
            if world == 1:
                todo = [Case(f"reference-{v}", reference_case, dict(workdir=f"{root}/{v}", variant=variants[v]))
                        for v in variants]
            else:
                launch(1)
                todo = [Case(f"{v}-{n}", layout_case, dict(workdir=f"{root}/{v}", name=n,
                                                            flags=layout_flags(*by_name[n][2:]), variant=variants[v]))
                        for v, n in cases if by_name[n][1] == world]
            run = harness.launch_cases(todo, world, timeout_s=480, workdir=f"{root}/launch-{world}", warm_up=warm_up)
            record(f"{label}, {world} rank(s), in all", run.total_seconds)
            results[world] = run.results
        return results[world]

    return launch
