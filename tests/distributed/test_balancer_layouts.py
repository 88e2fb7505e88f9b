"""The 2025-2026 balancers (issue 28) under TP2+SP, EP2 and PP2 equal one process: same weights, batches, steps.

Recipe and tolerances as tests/distributed/test_layouts.py (``layout_cases``). Three variants, so that CI grows
by one 1-rank and one 2-rank launch only:
- SMEBU with the primal_dual rate schedule (both: the rule's momentum and the schedule's step count);
- phi-Balancing (its EMA state);
- BIP (the iterated exact quantile solve: values all-gathered over TP as the quantile rule's exact estimator).
SMEBU and phi are functions of the all-reduced integer counts: bias, rule state and counts exact. BIP sums
fp32 micro-batch solutions in another order under a layout: bias within 1e-6, counts exact (as the quantile rule).
"""

from __future__ import annotations

import pytest

from tests.distributed import layout_cases
from tests.distributed.test_layouts import LAYOUTS, LOSS_RTOL, WEIGHT_ATOL

pytestmark = pytest.mark.distributed

VARIANTS = {
    "smebu-pd": ["--lossfree-update-rule", "smebu", "--lossfree-rate-schedule", "primal_dual",
                 "--lossfree-rate-decay-steps", "1"],
    "phi": ["--lossfree-update-rule", "phi", "--lossfree-phi-ema", "0.5"],
    "bip": ["--lossfree-update-rule", "bip", "--lossfree-bip-iterations", "2"],
}
EXACT = {"smebu-pd": 0.0, "phi": 0.0, "bip": 1e-6}
NAMES = ("tp2_sp", "ep2_alltoall", "pp2_4microbatches")
CASES = [(v, n) for v in VARIANTS for n in NAMES]
BY_NAME = {layout[0]: layout for layout in LAYOUTS}


@pytest.fixture(scope="module")
def launches(tmp_path_factory, record_distributed_time):
    return layout_cases.variant_launcher(str(tmp_path_factory.mktemp("balancer-layouts")), VARIANTS, CASES, BY_NAME,
                                         record_distributed_time, "2025-2026 balancer layouts")


def _tolerance(variant: str, key: str) -> float:
    if key.endswith("expert_bias") or key.endswith("lossfree_rule_state"):
        return EXACT[variant]
    return WEIGHT_ATOL


@pytest.mark.parametrize("variant,name", CASES, ids=[f"{v}-{n}" for v, n in CASES])
def test_balancer_layout_matches_single_process(launches, variant, name):
    ref = launches(1)[f"reference-{variant}"][0]
    assert any(abs(b) > 0 for bias in ref["expert_bias"].values() for b in bias)  # the rule moved the bias
    per_rank = launches(2)[f"{variant}-{name}"]
    losses = layout_cases.last_stage_losses(per_rank)
    assert losses == pytest.approx(ref["losses"], rel=LOSS_RTOL, abs=0)
    compared_state = False
    for result in per_rank:
        far = {k: d for k, d in result["diff"].items() if d > _tolerance(variant, k)}
        assert not far, far
        compared_state |= any(k.endswith("lossfree_rule_state") for k in result["diff"])
        for step, counts in enumerate(result["counts"]):
            for layer, row in counts.items():
                assert row == ref["counts"][step][layer], f"step {step + 1} layer {layer} counts"
        if EXACT[variant] == 0.0:
            for layer, bias in result["expert_bias"].items():
                assert bias == ref["expert_bias"][layer], f"layer {layer} expert_bias"
    # The rule's state is in the checkpoint and was compared (SMEBU's momentum, phi's EMA); BIP has none.
    assert compared_state == (variant != "bip")
