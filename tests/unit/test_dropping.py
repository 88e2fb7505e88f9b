"""dropping.py: capacities, expert mask vs Megatron-Core, V2 device mask, exempt choice."""

import re

import pytest
import torch

from megatron_moe_lossfree.dropping import (
    _splitmix64,
    device_budget,
    device_keep_mask,
    expert_capacity,
    expert_keep_mask,
    select_exempt_sequences,
)
from megatron_moe_lossfree.errors import LossFreeConfigError


def raises_exactly(message):
    """pytest.raises for LossFreeConfigError whose whole message is ``message``."""
    return pytest.raises(LossFreeConfigError, match=f"^{re.escape(message)}$")


def distinct_routing(num_tokens, num_experts, topk, seed):
    """Random top-k routing with all gate values distinct (no tie ambiguity)."""
    gen = torch.Generator().manual_seed(seed)
    experts_TK = torch.stack(
        [torch.randperm(num_experts, generator=gen)[:topk] for _ in range(num_tokens)]
    )
    gates_TK = (torch.randperm(num_tokens * topk, generator=gen).float() + 1) / (
        num_tokens * topk + 1
    )
    return gates_TK.view(num_tokens, topk), experts_TK


def test_capacities_exact():
    assert expert_capacity(100, 2, 8, 1.0) == 25
    assert expert_capacity(100, 2, 8, 1.1) == 28  # ceil(27.5)
    assert expert_capacity(10, 1, 4, 1.0) == 3  # ceil(2.5)
    assert device_budget(100, 6, 8, 1.0) == 75
    assert device_budget(10, 3, 4, 1.0) == 8  # ceil(7.5)


def test_capacity_matches_megatron_get_capacity():
    pytest.importorskip("megatron.core")
    from megatron.core.transformer.moe.moe_utils import get_capacity

    for tokens, topk, experts, factor in [
        (100, 2, 8, 1.1),
        (37, 3, 16, 0.7),
        (4096, 8, 64, 1.25),
        (7, 6, 64, 1.0),
    ]:
        assert expert_capacity(tokens, topk, experts, factor) == get_capacity(
            tokens * topk, experts, factor
        )


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("factor", [0.5, 1.0, 1.3, 4.0])
def test_expert_mask_matches_megatron(policy, factor):
    pytest.importorskip("megatron.core")
    from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping

    num_tokens, num_experts, topk = 96, 8, 2
    gates_TK, experts_TK = distinct_routing(num_tokens, num_experts, topk, seed=int(factor * 10))
    routing_map_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter(
        1, experts_TK, True
    )
    probs_TE = torch.zeros(num_tokens, num_experts).scatter(1, experts_TK, gates_TK)
    _, megatron_TE = apply_router_token_dropping(
        probs_TE, routing_map_TE, topk, factor, drop_policy=policy, pad_to_capacity=False
    )
    keep_TK = expert_keep_mask(
        gates_TK, experts_TK, num_experts=num_experts, capacity_factor=factor, policy=policy
    )
    ours_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter(1, experts_TK, keep_TK)
    if policy == "probs":
        assert torch.equal(ours_TE, megatron_TE)
    else:
        # Megatron-Core takes torch.topk over a 0/1 map: the same number per expert, but which of
        # the tied tokens is unspecified. Ours keeps exactly the earliest tokens.
        assert torch.equal(ours_TE.sum(0), megatron_TE.sum(0))
        capacity = expert_capacity(num_tokens, topk, num_experts, factor)
        for e in range(num_experts):
            chosen = routing_map_TE[:, e].nonzero().flatten()
            assert torch.equal(ours_TE[:, e].nonzero().flatten(), chosen[:capacity])


def test_expert_mask_hand_example():
    # T=4, K=1, E=2, cf=1: capacity ceil(4/2) = 2. Expert 0 gets tokens 0, 1, 2; expert 1 gets 3.
    gates_TK = torch.tensor([[0.2], [0.9], [0.5], [0.1]])
    experts_TK = torch.tensor([[0], [0], [0], [1]])
    probs = expert_keep_mask(gates_TK, experts_TK, num_experts=2, capacity_factor=1.0)
    position = expert_keep_mask(
        gates_TK, experts_TK, num_experts=2, capacity_factor=1.0, policy="position"
    )
    assert probs.flatten().tolist() == [False, True, True, True]
    assert position.flatten().tolist() == [True, True, False, True]


