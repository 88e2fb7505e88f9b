"""quantile.py, quantile balancing (QB): the exact estimator (Megatron-Core 0.19.2's), the histogram
estimator (Kimi K3 / torchtitan), and the step-level finish. REFERENCE.md section 10.

Plugin convention: the bias b is ADDED to the selection score; Megatron-Core's qb_beta is
SUBTRACTED, so b = -qb_beta. The required bias is r[t, i] = cutoff_t - s[t, i].
The lane-2 tests (megatron-core >= 0.19 with ``qb_dual_update``) compare with Megatron's own code
and require BITWISE equality (torch.equal), not a tolerance.
"""

import math
import re
from importlib.metadata import version
from types import SimpleNamespace

import pytest
import torch
from packaging.version import Version

from megatron_moe_lossfree.quantile import (
    qb_blend_center,
    qb_cutoff,
    qb_exact_solve_E,
    qb_finish_step,
    qb_histogram_EB,
    qb_histogram_quantile_E,
    qb_histogram_range,
    qb_mean_solution,
    qb_required_bias_TE,
)
from megatron_moe_lossfree.errors import LossFreeConfigError

INF = math.inf

# Hand-made batch: 6 tokens, 4 experts, integer scores so that every value is exact.
S = torch.tensor(
    [
        [9.0, 5.0, 1.0, 0.0],
        [2.0, 8.0, 6.0, 3.0],
        [3.0, 1.0, 7.0, 4.0],
        [6.0, 4.0, 5.0, 0.0],
        [5.0, 9.0, 2.0, 8.0],
        [1.0, 2.0, 3.0, 7.0],
    ]
)
B = torch.tensor([0.5, 0.0, -0.5, 0.0])
# K = 1: biased rows s + b, cutoff = 2nd largest: [5, 5.5, 4, 4.5, 8, 2.5].
# r = cutoff - s, by column (token order):
R1_COLUMNS = [
    [-4.0, 3.5, 1.0, -1.5, 3.0, 1.5],
    [0.0, -2.5, 3.0, 0.5, -1.0, 0.5],
    [4.0, -0.5, -3.0, -0.5, 6.0, -0.5],
    [5.0, 2.5, 0.0, 4.5, 0.0, -4.5],
]


def f32(values):
    return torch.tensor(values, dtype=torch.float32)


def reference_solve(scores, bias, topk, valid=None, reachable=None):
    """Plain-Python oracle of qb_exact_solve_E: sorted lists, rank P = n*K/E clamped to
    [forced, n - 1], linear interpolation; no finite entry -> the old bias."""
    num_tokens, num_experts = scores.shape
    valid = [True] * num_tokens if valid is None else valid.tolist()
    reach = [[True] * num_experts] * num_tokens if reachable is None else reachable.tolist()
    s, b = scores.double().tolist(), bias.double().tolist()
    cutoffs = []
    for t in range(num_tokens):
        values = sorted((s[t][i] + b[i] for i in range(num_experts) if reach[t][i]), reverse=True)
        cutoffs.append(values[topk] if len(values) > topk else -INF)
    n = sum(valid)
    rank = n * topk / num_experts
    out = []
    for i in range(num_experts):
        column = sorted(cutoffs[t] - s[t][i] for t in range(num_tokens) if valid[t] and reach[t][i])
        forced = sum(v == -INF for v in column)
        if forced >= len(column):
            out.append(b[i])
            continue
        p = min(max(rank, forced), len(column) - 1)
        lo = math.floor(p)
        hi = min(lo + 1, len(column) - 1)
        out.append(column[lo] + (p - lo) * (column[hi] - column[lo]))
    return torch.tensor(out, dtype=torch.float64)


def loads(experts_TK, num_experts):
    return torch.bincount(experts_TK.reshape(-1), minlength=num_experts)


# --------------------------------------------------------------------------------------------------
# Exact estimator, by hand
# --------------------------------------------------------------------------------------------------


