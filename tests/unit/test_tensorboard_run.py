"""mlf-report on a Megatron-LM run's TensorBoard directory (tensorboard_run.py): the events written under
the names lm_logging.py gives and Megatron-LM's own, read back as metrics.jsonl rows, plotted."""

import math
import os

import pytest

from megatron_moe_lossfree.megatron.lm_logging import scalars_from_metrics
from megatron_moe_lossfree.report import load_run, write_report

LOADS = {1: [[6, 2, 4, 4], [4, 4, 4, 4]], 2: [[5, 3, 4, 4], [8, 0, 4, 4]]}
BIAS = {1: [[-0.5, 0.5, 0.0, 0.0], [0.0] * 4], 2: [[-1.0, 1.0, 0.0, 0.0], [0.25, -0.25, 0.0, 0.0]]}
MAXVIO = {1: [0.5, 0.0], 2: [0.25, 1.0]}


@pytest.fixture
def megatron_lm_run(tmp_path):
    """Two logged iterations of a 2-layer model (MoE layers 1 and 2 of 2), an evaluation at iteration 2
    followed by Megatron-LM's after-training validation and test evaluations at the same iteration."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    for step in (1, 2):
        writer.add_scalar("lm loss", 7.0 - step, step)
        writer.add_scalar("learning-rate", 1e-3, step)
        metrics = {"maxvio_batch": sum(MAXVIO[step]) / 2, "maxvio_batch_layers": MAXVIO[step],
                   "drop_fraction": 0.125 * step, "loads_layers": LOADS[step], "bias_layers": BIAS[step]}
        for tag, value in scalars_from_metrics(metrics, [1, 2], 2, per_layer=True).items():
            writer.add_scalar(tag, value, step)
    for loss, maxvio in ((2.5, 0.75), (2.0, 0.5), (1.5, 0.25)):  # in the loop; after training: valid, test
        writer.add_scalar("lm loss validation", loss, 2)
        for tag, value in scalars_from_metrics({"maxvio_global_layers": [maxvio, 0.0]}, [1, 2], 2,
                                               per_layer=True).items():
            writer.add_scalar(tag, value, 2)
    writer.close()
    return str(tmp_path / "tb")


def test_rows_hold_the_logged_values(megatron_lm_run):
    run = load_run(megatron_lm_run, label="megatron-lm")
    assert [r["step"] for r in run.train] == [1, 2]
    last = run.train[-1]
    assert (last["loss"], last["drop_fraction"], last["maxvio_batch"]) == (5.0, 0.25, 0.625)
    assert last["lr"] == pytest.approx(1e-3, rel=1e-7)  # fp32 in the event file
    assert last["maxvio_batch_layers"] == [0.25, 1.0]
    assert last["loads_layers"] == LOADS[2]
    assert last["bias_layers"] == BIAS[2]
    assert len(run.valid) == 1  # the evaluation in the loop, not the after-training ones
    valid = run.valid[0]
    assert (valid["step"], valid["loss"], valid["maxvio_global"]) == (2, 2.5, 0.375)
    assert valid["maxvio_global_layers"] == [0.75, 0.0]
    assert valid["ppl"] == math.exp(2.5)  # Megatron-LM's exp(min(20, loss))


def test_report_plots_a_megatron_lm_run(megatron_lm_run, tmp_path):
    result = write_report([load_run(megatron_lm_run)], str(tmp_path / "report"), smooth=1)
    assert result["notes"] == []
    names = sorted(os.path.basename(f) for f in result["files"])
    assert names == ["bias.png", "load_heatmap.png", "loss.png", "maxvio_batch.png", "summary.md"]
    assert "| tb | 2 | 12.18 | 0.3750 | 0.6250 | 25.00% |" in result["table"]


def test_mtp_layers_come_after_the_decoders(tmp_path):
    from megatron_moe_lossfree.tensorboard_run import rows_from_scalars

    scalars = {"lossfree/MaxVio_batch_mtp_layer_0": [(1, 3.0)], "lossfree/MaxVio_batch_layer_1": [(1, 1.0)],
               "lossfree/MaxVio_batch_layer_0": [(1, 2.0)]}
    train, valid = rows_from_scalars(scalars)
    assert train == [{"kind": "train", "step": 1, "maxvio_batch_layers": [2.0, 1.0, 3.0]}] and valid == []
