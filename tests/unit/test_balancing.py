"""balancing.py: bias update rules (hand-computed values) and rate schedules."""

import math
import re

import pytest
import torch

from megatron_moe_lossfree.balancing import (
    RATE_SCHEDULES,
    UPDATE_RULES,
    RateSchedule,
    make_rate_schedule,
    update_bias,
)
from megatron_moe_lossfree.errors import LossFreeConfigError

U = 1e-3


def raises_exactly(message):
    """pytest.raises for LossFreeConfigError whose whole message is ``message``."""
    return pytest.raises(LossFreeConfigError, match=f"^{re.escape(message)}$")


def f32(values):
    return torch.tensor(values, dtype=torch.float32)


def test_registry_holds_every_paper_variant():
    assert sorted(UPDATE_RULES) == ["multiplicative", "proportional", "sign", "sign_centered"]
    assert sorted(RATE_SCHEDULES) == ["constant", "v3"]


def test_sign_rule_brief_example():
    # counts [6, 2, 4, 4]: mean 4, e = mean - c = [-2, 2, 0, 0].
    new = update_bias(torch.zeros(4), torch.tensor([6, 2, 4, 4]), rule="sign", rate=U)
    assert torch.equal(new, f32([-1e-3, 1e-3, 0.0, 0.0]))


# counts [7, 3, 3, 3]: mean 4, e = [-3, 1, 1, 1], sign(e) = [-1, 1, 1, 1],
# e / mean = [-0.75, 0.25, 0.25, 0.25].
COUNTS = torch.tensor([7, 3, 3, 3])


def test_sign_rule_by_hand():
    new = update_bias(f32([0.25, -0.5, 0.0, 0.125]), COUNTS, rule="sign", rate=U)
    assert torch.equal(new, f32([0.25 - 1e-3, -0.5 + 1e-3, 1e-3, 0.125 + 1e-3]))


def test_proportional_rule_by_hand():
    new = update_bias(torch.zeros(4), COUNTS, rule="proportional", rate=U)
    assert torch.equal(new, f32([-0.75e-3, 0.25e-3, 0.25e-3, 0.25e-3]))


def test_sign_centered_rule_by_hand():
    # d = [-1, 1, 1, 1] * 1e-3, mean(d) = 0.5e-3, d - mean(d) = [-1.5, 0.5, 0.5, 0.5] * 1e-3.
    new = update_bias(torch.zeros(4), COUNTS, rule="sign_centered", rate=U)
    assert torch.equal(new, f32([-1.5e-3, 0.5e-3, 0.5e-3, 0.5e-3]))
    assert abs(float(new.double().sum())) < 1e-9


def test_multiplicative_rule_from_ones():
    new = update_bias(torch.ones(4), COUNTS, rule="multiplicative", rate=U)
    assert torch.equal(new, f32([1 - 1e-3, 1 + 1e-3, 1 + 1e-3, 1 + 1e-3]))


def test_layer_rows_are_independent():
    bias_LE = torch.zeros(3, 4)
    counts_LE = torch.tensor([[6, 2, 4, 4], [0, 0, 0, 0], [1, 1, 1, 5]], dtype=torch.int32)
    assert torch.equal(
        update_bias(bias_LE, counts_LE, rule="sign", rate=U),
        f32([[-1e-3, 1e-3, 0, 0], [0, 0, 0, 0], [1e-3, 1e-3, 1e-3, -1e-3]]),
    )
    # mean 0 (a layer that saw no token): proportional leaves it unchanged.
    assert torch.equal(
        update_bias(bias_LE, counts_LE, rule="proportional", rate=U),
        f32([[-0.5e-3, 0.5e-3, 0, 0], [0, 0, 0, 0], [0.5e-3, 0.5e-3, 0.5e-3, -1.5e-3]]),
    )


def test_pure_and_frozen_rate_returns_equal_copy():
    bias = f32([0.25, -0.5, 0.0, 0.125])
    before = bias.clone()
    new = update_bias(bias, COUNTS, rule="sign", rate=U)
    assert torch.equal(bias, before)
    frozen = update_bias(bias, COUNTS, rule="sign", rate=0.0)
    assert torch.equal(frozen, bias) and frozen.data_ptr() != bias.data_ptr()
    assert new.dtype == torch.float32


