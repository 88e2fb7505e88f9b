"""Router forward+backward: LossFreeRouter vs Megatron-Core's TopKRouter with its built-in expert bias.

    python benchmarks/bench_router.py [--quick] [--megatron-fusion]

Same shapes for both: T tokens x hidden 256 (fp32 on CPU; bf16 on the GPU when there is one), E experts,
top-K, sigmoid scores, a bias. The two routers alternate call by call; prints median (min-max) ms and the
ratio ours / Megatron (median over rounds of the within-round ratio; target <= 1.05). On a GPU every call
ends with a device synchronize, so the times are kernel times, not launch times.

``--megatron-fusion`` gives Megatron's router ``moe_router_fusion=True`` (Transformer Engine's fused top-k
with score function and expert bias; needs CUDA and TE): the comparison is then against Megatron's fastest
router path. The plugin's router is built as a user's config builds it, without the flag.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import torch

from common import fmt, interleaved, machine, megatron_world, paired_ratio, print_table

HIDDEN = 256


def build(router_cls_name: str, num_experts: int, topk: int, dtype, device="cpu", fusion: bool = False):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_moe_lossfree.megatron.router import LossFreeRouter
    from megatron_moe_lossfree.megatron.transformer_config import LossFreeTransformerConfig

    megatron_builtin = router_cls_name == "megatron"
    fields = dict(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, num_moe_experts=num_experts, moe_router_topk=topk,
        moe_router_score_function="sigmoid", moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32", add_bias_linear=False, use_cpu_initialization=True)
    if megatron_builtin:  # Megatron's own config class: the plugin's checks do not apply to Megatron's router
        config = TransformerConfig(**fields, moe_router_enable_expert_bias=True, moe_router_fusion=fusion)
        router = TopKRouter(config=config, pg_collection=get_default_pg_collection())
    else:
        router = LossFreeRouter(config=LossFreeTransformerConfig(**fields), pg_collection=get_default_pg_collection())
    router.set_layer_number(1)
    return router.to(device=device, dtype=dtype)


def step_fn(router, x):
    def run():
        probs, _ = router(x)[:2]
        probs.sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
    return run


def fusion_problem() -> str | None:
    """Why ``--megatron-fusion`` cannot run here, or None."""
    if not torch.cuda.is_available():
        return "--megatron-fusion needs a CUDA GPU (moe_router_fusion runs Transformer Engine's CUDA kernel)"
    if importlib.util.find_spec("transformer_engine") is None:
        return ("--megatron-fusion needs Transformer Engine (moe_router_fusion is its fused top-k): "
                "pip install 'megatron_moe_lossfree[te]'")
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="T=4k, E in {16,64}, K=2 only")
    p.add_argument("--megatron-fusion", action="store_true",
                   help="Megatron's router with moe_router_fusion=True (TE's fused top-k; needs CUDA and TE)")
    a = p.parse_args(argv)
    if a.megatron_fusion and fusion_problem():
        print(f"error: {fusion_problem()}", file=sys.stderr)
        return 2
    megatron_world()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = [(t, e, k) for t in (4096, 16384) for e in (16, 64, 256) for k in (2, 6, 8)]
    if a.quick:
        shapes = [(4096, e, 2) for e in (16, 64)]
    rows = []
    for tokens, experts, topk in shapes:
        torch.manual_seed(0)
        x = torch.randn(tokens, 1, HIDDEN, dtype=dtype, device=device, requires_grad=True)
        routers = {name: build(name, experts, topk, dtype, device, fusion=a.megatron_fusion)
                   for name in ("megatron", "lossfree")}
        routers["lossfree"].load_state_dict(routers["megatron"].state_dict(), strict=False)
        stats = interleaved({n: step_fn(r, x) for n, r in routers.items()}, warmup=3,
                            repeat=11 if tokens > 4096 else 21)
        ratio = paired_ratio(stats, "lossfree", "megatron")
        best = stats["lossfree"]["min"] / stats["megatron"]["min"]
        rows.append([tokens, experts, topk, fmt(stats["megatron"]), fmt(stats["lossfree"]), f"{ratio:.3f}",
                     f"{best:.3f}"])
    megatron = "Megatron TopKRouter+bias" + (", moe_router_fusion" if a.megatron_fusion else "")
    print_table(f"Router fwd+bwd, ms, {machine()}", ["T", "E", "K", megatron, "LossFreeRouter",
                                                    "ratio (paired)", "ratio of minima"], rows)
    print("(paired: median over rounds of the ratio within each round; the two routers alternate)")
    for column, label in ((-2, "paired ratio"), (-1, "ratio of minima")):
        ratios = sorted(float(r[column]) for r in rows)
        print(f"router {label}: median over shapes {ratios[len(ratios) // 2]:.3f}, max {ratios[-1]:.3f} "
              f"(target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
