"""The plugin's router selects exactly what Megatron-Core selects, in every router dtype (REFERENCE 13).

Megatron's own ``topk_routing_with_score_function`` is the oracle: the same logits go through it and through
``LossFreeRouter.routing``, and the routing map and the probs must be bitwise equal, in fp32, bf16 (no
``moe_router_dtype``: 0.16 selects on bf16-rounded scores, 0.19 on fp32 ones) and fp64, for every score
function, with and without the expert bias, with group-limited routing (softmax after the top-K ranks groups
on the raw logits) and with a group top-k that does not divide the top-k. A fixed bias
(``moe_router_bias_update_rate 0``) selects, is saved and loaded, and never moves.
"""

import pytest
import torch

from megatron_moe_lossfree.config import LossFreeConfig
from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.megatron.compat import megatron_core_version
from megatron_moe_lossfree.megatron.dropin import MEGATRON_ONLY
from tests.unit.test_router import H, make_router

NEWER = megatron_core_version().release >= (0, 19)
DTYPES = {None: torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
GROUPS = dict(moe_router_num_groups=4, moe_router_group_topk=2)
CASES = {
    "sigmoid": dict(),
    "sigmoid_bias": dict(moe_router_enable_expert_bias=True),
    "sigmoid_bias_groups": dict(moe_router_enable_expert_bias=True, **GROUPS),
    "sigmoid_groups_3_of_4": dict(moe_router_num_groups=4, moe_router_group_topk=3),  # K // M = 1
    "pre_softmax": dict(moe_router_score_function="softmax", moe_router_pre_softmax=True),
    "pre_softmax_groups": dict(moe_router_score_function="softmax", moe_router_pre_softmax=True, **GROUPS),
    "softmax_groups": dict(moe_router_score_function="softmax", moe_router_topk_scaling_factor=2.0, **GROUPS),
    "softmax_groups_3_of_4": dict(moe_router_score_function="softmax", moe_router_num_groups=4,
                                  moe_router_group_topk=3),
}
if NEWER:
    CASES["sqrtsoftplus_bias_groups"] = dict(moe_router_score_function="sqrtsoftplus",
                                             moe_router_enable_expert_bias=True, **GROUPS)
EXPERTS, TOPK = 16, 4


def pair(megatron_world, fields, router_dtype):
    bias = fields.get("moe_router_enable_expert_bias", False)
    router = make_router(megatron_world, num_moe_experts=EXPERTS, moe_router_topk=TOPK, moe_router_dtype=router_dtype,
                         lossfree=MEGATRON_ONLY if bias else LossFreeConfig(balancing="none"), **fields)
    if bias:  # a bias of the size of the score gaps, so that it changes choices
        router.expert_bias.copy_(torch.linspace(-0.02, 0.02, EXPERTS).roll(5))
    return router


def megatron_routing(router, logits_TE):
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    cfg = router.config
    return topk_routing_with_score_function(
        logits_TE, cfg.moe_router_topk, use_pre_softmax=cfg.moe_router_pre_softmax,
        num_groups=cfg.moe_router_num_groups, group_topk=cfg.moe_router_group_topk,
        scaling_factor=cfg.moe_router_topk_scaling_factor, score_function=cfg.moe_router_score_function,
        expert_bias=router.expert_bias)


def logits_with_ties(dtype, tokens=160, seed=0):
    """Logits on a coarse grid (many equal scores and group sums), rounded to ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randint(-12, 13, (tokens, EXPERTS), generator=generator).float() / 8
    fine = torch.randn(tokens, EXPERTS, generator=generator) * 0.7
    return torch.cat([coarse, fine]).to(dtype)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("router_dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_selection_equals_megatron_bitwise(megatron_world, name, router_dtype, grad):
    router = pair(megatron_world, CASES[name], router_dtype)
    logits_TE = logits_with_ties(DTYPES[router_dtype])
    with torch.set_grad_enabled(grad):
        native_probs, native_map = megatron_routing(router, logits_TE)
        probs, routing_map = router.routing(logits_TE.view(-1, 2, EXPERTS))
    assert torch.equal(routing_map, native_map)
    assert probs.dtype == native_probs.dtype == DTYPES[router_dtype]
    assert torch.equal(probs, native_probs)


def test_bf16_selection_is_not_the_fp32_one_in_0_16(megatron_world):
    """The case is not vacuous: on these logits the fp32 selection (the plugin before issue 25) differs from
    Megatron 0.16's bf16 one; 0.19 selects on fp32 scores, so there they agree."""
    router = pair(megatron_world, CASES["sigmoid"], None)
    logits_TE = logits_with_ties(torch.bfloat16)
    _, native_map = megatron_routing(router, logits_TE)
    fp32_map = torch.zeros_like(native_map).scatter(
        1, torch.sigmoid(logits_TE.float()).topk(TOPK, dim=-1).indices, True)
    differ = int((fp32_map != native_map).any(dim=-1).sum())
    assert (differ == 0) if NEWER else (differ > 0)


def test_softmax_after_topk_ranks_groups_on_logits_not_probabilities(megatron_world):
    """Issue 25 item 2: a sum of probabilities does not order like a sum of logits. With 4 groups of 4 and
    2 kept, ranking on probs picks other experts for some tokens; the plugin ranks on logits, as Megatron."""
    router = pair(megatron_world, CASES["softmax_groups"], "fp32")
    logits_TE = torch.randn(2048, EXPERTS, generator=torch.Generator().manual_seed(1)) * 2
    _, native_map = megatron_routing(router, logits_TE)
    _, plugin_map = router.routing(logits_TE.view(-1, 2, EXPERTS))
    probs_TE = torch.softmax(logits_TE, dim=-1)
    group_TG = probs_TE.view(-1, 4, 4).topk(2, dim=-1).values.sum(-1)
    keep_TE = torch.zeros_like(group_TG, dtype=torch.bool).scatter(1, group_TG.topk(2, dim=-1).indices, True)
    on_probs = probs_TE.masked_fill(~keep_TE.repeat_interleave(4, dim=1), -1).topk(TOPK, dim=-1).indices
    probs_map = torch.zeros_like(native_map).scatter(1, on_probs, True)
    assert torch.equal(plugin_map, native_map)
    assert int((probs_map != native_map).any(dim=-1).sum()) > 0


@pytest.mark.parametrize("fields,message", [
    (dict(moe_router_num_groups=8, moe_router_group_topk=5),
     "--moe-router-group-topk (5) is larger than --moe-router-topk (4): each kept group is scored by its top "
     "--moe-router-topk // --moe-router-group-topk experts, none here, so use a --moe-router-group-topk of at "
     "most 4"),
    (dict(moe_router_num_groups=16, moe_router_group_topk=2),
     "--moe-router-group-topk (2) groups of 1 experts cannot hold --moe-router-topk (4) experts: raise "
     "--moe-router-group-topk to at least 4"),
])
def test_group_layouts_megatron_cannot_route_are_refused_at_construction(megatron_world, fields, message):
    with pytest.raises(LossFreeConfigError) as info:
        pair(megatron_world, fields, "fp32")
    assert str(info.value) == message


def test_a_fixed_bias_selects_is_saved_and_loaded_and_never_moves(megatron_world):
    """GLM-4.5's recipes: ``--moe-router-enable-expert-bias --moe-router-bias-update-rate 0``. The bias
    routes (the choice equals Megatron's with that bias), loads are counted (MaxVio as usual), the update
    leaves it bitwise unchanged, and it goes through the state dict."""
    from megatron_moe_lossfree.megatron.balancer import BiasBalancer
    from megatron_moe_lossfree.metrics import max_violation

    fields = dict(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.0)
    router = pair(megatron_world, fields, "fp32")
    assert (router.lossfree.balancing, router.lossfree.update_rate) == ("bias", 0.0)
    fixed = router.expert_bias.clone()
    balancer = BiasBalancer([router], router.lossfree, group=None, topk=TOPK)
    logits_TE = logits_with_ties(torch.float32)
    for _ in range(3):
        _, native_map = megatron_routing(router, logits_TE)
        _, routing_map = router.routing(logits_TE.view(-1, 2, EXPERTS))
        assert torch.equal(routing_map, native_map)
        balancer.step()
        assert torch.equal(router.expert_bias, fixed)
    counts_E = balancer.last_counts[0]
    assert torch.equal(counts_E, native_map.sum(0))
    assert max_violation(counts_E) > 0
    state = router.state_dict()
    assert torch.equal(state["expert_bias"], fixed)
    other = pair(megatron_world, fields, "fp32")
    other.load_state_dict(state)
    assert torch.equal(other.expert_bias, fixed)


def test_megatron_router_input_in_bf16_routes_like_megatron(megatron_world):
    """Through the whole forward (gate GEMM in bf16, as under Float16Module): the same map and probs as
    Megatron's own TopKRouter with the same weight and bias."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from tests.unit.test_router import make_config

    fields = dict(moe_router_enable_expert_bias=True, **GROUPS)
    router = pair(megatron_world, fields, None).to(torch.bfloat16)
    config = make_config(lossfree=MEGATRON_ONLY, num_moe_experts=EXPERTS, moe_router_topk=TOPK, moe_router_dtype=None,
                         **fields)
    native = TopKRouter(config=config, pg_collection=get_default_pg_collection()).to(torch.bfloat16)
    native.weight.data.copy_(router.weight.data)
    native.expert_bias.data = router.expert_bias.clone()  # as a checkpoint loads it (fp32, after the cast)
    x = torch.randn(40, 2, H).to(torch.bfloat16)
    native_probs, native_map = native(x)
    assert router.expert_bias.dtype == native.expert_bias.dtype == torch.float32
    probs, routing_map = router(x)
    assert torch.equal(routing_map, native_map) and torch.equal(probs, native_probs)
    assert torch.equal(router.local_tokens_per_expert, native_map.sum(0).long())
