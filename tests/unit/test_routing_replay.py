"""Routing replay (``moe_enable_routing_replay``) with every bias update rule (issue 30, item 1).

The decision, stated in router.py, dropin.py, the README and docs/notes_qb_megatron.md:
- RECORD: the router selects, balances and updates exactly as without replay, and records its own choice;
- REPLAY_FORWARD / REPLAY_BACKWARD: the recorded experts are dispatched and counted (MaxVio reports them),
  so the count-driven rules learn from the replayed loads; the quantile rule still observes the micro-batch,
  since its solution depends on the scores and the bias only: its bias moves as it would without replay.
Before the fix the quantile rule observed nothing under replay (even RECORD): its bias stayed 0.
"""

import pytest
import torch

from megatron_moe_lossfree import balancing, routing
from megatron_moe_lossfree.config import LossFreeConfig
from megatron_moe_lossfree.megatron.balancer import BiasBalancer
from tests.unit.test_router import E, H, K, make_router

RULES = {
    "sign": LossFreeConfig(update_rule="sign", update_rate=1e-2),
    "proportional": LossFreeConfig(update_rule="proportional", update_rate=1e-2),
    "sign_centered": LossFreeConfig(update_rule="sign_centered", update_rate=1e-2),
    "multiplicative": LossFreeConfig(update_rule="multiplicative", bias_kind="multiplicative", update_rate=1e-2),
    "quantile_exact": LossFreeConfig(update_rule="quantile"),
    "quantile_histogram": LossFreeConfig(update_rule="quantile", quantile_estimator="histogram",
                                         quantile_space="scores", quantile_bins=50),
}


@pytest.fixture
def replay():
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    RouterReplay.clear_global_router_replay_instances()
    yield RouterReplayAction
    RouterReplay.clear_global_router_replay_instances()


def twins(megatron_world, cfg):
    """The same router twice (same weights): with and without routing replay."""
    plain = make_router(megatron_world, lossfree=cfg)
    replaying = make_router(megatron_world, lossfree=cfg, moe_enable_routing_replay=True)
    replaying.load_state_dict(plain.state_dict())
    return plain, replaying


def step(router, xs) -> list:
    """One optimizer step of ``router`` over the micro-batches ``xs``; the routing maps of each."""
    balancer = BiasBalancer(torch.nn.ModuleList([router]), router.lossfree, topk=K)
    maps = [router(x)[1] for x in xs]
    balancer.step()
    return maps


@pytest.mark.parametrize("rule", list(RULES))
def test_record_mode_balances_and_records_as_without_replay(megatron_world, replay, rule):
    torch.manual_seed(5)
    plain, replaying = twins(megatron_world, RULES[rule])
    xs = [torch.randn(4, 2, H) for _ in range(2)]  # two micro-batches of 8 tokens (T*K/E = 2)
    start = plain.expert_bias.clone()
    replaying.router_replay.set_router_replay_action(replay.RECORD)
    plain_maps, replay_maps = step(plain, xs), step(replaying, xs)
    assert all(torch.equal(a, b) for a, b in zip(plain_maps, replay_maps))
    recorded = replaying.router_replay.get_recorded_indices()  # the last micro-batch's choice
    assert torch.equal(torch.zeros_like(replay_maps[-1]).scatter(1, recorded, True), replay_maps[-1])
    assert not torch.equal(plain.expert_bias, start)  # the rule moved the bias ...
    assert torch.equal(replaying.expert_bias, plain.expert_bias)  # ... and replay moved it the same


def fixed_experts_TK(num_tokens: int) -> torch.Tensor:
    """A replayed choice that no router makes: token t takes experts 0 and 1 + t % (E - 1)."""
    t = torch.arange(num_tokens)
    return torch.stack([torch.zeros_like(t), 1 + t % (E - 1)], dim=1)


@pytest.mark.parametrize("rule", list(RULES))
def test_replay_mode_dispatches_and_counts_the_replayed_experts(megatron_world, replay, rule):
    torch.manual_seed(6)
    cfg = RULES[rule]
    plain, replaying = twins(megatron_world, cfg)
    x = torch.randn(4, 2, H)
    target_TK = fixed_experts_TK(8)
    start = replaying.expert_bias.clone()
    replaying.router_replay.set_target_indices(target_TK)
    replaying.router_replay.set_router_replay_action(replay.REPLAY_FORWARD)
    balancer = BiasBalancer(torch.nn.ModuleList([replaying]), cfg, topk=K)
    _, map_TE = replaying(x)
    assert torch.equal(map_TE, torch.zeros_like(map_TE).scatter(1, target_TK, True))
    counts_E = routing.count_tokens_per_expert(target_TK, E)
    assert torch.equal(replaying.local_tokens_per_expert, counts_E)
    balancer.step()
    if cfg.update_rule == "quantile":
        # the quantile observes the scores at the current bias: the bias the router's own choice would learn
        step(plain, [x])
        assert not torch.equal(replaying.expert_bias, start)
        assert torch.equal(replaying.expert_bias, plain.expert_bias)
    else:
        expected = balancing.update_bias(start, counts_E, rule=cfg.update_rule, rate=cfg.update_rate)
        assert torch.equal(replaying.expert_bias, expected)


def test_replay_backward_observes_the_quantile_once_per_micro_batch(megatron_world, replay):
    """Activation recompute under replay: the no-grad first forward observes nothing, the recompute in
    backward (REPLAY_BACKWARD, grad on) observes once, as the counts count once."""
    cfg = RULES["quantile_exact"]
    _, router = twins(megatron_world, cfg)
    x = torch.randn(4, 2, H)
    target_TK = fixed_experts_TK(8)
    router.router_replay.set_target_indices(target_TK)
    router.router_replay.set_router_replay_action(replay.REPLAY_BACKWARD)
    with torch.no_grad():
        router(x)
    assert int(router.qb_observed) == 0
    router.router_replay.set_target_indices(target_TK)
    router(x)
    assert int(router.qb_observed) == 1
    assert int(router.local_tokens_per_expert.sum()) == 8 * K
