"""The drop-in contract, shown: Megatron's router flags with the plugin give Megatron-native's training.

For each combination below, Megatron-Core's own router/layer/finalize and the plugin (given only Megatron's
flags) train ``dropin_cases.STEPS`` steps from the same weights on the same batches (``dropin_cases``), in
one process and at EP = 2 (gloo, alltoall). Required, per the drop-in issue:
- loss of every step within rel 1e-6;
- every parameter within 1e-6 abs;
- ``expert_bias`` bitwise equal (and, where Megatron's bias is on, moved, so two zero vectors do not pass);
- the routing map of every router call equal.

The matrix is pruned to combinations that exercise distinct code (axes: score function x expert bias x group
limit x balancing loss type x capacity and policy):
- each score-function path once (sigmoid, softmax after top-K, softmax before top-K);
- the expert bias alone, with the group limit (V3's node rule), and in the V3 recipe (seq aux loss, scaling
  factor, z-loss), and with an fp64 router;
- each Megatron loss type (aux, seq aux, global aux) and a list of two types with a list of coefficients;
- expert capacity with both drop policies, one with padding to capacity (no bias: with a bias the plugin
  counts loads BEFORE dropping, a documented departure, tested in tests/unit/test_dropin.py);
- lane 2 (megatron-core 0.19): Megatron's quantile_balancing, with and without its EMA, against the plugin's
  quantile rule (plugin ``expert_bias`` == -Megatron ``qb_beta``, bitwise);
- a fixed bias (``--moe-router-bias-update-rate 0``, GLM-4.5's recipes): both start from the same non-zero bias,
  which routes and never moves;
- bf16 on CPU (``dropin_cases.bf16_pair_case``: Float16Module, no ``--moe-router-dtype``, Megatron's default):
  sigmoid with the bias and groups, softmax before the top-K, softmax after the top-K with groups (groups ranked
  on the raw bf16 logits). The rate there is 2**-7: Megatron's own update under Float16Module multiplies a bf16
  sign by the rate and so moves by the bf16-rounded rate (1e-2 becomes 0.010009765625, its counts are bf16 too);
  the plugin moves by the exact fp32 rate on int64 counts, a stated departure (README).
- the flags Megatron's inherited ``TopKRouter.forward`` applies before routing: forced random logits, input
  jitter (with the bias) and 0.19's forced random bias, both runs drawing the same random numbers;
- routing replay with the bias: RECORD (both record the same choices) and REPLAY_FORWARD of a fixed choice no
  router makes (every map is that choice, and the bias learns from its loads as Megatron's does).
"""

from __future__ import annotations

import pytest

from megatron_moe_lossfree.megatron.compat import megatron_core_version
from tests.distributed import dropin_cases, harness
from tests.distributed.harness import Case

pytestmark = pytest.mark.distributed

