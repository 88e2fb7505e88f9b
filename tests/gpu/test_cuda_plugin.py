"""GPU-only, no Transformer Engine needed: the plugin's router and bias update on CUDA give the exact answer.

Run on a GPU machine: ``pytest -m gpu tests/gpu`` (``make gpu-check`` does). Megatron's router always gates on
the GPU when there is one (it moves a host-initialised weight there), so the reference is a float64 per-token
computation on the host from the router's own weight and bias: selection by score + bias (LFB eq. 3), the
counts, and the sign update b += u * sign(mean - count) (LFB eq. 4).
"""

import pytest
import torch

from megatron_moe_lossfree.config import LossFreeConfig

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

H, E, K = 64, 16, 4


def _router(lossfree: LossFreeConfig):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_moe_lossfree.megatron.router import LossFreeRouter
    from megatron_moe_lossfree.megatron.transformer_config import LossFreeTransformerConfig

    config = LossFreeTransformerConfig(
        lossfree=lossfree, num_layers=1, hidden_size=H, num_attention_heads=4, num_moe_experts=E,
        moe_router_topk=K, moe_ffn_hidden_size=32, ffn_hidden_size=32, moe_router_score_function="sigmoid",
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, add_bias_linear=False,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm",
        moe_router_dtype="fp32")
    router = LossFreeRouter(config=config, pg_collection=get_default_pg_collection())
    router.set_layer_number(1)
    return router


def _reference(x_TH, weight_EH, bias_E):
    """float64 on the host: the selected experts' map and the unbiased, normalised gates."""
    scores_TE = torch.sigmoid(x_TH.double() @ weight_EH.double().t())
    experts_TK = (scores_TE + bias_E.double()).topk(K, dim=-1).indices
    map_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter_(1, experts_TK, True)
    gates_TE = torch.where(map_TE, scores_TE, 0.0)
    return map_TE, gates_TE / gates_TE.sum(-1, keepdim=True)


