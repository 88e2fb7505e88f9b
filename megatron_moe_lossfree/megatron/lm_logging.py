"""The plugin's balance metrics in Megatron-LM's own TensorBoard and W&B logs.

Megatron-LM's ``training_log`` reports its MoE tracker with a fixed list of names (the aux and z losses),
and that tracker is a different API in each release (0.16: ``moe_utils.save_to_aux_losses_tracker``
dicts; 0.19 and later: ``moe_logging.MoEMetricsTracker``), which reduces every name with its own
collectives and averages it over DP. What every Megatron-LM release has are its writers:
``megatron.training.global_vars.get_tensorboard_writer()`` and ``get_wandb_writer()``, created on the last
rank. The plugin writes to those, from two places it already owns:

1. training: ``BiasBalancer.after_step_hooks``. After the bias update of an iteration that is a multiple
   of ``--log-interval`` (the balancer counts iterations from Megatron-LM's ``args.iteration``), the step's
   metrics come from the counts the update already all-reduced (``training/metrics_log.step_metrics``).
   Other iterations add nothing: no host sync, no collective. A logging iteration adds what the plugin's
   own loop does there: one host sync, and when PP > 1 / EP > 1 / dropping is on, the small PP table,
   EP micro-batch-count and drop-counter all-reduces.
2. evaluation: ``LossFreeRouter.evaluation_observer``. Megatron-LM's ``evaluate()`` calls ``model.eval()``
   before and ``model.train()`` after; at the first router leaving eval mode, MaxVio_global of the
   evaluation's counts (one all-reduce over the count group, one over PP), at the iteration it ran.

Names (``TAGS``): the mean over MoE layers under ``lossfree/<name>``; with ``--moe-per-layer-logging`` also
one series per layer, ``lossfree/<name>_layer_<i>`` with Megatron's own per-layer index (i = global layer
number - 1, as its ``moe/<loss>_layer_<i>``; an MTP layer is ``lossfree/<name>_mtp_layer_<j>``), and the
per-expert loads and biases under ``lossfree_experts/`` (what ``mlf-report``'s heatmap and bias plot read).
W&B gets the same scalars at the same iterations.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable, Optional

import torch

TAGS = {
    # metrics_log key -> (Megatron-LM tag, how the layers' values become the one scalar)
    "maxvio_batch": ("lossfree/MaxVio_batch", "mean"),
    "maxvio_compute": ("lossfree/MaxVio_computation-batch", "mean"),
    "drop_fraction": ("lossfree/drop_fraction", None),  # one value over all layers (dropped / assigned)
    "bias_mean": ("lossfree/expert_bias_mean", "mean"),
    "bias_std": ("lossfree/expert_bias_std", "mean"),
    "bias_absmax": ("lossfree/expert_bias_absmax", "max"),
    "bias_motion": ("lossfree/expert_bias_motion", "mean"),
    "maxvio_global": ("lossfree/MaxVio_global", "mean"),
}
EXPERT_TAGS = {"loads_layers": "lossfree_experts/tokens_per_expert", "bias_layers": "lossfree_experts/expert_bias"}


def megatron_lm_writers() -> tuple:
    """(TensorBoard writer, W&B module) of Megatron-LM; None where this rank has none."""
    from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer

    return get_tensorboard_writer(), get_wandb_writer()


def layer_suffix(layer_number: int, num_layers: int) -> str:
    """Megatron's per-layer index (0-based global layer); MTP layers (beyond the decoder) say so."""
    if layer_number > num_layers:
        return f"_mtp_layer_{layer_number - num_layers - 1}"
    return f"_layer_{layer_number - 1}"


def scalars_from_metrics(metrics: dict, layer_numbers: list[int], num_layers: int, *,
                         per_layer: bool) -> dict[str, float]:
    """The tags and values written for one ``step_metrics`` / ``eval_metrics`` dict (pure)."""
    out: dict[str, float] = {}
    for key, (tag, reduce) in TAGS.items():
        values = metrics.get(f"{key}_layers")
        if reduce is None or values is None:
            if isinstance(metrics.get(key), (int, float)):
                out[tag] = float(metrics[key])
            continue
        if not values:
            continue
        out[tag] = max(values) if reduce == "max" else sum(values) / len(values)
        if per_layer:
            for number, value in zip(layer_numbers, values):
                out[tag + layer_suffix(number, num_layers)] = float(value)
    for key, tag in EXPERT_TAGS.items():
        if per_layer and metrics.get(key):
            for number, row in zip(layer_numbers, metrics[key]):
                for expert, value in enumerate(row):
                    out[f"{tag}{layer_suffix(number, num_layers)}/expert_{expert}"] = float(value)
    return {tag: value for tag, value in out.items() if math.isfinite(value)}