LOSS_RTOL = 1e-6
WEIGHT_ATOL = 1e-6
BIAS = ["--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "1e-2"]
GROUPS = ["--moe-router-num-groups", "4", "--moe-router-group-topk", "2"]
SOFTMAX = ["--moe-router-score-function", "softmax"]

MATRIX = {
    "sigmoid": [],
    "sigmoid_bias": BIAS,
    "sigmoid_bias_groups": BIAS + GROUPS,
    "v3_recipe": BIAS + GROUPS + ["--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "1e-2",
                                  "--moe-router-topk-scaling-factor", "2.5", "--moe-z-loss-coeff", "1e-3"],
    "bias_fp64_router": BIAS + ["--moe-router-dtype", "fp64"],
    "softmax_aux_loss": SOFTMAX + ["--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "1e-2"],
    "softmax_pre_global_aux": SOFTMAX + ["--moe-router-pre-softmax", "--moe-router-load-balancing-type",
                                         "global_aux_loss", "--moe-aux-loss-coeff", "1e-2"],
    "loss_list": ["--moe-router-load-balancing-type", "aux_loss", "seq_aux_loss",
                  "--moe-aux-loss-coeff", "1e-2", "1e-3"],
    "capacity_probs": SOFTMAX + ["--moe-expert-capacity-factor", "1.0"],
    "capacity_position_padded": ["--moe-expert-capacity-factor", "0.5", "--moe-token-drop-policy", "position",
                                 "--moe-pad-expert-input-to-capacity"],
    "force_load_balancing": ["--moe-router-force-load-balancing"],
    "input_jitter_bias": BIAS + ["--moe-input-jitter-eps", "0.1"],
    "replay_record_bias": BIAS + ["--moe-enable-routing-replay"],
    "replay_forward_bias": BIAS + ["--moe-enable-routing-replay"],
}
# RouterReplay's action in both runs (dropin_cases.pair_case).
REPLAY = {"replay_record_bias": "record", "replay_forward_bias": "forward"}
# megatron-core >= 0.19: Megatron's quantile balancing against the plugin's quantile rule (exact estimator on
# logits, mapped from Megatron's flags), with and without its EMA.
QB = {
    "quantile_balancing": ["--moe-router-load-balancing-type", "quantile_balancing"],
    "quantile_balancing_ema": ["--moe-router-load-balancing-type", "quantile_balancing",
                               "--moe-router-quantile-balancing-ema", "0.9"],
}
MATRIX["fixed_bias"] = ["--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0"] + GROUPS
BF16_BIAS = ["--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", str(2 ** -7)]
BF16 = {
    "bf16_sigmoid_bias_groups": BF16_BIAS + GROUPS,
    "bf16_pre_softmax": SOFTMAX + ["--moe-router-pre-softmax"],
    "bf16_softmax_groups": SOFTMAX + GROUPS,
}
HAS_QB = megatron_core_version().release >= (0, 19)
if HAS_QB:
    MATRIX.update(QB)
    MATRIX["force_biased"] = ["--moe-router-force-biased", "0.5"]  # a 0.19 field
EP2 = ["sigmoid_bias_groups", "v3_recipe", "softmax_aux_loss", "capacity_probs"]
EP2_FLAGS = ["--expert-model-parallel-size", "2"]
if HAS_QB:
    EP2.append("quantile_balancing")


@pytest.fixture(scope="module")
def launches(tmp_path_factory, record_distributed_time):
    workdir = str(tmp_path_factory.mktemp("dropin"))
    results = {}

    def run(world: int) -> dict:
        if world not in results:
            names = list(MATRIX) if world == 1 else EP2
            extra = [] if world == 1 else EP2_FLAGS
            cases = [Case(n, dropin_cases.pair_case, dict(workdir=workdir, name=n, flags=MATRIX[n] + extra,
                                                          initial_bias=n == "fixed_bias",
                                                          replay=REPLAY.get(n)))
                     for n in names]
            if world == 1:
                cases += [Case(n, dropin_cases.bf16_pair_case, dict(workdir=workdir, name=n, flags=flags))
                          for n, flags in BF16.items()]
            launch = harness.launch_cases(cases, world, timeout_s=900 if world == 1 else 480,
                                           workdir=f"{workdir}/launch-{world}")
            record_distributed_time(f"drop-in matrix, {world} rank(s), in all", launch.total_seconds)
            results[world] = launch.results
        return results[world]

    return run


def check(result: dict, name: str) -> None:
    flags = {**MATRIX, **BF16}[name]
    native, plugin = result["native_losses"], result["plugin_losses"]
    if native[0] is not None:  # the last pipeline stage reports the loss
        assert plugin == pytest.approx(native, rel=LOSS_RTOL, abs=0)
    assert result["param_diff"] <= WEIGHT_ATOL, result["param_diff"]
    assert result["maps"] > 0 and result["maps_equal"]
    assert result["bias_equal"], result["bias_diff"]
    if name == "fixed_bias":
        assert result["bias_keys"] == 3 and result["bias_fixed"]
    elif "--moe-router-enable-expert-bias" in flags or name in QB:
        assert result["bias_keys"] == (2 if name in BF16 else 3) and result["bias_moved"]
    else:
        assert result["bias_keys"] == 0
    if name in BF16:
        assert result["bias_fp32"]
    if "--moe-expert-capacity-factor" in flags:
        assert result["dropped"], "the capacity dropped nothing: the case would not test dropping"
    if REPLAY.get(name) == "record":
        assert result["recorded"] == 3 and result["recorded_equal"]  # every MoE layer recorded the same choice
    if REPLAY.get(name) == "forward":
        assert result["maps_replayed"]


@pytest.mark.parametrize("name", list(MATRIX))
def test_one_process(launches, name):
    check(launches(1)[name][0], name)


@pytest.mark.parametrize("name", list(BF16))
def test_bf16_one_process(launches, name):
    check(launches(1)[name][0], name)


@pytest.mark.parametrize("name", EP2)
def test_ep2(launches, name):
    for rank_result in launches(2)[name]:
        check(rank_result, name)