@pytest.mark.gpu
@needs_cuda
def test_router_and_sign_update_on_cuda_are_exact(megatron_world):
    from megatron_moe_lossfree.megatron.balancer import BiasBalancer

    u = 1e-3
    router = _router(LossFreeConfig(update_rule="sign", update_rate=u)).cuda()
    assert router.expert_bias.is_cuda and router.local_tokens_per_expert.is_cuda
    balancer = BiasBalancer([router], LossFreeConfig(update_rule="sign", update_rate=u), group=None, topk=K)
    bias_E = torch.zeros(E, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        x = torch.randn(32, 4, H, generator=generator)
        probs_TE, map_TE = router(x.cuda().requires_grad_())[:2]
        want_map, want_probs = _reference(x.view(-1, H), router.weight.detach().cpu(), bias_E)
        assert torch.equal(map_TE.cpu(), want_map)
        torch.testing.assert_close(probs_TE.double().cpu(), want_probs, rtol=1e-5, atol=1e-6)
        counts_E = want_map.sum(0)
        assert torch.equal(router.local_tokens_per_expert.cpu(), counts_E)
        balancer([torch.nn.ModuleList([router])], None)
        bias_E = bias_E + u * torch.sign(counts_E.sum() / E - counts_E).float()
        assert torch.equal(router.expert_bias.cpu(), bias_E)  # +-u steps: bit-identical
    assert router.expert_bias.is_cuda and router.expert_bias.dtype == torch.float32
    assert float(bias_E.abs().sum()) > 0


@pytest.mark.gpu
@needs_cuda
def test_bf16_model_keeps_fp32_bias_and_quantile_sums_on_the_gpu(megatron_world):
    """Float16Module's cast on the GPU: the bias and the quantile rule's solution sums stay fp32 there."""
    router = _router(LossFreeConfig(update_rule="quantile")).cuda().bfloat16()
    for name in ("expert_bias", "qb_solution_sum"):
        buffer = getattr(router, name)
        assert buffer.is_cuda and buffer.dtype == torch.float32, name
    probs_TE, map_TE = router(torch.randn(8, 2, H, device="cuda", dtype=torch.bfloat16, requires_grad=True))[:2]
    assert int(map_TE.sum()) == 16 * K and int(router.local_tokens_per_expert.sum()) == 16 * K


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("padded", [False, True])
def test_router_forward_backward_never_waits_for_the_host(megatron_world, padded):
    """No host synchronisation in a counting forward + backward (bincount and boolean indexing would add
    one per router call, stalling the launch queue of every MoE layer)."""
    router = _router(LossFreeConfig(update_rule="sign")).cuda()
    x = torch.randn(64, 2, H, device="cuda", requires_grad=True)
    pad = torch.zeros(64, 2, dtype=torch.bool, device="cuda")
    pad[-5:] = True
    kwargs = {"padding_mask": pad} if padded else {}
    router(x, **kwargs)[0].sum().backward()  # first call: allocations, Megatron's lazy weight move
    torch.cuda.synchronize()
    router.local_tokens_per_expert.zero_()
    torch.cuda.set_sync_debug_mode("error")
    try:
        probs_TE = router(x, **kwargs)[0]
        probs_TE.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(router.local_tokens_per_expert.sum()) == (128 - (10 if padded else 0)) * K


@pytest.mark.gpu
@needs_cuda
def test_dropping_masks_on_cuda_equal_the_host_and_never_wait_for_it():
    """The plugin's part of a dropping layer (reading the selected experts, the expert- and device-level
    keep masks, the drop counter) gives the host's masks bit for bit on the GPU, with no host sync: value
    checks run on host tensors only. (Megatron's dropping dispatcher itself syncs once per layer to size
    its permutation; that one is Megatron's.)"""
    from types import SimpleNamespace

    from megatron_moe_lossfree import dropping
    from megatron_moe_lossfree.megatron.moe_layer import LossFreeMoELayer, selected_experts

    generator = torch.Generator().manual_seed(0)
    scores_TE = torch.rand(256, E, generator=generator)
    scores_TE[:, :3] += 0.5  # three popular experts, so both masks drop
    experts_TK = scores_TE.topk(K, dim=-1).indices
    map_TE = torch.zeros(256, E, dtype=torch.bool).scatter_(1, experts_TK, True)
    gates_TE = torch.where(map_TE, scores_TE, 0.0)
    exempt_T = torch.rand(256, generator=generator) < 0.1

    def masks(map_TE, gates_TE, exempt_T):
        experts = selected_experts(map_TE, K)
        gates = gates_TE.gather(1, experts)
        return [experts,
                dropping.expert_keep_mask(gates, experts, num_experts=E, capacity_factor=1.0),
                dropping.expert_keep_mask(gates, experts, num_experts=E, capacity_factor=1.0, policy="position"),
                dropping.device_keep_mask(gates, experts, num_devices=4, capacity_factor=1.0, exempt=exempt_T,
                                          num_experts=E)]

    want = masks(map_TE, gates_TE, exempt_T)
    assert 0 < int((~want[1]).sum()) and 0 < int((~want[3]).sum())
    on_gpu = [t.cuda() for t in (map_TE, gates_TE, exempt_T)]
    masks(*on_gpu)  # first call: allocations
    counters = SimpleNamespace(local_assigned=torch.zeros((), dtype=torch.int64, device="cuda"),
                               local_dropped=torch.zeros((), dtype=torch.int64, device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = masks(*on_gpu)
        LossFreeMoELayer.count_drops(counters, got[3])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for name, g, w in zip(("experts", "expert mask", "expert mask, position", "device mask"), got, want):
        assert torch.equal(g.cpu(), w), name
    assert int(counters.local_dropped) == int((~want[3]).sum()) and int(counters.local_assigned) == 256 * K