def test_cutoff_and_required_bias_by_hand():
    cut = qb_cutoff(S, B, 1)
    assert cut.cutoff_T.tolist() == [5.0, 5.5, 4.0, 4.5, 8.0, 2.5]
    assert cut.experts_TK.tolist() == [[0], [1], [2], [0], [1], [3]]
    assert cut.experts_TK.dtype == torch.int64
    assert qb_required_bias_TE(S, cut.cutoff_T).T.tolist() == R1_COLUMNS


def test_integer_rank_takes_the_order_statistic():
    # First 4 tokens, K = 1, E = 4: P = 4 * 1 / 4 = 1, the 2nd smallest of each column:
    # col0 [-4, 3.5, 1, -1.5] -> -1.5; col1 [0, -2.5, 3, 0.5] -> 0;
    # col2 [4, -0.5, -3, -0.5] -> -0.5; col3 [5, 2.5, 0, 4.5] -> 2.5.
    assert torch.equal(qb_exact_solve_E(S[:4], B, 1), f32([-1.5, 0.0, -0.5, 2.5]))
    # All 6 tokens, K = 2: cutoffs [0.5, 3, 3.5, 4, 5.5, 2] (3rd largest), P = 6 * 2 / 4 = 3:
    # col0 sorted [-8.5, -2, 0.5, 0.5, 1, 1] -> 0.5; col1 [-5, -4.5, -3.5, 0, 0, 2.5] -> 0;
    # col2 [-3.5, -3, -1, -1, -0.5, 3.5] -> -1; col3 [-5, -2.5, -0.5, 0, 0.5, 4] -> 0.
    assert torch.equal(qb_exact_solve_E(S, B, 2), f32([0.5, 0.0, -1.0, 0.0]))


def test_non_integer_rank_interpolates():
    # 6 tokens, K = 1: P = 6/4 = 1.5, halfway between the 2nd and 3rd smallest:
    # col0 [-4, -1.5, 1, ...] -> -0.25; col1 [-2.5, -1, 0, ...] -> -0.5;
    # col2 [-3, -0.5, -0.5, ...] -> -0.5; col3 [-4.5, 0, 0, ...] -> 0.
    assert torch.equal(qb_exact_solve_E(S, B, 1), f32([-0.25, -0.5, -0.5, 0.0]))


def test_padding_mask_drops_tokens_and_counts_only_valid_ones():
    # Token 2 is padding: n = 5, P = 5/4 = 1.25 (each token keeps its own cutoff):
    # col0 [-4, -1.5, 1.5, 3, 3.5] -> -1.5 + 0.25 * 3 = -0.75
    # col1 [-2.5, -1, 0, 0.5, 0.5] -> -1 + 0.25 * 1 = -0.75
    # col2 [-0.5, -0.5, -0.5, 4, 6] -> -0.5
    # col3 [-4.5, 0, 2.5, 4.5, 5]   -> 0 + 0.25 * 2.5 = 0.625
    valid = torch.tensor([True, True, False, True, True, True])
    assert torch.equal(qb_exact_solve_E(S, B, 1, valid_T=valid), f32([-0.75, -0.75, -0.5, 0.625]))
    # A padded batch equals the batch without the padded token.
    assert torch.equal(qb_exact_solve_E(S, B, 1, valid_T=valid), qb_exact_solve_E(S[valid], B, 1))


