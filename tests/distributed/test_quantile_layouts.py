"""The quantile rule under every parallel layout equals one process (same weights, batches and steps).

Recipe and tolerances as tests/distributed/test_layouts.py (``layout_cases``), with the plugin's quantile rule:
- exact estimator (Megatron-Core's, on logits): TP2+SP (values all-gathered over TP, as Megatron), EP2, PP2,
  DP2, EP4, TP2xEP2. Every layout solves the same micro-batches as one process; only the order of the fp32
  sums of the solutions differs, so the bias is compared within 1e-6 (not bitwise) and the all-reduced
  counts of every step exactly (a token routed differently would show there);
- histogram estimator (Kimi K3's, on scores): TP2+SP (no gather: each TP rank histograms its own tokens, the
  step's one all-reduce adds them) and DP2. Integer histograms add up exactly: bias and counts exact.
"""

from __future__ import annotations

import pytest

from tests.distributed import layout_cases
from tests.distributed.test_layouts import LAYOUTS, LOSS_RTOL, WEIGHT_ATOL

pytestmark = pytest.mark.distributed

VARIANTS = {
    "exact": ["--lossfree-update-rule", "quantile"],
    "histogram": ["--lossfree-update-rule", "quantile", "--lossfree-quantile-estimator", "histogram",
                  "--lossfree-quantile-space", "scores", "--lossfree-quantile-bins", "200"],
}
BIAS_ATOL = {"exact": 1e-6, "histogram": 0.0}
CASES = [("exact", n) for n in ("tp2_sp", "ep2_alltoall", "pp2_4microbatches", "dp2", "ep4", "tp2_ep2_etp1")]
CASES += [("histogram", n) for n in ("tp2_sp", "dp2")]
BY_NAME = {layout[0]: layout for layout in LAYOUTS}


@pytest.fixture(scope="module")
def launches(tmp_path_factory, record_distributed_time):
    return layout_cases.variant_launcher(str(tmp_path_factory.mktemp("quantile-layouts")), VARIANTS, CASES, BY_NAME,
                                         record_distributed_time, "quantile layouts")


@pytest.mark.parametrize("variant,name", CASES, ids=[f"{v}-{n}" for v, n in CASES])
def test_quantile_layout_matches_single_process(launches, variant, name):
    ref = launches(1)[f"reference-{variant}"][0]
    assert any(abs(b) > 0 for bias in ref["expert_bias"].values() for b in bias)  # the rule moved the bias
    per_rank = launches(BY_NAME[name][1])[f"{variant}-{name}"]
    losses = layout_cases.last_stage_losses(per_rank)
    assert losses == pytest.approx(ref["losses"], rel=LOSS_RTOL, abs=0)
    for result in per_rank:
        far = {k: d for k, d in result["diff"].items()
               if d > (BIAS_ATOL[variant] if k.endswith("expert_bias") else WEIGHT_ATOL)}
        assert not far, far
        for step, counts in enumerate(result["counts"]):
            for layer, row in counts.items():
                assert row == ref["counts"][step][layer], f"step {step + 1} layer {layer} counts"
