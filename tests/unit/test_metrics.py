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


def _stub_trainer(counts, micro, biases, layer_numbers, num_layers=6, aux=None, motion=None):
    from types import SimpleNamespace

    from megatron_moe_lossfree.config import LossFreeConfig

    routers = [SimpleNamespace(layer_number=n, expert_bias=b, last_aux_losses=aux or {}, metric_layer_number=lambda n=n: n)
               for n, b in zip(layer_numbers, biases)]
    balancer = SimpleNamespace(routers=routers, last_counts=counts, last_micro_batch_counts=micro, group=None,
                               last_bias_motion=motion)
    config = SimpleNamespace(num_layers=num_layers, lossfree=LossFreeConfig())
    return SimpleNamespace(balancer=balancer, config=config, model=None)


@pytest.mark.parametrize("widths", [(4, 4), (4, 2)], ids=["equal_widths", "mixed_widths"])
def test_step_metrics_table_has_exact_per_layer_values(megatron_world, widths):
    """The packed one-sync table gives the hand-computed numbers, layer by layer (global layer numbers)."""
    from megatron_moe_lossfree.training.metrics_log import step_metrics

    loads = {4: [6, 2, 4, 4], 2: [3, 1]}
    counts = [torch.tensor(loads[4]), torch.tensor(loads[widths[1]])]
    # two micro-batches per layer: MaxVio [8,0,0,0] = 3 and [2,2,2,2] = 0 -> 1.5; [3,1] = 0.5, [1,1] = 0
    micro = [torch.tensor([[8, 0, 0, 0], [2, 2, 2, 2]]),
             torch.tensor([[8, 0, 0, 0], [2, 2, 2, 2]]) if widths[1] == 4 else torch.tensor([[3, 1], [1, 1]])]
    biases = [torch.tensor([-1e-3, 1e-3, 0.0, 0.0]), torch.tensor([2e-3, -5e-3, 0.0, 1e-3][: widths[1]])]
    aux = {"seq_aux_loss": torch.tensor(0.25)}
    motion = torch.tensor([1e-3, 0.25e-3], dtype=torch.float64)
    m = step_metrics(_stub_trainer(counts, micro, biases, layer_numbers=[2, 5], aux=aux, motion=motion))
    assert m["maxvio_batch_layers"] == [0.5, 0.5]  # [6,2,4,4]: (6-4)/4; [3,1]: (3-2)/2
    assert m["maxvio_batch"] == 0.5
    assert m["maxvio_compute"] == (1.5 + (1.5 if widths[1] == 4 else 0.25)) / 2
    assert m["loads_layers"] == [loads[4], loads[widths[1]]]
    assert m["bias_layers"] == [b.double().tolist() for b in biases]
    assert m["bias_absmax_layers"] == [float(torch.tensor(1e-3)), float(torch.tensor(5e-3))]  # fp32 values
    assert m["maxvio_compute_layers"] == [1.5, 1.5 if widths[1] == 4 else 0.25]
    assert m["bias_motion_layers"] == [1e-3, 0.25e-3]
    fp32 = [b.double().tolist() for b in biases]
    means = [sum(b) / len(b) for b in fp32]
    assert m["bias_mean_layers"] == means
    assert m["bias_std_layers"] == [math.sqrt(sum((x - mu) ** 2 for x in b) / len(b)) for b, mu in zip(fp32, means)]
    assert m["seq_aux_loss"] == 0.25


def test_step_metrics_without_bias_or_micro_batch_counts(megatron_world):
    from megatron_moe_lossfree.training.metrics_log import step_metrics

    m = step_metrics(_stub_trainer([torch.tensor([1, 3])], [None], [None], layer_numbers=[1]))
    assert m == {"maxvio_batch": 0.5, "maxvio_batch_layers": [0.5], "loads_layers": [[1, 3]]}
