"""Presets: plain dicts of argument defaults (Megatron names, ``lossfree_`` for the plugin's own).

An explicit flag always beats the preset. ``tiny-cpu`` is the laptop/CI "baby" model; ``paper-1b`` and
``paper-3b`` are the LFB paper's shapes and schedules (REFERENCE.md section 8) for GPU clusters.
"""

from __future__ import annotations

from megatron_moe_lossfree.errors import LossFreeConfigError

_PAPER_COMMON = dict(
    num_experts=64,                       # 64 routed experts
    moe_shared_expert_intermediate_size=2 * 512,  # + 2 shared experts (one fused MLP of 2x expert width)
    moe_router_topk=6,                    # K = 6
    moe_router_score_function="sigmoid",  # LFB: sigmoid gate (softmax is Table 6)
    moe_first_dense_layers=1,             # "first FFN dense"
    vocab_size=32064,
    seq_length=2048,
    init_method_std=0.006,
    lr_warmup_iters=1000,
    lossfree_update_rule="sign",
    lossfree_update_rate=1e-3,
    bf16=True,
)

PRESETS: dict[str, dict] = {
    # Demo/CI: 4 layers (first dense), 16 experts top-2 plus a shared expert; ~2-3 minutes on 2 cores.
    "tiny-cpu": dict(
        num_layers=4, hidden_size=128, num_attention_heads=4, ffn_hidden_size=512, moe_ffn_hidden_size=128,
        num_experts=16, moe_router_topk=2, moe_shared_expert_intermediate_size=128,
        moe_first_dense_layers=1, moe_router_score_function="sigmoid",
        seq_length=128, micro_batch_size=8, global_batch_size=16, train_iters=150, lr=2e-3, min_lr=2e-4,
        lr_warmup_iters=10, vocab_size=4096, eval_interval=50, eval_iters=4, log_interval=10,
        # u = 1e-2, not the paper's 1e-3: in 150 steps a 1e-3 sign update moves a bias by at most 0.15,
        # too little to undo the early router collapse (measured: MaxVio_batch 1.9 at step 150 with
        # 1e-3, 0.3-0.45 with 1e-2, same perplexity). LFB Fig. 4 sweeps 1e-2 too.
        lossfree_update_rule="sign", lossfree_update_rate=1e-2,
    ),
    # LFB 1B: hidden 1024, 8 heads, 9 layers (first FFN dense), seq 2048, batch 1152, 40k steps,
    # cosine 1e-3 -> 1e-4, warmup 1000. The expert width is not in REFERENCE.md; 512 is our choice.
    "paper-1b": dict(
        _PAPER_COMMON, num_layers=9, hidden_size=1024, num_attention_heads=8, ffn_hidden_size=4096,
        moe_ffn_hidden_size=512, global_batch_size=1152, micro_batch_size=4, train_iters=40000,
        lr=1e-3, min_lr=1e-4, lr_decay_style="cosine",
    ),
    # LFB 3B: hidden 1280, 10 heads, 11 layers, batch 1728, 56,514 steps, warmup 2000, multistep lr
    # [7.8e-4, 2.47e-4, 7.8e-5] at [45211, 50862] (approximated here by cosine 7.8e-4 -> 7.8e-5).
    "paper-3b": dict(
        _PAPER_COMMON, num_layers=11, hidden_size=1280, num_attention_heads=10, ffn_hidden_size=5120,
        moe_ffn_hidden_size=640, moe_shared_expert_intermediate_size=2 * 640, global_batch_size=1728,
        micro_batch_size=4, train_iters=56514, lr=7.8e-4, min_lr=7.8e-5, lr_warmup_iters=2000,
        lr_decay_style="cosine",
    ),
    # V2-style router: device-limited routing (M=3), device-level dropping cf 1.0 with 10% exempt,
    # expert/device/comm balance losses at V2's coefficients (REFERENCE 5-7).
    "v2-router": dict(
        lossfree_balancing="none", lossfree_route_limit="device", lossfree_route_max_groups=3,
        lossfree_drop="device", lossfree_capacity_factor=1.0, lossfree_exempt_fraction=0.1,
        lossfree_aux_loss_coeff=0.003, lossfree_device_loss_coeff=0.05, lossfree_comm_loss_coeff=0.02,
        moe_router_score_function="softmax",
    ),
    # V3-style router: sigmoid, bias balancing (sign, u=1e-3), node-limited (M=4 of 8 nodes),
    # sequence-wise loss alpha 1e-4, drop-free (REFERENCE 1, 4, 6).
    "v3-router": dict(
        lossfree_balancing="bias", lossfree_update_rule="sign", lossfree_update_rate=1e-3,
        lossfree_route_limit="node", lossfree_route_groups=8, lossfree_route_max_groups=4,
        lossfree_seq_aux_loss_coeff=1e-4, moe_router_score_function="sigmoid",
    ),
}


def preset_defaults(name: str) -> dict:
    if name not in PRESETS:
        raise LossFreeConfigError(f"--preset ({name}) is unknown: use one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])
