"""metrics.py: MaxVio (LFB eq. 4) and friends on constructed counts, exact values."""

import math
import re

import pytest
import torch

from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.metrics import (
    bias_stats,
    drop_fraction,
    load_stats,
    max_violation,
    mean_max_violation,
)


def raises_exactly(message):
    """pytest.raises for LossFreeConfigError whose whole message is ``message``."""
    return pytest.raises(LossFreeConfigError, match=f"^{re.escape(message)}$")


def test_max_violation_vector():
    assert max_violation(torch.tensor([5, 5, 5, 5])) == 0.0
    # mean 4, max 8: one expert at double the balanced load -> exactly 1.0.
    assert max_violation(torch.tensor([8, 4, 2, 2])) == 1.0
    # mean 4, max 5 -> 0.25.
    assert max_violation(torch.tensor([5, 3, 4, 4])) == 0.25
    assert max_violation(torch.tensor([0, 0, 0])) == 0.0
    assert isinstance(max_violation(torch.tensor([1, 2])), float)


def test_max_violation_per_layer():
    counts_LE = torch.tensor([[5, 5, 5, 5], [8, 4, 2, 2], [0, 0, 0, 0], [12, 0, 0, 0]])
    vio_L = max_violation(counts_LE)
    assert vio_L.dtype == torch.float64
    assert vio_L.tolist() == [0.0, 1.0, 0.0, 3.0]
    assert mean_max_violation(counts_LE) == 1.0


def test_load_stats_exact():
    stats = load_stats(torch.tensor([8, 4, 2, 2]))
    assert stats == {"min": 2.0, "max": 8.0, "mean": 4.0, "std": math.sqrt(6.0)}  # population std


def test_drop_fraction():
    assert drop_fraction(25, 100) == 0.25
    assert drop_fraction(torch.tensor(3), torch.tensor(12)) == 0.25
    assert drop_fraction(0, 0) == 0.0
    with raises_exactly(
        "num_dropped (5.0) must be between 0 and num_assigned (4.0): count both over the same "
        "assignments"
    ):
        drop_fraction(5, 4)


def test_bias_stats_exact():
    stats = bias_stats(torch.tensor([[0.5, -0.5], [0.0, 0.0]]))
    assert stats == {"mean": 0.0, "min": -0.5, "max": 0.5, "norm": math.sqrt(0.5)}


def test_max_violation_rejects_bad_shape():
    with raises_exactly(
        "counts (torch.int64, shape (2, 2, 2)) must be a tensor of shape [E] or [L, E]: "
        "pass the tokens per expert (per layer)"
    ):
        max_violation(torch.zeros(2, 2, 2, dtype=torch.int64))
