"""routing.py: biased top-k against a dense per-token reference, group limits, gradients, errors."""

import math
import re

import pytest
import torch

from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.routing import (
    ROUTE_LIMITS,
    SCORE_FUNCTIONS,
    compute_scores,
    count_tokens_per_expert,
    routing_map_from_experts,
    select_experts,
)


def raises_exactly(message):
    """pytest.raises for LossFreeConfigError whose whole message is ``message``."""
    return pytest.raises(LossFreeConfigError, match=f"^{re.escape(message)}$")


def reference_select(
    scores_TE, bias_E, topk, bias_kind, route_limit="none", num_groups=1, max_groups=1
):
    """Dense oracle: one token at a time, python sorts, no torch.topk."""
    num_tokens, num_experts = scores_TE.shape
    per_group = num_experts // num_groups
    experts = []
    for t in range(num_tokens):
        s = scores_TE[t].tolist()
        b = (
            bias_E.tolist()
            if bias_E is not None
            else [0.0 if bias_kind == "additive" else 1.0] * num_experts
        )
        sel = [s[i] + b[i] if bias_kind == "additive" else s[i] * b[i] for i in range(num_experts)]
        allowed = list(range(num_experts))
        if route_limit != "none":
            group_scores = []
            for g in range(num_groups):
                members = sorted(sel[g * per_group : (g + 1) * per_group], reverse=True)
                group_scores.append(
                    members[0] if route_limit == "device" else sum(members[: topk // max_groups])
                )
            kept = sorted(range(num_groups), key=lambda g: -group_scores[g])[:max_groups]
            allowed = [i for i in allowed if i // per_group in kept]
        experts.append(sorted(allowed, key=lambda i: -sel[i])[:topk])
    return torch.tensor(experts, dtype=torch.int64)


@pytest.mark.parametrize("bias_kind", ["additive", "multiplicative"])
@pytest.mark.parametrize(
    "route_limit,groups,max_groups", [("none", None, None), ("device", 4, 2), ("node", 4, 2)]
)
def test_select_matches_dense_reference(bias_kind, route_limit, groups, max_groups):
    gen = torch.Generator().manual_seed(0)
    scores_TE = torch.rand(40, 16, generator=gen)
    bias_E = (torch.rand(16, generator=gen) - 0.5) * 0.3
    if bias_kind == "multiplicative":
        bias_E = 1.0 + bias_E
    gates_TK, experts_TK = select_experts(
        scores_TE,
        bias_E,
        4,
        bias_kind=bias_kind,
        normalize=False,
        route_limit=route_limit,
        num_groups=groups,
        max_groups=max_groups,
    )
    expected_TK = reference_select(
        scores_TE, bias_E, 4, bias_kind, route_limit, groups or 1, max_groups or 1
    )
    assert experts_TK.dtype == torch.int64
    assert torch.equal(experts_TK, expected_TK)
    # Gates are the UNBIASED scores of the chosen experts (LFB Alg. 1).
    assert torch.equal(gates_TK, torch.gather(scores_TE, 1, expected_TK))


def test_bias_changes_selection_but_not_gates():
    scores_TE = torch.tensor([[0.9, 0.8, 0.1, 0.2]])
    bias_E = torch.tensor([0.0, -1.0, 0.0, 0.0])
    gates_TK, experts_TK = select_experts(scores_TE, bias_E, 2, normalize=False)
    assert experts_TK.tolist() == [[0, 3]]
    assert torch.equal(gates_TK, torch.tensor([[0.9, 0.2]]))


def test_normalize_and_scaling_factor_exact():
    scores_TE = torch.tensor([[0.5, 0.25, 0.125, 0.125]])
    gates_TK, experts_TK = select_experts(scores_TE, None, 2, scaling_factor=2.0)
    assert experts_TK.tolist() == [[0, 1]]
    # 0.5 / 0.75 and 0.25 / 0.75, times 2 (the 1e-20 is below fp32 resolution here).
    assert torch.equal(gates_TK, torch.tensor([[0.5 / 0.75 * 2.0, 0.25 / 0.75 * 2.0]]))
    # K == 1: no normalisation (as Megatron-Core), so the gate keeps its gradient signal.
    gates_T1, _ = select_experts(scores_TE, None, 1)
    assert gates_T1.tolist() == [[0.5]]


def test_gradient_reaches_scores_not_bias():
    gen = torch.Generator().manual_seed(1)
    logits_TE = torch.randn(12, 8, generator=gen, requires_grad=True)
    bias_E = torch.randn(8, generator=gen).mul_(0.1).requires_grad_(True)
    weights_TK = torch.randn(12, 2, generator=gen)
    gates_TK, experts_TK = select_experts(torch.sigmoid(logits_TE), bias_E, 2)
    (gates_TK * weights_TK).sum().backward()
    assert bias_E.grad is None
    # Same loss built by hand on the same experts: identical gradient.
    logits_ref = logits_TE.detach().clone().requires_grad_(True)
    picked_TK = torch.gather(torch.sigmoid(logits_ref), 1, experts_TK)
    ((picked_TK / (picked_TK.sum(-1, keepdim=True) + 1e-20)) * weights_TK).sum().backward()
    assert torch.equal(logits_TE.grad, logits_ref.grad)
    assert logits_TE.grad.abs().sum() > 0


@pytest.mark.parametrize("route_limit", ["device", "node"])
def test_group_limit_holds_under_ties(route_limit):
    gen = torch.Generator().manual_seed(2)
    # Quantised scores: most experts tie with several others, in and across groups.
    scores_TE = torch.randint(0, 3, (500, 16), generator=gen).float() / 2
    for bias_E in (None, torch.zeros(16), torch.randint(0, 2, (16,), generator=gen).float() / 2):
        _, experts_TK = select_experts(
            scores_TE, bias_E, 4, route_limit=route_limit, num_groups=8, max_groups=2
        )
        groups_TK = experts_TK // 2
        for t in range(500):
            assert len(set(groups_TK[t].tolist())) <= 2
            assert len(set(experts_TK[t].tolist())) == 4


def test_device_and_node_rules_differ_on_constructed_case():
    # 4 groups of 2 experts, K=2, M=1. Group 0 has the single best expert (0.9 + 0.0 = 0.9),
    # group 1 the best pair (0.6 + 0.6 = 1.2).
    scores_TE = torch.tensor([[0.9, 0.0, 0.6, 0.6, 0.1, 0.1, 0.2, 0.1]])
    options = dict(normalize=False, num_groups=4, max_groups=1)
    gates_dev, experts_dev = select_experts(scores_TE, None, 2, route_limit="device", **options)
    gates_node, experts_node = select_experts(scores_TE, None, 2, route_limit="node", **options)
    assert experts_dev.tolist() == [[0, 1]]  # V2: group with the max expert
    assert gates_dev.tolist() == [[pytest.approx(0.9), 0.0]]
    assert experts_node.tolist() == [[2, 3]]  # V3: group with the best top-K/M sum
    assert torch.equal(gates_node, torch.tensor([[0.6, 0.6]]))
    # Selection scores are biased: +1.2 on expert 6 (1.4) makes group 3 win under both rules.
    bias_E = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.2, 0.0])
    _, experts_dev = select_experts(scores_TE, bias_E, 2, route_limit="device", **options)
    _, experts_node = select_experts(scores_TE, bias_E, 2, route_limit="node", **options)
    assert experts_dev.tolist() == [[6, 7]]
    assert experts_node.tolist() == [[6, 7]]


def test_matches_megatron_node_limited_sigmoid_with_bias():
    pytest.importorskip("megatron.core")
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    gen = torch.Generator().manual_seed(3)
    logits_TE = torch.randn(64, 16, generator=gen)
    bias_E = torch.randn(16, generator=gen) * 0.1
    probs_TE, map_TE = topk_routing_with_score_function(
        logits_TE,
        4,
        num_groups=4,
        group_topk=2,
        scaling_factor=2.5,
        score_function="sigmoid",
        expert_bias=bias_E,
    )
    gates_TK, experts_TK = select_experts(
        compute_scores(logits_TE, "sigmoid"),
        bias_E,
        4,
        scaling_factor=2.5,
        route_limit="node",
        num_groups=4,
        max_groups=2,
    )
    assert torch.equal(routing_map_from_experts(experts_TK, 16), map_TE)
    ours_TE = torch.zeros(64, 16).scatter(1, experts_TK, gates_TK)
    torch.testing.assert_close(ours_TE, probs_TE, rtol=0, atol=1e-7)


def test_compute_scores_exact_and_fp32():
    logits_TE = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.bfloat16)
    assert compute_scores(logits_TE, "sigmoid").dtype == torch.float32
    assert compute_scores(torch.tensor([[0.0, 0.0]]), "sigmoid").tolist() == [[0.5, 0.5]]
    assert compute_scores(torch.tensor([[0.0, math.log(3.0)]]), "softmax").tolist() == [
        [pytest.approx(0.25), pytest.approx(0.75)]
    ]
    assert compute_scores(torch.tensor([[0.0]]), "sqrtsoftplus").item() == pytest.approx(
        math.sqrt(math.log(2.0))
    )
    assert sorted(SCORE_FUNCTIONS) == ["sigmoid", "softmax", "sqrtsoftplus"]
    assert sorted(ROUTE_LIMITS) == ["device", "node", "none"]


