"""ablation/floors.py: the sampling floor (random router) and the oracle floor (best single bias on the
validation scores), on cases whose answers are known exactly."""

import math
import os

import pytest
import torch

from megatron_moe_lossfree.ablation import floors
from megatron_moe_lossfree.ablation.floors import (
    Floor,
    load_valid_routing,
    oracle_bias_E,
    oracle_floor,
    routed_counts_E,
    sampling_floor,
)
from megatron_moe_lossfree.errors import LossFreeConfigError


# ----------------------------------------------------------------------------- sampling floor


def test_sampling_floor_is_exact_where_the_loads_are_certain():
    # K = E: every token takes every expert, the loads are always equal.
    assert sampling_floor(4, 4, 10, samples=50) == Floor(0.0, 0.0, 50, "subsets")
    # One token, E = 2, K = 1: loads (1, 0) or (0, 1), MaxVio = (1 - 0.5) / 0.5 = 1 always.
    assert sampling_floor(2, 1, 1, samples=50) == Floor(1.0, 0.0, 50, "subsets")


def test_sampling_floor_matches_the_enumerated_expectation():
    # E = 2, K = 1, T = 2: loads (2,0)/(0,2) with probability 1/2 (MaxVio 1), (1,1) with 1/2 (MaxVio 0).
    floor = sampling_floor(2, 1, 2, samples=20000, seed=3)
    assert floor.method == "subsets" and floor.samples == 20000
    assert abs(floor.mean - 0.5) < 4 * floor.stderr and floor.stderr == pytest.approx(0.5 / math.sqrt(20000), rel=0.01)
    # E = 3, K = 2, T = 1: one token takes 2 of 3 experts, loads (1, 1, 0): MaxVio = (1 - 2/3) / (2/3).
    assert sampling_floor(3, 2, 1, samples=10).mean == pytest.approx(0.5, abs=1e-12)


def test_sampling_floor_is_seeded_and_shrinks_with_the_batch():
    assert sampling_floor(16, 2, 4096, seed=1) == sampling_floor(16, 2, 4096, seed=1)
    small, large = sampling_floor(16, 2, 1024), sampling_floor(16, 2, 16384)
    # The loads' noise is ~ sqrt(T): 16x the tokens, a quarter of the MaxVio (to Monte-Carlo precision).
    assert large.mean == pytest.approx(small.mean / 4, rel=0.05)


def test_sampling_floor_normal_approximation_agrees_with_exact_draws(monkeypatch):
    exact = sampling_floor(16, 2, 4096, samples=8000)
    monkeypatch.setattr(floors, "EXACT_SUBSETS", 10)  # C(16, 2) = 120 > 10: the normal approximation
    approx = sampling_floor(16, 2, 4096, samples=8000)
    assert (exact.method, approx.method) == ("subsets", "normal")
    assert abs(exact.mean - approx.mean) < 4 * math.hypot(exact.stderr, approx.stderr) + 0.002


def test_sampling_floor_bad_arguments_name_the_value():
    with pytest.raises(LossFreeConfigError) as err:
        sampling_floor(4, 5, 0, samples=1)
    assert str(err.value) == ("topk (5) must be an integer in [1, num_experts (4)]; tokens (0) must be an integer "
                              ">= 1: pass the tokens the loads count; samples (1) must be an integer >= 2")


# ----------------------------------------------------------------------------- oracle floor


def skewed_scores(num_tokens=8):
    """Every token prefers expert 0, then expert 1, ...: unbiased top-1 sends all of them to expert 0.
    Token t's scores are [0.9, 0.8, 0.7, 0.6] + 0.01 t on expert t % 4: distinct required biases."""
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6]] * num_tokens, dtype=torch.float64)
    for t in range(num_tokens):
        scores[t, t % 4] += 0.01 * t
    return scores


def test_routed_counts_additive_and_multiplicative():
    scores = skewed_scores()
    assert routed_counts_E(scores, None, 1).tolist() == [8, 0, 0, 0]
    assert routed_counts_E(scores, torch.tensor([0.0, 0.5, 0.0, 0.0]), 1).tolist() == [0, 8, 0, 0]
    assert routed_counts_E(scores, torch.tensor([1.0, 2.0, 1.0, 1.0]), 2, "multiplicative").tolist() == [8, 8, 0, 0]


