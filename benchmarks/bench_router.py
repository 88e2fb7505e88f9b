"""Router forward+backward: LossFreeRouter (unfused, and fused: ``--moe-router-fusion``, the plugin's Triton
kernels) vs Megatron-Core's TopKRouter with its built-in expert bias (unfused, and TE's fused router where
Transformer Engine is installed), all in one run, paired.

    python benchmarks/bench_router.py [--quick] [--megatron-fusion]

The fused plugin router runs only on a CUDA GPU: on a CPU the Triton interpreter proves correctness only
(tests/unit/test_fused_router.py), so no CPU figure is printed for it. Targets on a GPU: fused fwd+bwd
<= 0.4x Megatron's unfused router and <= 1.0x TE's fused router (median over shapes).

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
    """``router_cls_name``: "megatron" (TopKRouter; ``fusion``: moe_router_fusion, TE's kernel),
    "megatron-te" (TopKRouter with moe_router_fusion), "lossfree" or "lossfree-fused" (LossFreeRouter,
    without or with moe_router_fusion: the plugin's Triton kernels)."""
    if router_cls_name == "megatron-te":
        router_cls_name, fusion = "megatron", True
    plugin_fusion = router_cls_name == "lossfree-fused"
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
        router = LossFreeRouter(config=LossFreeTransformerConfig(**fields, moe_router_fusion=plugin_fusion),
                                pg_collection=get_default_pg_collection())
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


def fused_problem() -> str | None:
    """Why the plugin's fused router is not timed here, or None."""
    from megatron_moe_lossfree import kernels

    if not torch.cuda.is_available():
        return "no CUDA device (the Triton interpreter proves correctness only: no CPU figure)"
    return kernels.unavailable_reason(device_is_cuda=True)


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
    shapes += [(t, 512, 10) for t in (4096, 16384)]
    if a.quick:
        shapes = [(4096, e, 2) for e in (16, 64)]
    names = ["megatron", "lossfree"]
    fused_why = fused_problem()
    if fused_why is None:
        names.append("lossfree-fused")
    else:
        print(f"LossFreeRouter --moe-router-fusion not timed: {fused_why}")
    if not a.megatron_fusion and fusion_problem() is None:
        names.append("megatron-te")  # TE's fused router beside Megatron's unfused one
    rows, fused_rows = [], []
    for tokens, experts, topk in shapes:
        torch.manual_seed(0)
        x = torch.randn(tokens, 1, HIDDEN, dtype=dtype, device=device, requires_grad=True)
        routers = {name: build(name, experts, topk, dtype, device, fusion=a.megatron_fusion) for name in names}
        for name in names[1:]:
            routers[name].load_state_dict(routers["megatron"].state_dict(), strict=False)
        stats = interleaved({n: step_fn(r, x) for n, r in routers.items()}, warmup=3,
                            repeat=11 if tokens > 4096 else 21)
        ratio = paired_ratio(stats, "lossfree", "megatron")
        best = stats["lossfree"]["min"] / stats["megatron"]["min"]
        rows.append([tokens, experts, topk, fmt(stats["megatron"]), fmt(stats["lossfree"]), f"{ratio:.3f}",
                     f"{best:.3f}"])
        if "lossfree-fused" in stats:
            te = stats.get("megatron-te")
            fused_rows.append([tokens, experts, topk, fmt(stats["lossfree-fused"]),
                               f"{paired_ratio(stats, 'lossfree-fused', 'megatron'):.3f}",
                               fmt(te) if te else "-",
                               f"{paired_ratio(stats, 'lossfree-fused', 'megatron-te'):.3f}" if te else "-"])
    megatron = "Megatron TopKRouter+bias" + (", moe_router_fusion" if a.megatron_fusion else "")
    print_table(f"Router fwd+bwd, ms, {machine()}", ["T", "E", "K", megatron, "LossFreeRouter",
                                                    "ratio (paired)", "ratio of minima"], rows)
    print("(paired: median over rounds of the ratio within each round; the routers alternate)")
    for column, label in ((-2, "paired ratio"), (-1, "ratio of minima")):
        ratios = sorted(float(r[column]) for r in rows)
        print(f"router {label}: median over shapes {ratios[len(ratios) // 2]:.3f}, max {ratios[-1]:.3f} "
              f"(target <= 1.05)")
    if fused_rows:
        print_table(f"Fused router fwd+bwd, ms, {machine()}",
                    ["T", "E", "K", "LossFreeRouter fused", f"/ {megatron}", "TE fused (Megatron)", "/ TE fused"],
                    fused_rows)
        for column, label, target in ((4, "fused / megatron", 0.4), (6, "fused / TE fused", 1.0)):
            ratios = sorted(float(r[column]) for r in fused_rows if r[column] != "-")
            if ratios:
                print(f"router {label}: median over shapes {ratios[len(ratios) // 2]:.3f}, max {ratios[-1]:.3f} "
                      f"(target <= {target})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
