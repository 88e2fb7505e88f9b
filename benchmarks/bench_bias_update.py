"""Bias update for all layers: the plugin's BiasBalancer.step vs Megatron's _update_router_expert_bias.

    python benchmarks/bench_bias_update.py

L = 8 and 60 MoE layers, E = 64 experts (and 256), in a one-rank gloo group. Both do one all-reduce of
all layers' counts; the plugin then applies one vectorised rule. Ratio target <= 1.0.
"""

from __future__ import annotations

import sys

import torch

from common import fmt, interleaved, machine, megatron_world, paired_ratio, print_table


def main(argv=None) -> int:
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    from megatron_moe_lossfree.config import LossFreeConfig
    from megatron_moe_lossfree.megatron.balancer import BiasBalancer, count_reduction_group
    from bench_router import build

    megatron_world()
    rows = []
    for layers in (8, 60):
        for experts in (64, 256):
            theirs = torch.nn.ModuleList([build("megatron", experts, 8, torch.float32) for _ in range(layers)])
            ours = torch.nn.ModuleList([build("lossfree", experts, 8, torch.float32) for _ in range(layers)])
            config = theirs[0].config
            balancer = BiasBalancer([ours], LossFreeConfig(), group=count_reduction_group(False), topk=8)
            counts = torch.randint(0, 1000, (layers, experts))

            def megatron_update():
                for r, c in zip(theirs, counts):
                    r.local_tokens_per_expert.copy_(c)
                _update_router_expert_bias([theirs], config)

            def plugin_update():
                for r, c in zip(ours, counts):
                    r.local_tokens_per_expert.copy_(c)
                balancer.step()

            stats = interleaved({"megatron": megatron_update, "lossfree": plugin_update}, warmup=3, repeat=21)
            ratio = paired_ratio(stats, "lossfree", "megatron")
            rows.append([layers, experts, fmt(stats["megatron"]), fmt(stats["lossfree"]), f"{ratio:.3f}"])
    print_table(f"Bias update, all layers, ms (counts copy included for both), {machine()}",
                ["L", "E", "Megatron _update_router_expert_bias", "BiasBalancer.step", "ratio (paired)"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