def test_device_mask_hand_example():
    # T=4, K=2, E=4, D=2 (experts 0-1 on device 0, 2-3 on device 1), cf=1: budget ceil(8/2) = 4.
    experts_TK = torch.tensor([[0, 2], [1, 0], [0, 1], [3, 1]])
    gates_TK = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.8, 0.2]])
    # Device 0 holds 6 assignments with gates .6 .7 .3 .5 .5 .2: drop the two lowest (.3, .2).
    keep = device_keep_mask(
        gates_TK, experts_TK, num_devices=2, capacity_factor=1.0, exempt=None, num_experts=4
    )
    assert keep.tolist() == [[True, True], [True, False], [True, True], [True, False]]
    # Token 3 exempt: its .2 is kept and uses one slot; the .5 tie on token 2 goes to k=0.
    exempt = torch.tensor([False, False, False, True])
    keep = device_keep_mask(
        gates_TK, experts_TK, num_devices=2, capacity_factor=1.0, exempt=exempt, num_experts=4
    )
    assert keep.tolist() == [[True, True], [True, False], [True, False], [True, True]]
    # E inferred from experts.max() = 3 -> smallest multiple of D above it = 4: same mask.
    assert torch.equal(
        device_keep_mask(gates_TK, experts_TK, num_devices=2, capacity_factor=1.0, exempt=exempt),
        keep,
    )


def test_device_mask_ties_keep_lower_token_index():
    experts_TK = torch.zeros(6, 1, dtype=torch.int64)
    gates_TK = torch.full((6, 1), 0.5)
    # D=2, E=2: budget ceil(6/2) = 3, all six on device 0 with equal gates.
    keep = device_keep_mask(
        gates_TK, experts_TK, num_devices=2, capacity_factor=1.0, exempt=None, num_experts=2
    )
    assert keep.flatten().tolist() == [True, True, True, False, False, False]


def test_device_mask_properties_on_random_routing():
    num_tokens, num_experts, topk, num_devices = 256, 16, 4, 4
    gen = torch.Generator().manual_seed(7)
    # Skewed routing so that some devices overflow.
    experts_TK = torch.multinomial(
        torch.linspace(3.0, 0.2, num_experts).expand(num_tokens, -1), topk, generator=gen
    )
    gates_TK = torch.rand(num_tokens, topk, generator=gen)
    exempt_T = torch.rand(num_tokens, generator=gen) < 0.1
    keep_TK = device_keep_mask(
        gates_TK,
        experts_TK,
        num_devices=num_devices,
        capacity_factor=1.0,
        exempt=exempt_T,
        num_experts=num_experts,
    )
    budget = device_budget(num_tokens, topk, num_devices, 1.0)
    device_TK = experts_TK // (num_experts // num_devices)
    exempt_TK = exempt_T.unsqueeze(1).expand_as(keep_TK)
    assert keep_TK[exempt_TK].all()
    dropped_somewhere = False
    for d in range(num_devices):
        on_d = device_TK == d
        n_exempt = int((on_d & exempt_TK).sum())
        kept = int((on_d & keep_TK).sum())
        assert kept == max(n_exempt, min(int(on_d.sum()), budget))
        dropped = gates_TK[on_d & ~keep_TK]
        kept_free = gates_TK[on_d & keep_TK & ~exempt_TK]
        if dropped.numel():
            dropped_somewhere = True
            assert dropped.max() <= kept_free.min()
    assert dropped_somewhere


