"""Quantile balancing: the plugin's quantile rule against Megatron-Core 0.19's own QB, and exact vs histogram.

    .venv-mcore019/bin/python benchmarks/bench_quantile.py [--quick]      # megatron-core >= 0.19 for part 1

1. Router forward+backward plus the per-step update, one micro-batch per step: Megatron-Core's TopKRouter with
   ``moe_router_load_balancing_type="quantile_balancing"`` and its ``_update_router_qb_beta`` against
   LossFreeRouter with ``--lossfree-update-rule quantile`` (exact estimator on logits, the mapping of
   Megatron's flag) and its BiasBalancer step. T tokens x hidden 256, E experts, K = 8 (T*K % E == 0, as
   Megatron asserts), sigmoid. The two alternate call by call; the ratio is ours / Megatron's (median over
   rounds of the within-round ratio; target <= 1.0). Skipped with a message on megatron-core < 0.19.
2. Exact against histogram estimator (1000 bins), both the plugin's, as T grows to 64k tokens (E 64, K 8):
   the exact estimator sorts a [T, E] column set per micro-batch (top-(T*K/E + 1) along tokens), the
   histogram one scatters [T, E] entries into [E, bins] counts and solves once per step.
"""

from __future__ import annotations

import argparse
import sys

import torch

from common import fmt, interleaved, machine, megatron_world, paired_ratio, print_table

HIDDEN = 256
TOPK = 8


def megatron_has_qb() -> bool:
    from megatron_moe_lossfree.megatron.compat import megatron_core_version

    return megatron_core_version().release >= (0, 19)


def fields(num_experts: int, **extra) -> dict:
    return dict(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, num_moe_experts=num_experts,
                moe_router_topk=TOPK, moe_router_score_function="sigmoid", moe_router_dtype="fp32",
                add_bias_linear=False, use_cpu_initialization=True, **extra)


def megatron_qb(num_experts: int):
    """Megatron's router and its per-step update, as one callable per step."""
    from megatron.core.distributed.finalize_model_grads import _update_router_qb_beta
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(**fields(num_experts, moe_router_load_balancing_type="quantile_balancing"))
    router = TopKRouter(config=config, pg_collection=get_default_pg_collection())
    router.set_layer_number(1)

    def update():
        _update_router_qb_beta([router], config)
        router.qb_beta_accum.zero_()
        router.qb_beta_count.zero_()

    return router, update


def plugin_qb(num_experts: int, estimator: str = "exact"):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_moe_lossfree.config import LossFreeConfig
    from megatron_moe_lossfree.megatron.balancer import BiasBalancer
    from megatron_moe_lossfree.megatron.router import LossFreeRouter
    from megatron_moe_lossfree.megatron.transformer_config import LossFreeTransformerConfig

    lossfree = LossFreeConfig(update_rule="quantile", quantile_estimator=estimator)
    config = LossFreeTransformerConfig(**fields(num_experts, moe_router_load_balancing_type="none",
                                                moe_aux_loss_coeff=0.0), lossfree=lossfree)
    router = LossFreeRouter(config=config, pg_collection=get_default_pg_collection())
    router.set_layer_number(1)
    balancer = BiasBalancer(torch.nn.ModuleList([router]), router.lossfree, topk=TOPK)
    return router, balancer.step


def step_fn(router, update, x):
    def run():
        probs, _ = router(x)[:2]
        probs.sum().backward()
        update()
    return run


def versus_megatron(quick: bool) -> list[list]:
    shapes = [(t, e) for t in ((4096,) if quick else (4096, 16384)) for e in (16, 64, 256)]
    rows = []
    for tokens, experts in shapes:
        torch.manual_seed(0)
        x = torch.randn(tokens, 1, HIDDEN, requires_grad=True)
        megatron, megatron_update = megatron_qb(experts)
        ours, our_update = plugin_qb(experts)
        ours.weight.data.copy_(megatron.weight.data)
        stats = interleaved({"megatron": step_fn(megatron, megatron_update, x),
                             "lossfree": step_fn(ours, our_update, x)}, warmup=3,
                            repeat=7 if tokens > 4096 else 15)
        assert torch.equal(ours.expert_bias, -megatron.qb_beta), "the two rules diverged"
        rows.append([tokens, experts, TOPK, fmt(stats["megatron"]), fmt(stats["lossfree"]),
                     f"{paired_ratio(stats, 'lossfree', 'megatron'):.3f}"])
    return rows


def exact_vs_histogram(quick: bool) -> list[list]:
    rows = []
    for tokens in ((4096, 16384) if quick else (4096, 16384, 65536)):
        torch.manual_seed(0)
        x = torch.randn(tokens, 1, HIDDEN, requires_grad=True)
        exact, exact_update = plugin_qb(64, "exact")
        histogram, histogram_update = plugin_qb(64, "histogram")
        histogram.weight.data.copy_(exact.weight.data)
        stats = interleaved({"exact": step_fn(exact, exact_update, x),
                             "histogram": step_fn(histogram, histogram_update, x)}, warmup=2,
                            repeat=5 if tokens > 16384 else 9)
        rows.append([tokens, 64, TOPK, fmt(stats["exact"]), fmt(stats["histogram"]),
                     f"{paired_ratio(stats, 'histogram', 'exact'):.3f}"])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    a = p.parse_args(argv)
    megatron_world()
    if megatron_has_qb():
        rows = versus_megatron(a.quick)
        print_table(f"Quantile balancing: router fwd+bwd + per-step update, ms, {machine()}",
                    ["T", "E", "K", "Megatron TopKRouter QB", "LossFreeRouter quantile (exact)", "ratio (paired)"],
                    rows)
        ratios = sorted(float(r[-1]) for r in rows)
        print(f"quantile vs Megatron QB: median over shapes {ratios[len(ratios) // 2]:.3f}, max {ratios[-1]:.3f} "
              f"(target <= 1.0)\n")
    else:
        print("Megatron-Core < 0.19 has no quantile balancing: part 1 runs in lane 2 "
              "(.venv-mcore019/bin/python benchmarks/bench_quantile.py)\n")
    print_table(f"Quantile estimators, plugin router fwd+bwd + per-step update, ms, {machine()}",
                ["T", "E", "K", "exact", "histogram (1000 bins)", "histogram / exact"], exact_vs_histogram(a.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