def test_reachable_mask_and_a_column_with_too_few_entries():
    # Groups {0, 1} and {2, 3}; tokens 0, 1, 3 reach {0, 1}, token 2 reaches {2, 3}. K = 1, T = 4,
    # P = 1. The cutoff is the other reachable expert: t0 biased [9.5, 5] -> 5; t1 [2.5, 8] -> 2.5;
    # t2 [6.5, 4] -> 4; t3 [6.5, 4] -> 4.
    # col0 [-4, 0.5, -2] sorted [-4, -2, 0.5] -> -2; col1 [0, -5.5, 0] -> 0;
    # col2 and col3 hold one entry each (token 2: -3 and 0) but rank 1 needs two: too few, so the
    # largest entry, the bias that wins every token the expert can reach.
    reach = torch.tensor(
        [[True, True, False, False], [True, True, False, False],
         [False, False, True, True], [True, True, False, False]]
    )
    cut = qb_cutoff(S[:4], B, 1, reachable_TE=reach)
    assert cut.cutoff_T.tolist() == [5.0, 2.5, 4.0, 4.0]
    assert cut.experts_TK.tolist() == [[0], [1], [2], [0]]
    assert torch.equal(qb_exact_solve_E(S[:4], B, 1, reachable_TE=reach), f32([-2.0, 0.0, -3.0, 0.0]))


def test_forced_tokens_empty_columns_and_the_clamp():
    # A token reaching only K experts has no cutoff (-inf): it takes them whatever the bias.
    # t3 reaches only expert 0: col0 [-4, 0.5, -inf] sorted [-inf, -4, 0.5], P = 1 -> -4.
    reach = torch.tensor(
        [[True, True, False, False], [True, True, False, False],
         [False, False, True, True], [True, False, False, False]]
    )
    assert qb_cutoff(S[:4], B, 1, reachable_TE=reach).cutoff_T[3].item() == -INF
    assert torch.equal(qb_exact_solve_E(S[:4], B, 1, reachable_TE=reach), f32([-4.0, 0.0, -3.0, 0.0]))
    # t1 and t3 forced onto expert 0: 2 forced > P = 1, the expert is over its target at any bias:
    # the smallest finite entry (-4). Expert 1 keeps only token 0 (r = 0): too few -> 0.
    reach[1] = torch.tensor([True, False, False, False])
    assert torch.equal(qb_exact_solve_E(S[:4], B, 1, reachable_TE=reach), f32([-4.0, 0.0, -3.0, 0.0]))
    # Every token forced onto expert 0; nobody reaches 1-3: no finite entry anywhere, bias kept.
    only0 = torch.zeros(4, 4, dtype=torch.bool)
    only0[:, 0] = True
    assert torch.equal(qb_exact_solve_E(S[:4], B, 1, reachable_TE=only0), B)
    # An all-padding batch and an empty batch keep the bias too.
    assert torch.equal(qb_exact_solve_E(S, B, 1, valid_T=torch.zeros(6, dtype=torch.bool)), B)
    assert torch.equal(qb_exact_solve_E(S[:0], B, 1), B)


def test_exact_estimator_matches_the_oracle_on_random_masked_batches():
    gen = torch.Generator().manual_seed(7)
    for trial in range(8):
        num_tokens, num_experts = 5 + 6 * trial, [4, 6, 8][trial % 3]
        topk = 1 + trial % (num_experts - 2)
        scores = torch.randn(num_tokens, num_experts, generator=gen).double()
        bias = (0.3 * torch.randn(num_experts, generator=gen)).double()
        valid = torch.rand(num_tokens, generator=gen) > 0.2
        reach = torch.rand(num_tokens, num_experts, generator=gen) > 0.4
        for kwargs in ({}, {"valid_T": valid}, {"reachable_TE": reach}, {"valid_T": valid, "reachable_TE": reach}):
            got = qb_exact_solve_E(scores, bias, topk, **kwargs)
            want = reference_solve(scores, bias, topk, kwargs.get("valid_T"), kwargs.get("reachable_TE"))
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=f"trial {trial} {sorted(kwargs)}")


