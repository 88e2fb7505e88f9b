"""The balancers of 2025-2026 (issue 28): hand-computed updates (known counts give a known bias), the
rules' state through the plugin's balancer and router, and the bad-input messages.

SMEBU (arXiv 2602.17004), phi-Balancing (arXiv 2605.15403, our reading), the primal-dual schedule (Han &
Zhong, arXiv 2512.03915, our reading) and BIP-based balancing (arXiv 2502.15451). README's rule table
says which parts are the papers' and which are ours."""

import math
import re

import pytest
import torch

from megatron_moe_lossfree import balancing, quantile
from megatron_moe_lossfree.config import LossFreeConfig
from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.megatron.balancer import BiasBalancer
from tests.unit.test_router import E, H, K, make_router

COUNTS = torch.tensor([400, 350, 150, 100])  # mean 250: violations -0.6, -0.4, +0.4, +0.6


def raises_exactly(message):
    return pytest.raises(LossFreeConfigError, match=f"^{re.escape(message)}$")


def smebu(bias, counts, state, rate=5e-4):
    return balancing.update_bias_with_state(bias, counts, state, rule="smebu", rate=rate, kappa=2.0, beta=0.5)


def test_smebu_first_step_by_hand():
    state = balancing.initial_rule_state("smebu", (4,), dtype=torch.float64)
    assert state.tolist() == [0.0] * 4
    bias, state = smebu(torch.zeros(4, dtype=torch.float64), COUNTS, state)
    # d = 5e-4 * tanh(2 v), already centred (symmetric violations); m = 0.5 * d; b = m
    d = [5e-4 * math.tanh(2 * v) for v in (-0.6, -0.4, 0.4, 0.6)]
    assert state.tolist() == pytest.approx([0.5 * x for x in d], abs=1e-18)
    assert bias.tolist() == state.tolist()
    assert bias[0].item() == pytest.approx(-2.0841365e-4, rel=1e-7)


def test_smebu_centres_the_step_and_carries_momentum():
    counts = torch.tensor([300, 100, 100, 100])  # mean 150: v = -1, 1/3, 1/3, 1/3
    state = torch.zeros(4, dtype=torch.float64)
    bias, state = smebu(torch.zeros(4, dtype=torch.float64), counts, state, rate=1.0)
    raw = [math.tanh(-2.0)] + [math.tanh(2 / 3)] * 3
    centred = [x - sum(raw) / 4 for x in raw]
    assert state.tolist() == pytest.approx([0.5 * x for x in centred], abs=1e-15)
    assert abs(float(bias.sum())) < 1e-15  # mean-centred: the bias keeps mean 0
    # Second step, balanced loads: no new push, the momentum halves and still moves the bias.
    bias2, state2 = smebu(bias, torch.tensor([150, 150, 150, 150]), state, rate=1.0)
    assert state2.tolist() == pytest.approx([0.25 * x for x in centred], abs=1e-15)
    assert bias2.tolist() == pytest.approx([0.75 * x for x in centred], abs=1e-15)


def test_phi_first_step_by_hand():
    share = balancing.initial_rule_state("phi", (4,), dtype=torch.float64)
    assert share.tolist() == [0.25] * 4
    bias, share = balancing.update_bias_with_state(torch.zeros(4, dtype=torch.float64), COUNTS, share,
                                                   rule="phi", rate=0.1, ema=0.9)
    expected_share = [0.9 * 0.25 + 0.1 * c / 1000 for c in (400, 350, 150, 100)]
    assert share.tolist() == pytest.approx(expected_share, abs=1e-15)
    logs = [math.log(4 * q) for q in expected_share]
    assert bias.tolist() == pytest.approx([-0.1 * (x - sum(logs) / 4) for x in logs], abs=1e-15)
    assert bias[0] < 0 < bias[3]  # the overloaded expert is pushed down


def test_phi_balanced_loads_keep_a_uniform_state_and_zero_bias():
    share = torch.full((2, 4), 0.25, dtype=torch.float64)
    bias, share = balancing.update_bias_with_state(torch.zeros(2, 4, dtype=torch.float64),
                                                   torch.full((2, 4), 7), share, rule="phi", rate=0.5, ema=0.5)
    assert share.tolist() == [[0.25] * 4] * 2 and bias.abs().max() < 1e-15


