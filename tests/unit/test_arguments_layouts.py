"""Parallel layouts that cannot train are refused before any process group exists, with our message.

Megatron-Core 0.16.1 refuses MoE under tensor parallelism without sequence parallelism only at the first
training forward of an MoE layer (``MoELayer.forward``: "During training, performance may degrade if MoE
and tensor parallelism are enabled without also enabling sequence parallelism."), i.e. after every rank
built its model. ``parse_args`` names the flag and the fix instead. Layouts that need the world size are
checked by ``check_world`` at setup, before the model is built.
"""

import pytest

from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.training.arguments import parse_args
from megatron_moe_lossfree.training.pretrain import check_world

TP_WITHOUT_SP = ("--tensor-model-parallel-size (2) with MoE needs --sequence-parallel: Megatron-Core requires "
                 "sequence parallelism for MoE under tensor parallelism")


@pytest.mark.parametrize("layout", [
    ["--tensor-model-parallel-size", "2"],
    ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"],
    ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
    ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1"],
], ids=["tp2", "tp2_ep2", "tp2_pp2", "tp2_ep2_etp1"])
def test_moe_with_tp_but_without_sp_is_refused_by_parse_args(layout):
    with pytest.raises(LossFreeConfigError) as info:
        parse_args(layout)
    assert str(info.value) == TP_WITHOUT_SP


@pytest.mark.parametrize("layout", [
    ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size", "2",
     "--expert-tensor-parallel-size", "2"],
    ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2"],
    ["--expert-model-parallel-size", "4", "--moe-token-dispatcher-type", "allgather"],
], ids=["tp2_sp", "tp2_sp_ep2_etp2", "pp2_ep2", "ep4_allgather"])
def test_supported_layouts_parse(layout):
    args = parse_args(layout)
    assert args.sequence_parallel == ("--sequence-parallel" in layout)


@pytest.mark.parametrize("layout,world,message", [
    (["--tensor-model-parallel-size", "2", "--sequence-parallel"], 3,
     "world size (3) must be divisible by --tensor-model-parallel-size x --pipeline-model-parallel-size "
     "(2 x 1): launch a multiple of 2 processes"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size", "2"], 2,
     "world size (2) must be divisible by --expert-model-parallel-size x expert TP x PP (2 x 2 x 1): launch a "
     "multiple of 4 processes"),
    (["--expert-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 2,
     "world size (2) must be divisible by --expert-model-parallel-size x expert TP x PP (2 x 1 x 2): launch a "
     "multiple of 4 processes"),
    (["--global-batch-size", "8", "--micro-batch-size", "4"], 4,
     "--global-batch-size (8) must be divisible by --micro-batch-size x data-parallel size (4 x 4)"),
], ids=["tp2_on_3", "tp2_ep2_on_2", "pp2_ep2_on_2", "batch_vs_dp4"])
def test_layout_that_does_not_fit_the_world_is_refused(layout, world, message):
    with pytest.raises(LossFreeConfigError) as info:
        check_world(parse_args(layout), world)
    assert str(info.value) == message


def test_second_setup_in_one_process_reuses_the_same_layout_and_refuses_another(megatron_world):
    from megatron.core import parallel_state as ps

    from megatron_moe_lossfree.training.pretrain import init_model_parallel

    group = ps.get_data_parallel_group()
    init_model_parallel(parse_args([]))  # the same (1-rank) layout: kept as it is
    assert ps.get_data_parallel_group() is group
    with pytest.raises(LossFreeConfigError) as info:
        init_model_parallel(parse_args(["--expert-model-parallel-size", "2"]))
    assert str(info.value) == (
        "Megatron's parallel state is already initialized with another layout: --expert-model-parallel-size 2 "
        "(initialized: 1); call megatron.core.parallel_state.destroy_model_parallel() first or use the same layout")