def test_work_dtype_and_no_grad():
    logits = torch.randn(16, 8, dtype=torch.bfloat16, requires_grad=True)
    solved = qb_exact_solve_E(logits, torch.zeros(8), 2)
    assert solved.dtype == torch.float32 and not solved.requires_grad
    assert torch.equal(solved, qb_exact_solve_E(logits.detach().float(), torch.zeros(8), 2))
    assert qb_exact_solve_E(logits.double(), torch.zeros(8), 2).dtype == torch.float64


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: qb_exact_solve_E(S, B, 4), "topk (4) must be an integer in [1, 3]"),
        (lambda: qb_exact_solve_E(S, B, 0), "topk (0) must be an integer in [1, 3]"),
        (lambda: qb_exact_solve_E(S, B[:3], 1), "bias_E (torch.float32, shape (3,)) must have shape [4]"),
        (lambda: qb_exact_solve_E(S[0], B, 1), "scores_TE (torch.float32, shape (4,)) must be a floating [T, E]"),
        (lambda: qb_exact_solve_E(S, B, 1, valid_T=torch.ones(6)), "valid_T (torch.float32, shape (6,)) must be a bool"),
        (lambda: qb_cutoff(S, B, 1, reachable_TE=torch.ones(6, 3, dtype=torch.bool)), "reachable_TE (torch.bool, shape (6, 3))"),
        (lambda: qb_histogram_EB(S, B, 1, bins=0), "bins (0) must be a positive integer"),
        (lambda: qb_histogram_range(B, 10, margin=0.0), "margin (0.0) must be a finite number > 0"),
        (lambda: qb_histogram_quantile_E(torch.zeros(4, 3), B, 1, interpolation="nearest"), "interpolation ('nearest') is not known"),
        (lambda: qb_blend_center(B, B, 1.5), "ema (1.5) must be a number in [0, 1]"),
    ],
)
def test_bad_input_names_the_field(call, message):
    with pytest.raises(LossFreeConfigError, match=f"^{re.escape(message)}"):
        call()


# --------------------------------------------------------------------------------------------------
# Balance: what the solved bias does to the batch it was solved on
# --------------------------------------------------------------------------------------------------


def test_at_fixed_cutoffs_each_expert_gets_the_balanced_count_up_to_ties():
    # The defining property (one dual coordinate-descent step): with the cutoffs held fixed,
    # expert i wins token t iff b_new[i] > r[t, i]. With P = T*K/E, the solved value has at most
    # floor(P) + 1 required biases strictly below it and at least that many at or below it
    # (integer P = c: at most c strictly below, more than c at or below). The gap is ties, and they
    # are structural, not bad luck: for each token whose cutoff expert is j, r[t, j] =
    # (s[t, j] + b[j]) - s[t, j] is b[j] up to rounding, so every column holds a cluster of
    # near-equal values.
    gen = torch.Generator().manual_seed(3)
    for num_tokens, num_experts, topk in [(256, 16, 2), (250, 8, 3), (97, 12, 5)]:
        scores = torch.randn(num_tokens, num_experts, generator=gen) + torch.linspace(0, 2, num_experts)
        bias = 0.1 * torch.randn(num_experts, generator=gen)
        cut = qb_cutoff(scores, bias, topk)
        solved = qb_exact_solve_E(scores, bias, topk, cutoff_T=cut.cutoff_T)
        required = qb_required_bias_TE(scores, cut.cutoff_T)
        below, at_or_below = (required < solved).sum(dim=0), (required <= solved).sum(dim=0)
        rank = num_tokens * topk / num_experts
        if rank == int(rank):
            assert (below <= rank).all() and (at_or_below > rank).all(), (below, at_or_below, rank)
        else:
            assert (below <= math.floor(rank) + 1).all() and (at_or_below >= math.floor(rank) + 1).all()
        # Where no other entry equals the solved value, exactly the target (floor(P) + 1 for a
        # non-integer P, which lies strictly between two order statistics).
        untied = at_or_below - below == (1 if rank == int(rank) else 0)
        assert untied.sum().item() >= num_experts // 2
        assert (below[untied] == math.floor(rank) + (0 if rank == int(rank) else 1)).all()