def test_exempt_over_budget_keeps_only_exempt():
    # All 8 tokens on device 0 (E=2, D=2, K=1, budget ceil(8/2) = 4); 5 of them exempt.
    experts_TK = torch.zeros(8, 1, dtype=torch.int64)
    gates_TK = torch.arange(8, 0, -1, dtype=torch.float32).view(8, 1) / 10
    exempt_T = torch.tensor([False, False, False, True, True, True, True, True])
    keep = device_keep_mask(
        gates_TK, experts_TK, num_devices=2, capacity_factor=1.0, exempt=exempt_T, num_experts=2
    )
    assert torch.equal(keep.flatten(), exempt_T)


def test_device_mask_validation():
    gates_TK, experts_TK = torch.rand(4, 2), torch.tensor([[0, 1], [2, 3], [4, 5], [0, 5]])
    with raises_exactly("num_devices (4) must divide num_experts (6): choose a divisor of 6"):
        device_keep_mask(
            gates_TK, experts_TK, num_devices=4, capacity_factor=1.0, exempt=None, num_experts=6
        )
    with raises_exactly(
        "exempt (torch.bool, shape (3,)) must be bool of shape (4,): one flag per token, or None"
    ):
        device_keep_mask(
            gates_TK,
            experts_TK,
            num_devices=2,
            capacity_factor=1.0,
            exempt=torch.ones(3, dtype=torch.bool),
        )
    with raises_exactly(
        "capacity_factor (0.0) must be a finite number > 0: V2 uses 1.0; use no dropping instead "
        "of an "
        "infinite factor"
    ):
        device_keep_mask(gates_TK, experts_TK, num_devices=2, capacity_factor=0.0, exempt=None)
    with raises_exactly("policy ('random') is not known: choose one of ['position', 'probs']"):
        expert_keep_mask(gates_TK, experts_TK, num_experts=6, capacity_factor=1.0, policy="random")


@pytest.mark.parametrize("bad", [6, -1])
def test_expert_ids_outside_the_layer_are_refused_by_both_masks(bad):
    gates_TK, experts_TK = torch.rand(4, 2), torch.tensor([[0, 1], [2, 3], [4, 5], [0, 5]])
    experts_TK[2, 1] = bad
    message = f"experts holds expert {bad} but num_experts is 6: pass the layer's number of experts"
    with raises_exactly(message):
        expert_keep_mask(gates_TK, experts_TK, num_experts=6, capacity_factor=1.0)
    with raises_exactly(message):
        device_keep_mask(gates_TK, experts_TK, num_devices=2, capacity_factor=1.0, exempt=None, num_experts=6)


def test_splitmix64_reference_values():
    # Known first outputs of splitmix64 seeded with 0 (Vigna's reference implementation).
    assert _splitmix64(0) == 0xE220A8397B1DCDAF
    assert _splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4


def test_exempt_fraction_and_determinism():
    ids_B = torch.arange(10_000)
    exempt = select_exempt_sequences(ids_B, seed=1234, step=7, fraction=0.1)
    assert exempt.dtype == torch.bool and exempt.shape == (10_000,)
    assert 0.08 <= exempt.float().mean().item() <= 0.12
    # Same inputs -> same flags; a flag does not depend on the neighbours (any rank's slice).
    assert torch.equal(select_exempt_sequences(ids_B, seed=1234, step=7, fraction=0.1), exempt)
    assert torch.equal(
        select_exempt_sequences(ids_B[5000:5100], seed=1234, step=7, fraction=0.1),
        exempt[5000:5100],
    )
    assert not torch.equal(select_exempt_sequences(ids_B, seed=1234, step=8, fraction=0.1), exempt)
    assert not select_exempt_sequences(ids_B[:1000], seed=1, step=0, fraction=0.0).any()
    assert select_exempt_sequences(ids_B[:1000], seed=1, step=0, fraction=1.0).all()


def test_exempt_validation():
    with raises_exactly("fraction (1.5) must be in [0, 1]: V2 exempts 0.1 of the sequences"):
        select_exempt_sequences(torch.arange(4), seed=0, step=0, fraction=1.5)
    with raises_exactly(
        "global_sample_ids_B (torch.float32, shape (4,)) must be a 1-D integer tensor: "
        "pass the global sample index of each sequence"
    ):
        select_exempt_sequences(torch.zeros(4), seed=0, step=0, fraction=0.1)