def test_oracle_balances_a_collapsed_layer_exactly():
    scores = skewed_scores()
    bias, vio = oracle_bias_E(scores, 1)
    assert vio == 0.0
    assert routed_counts_E(scores, bias, 1).tolist() == [2, 2, 2, 2]
    assert float(bias.sum()) == pytest.approx(0.0, abs=1e-12)  # centred, as QB centres


def test_oracle_floor_is_the_integer_limit_when_exact_balance_is_impossible():
    # 5 tokens, 2 experts, top-1: the best split is 3/2, MaxVio = 3 / 2.5 - 1 = 0.2.
    scores = torch.tensor([[0.5, 0.1], [0.6, 0.2], [0.7, 0.3], [0.8, 0.4], [0.9, 0.45]], dtype=torch.float64)
    assert oracle_bias_E(scores, 1)[1] == pytest.approx(0.2, abs=1e-12)
    # Identical tokens cannot be told apart by any bias: all take the same expert, MaxVio = E/K - 1 = 3.
    same = torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 4)
    assert oracle_bias_E(same, 1)[1] == 3.0


def write_dump(run_dir, **overrides):
    scores = skewed_scores()
    blob = {"format": floors.VALID_ROUTING_FORMAT, "step": 10, "topk": 1, "bias_kind": "additive",
            "layers": [2, 3], "scores": [scores, scores.flip(1)],
            "bias": [torch.zeros(4, dtype=torch.float64), torch.tensor([0.0, 0.0, 0.0, 0.5], dtype=torch.float64)],
            "counts": [torch.tensor([8, 0, 0, 0]), torch.tensor([8, 0, 0, 0])]}
    blob.update(overrides)
    os.makedirs(run_dir, exist_ok=True)
    torch.save(blob, os.path.join(run_dir, floors.VALID_ROUTING))


def test_oracle_floor_from_a_dump(tmp_path):
    assert load_valid_routing(str(tmp_path)) is None  # no dump: no oracle floor
    write_dump(str(tmp_path))
    routing = load_valid_routing(str(tmp_path))
    assert (routing.step, routing.topk, routing.layers) == (10, 1, (2, 3))
    result = oracle_floor(routing)
    # Layer 2 routes everything to expert 0 (MaxVio 3); layer 3 with bias +0.5 on expert 3 too: the
    # learned MaxVio_global recomputed from the dump is their mean, 3.0; the oracle balances both.
    assert (result.maxvio_global, result.layers, result.learned) == (0.0, (0.0, 0.0), 3.0)


def test_a_dump_of_another_format_is_refused(tmp_path):
    write_dump(str(tmp_path), format="something-else")
    with pytest.raises(LossFreeConfigError) as err:
        load_valid_routing(str(tmp_path))
    assert str(err.value) == (f"{tmp_path}/valid_routing.pt (format something-else) is not a mlf-valid-routing/1 "
                              f"dump: rewrite it with this version of mlf-pretrain or delete it")
    write_dump(str(tmp_path), layers=[2])
    with pytest.raises(LossFreeConfigError, match=r"has 2 score tables but 1 layers, 2 biases and 2 count rows"):
        load_valid_routing(str(tmp_path))


def test_small_scale_final_evaluation_puts_the_random_floor_under_one_percent():
    """Issue 26: MaxVio_global is read off the final evaluation, whose random-router floor at the small
    scale (16 experts top-2, 64 x 4,096 tokens) is at most 0.01; the periodic ones keep --eval-iters."""
    from megatron_moe_lossfree.ablation import runner, suites
    from megatron_moe_lossfree.training.arguments import parse_args

    scale = suites.get_scale("small")
    arm = suites.get_suite("lfb-main", scale).arms[0]
    args = parse_args(runner.config_flags(scale, arm, 1, steps=None, extra=()))
    tokens = floors.floor_tokens(args)
    assert (args.eval_iters, args.final_eval_iters, tokens["global"]) == (4, 64, 262144)
    assert floors.random_floor(args.num_experts, args.moe_router_topk, tokens["global"]) <= 0.01
    args.final_eval_iters = None  # a run made before the flag: its evaluations all read --eval-iters
    assert floors.floor_tokens(args)["global"] == 4 * 32 * 128
