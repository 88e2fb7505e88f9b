"""The plugin's exact quantile step in Megatron-Core 0.19.2's order, at 3 ranks x 3 micro-batches (issue 30,
item 3). Lane 2 only (megatron-core >= 0.19 has quantile balancing).

Megatron's ``_update_router_qb_beta``: each rank's mean of its micro-batch solutions (fp32 sum in micro-batch
order over the count), then the mean of those over the DP x CP ranks, then EMA and centring. The plugin's
balancer does the same through ``quantile.qb_mean_solution`` (twice) and ``qb_blend_center`` in its one
collective. Three ranks of three micro-batches is where the older order (every solution summed, over 9)
rounds differently: counts that are not powers of two.

The ranks are emulated in one process: every rank's real router and real step run, and the collective is
replaced by what it computes given all ranks' tensors. The sum over ranks is taken exactly (fp64, one
rounding) on both sides: Megatron's real fp32 ``all_reduce(AVG)`` rounds at each addition in the backend's
order, which no other reduction reproduces (balancer.update_quantile says so).
"""

from importlib.metadata import version

import pytest
import torch
import torch.distributed as dist
from packaging.version import Version

from megatron_moe_lossfree import quantile
from megatron_moe_lossfree.config import LossFreeConfig
from megatron_moe_lossfree.megatron.balancer import BiasBalancer
from tests.unit.test_router import E, H, K, make_config, make_router

pytestmark = pytest.mark.skipif(Version(version("megatron-core")) < Version("0.19"),
                                reason="megatron-core < 0.19 has no quantile balancing (lane 2 only)")
RANKS, MICRO = 3, 3


class Aborted(Exception):
    pass


def emulated_collective(monkeypatch, reduce):
    """Run ``step(rank)`` for every rank twice: once to collect each rank's all-reduce input (aborted there,
    before any state changes), once with the all-reduce answering ``reduce(inputs)``."""
    inputs, answer = [], {}

    def all_reduce(tensor, op=None, group=None, **kwargs):
        if "value" not in answer:
            inputs.append(tensor.clone())
            raise Aborted
        tensor.copy_(answer["value"])

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: RANKS)

    def run(steps):
        for step in steps:
            with pytest.raises(Aborted):
                step()
        answer["value"] = reduce(inputs)
        for step in steps:
            step()

    return run


def exact_sum(inputs):
    return torch.stack([t.double() for t in inputs]).sum(0).to(inputs[0].dtype)


@pytest.mark.parametrize("ema", [0.0, 0.37])
def test_three_ranks_of_three_micro_batches_give_megatron_s_qb_beta_bitwise(megatron_world, monkeypatch, ema):
    from megatron.core.distributed.finalize_model_grads import _update_router_qb_beta
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    torch.manual_seed(30)
    config = make_config(moe_router_load_balancing_type="quantile_balancing", moe_router_quantile_balancing_ema=ema)
    natives, plugins, balancers = [], [], []
    cfg = LossFreeConfig(update_rule="quantile", quantile_ema=ema)
    for rank in range(RANKS):
        native = TopKRouter(config=config, pg_collection=get_default_pg_collection())
        native.set_layer_number(1)
        if natives:
            native.load_state_dict(natives[0].state_dict())
        plugin = make_router(megatron_world, lossfree=cfg)
        with torch.no_grad():
            plugin.weight.copy_(native.weight)
            plugin.expert_bias.copy_(-native.qb_beta)
        natives.append(native)
        plugins.append(plugin)
        balancers.append(BiasBalancer(torch.nn.ModuleList([plugin]), cfg, topk=K, group=object()))
    # Step 1 moves the bias from 0, step 2 solves at a non-zero bias: every rank its own 3 micro-batches of 8.
    for _ in range(2):
        batches = [[torch.randn(4, 2, H) for _ in range(MICRO)] for _ in range(RANKS)]
        totals = []
        for native, plugin, xs in zip(natives, plugins, batches):
            for x in xs:
                _, native_map = native(x)
                _, plugin_map = plugin(x)
                assert torch.equal(native_map, plugin_map)
            totals.append((plugin.qb_solution_sum.clone(), plugin.expert_bias.clone()))

        def avg(inputs):  # Megatron's AVG with the sum over ranks taken exactly
            return exact_sum(inputs) / RANKS

        def native_step(native):
            return lambda: _update_router_qb_beta([torch.nn.ModuleList([native])], config)

        emulated_collective(monkeypatch, avg)([native_step(n) for n in natives])
        for native in natives:
            native.qb_beta_accum.zero_()
            native.qb_beta_count.zero_()
        emulated_collective(monkeypatch, exact_sum)([b.step for b in balancers])
        for native, plugin in zip(natives, plugins):
            assert torch.equal(plugin.expert_bias, -native.qb_beta)
        # The older order (all 9 solutions summed, over 9) rounds differently here: the layout tests the order.
        old_bias = totals[0][1]
        every = torch.stack([s.double() for s, _ in totals]).sum(0).float()
        older = quantile.qb_blend_center(old_bias, quantile.qb_mean_solution(every, RANKS * MICRO), ema)
        assert not torch.equal(older, plugins[0].expert_bias)
    assert plugins[0].expert_bias.abs().sum() > 0


def test_a_tp_duplicate_adds_weight_zero(megatron_world):
    """Under SP every TP rank solved the same gathered rows: TP ranks > 0 add nothing, so the mean is over
    DP x CP, as Megatron's (whose group is DP x CP)."""
    cfg = LossFreeConfig(update_rule="quantile")
    router = make_router(megatron_world, lossfree=cfg)
    router(torch.randn(4, 2, H))
    router(torch.randn(4, 2, H))
    mean_E = quantile.qb_mean_solution(router.qb_solution_sum, 2)
    first = BiasBalancer(torch.nn.ModuleList([router]), cfg, topk=K).exact_rank_stats(router)
    duplicate = BiasBalancer(torch.nn.ModuleList([router]), cfg, topk=K, qb_duplicate=True).exact_rank_stats(router)
    assert torch.equal(first[0], mean_E) and int(first[1]) == 1
    assert not duplicate[0].any() and int(duplicate[1]) == 0