class MegatronLMLogger:
    """Writes the plugin's metrics to Megatron-LM's writers (see the module docstring)."""

    def __init__(self, balancer, model_chunks, transformer_config, *, log_interval: int,
                 writers: Callable[[], tuple] = megatron_lm_writers):
        self.balancer = balancer
        self.log_interval = int(log_interval)
        self.writers = writers
        self.per_layer = bool(getattr(transformer_config, "moe_per_layer_logging", False))
        self.num_layers = int(transformer_config.num_layers)
        total = self.num_layers + int(getattr(transformer_config, "mtp_num_layers", None) or 0)
        # What metrics_log reads of a trainer; the effective options (Megatron's flags mapped) decide dropping.
        self.view = SimpleNamespace(balancer=balancer, model=list(model_chunks), drop_carry=(0, 0),
                                    config=SimpleNamespace(num_layers=total, lossfree=balancer.lossfree))
        self.layer_numbers: Optional[list[int]] = None
        self.in_evaluation = False
        self.written = 0  # scalars written on this rank (tests and the end-of-run summary)

    def install(self) -> "MegatronLMLogger":
        self.balancer.after_step_hooks.append(self.after_step)
        for router in self.balancer.routers:
            router.evaluation_observer = self.on_evaluation
        return self

    def iteration(self) -> int:
        """The iteration just trained: the balancer's step count, which starts at Megatron-LM's
        ``args.iteration`` (``megatron_lm.megatron_lm_progress``)."""
        balancer = self.balancer
        if not balancer._progress_known and balancer.progress_source is not None:
            return int(balancer.progress_source()[0])  # an evaluation before the first step
        return balancer.steps

    def global_layer_numbers(self) -> list[int]:
        """The global layer number of each entry of the metrics' per-layer lists (once; a PP all-reduce)."""
        if self.layer_numbers is None:
            from megatron_moe_lossfree.training.metrics_log import _by_layer

            routers = self.balancer.routers
            device = self.balancer.flat_counts.device
            rows = _by_layer(self.view, torch.tensor([[float(r.layer_number)] for r in routers],
                                                     dtype=torch.float64, device=device))
            self.layer_numbers = [int(row[0]) for row in rows]
        return self.layer_numbers

    def after_step(self, balancer) -> None:
        if not balancer.routers or balancer.steps % self.log_interval:
            return
        from megatron_moe_lossfree.training.metrics_log import step_metrics

        self.write(step_metrics(self.view), balancer.steps)

    def on_evaluation(self, phase: str) -> None:
        """"start": the first router entering eval mode zeroes every router's evaluation counts; "end":
        the first one leaving it writes MaxVio_global (the evaluation's counts are complete by then)."""
        from megatron_moe_lossfree.training.metrics_log import eval_metrics, reset_eval_counts

        if phase == "start" and not self.in_evaluation:
            self.in_evaluation = True
            reset_eval_counts(self.view)
        elif phase == "end" and self.in_evaluation:
            self.in_evaluation = False
            self.write(eval_metrics(self.view), self.iteration())

    def write(self, metrics: dict, iteration: int) -> None:
        if not metrics:
            return
        scalars = scalars_from_metrics(metrics, self.global_layer_numbers(), self.num_layers,
                                       per_layer=self.per_layer)
        writer, wandb_writer = self.writers()
        if writer is not None:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, iteration)
            self.written += len(scalars)
        if wandb_writer is not None:
            wandb_writer.log(scalars, iteration)


def install_megatron_lm_logger(balancer, model_chunks, transformer_config) -> MegatronLMLogger:
    """The logger for a Megatron-LM run, at its ``--log-interval``."""
    from megatron.training.global_vars import get_args

    return MegatronLMLogger(balancer, model_chunks, transformer_config,
                            log_interval=get_args().log_interval).install()