def test_bias_is_not_part_of_autograd():
    bias = torch.zeros(4, requires_grad=True)
    assert not update_bias(bias, COUNTS, rule="sign", rate=U).requires_grad


def test_large_counts_keep_exact_sign():
    # 2**24 + 1 is not representable in fp32 or bf16: float counts would call this expert balanced.
    counts = torch.tensor([2**24 + 1, 2**24 - 1, 2**24, 2**24], dtype=torch.int64)
    assert torch.equal(
        update_bias(torch.zeros(4), counts, rule="sign", rate=U), f32([-1e-3, 1e-3, 0, 0])
    )


@pytest.mark.parametrize(
    "bias,counts,kwargs,message",
    [
        (
            torch.zeros(4),
            torch.tensor([6.0, 2.0, 4.0, 4.0]),
            dict(rule="sign", rate=U),
            "counts (torch.float32, shape (4,)) must be an integral tensor: count tokens in int64 "
            "(all-reduce in int64 or float64, then cast back with .long())",
        ),
        (
            torch.zeros(4),
            torch.tensor([True, False, True, True]),
            dict(rule="sign", rate=U),
            "counts (torch.bool, shape (4,)) must be an integral tensor: count tokens in int64 "
            "(all-reduce in int64 or float64, then cast back with .long())",
        ),
        (
            torch.zeros(2, 4),
            torch.tensor([6, 2, 4, 4]),
            dict(rule="sign", rate=U),
            "counts shape (4,) must equal bias shape (2, 4): pass one count per expert (per layer)",
        ),
        (
            torch.zeros(4),
            COUNTS,
            dict(rule="signum", rate=U),
            "rule ('signum') is not known: choose one of ['multiplicative', 'proportional', "
            "'sign', 'sign_centered']",
        ),
        (
            torch.zeros(4),
            COUNTS,
            dict(rule="sign", rate=-1e-3),
            "rate (-0.001) must be a finite number >= 0: the paper uses 0.001 (0 freezes the bias)",
        ),
        (
            torch.zeros(4),
            COUNTS,
            dict(rule="sign", rate=math.nan),
            "rate (nan) must be a finite number >= 0: the paper uses 0.001 (0 freezes the bias)",
        ),
        (
            torch.zeros(4, dtype=torch.int64),
            COUNTS,
            dict(rule="sign", rate=U),
            "bias (torch.int64, shape (4,)) must be a floating tensor of shape [E] or [L, E]: "
            "keep the expert bias as an fp32 buffer",
        ),
    ],
)
def test_update_bias_rejects_bad_input(bias, counts, kwargs, message):
    with raises_exactly(message):
        update_bias(bias, counts, **kwargs)


def test_v3_schedule_exact_at_boundary():
    schedule = make_rate_schedule("v3", 1e-3, freeze_after_tokens=14_300_000_000_000)
    assert schedule.rate_at(0) == 1e-3
    assert schedule.rate_at(14_299_999_999_999) == 1e-3
    assert schedule.rate_at(14_300_000_000_000) == 0.0
    assert schedule.rate_at(14_800_000_000_000) == 0.0


def test_constant_schedule():
    schedule = make_rate_schedule("constant", 1e-3)
    assert schedule == RateSchedule(name="constant", rate=1e-3)
    assert [schedule.rate_at(n) for n in (0, 10**15)] == [1e-3, 1e-3]


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ("v3", 1e-3),
            "freeze_after_tokens (None) must be a positive token count with schedule 'v3': "
            "set it (V3 froze the bias after 14.3T tokens)",
        ),
        (
            ("v3", 1e-3, 0),
            "freeze_after_tokens (0) must be a positive token count with schedule 'v3': "
            "set it (V3 froze the bias after 14.3T tokens)",
        ),
        (
            ("constant", 1e-3, 100),
            "freeze_after_tokens (100) is only used by schedule 'v3': drop it or choose name 'v3'",
        ),
        (("cosine", 1e-3), "name ('cosine') is not known: choose one of ['constant', 'primal_dual', 'v3']"),
        (
            ("constant", -1.0),
            "rate (-1.0) must be a finite number >= 0: the paper uses 0.001 (0 freezes the bias)",
        ),
    ],
)
def test_schedule_validation(args, message):
    with raises_exactly(message):
        make_rate_schedule(*args)