def test_routing_map_and_counts():
    experts_TK = torch.tensor([[0, 2], [2, 3], [0, 2]])
    assert routing_map_from_experts(experts_TK, 4).tolist() == [
        [True, False, True, False],
        [False, False, True, True],
        [True, False, True, False],
    ]
    counts_E = count_tokens_per_expert(experts_TK, 4)
    assert counts_E.dtype == torch.int64 and counts_E.tolist() == [2, 0, 3, 1]
    keep_TK = torch.tensor([[True, False], [True, True], [False, True]])
    assert count_tokens_per_expert(experts_TK, 4, keep_TK).tolist() == [1, 0, 2, 1]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(topk=17),
            "topk (17) must be between 1 and num_experts (16): choose at most 16 experts per token",
        ),
        (
            dict(bias_kind="mul"),
            "bias_kind ('mul') is not known: choose one of ['additive', 'multiplicative']",
        ),
        (
            dict(route_limit="rank"),
            "route_limit ('rank') is not known: choose one of ['device', 'node', 'none']",
        ),
        (
            dict(route_limit="device", num_groups=6, max_groups=2),
            "num_groups (6) must divide num_experts (16): choose a divisor of 16",
        ),
        (
            dict(route_limit="device", num_groups=4, max_groups=5),
            "max_groups (5) must be at most num_groups (4): lower max_groups",
        ),
        (
            dict(route_limit="device", num_groups=8, max_groups=1),
            "max_groups (1) groups of 2 experts cannot hold topk (4) experts: raise max_groups "
            "to at least 2",
        ),
        (
            dict(route_limit="node", num_groups=8, max_groups=5),
            "max_groups (5) must be at most topk (4) with route_limit 'node' (each group scores its "
            "top K // M experts, none here): lower max_groups to at most 4",
        ),
        (
            dict(route_limit="node", num_groups=None, max_groups=2),
            "num_groups (None) must be a positive integer with route_limit 'node': set it or use "
            "route_limit 'none'",
        ),
        (
            dict(num_groups=4),
            "num_groups (4) is only used with route_limit 'device' or 'node': drop it or choose "
            "a route_limit",
        ),
    ],
)
def test_validation_messages(kwargs, message):
    args = dict(topk=4)
    args.update(kwargs)
    topk = args.pop("topk")
    with raises_exactly(message):
        select_experts(torch.rand(3, 16), None, topk, **args)


def test_score_function_registry_lists_choices():
    with raises_exactly(
        "score_function ('relu') is not known: choose one of ['sigmoid', 'softmax', 'sqrtsoftplus']"
    ):
        compute_scores(torch.zeros(1, 2), "relu")