def test_routing_on_the_solved_bias_balances_the_batch_approximately():
    # The cutoffs move once the bias does, so ONE step does not balance a batch exactly: it cuts the
    # imbalance by most of it. Repeating the step on the same batch (the dual coordinate descent of
    # Su's post, ema 0) settles within a few tokens of T*K/E (here <= 20%) but not exactly.
    gen = torch.Generator().manual_seed(1)
    for num_tokens, num_experts, topk in [(512, 16, 2), (300, 8, 1)]:
        scores = torch.randn(num_tokens, num_experts, generator=gen) + torch.linspace(0, 3, num_experts)
        target = num_tokens * topk / num_experts
        bias = torch.zeros(num_experts)
        deviations = []
        for _ in range(30):
            cut = qb_cutoff(scores, bias, topk)
            load = loads(cut.experts_TK, num_experts).double()
            deviations.append((load - target).abs().max().item() / target)
            bias = qb_blend_center(bias, qb_exact_solve_E(scores, bias, topk, cutoff_T=cut.cutoff_T), 0.0)
        assert deviations[0] > 1.5
        assert deviations[1] < 0.35 * deviations[0]
        assert max(deviations[10:]) <= 0.2, deviations


# --------------------------------------------------------------------------------------------------
# Histogram estimator
# --------------------------------------------------------------------------------------------------


def test_histogram_range_rule():
    lower, width = qb_histogram_range(f32([0.25, -0.5, 1.0]), 10)
    assert lower.item() == -1.5 and width.item() == pytest.approx(0.35)  # [-1.5, 2.0] in 10 bins
    lower, width = qb_histogram_range(torch.zeros(3), 4, margin=2.0)
    assert lower.item() == -2.0 and width.item() == 1.0


def test_histogram_counts_by_hand_with_edge_clamping():
    # Bias 0, 4 bins over [-1, 1] (width 0.5). K = 1 of 3 experts: cutoff = the 2nd largest.
    scores = f32([[0.9, 0.2, 0.0], [0.1, 0.3, 0.2], [3.0, 0.0, -0.5], [0.0, 2.0, -2.0]])
    # cutoffs [0.2, 0.2, 0, 0]; r = cutoff - s; bin = floor((r + 1) / 0.5), clamped into [0, 3]:
    # col0 r = [-0.7, 0.1, -3, 0]  -> bins 0, 2, 0 (clamped), 2 -> [2, 0, 2, 0]
    # col1 r = [0, -0.1, 0, -2]    -> bins 2, 1, 2, 0 (clamped) -> [1, 1, 2, 0]
    # col2 r = [0.2, 0, 0.5, 2]    -> bins 2, 2, 3, 3 (clamped) -> [0, 0, 2, 2]
    hist = qb_histogram_EB(scores, torch.zeros(3), 1, bins=4)
    assert hist.dtype == torch.int64
    assert hist.tolist() == [[2, 0, 2, 0], [1, 1, 2, 0], [0, 0, 2, 2]]
    valid = torch.tensor([True, True, True, False])
    masked = qb_histogram_EB(scores, torch.zeros(3), 1, bins=4, valid_T=valid)
    assert masked.tolist() == [[2, 0, 1, 0], [0, 1, 2, 0], [0, 0, 2, 1]]
    reach = torch.ones(4, 3, dtype=torch.bool)
    reach[3, 0] = False  # token 3 keeps experts 1 and 2: cutoff -2, r = [-, -4, 0] -> bins 0, 2
    assert qb_histogram_EB(scores, torch.zeros(3), 1, bins=4, reachable_TE=reach).tolist() == [
        [2, 0, 1, 0], [1, 1, 2, 0], [0, 0, 3, 1]]
    as_f64 = qb_histogram_EB(scores, torch.zeros(3), 1, bins=4, dtype=torch.float64)
    assert as_f64.dtype == torch.float64 and torch.equal(as_f64, hist.double())


