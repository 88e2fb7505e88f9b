"""The plugin's metrics in Megatron-LM's writers (megatron/lm_logging.py), without a Megatron-LM checkout:
real LossFreeRouters and BiasBalancer, a real TensorBoard SummaryWriter read back with tensorboard's event
reader, and a stand-in for the W&B module that records what it is given."""

import types

import pytest
import torch

from megatron_moe_lossfree.config import LossFreeConfig

E = 8
SKEWED_E = [60, 4, 4, 4, 4, 4, 4, 44]  # 128 assignments, mean 16: MaxVio (60 - 16) / 16 = 2.75
BALANCED_E = [16] * E  # MaxVio 0


class RecordingWandb:
    def __init__(self):
        self.logged = []

    def log(self, scalars, step):
        self.logged.append((step, dict(scalars)))


def read_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture
def logged_run(megatron_world, tmp_path):
    """Layers 1 and 2, sign rule u = 1e-2, --log-interval 2, --moe-per-layer-logging; three steps of known
    counts, then one evaluation of known counts."""
    from torch.utils.tensorboard import SummaryWriter

    from megatron_moe_lossfree.megatron.balancer import BiasBalancer
    from megatron_moe_lossfree.megatron.lm_logging import MegatronLMLogger
    from megatron_moe_lossfree.training import metrics_log
    from tests.unit.test_router import K, make_router

    lossfree = LossFreeConfig(update_rule="sign", update_rate=1e-2)
    model = torch.nn.ModuleList([make_router(megatron_world, layer_number=n, lossfree=lossfree) for n in (1, 2)])
    balancer = BiasBalancer([model], lossfree, group=None, topk=K)
    writer, wandb = SummaryWriter(log_dir=str(tmp_path / "tb")), RecordingWandb()
    logger = MegatronLMLogger(balancer, [model], types.SimpleNamespace(num_layers=2, moe_per_layer_logging=True),
                              log_interval=2, writers=lambda: (writer, wandb)).install()
    computed = []
    original = metrics_log.step_metrics
    metrics_log.step_metrics = lambda view: computed.append(balancer.steps) or original(view)
    try:
        biases = []
        for _ in range(3):
            for router, counts in zip(model, (SKEWED_E, BALANCED_E)):
                router.local_tokens_per_expert.copy_(torch.tensor(counts))
            balancer([model], None)
            biases.append(torch.stack([r.expert_bias.clone() for r in model]))
        model.eval()  # Megatron-LM's evaluate(): model.eval(), forwards, model.train()
        model[0].eval_tokens_per_expert.copy_(torch.tensor([10, 2, 2, 2, 2, 2, 2, 10]))  # mean 4: MaxVio 1.5
        model[1].eval_tokens_per_expert.copy_(torch.tensor([4] * E))
        model.train()
    finally:
        metrics_log.step_metrics = original
    writer.close()
    return types.SimpleNamespace(scalars=read_scalars(tmp_path / "tb"), wandb=wandb.logged, computed=computed,
                                 biases=biases, logger=logger)


def test_only_log_interval_steps_compute_and_write(logged_run):
    assert logged_run.computed == [2]  # steps 1 and 3 do nothing beyond the bias update
    scalars = logged_run.scalars
    assert scalars["lossfree/MaxVio_batch"] == [(2, 1.375)]  # (2.75 + 0) / 2
    assert scalars["lossfree/MaxVio_batch_layer_0"] == [(2, 2.75)]
    assert scalars["lossfree/MaxVio_batch_layer_1"] == [(2, 0.0)]
    assert scalars["lossfree/MaxVio_global"] == [(3, 0.75)]  # after step 3: (1.5 + 0) / 2
    assert scalars["lossfree/MaxVio_global_layer_0"] == [(3, 1.5)]


def test_bias_statistics_and_motion_are_those_of_the_logged_step(logged_run):
    bias_LE = logged_run.biases[1].double()  # after step 2: layer 1 moved by +-u twice, layer 2 never
    moved_LE = (logged_run.biases[1] - logged_run.biases[0]).abs().double()
    scalars = logged_run.scalars
    for layer in (0, 1):
        b = bias_LE[layer]
        assert scalars[f"lossfree/expert_bias_mean_layer_{layer}"] == [(2, pytest.approx(float(b.mean()), abs=1e-9))]
        assert scalars[f"lossfree/expert_bias_std_layer_{layer}"] == [
            (2, pytest.approx(float(b.std(unbiased=False)), abs=1e-9))]
        assert scalars[f"lossfree/expert_bias_motion_layer_{layer}"] == [
            (2, pytest.approx(float(moved_LE[layer].mean()), abs=1e-9))]
        for expert in range(E):
            assert scalars[f"lossfree_experts/expert_bias_layer_{layer}/expert_{expert}"] == [
                (2, pytest.approx(float(b[expert]), abs=1e-9))]
    assert scalars["lossfree/expert_bias_absmax"] == [(2, pytest.approx(0.02, abs=1e-8))]
    assert scalars["lossfree/expert_bias_motion_layer_0"] == [(2, pytest.approx(0.01, abs=1e-8))]
    assert scalars["lossfree/expert_bias_motion_layer_1"] == [(2, 0.0)]  # balanced: sign(0) = 0
    assert [value for _, value in scalars["lossfree_experts/tokens_per_expert_layer_0/expert_0"]] == [60.0]


def test_wandb_gets_the_same_scalars_at_the_same_iterations(logged_run):
    tensorboard = {(step, tag): value for tag, points in logged_run.scalars.items() for step, value in points}
    wandb = {(step, tag): value for step, logged in logged_run.wandb for tag, value in logged.items()}
    assert wandb.keys() == tensorboard.keys()
    assert all(wandb[key] == pytest.approx(tensorboard[key], rel=1e-6, abs=1e-12) for key in wandb)  # TB: fp32
    assert [step for step, _ in logged_run.wandb] == [2, 3]


def test_without_per_layer_logging_only_the_means(megatron_world):
    from megatron_moe_lossfree.megatron.lm_logging import scalars_from_metrics

    metrics = {"maxvio_batch": 1.0, "maxvio_batch_layers": [2.0, 0.0], "drop_fraction": 0.25,
               "bias_absmax_layers": [0.5, 0.25], "loads_layers": [[1, 3], [2, 2]]}
    assert scalars_from_metrics(metrics, [2, 4], 4, per_layer=False) == {
        "lossfree/MaxVio_batch": 1.0, "lossfree/drop_fraction": 0.25, "lossfree/expert_bias_absmax": 0.5}
    per_layer = scalars_from_metrics(metrics, [2, 5], 4, per_layer=True)
    assert per_layer["lossfree/MaxVio_batch_layer_1"] == 2.0
    assert per_layer["lossfree/MaxVio_batch_mtp_layer_0"] == 0.0  # layer 5 of a 4-layer decoder: MTP
    assert per_layer["lossfree_experts/tokens_per_expert_mtp_layer_0/expert_1"] == 2.0
