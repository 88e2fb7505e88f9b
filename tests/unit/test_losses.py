"""balancing.py losses: each against a python loop over its paper equation; gradients."""

import re

import pytest
import torch

from megatron_moe_lossfree.balancing import (
    aux_loss,
    comm_balance_loss,
    device_balance_loss,
    sequence_aux_loss,
    unbiased_topk,
)
from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.routing import select_experts

B, S, E, K, D, M = 3, 10, 8, 2, 4, 2
ALPHA = 0.3


def raises_exactly(message):
    """pytest.raises for LossFreeConfigError whose whole message is ``message``."""
    return pytest.raises(LossFreeConfigError, match=f"^{re.escape(message)}$")


def random_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    scores_TE = torch.rand(B * S, E, generator=gen, dtype=torch.float64)
    experts_TK = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(B * S)])
    return scores_TE, experts_TK


def loop_expert_terms(scores, experts, b, normalise=False, seq_len=S):
    """f_i and P_i of sequence b (LFB eq. 2 / V2 eqs. 13-14 / V3 eqs. 18-20), written out."""
    rows = range(b * seq_len, (b + 1) * seq_len)
    f, p = [], []
    for i in range(E):
        chosen = sum(1 for t in rows for k in range(K) if experts[t][k] == i)
        f.append(E / (K * seq_len) * chosen)
        total = 0.0
        for t in rows:
            s = scores[t][i] / sum(scores[t]) if normalise else scores[t][i]
            total += s
        p.append(total / seq_len)
    return f, p


def loop_aux(scores, experts, normalise=False, num_sequences=B):
    per_seq, seq_len = [], len(scores) // num_sequences
    for b in range(num_sequences):
        f, p = loop_expert_terms(scores, experts, b, normalise, seq_len)
        per_seq.append(ALPHA * sum(f[i] * p[i] for i in range(E)))
    return sum(per_seq) / num_sequences


def loop_device(scores, experts):
    per_seq, per_dev = [], E // D
    for b in range(B):
        f, p = loop_expert_terms(scores, experts, b)
        total = 0.0
        for d in range(D):
            members = range(d * per_dev, (d + 1) * per_dev)
            total += (sum(f[i] for i in members) / per_dev) * sum(p[i] for i in members)
        per_seq.append(ALPHA * total)
    return sum(per_seq) / B


def loop_comm(scores, experts):
    per_seq, per_dev = [], E // D
    for b in range(B):
        _, p = loop_expert_terms(scores, experts, b)
        total = 0.0
        for d in range(D):
            sent = sum(
                1 for t in range(b * S, (b + 1) * S) if any(e // per_dev == d for e in experts[t])
            )
            total += D / (M * S) * sent * sum(p[i] for i in range(d * per_dev, (d + 1) * per_dev))
        per_seq.append(ALPHA * total)
    return sum(per_seq) / B


def test_aux_loss_matches_loop():
    scores, experts = random_batch(0)
    got = aux_loss(scores, experts, alpha=ALPHA, num_sequences=B)
    assert got.item() == pytest.approx(
        loop_aux(scores.tolist(), experts.tolist()), rel=1e-6, abs=1e-6
    )


def test_aux_loss_single_sequence_matches_loop():
    # One sequence of all B*S tokens: the batch-level form of LFB eq. 2.
    scores, experts = random_batch(1)
    expected = loop_aux(scores.tolist(), experts.tolist(), num_sequences=1)
    assert aux_loss(scores, experts, alpha=ALPHA).item() == pytest.approx(
        expected, rel=1e-6, abs=1e-6
    )


def test_sequence_aux_loss_matches_loop_on_unbiased_topk():
    scores, _ = random_batch(2)
    experts = unbiased_topk(scores, K)
    assert torch.equal(experts, torch.topk(scores, K, dim=-1).indices)
    got = sequence_aux_loss(scores, experts, alpha=ALPHA, num_sequences=B)
    expected = loop_aux(scores.tolist(), experts.tolist(), normalise=True)
    assert got.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_device_balance_loss_matches_loop():
    scores, experts = random_batch(3)
    got = device_balance_loss(scores, experts, alpha=ALPHA, num_devices=D, num_sequences=B)
    assert got.item() == pytest.approx(
        loop_device(scores.tolist(), experts.tolist()), rel=1e-6, abs=1e-6
    )


def test_comm_balance_loss_matches_loop():
    scores, experts = random_batch(4)
    got = comm_balance_loss(
        scores, experts, alpha=ALPHA, num_devices=D, max_devices=M, num_sequences=B
    )
    assert got.item() == pytest.approx(
        loop_comm(scores.tolist(), experts.tolist()), rel=1e-6, abs=1e-6
    )


def test_balanced_uniform_routing_gives_alpha():
    # Perfect balance with uniform scores: f_i = 1, P_i = 1/E, L = alpha (the loss's minimum scale).
    scores_TE = torch.full((4, 4), 0.25)
    experts_TK = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert aux_loss(scores_TE, experts_TK, alpha=0.01).item() == pytest.approx(0.01)


@pytest.mark.parametrize("which", ["aux", "seq", "dev", "comm"])
def test_gradient_reaches_router_weights_not_bias(which):
    gen = torch.Generator().manual_seed(5)
    hidden_TH = torch.randn(B * S, 6, generator=gen)
    weight_EH = torch.randn(E, 6, generator=gen).requires_grad_(True)
    bias_E = torch.zeros(E, requires_grad=True)
    scores_TE = torch.sigmoid(hidden_TH @ weight_EH.t())
    scores_TE.retain_grad()
    _, experts_TK = select_experts(scores_TE, bias_E, K)
    if which == "aux":
        loss = aux_loss(scores_TE, experts_TK, alpha=ALPHA, num_sequences=B)
    elif which == "seq":
        loss = sequence_aux_loss(
            scores_TE, unbiased_topk(scores_TE, K), alpha=ALPHA, num_sequences=B
        )
    elif which == "dev":
        loss = device_balance_loss(
            scores_TE, experts_TK, alpha=ALPHA, num_devices=D, num_sequences=B
        )
    else:
        loss = comm_balance_loss(
            scores_TE, experts_TK, alpha=ALPHA, num_devices=D, max_devices=M, num_sequences=B
        )
    loss.backward()
    assert bias_E.grad is None
    assert weight_EH.grad is not None and weight_EH.grad.abs().sum() > 0
    if which == "aux":
        # dL/ds[t, i] = alpha * f_i(seq of t) / (S * B): the f terms carry no gradient.
        counts_BE = torch.zeros(B, E).scatter_add_(1, experts_TK.view(B, -1), torch.ones(B, S * K))
        expected_TE = (ALPHA * counts_BE * E / (K * S) / (S * B)).repeat_interleave(S, dim=0)
        torch.testing.assert_close(scores_TE.grad, expected_TE, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "call,message",
    [
        (
            lambda s, e: aux_loss(s, e, alpha=1.0, num_sequences=4),
            "num_sequences (4) must divide the 30 tokens: pass the number of sequences in this "
            "batch",
        ),
        (
            lambda s, e: device_balance_loss(s, e, alpha=1.0, num_devices=3),
            "num_devices (3) must divide num_experts (8): choose a divisor of 8",
        ),
        (
            lambda s, e: comm_balance_loss(s, e, alpha=1.0, num_devices=4, max_devices=5),
            "max_devices (5) must be between 1 and num_devices (4): use the M of device-limited "
            "routing",
        ),
    ],
)
def test_loss_validation(call, message):
    scores, experts = random_batch(6)
    with raises_exactly(message):
        call(scores, experts)
