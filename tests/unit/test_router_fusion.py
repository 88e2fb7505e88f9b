"""``--moe-router-fusion`` in the plugin's router equals the unfused router (one gloo rank, CPU, Triton's
interpreter): the same routing map, counts and quantile statistics bit for bit; probs and gradients within
the fused router's stated bounds. Two routers with the same weights, one with the flag, route one batch."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from megatron_moe_lossfree.config import LossFreeConfig  # noqa: E402
from megatron_moe_lossfree.errors import LossFreeConfigError  # noqa: E402
from tests.unit.test_router import H, make_router  # noqa: E402

CASES = {
    "sigmoid-additive": (dict(), LossFreeConfig()),
    "softmax-bias": (dict(moe_router_score_function="softmax", moe_router_topk=3), LossFreeConfig()),
    "multiplicative-device": (dict(num_moe_experts=16, moe_router_topk=4),
                              LossFreeConfig(bias_kind="multiplicative", update_rule="multiplicative",
                                             route_limit="device", route_groups=4, route_max_groups=2)),
    "megatron-groups": (dict(num_moe_experts=16, moe_router_topk=4, moe_router_num_groups=4,
                             moe_router_group_topk=2, moe_router_topk_scaling_factor=2.5), LossFreeConfig()),
    "quantile-exact-logits": (dict(num_moe_experts=16, moe_router_topk=4),
                              LossFreeConfig(update_rule="quantile", route_limit="node", route_groups=4,
                                             route_max_groups=2)),
    "quantile-histogram-scores": (dict(), LossFreeConfig(update_rule="quantile", quantile_estimator="histogram",
                                                         quantile_space="scores")),
    "sqrtsoftplus-k1": (dict(moe_router_score_function="sqrtsoftplus", moe_router_topk=1), LossFreeConfig()),
    "pre-softmax-aux-losses": (dict(moe_router_score_function="softmax", moe_router_pre_softmax=True,
                                    moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2),
                               LossFreeConfig(balancing="none", seq_aux_loss_coeff=1e-3)),
}


def pair(megatron_world, fields, lossfree, dtype):
    torch.manual_seed(0)
    overrides = dict(fields, lossfree=lossfree)
    if dtype != torch.float32:
        overrides["moe_router_dtype"] = None  # the router GEMM in the model's dtype
    plain = make_router(megatron_world, **overrides)
    fused = make_router(megatron_world, moe_router_fusion=True, **overrides)
    fused.load_state_dict(plain.state_dict())
    plain.keep_selection = fused.keep_selection = True  # the (gates, experts) of each forward, compared below
    if plain.expert_bias is not None:
        start = 1.0 if lossfree.bias_kind == "multiplicative" else 0.0
        bias = start + 0.05 * torch.randn(plain.expert_bias.shape, generator=torch.Generator().manual_seed(1))
        plain.expert_bias.copy_(bias)
        fused.expert_bias.copy_(bias)
    return plain.to(dtype), fused.to(dtype)


def route(router, x, padding_mask):
    x = x.clone().requires_grad_()
    probs_TE, map_TE = router(x, padding_mask=padding_mask)[:2]
    weight_TE = torch.randn(probs_TE.shape, generator=torch.Generator().manual_seed(2))
    (probs_TE.float() * weight_TE).sum().backward()
    return probs_TE, map_TE, x.grad, router.weight.grad


def by_expert(gates_TK, experts_TK):
    """(gates, experts) with each token's K in ascending expert order."""
    order_TK = experts_TK.argsort(dim=1)
    return gates_TK.gather(1, order_TK), experts_TK.gather(1, order_TK)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("name", list(CASES))
def test_fused_router_equals_the_unfused_router(megatron_world, name, dtype):
    fields, lossfree = CASES[name]
    if dtype == torch.bfloat16 and name not in ("sigmoid-additive", "megatron-groups", "softmax-bias"):
        pytest.skip("bf16 covers one case per gate rule (the interpreter is slow)")
    plain, fused = pair(megatron_world, fields, lossfree, dtype)
    x = torch.randn(6, 2, H, generator=torch.Generator().manual_seed(3)).to(dtype)
    padding_mask = None
    if "quantile-exact" not in name and "losses" not in name:  # Megatron's exact QB and the plugin's losses
        # take no padding; the other rules do
        padding_mask = torch.zeros(6, 2, dtype=torch.bool)
        padding_mask[4:, 1] = True
    got, want = route(fused, x, padding_mask), route(plain, x, padding_mask)

    assert torch.equal(got[1], want[1])
    assert torch.equal(fused.local_tokens_per_expert, plain.local_tokens_per_expert)
    assert fused.local_tokens_per_expert.sum() > 0
    assert torch.equal(fused.micro_batch_counts_ME, plain.micro_batch_counts_ME)
    assert torch.equal(fused.micro_batch_index, plain.micro_batch_index)
    # The K of a token in expert order: in bf16 without --moe-router-dtype the unfused router selects on
    # bf16-rounded scores as Megatron 0.16 does, whose ties torch.topk may list in either order (the
    # routing map above, Megatron's layout, is order-free and equal bit for bit).
    fused_gates, fused_experts = by_expert(*fused.last_selection)
    plain_gates, plain_experts = by_expert(*plain.last_selection)
    assert torch.equal(fused_experts, plain_experts)
    bound = dict(rtol=2e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(got[0], want[0], **bound)
    torch.testing.assert_close(fused_gates, plain_gates, **bound)
    for got_grad, want_grad in zip(got[2:], want[2:]):  # the input's and the router weight's gradients
        tol = (1e-5 if dtype == torch.float32 else 2 ** -6) * want_grad.float().abs().max()
        assert (got_grad.float() - want_grad.float()).abs().max() <= tol
    if plain.quantile:
        assert torch.equal(fused.qb_observed, plain.qb_observed)
        for state in ("qb_solution_sum", "qb_histogram"):
            if getattr(plain, state) is not None:
                torch.testing.assert_close(getattr(fused, state), getattr(plain, state), rtol=0, atol=0)


def test_evaluation_forward_counts_into_the_evaluation_loads(megatron_world):
    plain, fused = pair(megatron_world, {}, LossFreeConfig(), torch.float32)
    x = torch.randn(4, 2, H, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got, want = fused.eval()(x)[:2], plain.eval()(x)[:2]
    assert torch.equal(got[1], want[1])
    assert torch.equal(fused.eval_tokens_per_expert, plain.eval_tokens_per_expert)
    assert fused.eval_tokens_per_expert.sum() == 8 * plain.topk and fused.local_tokens_per_expert.sum() == 0


def test_fusion_is_refused_by_name_without_cuda(megatron_world, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the fused router runs")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(LossFreeConfigError) as info:
        make_router(megatron_world, moe_router_fusion=True)
    assert str(info.value) == (
        "--moe-router-fusion (True) needs a CUDA device (the fused router is a Triton GPU kernel, and TRITON_INTERPRET=1 "
        "runs it on the host for tests only): run on a GPU, or drop --moe-router-fusion")
