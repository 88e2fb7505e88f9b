"""Per-step balance metrics for the log: computed from the balancer's already-reduced counts (free)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_moe_lossfree import metrics


def step_metrics(trainer) -> dict:
    """MaxVio_batch (mean and per layer) and bias statistics of the step that just ended.

    Each pipeline stage holds its own layers; one small all-reduce over the PP group assembles all
    layers on every stage (only on logging steps).
    """
    from megatron.core import parallel_state as ps

    balancer = trainer.balancer
    if balancer is None or not balancer.last_counts:
        return {}
    num_layers = trainer.config.num_layers
    values = torch.zeros(3, num_layers, dtype=torch.float64)  # maxvio, bias max |b|, present
    for router, counts_E in zip(balancer.routers, balancer.last_counts):
        i = router.layer_number - 1
        values[0, i] = metrics.max_violation(counts_E)
        if router.expert_bias is not None:
            values[1, i] = float(router.expert_bias.abs().max())
        values[2, i] = 1.0
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(values, group=ps.get_pipeline_model_parallel_group())
    present = values[2] > 0
    per_layer = values[0][present].tolist()
    return {
        "maxvio_batch": sum(per_layer) / len(per_layer),
        "maxvio_batch_layers": per_layer,
        "bias_absmax_layers": values[1][present].tolist(),
    }
