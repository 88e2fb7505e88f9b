"""Multi-token prediction through the plugin, shown equal to Megatron-native MTP (the drop-in matrix's
criteria, ``test_dropin_equivalence.check``): Megatron builds the MTP layers from the decoder block's last
layer spec, so with the plugin's spec their MoE layers carry the plugin's router; the balancer counts and
moves their biases in its one collective. Per case, native (Megatron's router, layer and finalize) and the
plugin given only Megatron's flags train ``dropin_cases.STEPS`` steps from the same weights:
- LM loss and Megatron's MTP loss of every step within rel 1e-6, every parameter within 1e-6;
- every ``expert_bias`` bitwise equal, the MTP layers' among them, and moved;
- every routing map equal (MTP routers included).
Layouts: one process, and PP = 2 (gloo, 2 ranks: MTP on the last stage). Lane 2 adds 0.19's repeated MTP
layer (one module applied ``--mtp-num-layers`` times).
"""

from __future__ import annotations

import pytest

from megatron_moe_lossfree.megatron.compat import megatron_core_version
from tests.distributed import dropin_cases, harness
from tests.distributed.harness import Case
from tests.distributed.test_dropin_equivalence import BIAS, GROUPS, LOSS_RTOL, WEIGHT_ATOL

pytestmark = pytest.mark.distributed

V3 = BIAS + GROUPS + ["--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "1e-2",
                      "--moe-router-topk-scaling-factor", "2.5", "--moe-z-loss-coeff", "1e-3"]
MATRIX = {
    "mtp1_bias": BIAS + ["--mtp-num-layers", "1"],
    "mtp2_v3_recipe": V3 + ["--mtp-num-layers", "2", "--mtp-loss-scaling-factor", "0.3"],
}
if megatron_core_version().release >= (0, 19):
    MATRIX["mtp2_repeated_v3"] = V3 + ["--mtp-num-layers", "2", "--mtp-use-repeated-layer"]
PP2 = {"mtp1_bias_pp2": MATRIX["mtp1_bias"] + ["--pipeline-model-parallel-size", "2"]}
MTP_LAYERS = {"mtp1_bias": 1, "mtp2_v3_recipe": 2, "mtp2_repeated_v3": 1, "mtp1_bias_pp2": 1}


@pytest.fixture(scope="module")
def launches(tmp_path_factory, record_distributed_time):
    workdir = str(tmp_path_factory.mktemp("mtp"))
    results = {}

    def run(world: int) -> dict:
        if world not in results:
            matrix = MATRIX if world == 1 else PP2
            cases = [Case(n, dropin_cases.pair_case, dict(workdir=workdir, name=n, flags=flags))
                     for n, flags in matrix.items()]
            launch = harness.launch_cases(cases, world, timeout_s=480, workdir=f"{workdir}/launch-{world}")
            record_distributed_time(f"MTP drop-in cases, {world} rank(s), in all", launch.total_seconds)
            results[world] = launch.results
        return results[world]

    return run


def check_mtp(result: dict, name: str, flags: list) -> None:
    native, plugin = result["native_losses"], result["plugin_losses"]
    if native[0] is not None:  # the last pipeline stage reports the losses, the MTP losses among them
        assert plugin == pytest.approx(native, rel=LOSS_RTOL, abs=0)
        depth = int(flags[flags.index("--mtp-num-layers") + 1])
        assert all(len(step) == depth for step in result["native_mtp_losses"]), result["native_mtp_losses"]
        for a, b in zip(result["native_mtp_losses"], result["plugin_mtp_losses"]):
            assert b == pytest.approx(a, rel=LOSS_RTOL, abs=0)
    assert result["param_diff"] <= WEIGHT_ATOL, result["param_diff"]
    assert result["maps"] > 0 and result["maps_equal"]
    assert result["bias_equal"], result["bias_diff"]
    assert result["bias_moved"]
    if native[0] is not None:  # MTP lives on the last stage
        assert len(result["mtp_bias_keys"]) == MTP_LAYERS[name] and result["mtp_bias_moved"], result["mtp_bias_keys"]
    else:
        assert result["mtp_bias_keys"] == []


@pytest.mark.parametrize("name", list(MATRIX))
def test_mtp_one_process(launches, name):
    check_mtp(launches(1)[name][0], name, MATRIX[name])


@pytest.mark.parametrize("name", list(PP2))
def test_mtp_pp2(launches, name):
    results = launches(2)[name]
    for rank_result in results:
        check_mtp(rank_result, name, PP2[name])
    assert [r["native_mtp_losses"][0] is not None for r in results] == [False, True]  # MTP: the last stage
