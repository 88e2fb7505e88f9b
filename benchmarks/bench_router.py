"""Router forward+backward: LossFreeRouter vs Megatron-Core's TopKRouter with its built-in expert bias.

    python benchmarks/bench_router.py [--quick]

Same shapes for both: T tokens x hidden 256 (fp32 on CPU; bf16 on a GPU), E experts, top-K, sigmoid
scores, a bias. The two routers alternate call by call; prints median (min-max) ms and the ratio ours / Megatron
(median over rounds of the within-round ratio; target <= 1.05).
"""

from __future__ import annotations

import argparse
import sys

import torch

from common import fmt, interleaved, machine, megatron_world, paired_ratio, print_table

HIDDEN = 256


def build(router_cls_name: str, num_experts: int, topk: int, dtype):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_moe_lossfree.megatron.router import LossFreeRouter
    from megatron_moe_lossfree.megatron.transformer_config import LossFreeTransformerConfig

    megatron_builtin = router_cls_name == "megatron"
    config = LossFreeTransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, num_moe_experts=num_experts, moe_router_topk=topk,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=megatron_builtin,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_router_dtype="fp32",
        add_bias_linear=False, use_cpu_initialization=True)
    cls = TopKRouter if megatron_builtin else LossFreeRouter
    router = cls(config=config, pg_collection=get_default_pg_collection())
    router.set_layer_number(1)
    return router.to(dtype)


def step_fn(router, x):
    def run():
        probs, _ = router(x)[:2]
        probs.sum().backward()
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="T=4k, E in {16,64}, K=2 only")
    a = p.parse_args(argv)
    megatron_world()
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    shapes = [(t, e, k) for t in (4096, 16384) for e in (16, 64, 256) for k in (2, 6, 8)]
    if a.quick:
        shapes = [(4096, e, 2) for e in (16, 64)]
    rows = []
    for tokens, experts, topk in shapes:
        torch.manual_seed(0)
        x = torch.randn(tokens, 1, HIDDEN, dtype=dtype, requires_grad=True)
        routers = {name: build(name, experts, topk, dtype) for name in ("megatron", "lossfree")}
        routers["lossfree"].load_state_dict(routers["megatron"].state_dict(), strict=False)
        stats = interleaved({n: step_fn(r, x) for n, r in routers.items()}, warmup=3,
                            repeat=11 if tokens > 4096 else 21)
        ratio = paired_ratio(stats, "lossfree", "megatron")
        best = stats["lossfree"]["min"] / stats["megatron"]["min"]
        rows.append([tokens, experts, topk, fmt(stats["megatron"]), fmt(stats["lossfree"]), f"{ratio:.3f}",
                     f"{best:.3f}"])
    print_table(f"Router fwd+bwd, ms, {machine()}", ["T", "E", "K", "Megatron TopKRouter+bias", "LossFreeRouter",
                                                    "ratio (paired)", "ratio of minima"], rows)
    print("(paired: median over rounds of the ratio within each round; the two routers alternate)")
    for column, label in ((-2, "paired ratio"), (-1, "ratio of minima")):
        ratios = sorted(float(r[column]) for r in rows)
        print(f"router {label}: median over shapes {ratios[len(ratios) // 2]:.3f}, max {ratios[-1]:.3f} "
              f"(target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