def test_histogram_quantile_by_hand():
    # Bias 0, margin 1, 4 bins: lower -1, width 0.5. K = 1, E = 2, so the target is n/2.
    hist = torch.tensor([[1, 2, 0, 1], [0, 0, 0, 3]])
    # col0: n = 4, rank 2 = the 2nd of bin 1's two entries: 1 + (2 - 1 + 0.5) / 2 = 1.75 bins
    #       -> -1 + 0.5 * 1.75 = -0.125.  cdf: the CDF reaches 2 halfway through bin 1 -> -0.25.
    # col1: n = 3, rank 1.5 between bin 3's entries 1 and 2: 3 + (1.5 + 0.5) / 3 = 3.6667 bins
    #       -> -1 + 0.5 * 3.6667 = 0.8333.  cdf: the CDF reaches 1.5 halfway through bin 3 -> 0.75.
    rank = qb_histogram_quantile_E(hist, torch.zeros(2), 1)
    torch.testing.assert_close(rank, torch.tensor([-0.125, 5 / 6], dtype=torch.float64))
    cdf = qb_histogram_quantile_E(hist, torch.zeros(2), 1, interpolation="cdf")
    torch.testing.assert_close(cdf, torch.tensor([-0.25, 0.75], dtype=torch.float64))
    # An empty column keeps the bias; a target beyond the column clamps to its last entry.
    # Bias [0.25, 0]: lower -1, width (0.25 + 2) / 4 = 0.5625. Target 8/2 = 4 > 2 entries: rank 1,
    # the 2nd of bin 3's two: 3 + 1.5 / 2 = 3.75 bins -> -1 + 0.5625 * 3.75.
    empty = qb_histogram_quantile_E(torch.tensor([[0, 0, 0, 0], [0, 0, 0, 2]]), f32([0.25, 0.0]), 1, num_tokens=8)
    torch.testing.assert_close(empty, torch.tensor([0.25, -1 + 0.5625 * 3.75], dtype=torch.float64))


def test_histograms_are_additive_over_micro_batches():
    gen = torch.Generator().manual_seed(5)
    scores = torch.sigmoid(torch.randn(200, 8, generator=gen))
    bias = 0.2 * torch.randn(8, generator=gen)
    whole = qb_histogram_EB(scores, bias, 2, bins=50)
    parts = sum(qb_histogram_EB(chunk, bias, 2, bins=50) for chunk in scores.split(64))
    assert torch.equal(whole, parts)
    assert whole.sum(dim=-1).tolist() == [200] * 8


@pytest.mark.parametrize("bins", [1000, 37])
def test_histogram_within_one_bin_of_exact(bins):
    # Sigmoid scores: every r lies inside [min b - 1, max b + 1], none is clamped, so each order
    # statistic's histogram position lies in its own bin. Integer and non-integer ranks, masks.
    gen = torch.Generator().manual_seed(11)
    cases = [(512, 16, 2), (500, 16, 3), (600, 32, 6), (77, 8, 1)]
    for num_tokens, num_experts, topk in cases:
        scores = torch.sigmoid(1.5 * torch.randn(num_tokens, num_experts, generator=gen))
        bias = 0.3 * torch.randn(num_experts, generator=gen)
        width = qb_histogram_range(bias, bins)[1].item()
        valid = torch.rand(num_tokens, generator=gen) > 0.1
        reach = torch.rand(num_tokens, num_experts, generator=gen) > 0.3
        for kwargs in ({}, {"valid_T": valid}, {"valid_T": valid, "reachable_TE": reach}):
            exact = qb_exact_solve_E(scores, bias, topk, **kwargs).double()
            hist = sum(qb_histogram_EB(chunk, bias, topk, bins=bins, **_split(kwargs, index))
                       for index, chunk in zip(torch.arange(num_tokens).split(100), scores.split(100)))
            n = int(valid.sum()) if "valid_T" in kwargs else num_tokens
            got = qb_histogram_quantile_E(hist, bias, topk, num_tokens=n)
            error = (got - exact).abs().max().item()
            assert error <= width * (1 + 1e-4), (num_tokens, num_experts, topk, sorted(kwargs), error / width)