def test_stateful_rule_at_rate_zero_is_frozen_and_inputs_untouched():
    bias, state = torch.tensor([0.1, -0.1, 0.0, 0.0]), torch.tensor([0.01, 0.0, -0.01, 0.0])
    before = (bias.clone(), state.clone())
    new_bias, new_state = smebu(bias, COUNTS, state, rate=0.0)
    assert torch.equal(new_bias, before[0]) and torch.equal(new_state, before[1])
    smebu(bias, COUNTS, state)
    assert torch.equal(bias, before[0]) and torch.equal(state, before[1])  # pure


def test_stateful_rules_refused_by_the_stateless_entry_point():
    with raises_exactly("rule ('smebu') keeps state between steps: call update_bias_with_state (the balancer "
                        "keeps the state in a checkpointed router buffer)"):
        balancing.update_bias(torch.zeros(4), COUNTS, rule="smebu", rate=1e-3)
    with raises_exactly("state (torch.float32, shape (3,)) must be a floating tensor shaped like the bias (4,): "
                        "start from initial_rule_state"):
        smebu(torch.zeros(4), COUNTS, torch.zeros(3))


def test_primal_dual_schedule_by_hand():
    schedule = balancing.make_rate_schedule("primal_dual", 1e-2, decay_steps=80)
    assert [schedule.rate_at(0, t) for t in (0, 80, 720)] == [1e-2, 5e-3, 1e-3]
    assert schedule.rate_at(10**12, 0) == 1e-2  # a function of the steps, not of the tokens
    with raises_exactly("decay_steps (None) must be a positive step count with schedule 'primal_dual': set it "
                        "(e.g. a tenth of the run)"):
        balancing.make_rate_schedule("primal_dual", 1e-2)
    with raises_exactly("decay_steps (5) is only used by schedule 'primal_dual': drop it or choose that schedule"):
        balancing.make_rate_schedule("constant", 1e-2, decay_steps=5)


BIP_SCORES = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]], dtype=torch.float64)


def test_bip_solve_by_hand():
    # T = 4, E = 2, K = 1: capacity 2 each. Iteration 1 from b = 0: cutoffs p = s[:, 1]; required biases of
    # expert 0: -0.8, -0.6, -0.4, -0.2 -> the 3rd smallest -0.4; expert 1: all 0 -> 0. Iteration 2 from
    # (-0.4, 0) gives the same point: the fixed point.
    for iterations in (1, 2, 4):
        solved = quantile.bip_solve_E(BIP_SCORES, torch.zeros(2, dtype=torch.float64), 1, iterations=iterations)
        assert solved.tolist() == pytest.approx([-0.4, 0.0], abs=1e-15)
    # BIP keeps q = -b >= 0 (no centring); the quantile rule would centre the same solution.
    solution = torch.tensor([-0.4, 0.0], dtype=torch.float64)
    assert quantile.bip_blend(torch.zeros(2, dtype=torch.float64), solution, 0.0).tolist() == [-0.4, 0.0]
    assert quantile.qb_blend_center(torch.zeros(2, dtype=torch.float64), solution, 0.0).tolist() == \
        pytest.approx([-0.2, 0.2], abs=1e-15)
    with raises_exactly("iterations (0) must be an integer >= 1, e.g. 4"):
        quantile.bip_solve_E(BIP_SCORES, torch.zeros(2), 1, iterations=0)


def test_bip_clamps_an_under_loaded_experts_dual_at_zero():
    # Expert 1 wins nothing at b = 0 for 3 of 4 tokens but its required biases are positive: QB would give it
    # a positive bias; BIP's dual of an inequality constraint stays at q = 0 (b = 0) when the expert has room.
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.2, 0.5], [0.7, 0.3, 0.5], [0.6, 0.4, 0.5]], dtype=torch.float64)
    solved = quantile.bip_solve_E(scores, torch.zeros(3, dtype=torch.float64), 1, iterations=1)
    plain = quantile.qb_exact_solve_E(scores, torch.zeros(3, dtype=torch.float64), 1)
    assert (solved <= 0).all() and torch.equal(solved, plain.clamp_max(0.0)) and (plain > 0).any()


@pytest.mark.parametrize("rule", ["smebu", "phi"])
def test_balancer_keeps_the_state_in_the_router_buffer(megatron_world, rule):
    cfg = LossFreeConfig(update_rule=rule, update_rate=1e-2)
    routers = [make_router(megatron_world, lossfree=cfg) for _ in range(2)]
    start = routers[0].lossfree_rule_state.clone()
    assert "lossfree_rule_state" in routers[0].state_dict()  # checkpointed with the bias
    balancer = BiasBalancer(torch.nn.ModuleList(routers), cfg, topk=K)
    assert routers[1].lossfree_rule_state.data_ptr() == balancer.flat_state[1].data_ptr()  # one [L, E] buffer
    x = torch.randn(8, 2, H)
    for router in routers:
        router(x)
    counts = [r.local_tokens_per_expert.clone() for r in routers]
    balancer.step()
    params = {"smebu": dict(kappa=2.0, beta=0.5), "phi": dict(ema=0.9)}[rule]
    for router, c in zip(routers, counts):
        want_bias, want_state = balancing.update_bias_with_state(torch.zeros(E), c, start, rule=rule, rate=1e-2,
                                                                 **params)
        assert torch.equal(router.expert_bias, want_bias) and torch.equal(router.lossfree_rule_state, want_state)
        assert router.lossfree_rule_state.dtype == torch.float32
    # A fresh router loading this one's state dict continues from the same state (what a resume does).
    fresh = make_router(megatron_world, lossfree=cfg)
    fresh.load_state_dict(routers[0].state_dict())
    assert torch.equal(fresh.lossfree_rule_state, routers[0].lossfree_rule_state)


def test_rules_without_state_have_no_state_key(megatron_world):
    router = make_router(megatron_world, lossfree=LossFreeConfig())
    assert router.lossfree_rule_state is None and "lossfree_rule_state" not in router.state_dict()


def test_bip_through_the_balancer_is_the_iterated_solve(megatron_world):
    cfg = LossFreeConfig(update_rule="bip", bip_iterations=3, quantile_space="scores")
    router = make_router(megatron_world, lossfree=cfg)
    x = torch.randn(4, 2, H)
    scores = torch.sigmoid((x.reshape(-1, H) @ router.weight.detach().t()).float())
    want = quantile.bip_solve_E(scores, torch.zeros(E), K, iterations=3)
    balancer = BiasBalancer(torch.nn.ModuleList([router]), cfg, topk=K)
    router(x)
    balancer.step()
    assert torch.equal(router.expert_bias, quantile.bip_blend(torch.zeros(E), want.float(), 0.0))
    assert (router.expert_bias <= 0).all()


@pytest.mark.parametrize("changes,message", [
    (dict(rate_schedule="primal_dual"),
     "--lossfree-rate-decay-steps (None) must be a positive step count with --lossfree-rate-schedule primal_dual: "
     "give tau of u * tau / (tau + t), e.g. a tenth of the run"),
    (dict(rate_decay_steps=10),
     "--lossfree-rate-decay-steps (10) is only used by --lossfree-rate-schedule primal_dual: drop it or choose "
     "that schedule"),
    (dict(update_rule="smebu", smebu_kappa=0.0),
     "--lossfree-smebu-kappa (0.0) must be a finite number > 0, e.g. 2 (Trinity Large)"),
    (dict(update_rule="smebu", smebu_momentum=1.0),
     "--lossfree-smebu-momentum (1.0) must lie in [0, 1), e.g. 0.5 (Trinity Large)"),
    (dict(update_rule="phi", phi_ema=-0.1), "--lossfree-phi-ema (-0.1) must lie in [0, 1), e.g. 0.9"),
    (dict(update_rule="bip", bip_iterations=0), "--lossfree-bip-iterations (0) must be an integer >= 1, e.g. 4"),
    (dict(update_rule="bip", quantile_estimator="histogram"),
     "--lossfree-update-rule bip solves the batch's dual exactly: drop --lossfree-quantile-estimator (histogram) "
     "or set it to exact"),
])
def test_bad_values_name_the_flag(changes, message):
    with raises_exactly(message):
        LossFreeConfig(**changes).validate()