def _split(kwargs, index):
    return {key: value[index] for key, value in kwargs.items()}


def test_histogram_rank_rule_stays_within_a_bin_across_a_gap_where_cdf_does_not():
    # One expert column of required biases [-0.9, -0.85, 0.9, 0.95] (bias 0, 20 bins of 0.1), K = 1
    # of E = 2: rank 2 -> the exact estimator takes 0.9 (Megatron's choice, the high end of the
    # balancing interval (-0.85, 0.9]). "rank" lands in 0.9's bin; torchtitan's "cdf" lands at the
    # top of -0.85's bin, 17 bins away: both balance this batch, only "rank" tracks the exact value.
    hist = torch.zeros(2, 20, dtype=torch.int64)
    hist[0, 1] = 2   # -0.9, -0.85 in [-0.9, -0.8)
    hist[0, 19] = 2  # 0.9, 0.95 in [0.9, 1.0]
    hist[1, 10] = 4
    rank = qb_histogram_quantile_E(hist, torch.zeros(2), 1)[0].item()
    cdf = qb_histogram_quantile_E(hist, torch.zeros(2), 1, interpolation="cdf")[0].item()
    assert abs(rank - 0.9) < 0.1
    assert cdf == pytest.approx(-0.8) and abs(cdf - 0.9) > 1.0


# --------------------------------------------------------------------------------------------------
# Step-level finish
# --------------------------------------------------------------------------------------------------


def test_finish_step_by_hand():
    old = f32([0.5, -0.5, 0.0, 0.0])
    solved = [f32([1.0, 2.0, 3.0, 6.0]), f32([3.0, 2.0, 1.0, 2.0])]
    # mean [2, 2, 2, 4]; ema 0: replaced, then centred (mean 2.5) -> [-0.5, -0.5, -0.5, 1.5]
    assert torch.equal(qb_finish_step(old, solved, 0.0), f32([-0.5, -0.5, -0.5, 1.5]))
    # ema 0.5: 0.5 * old + 0.5 * mean = [1.25, 0.75, 1, 2], mean 1.25 -> [0, -0.5, -0.25, 0.75]
    assert torch.equal(qb_finish_step(old, solved, 0.5), f32([0.0, -0.5, -0.25, 0.75]))
    # First step from 0 with ema 0.9: (1 - 0.9) * mean, centred; no special case.
    first = qb_finish_step(torch.zeros(4), solved, 0.9)
    torch.testing.assert_close(first, 0.1 * f32([-0.5, -0.5, -0.5, 1.5]))
    # ema 1 keeps the old bias (centred); no solution at all keeps it untouched.
    assert torch.equal(qb_finish_step(old, solved, 1.0), old)
    assert torch.equal(qb_finish_step(old, [], 0.0), old)
    # Per layer: [L, E] with counts per layer.
    stacked = qb_blend_center(torch.zeros(2, 2), qb_mean_solution(f32([[2, 4], [6, 6]]), torch.tensor([2, 0])), 0.0)
    assert torch.equal(stacked, f32([[-0.5, 0.5], [0.0, 0.0]]))


# --------------------------------------------------------------------------------------------------
# Lane 2: Megatron-Core 0.19.2's own functions
# --------------------------------------------------------------------------------------------------


lane2 = pytest.mark.skipif(
    Version(version("megatron-core")) < Version("0.19"),
    reason="megatron-core < 0.19 has no quantile balancing (lane 2 only)",
)


def _megatron_qb():
    from megatron_moe_lossfree.megatron import compat

    compat.install_import_placeholders()
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "qb_dual_update"):
        pytest.skip("this megatron-core has no moe_utils.qb_dual_update")
    return moe_utils.qb_dual_update


@lane2
def test_exact_estimator_equals_megatron_qb_dual_update_bitwise():
    qb_dual_update = _megatron_qb()
    gen = torch.Generator().manual_seed(19)
    for num_tokens, num_experts, topk in [(64, 8, 2), (256, 16, 4), (96, 32, 8), (1024, 64, 6), (40, 4, 1)]:
        for scale in (0.01, 1.0, 30.0):
            logits = scale * torch.randn(num_tokens, num_experts, generator=gen)
            beta = scale * torch.randn(num_experts, generator=gen)
            indices, beta_local = qb_dual_update(logits, topk, beta)
            cut = qb_cutoff(logits, -beta, topk)
            assert torch.equal(cut.experts_TK, indices)
            assert torch.equal(qb_exact_solve_E(logits, -beta, topk), -beta_local)
            # bf16 logits: Megatron's router upcasts to fp32 before qb_dual_update; so do we.
            low = logits.bfloat16()
            assert torch.equal(qb_exact_solve_E(low, -beta, topk), -qb_dual_update(low.float(), topk, beta)[1])
    # Ties (integer logits): the order statistic is a value, so ties cannot split the two.
    logits = torch.randint(0, 3, (48, 8), generator=gen).float()
    assert torch.equal(qb_exact_solve_E(logits, torch.zeros(8), 2), -qb_dual_update(logits, 2, torch.zeros(8))[1])


@lane2
def test_non_integer_rank_is_where_megatron_asserts():
    qb_dual_update = _megatron_qb()
    logits = torch.randn(10, 4)
    with pytest.raises(AssertionError, match="divisible"):
        qb_dual_update(logits, 1, torch.zeros(4))
    solved = qb_exact_solve_E(logits, torch.zeros(4), 1)  # P = 2.5: interpolated, no assertion
    assert torch.isfinite(solved).all()


@lane2
def test_finish_step_equals_megatron_update_router_qb_beta_bitwise(megatron_world):
    qb_dual_update = _megatron_qb()
    from megatron.core.distributed.finalize_model_grads import _update_router_qb_beta

    gen = torch.Generator().manual_seed(23)
    for ema in (0.0, 0.9, 0.37):
        routers = torch.nn.ModuleList()
        ours_old, ours_solved = [], []
        for _ in range(3):  # three MoE layers, three micro-batches each
            router = torch.nn.Module()
            beta = torch.randn(16, generator=gen)
            router.register_buffer("qb_beta", beta.clone())
            router.register_buffer("qb_beta_accum", torch.zeros(16))
            router.register_buffer("qb_beta_count", torch.zeros((), dtype=torch.long))
            solutions = []
            for _ in range(3):
                logits = torch.randn(64, 16, generator=gen)
                _, beta_local = qb_dual_update(logits, 2, router.qb_beta)
                router.qb_beta_accum.add_(beta_local)
                router.qb_beta_count.add_(1)
                solutions.append(qb_exact_solve_E(logits, -beta, 2))
            routers.append(router)
            ours_old.append(-beta)
            ours_solved.append(solutions)
        _update_router_qb_beta([routers], SimpleNamespace(moe_router_quantile_balancing_ema=ema),
                               dp_cp_group=megatron_world.group.WORLD)
        for router, old, solutions in zip(routers, ours_old, ours_solved):
            assert torch.equal(qb_finish_step(old, solutions, ema), -router.qb_beta), ema
        # All layers at once ([L, E], one buffer for one collective): the same bits.
        accum = torch.zeros(3, 16)
        for micro in range(3):
            accum += torch.stack([solutions[micro] for solutions in ours_solved])
        stacked = qb_blend_center(torch.stack(ours_old), qb_mean_solution(accum, torch.tensor([3, 3, 3])), ema)
        assert torch.equal(stacked, -torch.stack([router.qb_beta for router in routers]))
