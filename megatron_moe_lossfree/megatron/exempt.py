"""Exempt sequences for V2 token dropping, handed to every MoE layer for ITS micro-batch.

V2 section 2.2.4 (REFERENCE 7): the tokens of ~10% of the training sequences are never dropped. Which ones
is ``dropping.select_exempt_sequences(global sample ids, seed, step, fraction)``: a pure function of the
sample's global index, so every TP/CP rank and PP stage computes the same flags. This module only carries
those flags to the MoE layers of the micro-batch being computed.

What the training loop calls, in its forward step, for every micro-batch (``training/pretrain.py`` does)::

    scope = exempt.begin_micro_batch(model, batch["sample_ids"], step=step)   # before model(...)
    output = model(tokens, position_ids, ...)
    output = scope.bind(output)                                                # before returning it

``step`` is the index of the optimizer step this micro-batch belongs to (the same on every rank).

Why this is correct under pipeline schedules and activation recompute:
- A micro-batch's first forward runs entirely inside its own ``model(...)`` call, right after
  ``begin_micro_batch`` set its context on every MoE layer of this stage.
- A recomputed forward (Megatron's full or selective recompute) runs inside the backward of that same
  micro-batch, and 1F1B may have run the forwards of later micro-batches in between, so the layers then
  hold a later context. ``bind`` registers a hook on the stage's output tensor: autograd computes the
  gradient of that tensor before any node of the stage's graph for this micro-batch (every node is upstream
  of it), so the hook re-installs THIS micro-batch's context before any recompute of it. The context is a
  value captured at forward time; nothing reads a "current batch" that a later micro-batch could replace.
- Each micro-batch's backward is one autograd call in Megatron's schedules (1F1B, interleaved, no-pipeline).
  Not covered: schedules that run layers of one micro-batch's forward inside another's backward (Megatron's
  ``overlap_moe_expert_parallel_comm`` combined 1F1B); the layer checks the sequence count at least.
Evaluation never drops, so evaluation forwards need no scope (it is harmless to open one).
"""

from __future__ import annotations

import torch

from megatron_moe_lossfree import dropping
from megatron_moe_lossfree.dropping import ExemptContext
from megatron_moe_lossfree.megatron.moe_layer import find_lossfree_layers

__all__ = ["ExemptContext", "MicroBatchScope", "begin_micro_batch", "make_context"]


def make_context(sample_ids_B: torch.Tensor, *, step: int, seed: int, fraction: float,
                 device=None) -> ExemptContext:
    """The exempt flags of one micro-batch (``dropping.select_exempt_sequences``), on ``device`` (the MoE
    layers' device: one host-to-GPU copy per micro-batch, not one per layer; None: the host)."""
    sample_ids_B = torch.as_tensor(sample_ids_B).detach().cpu()
    exempt_B = dropping.select_exempt_sequences(sample_ids_B, seed=seed, step=step, fraction=fraction)
    if device is not None:
        exempt_B = exempt_B.to(device)
    return ExemptContext(step=int(step), sample_ids_B=sample_ids_B, exempt_B=exempt_B)


class MicroBatchScope:
    """The context of one micro-batch and the MoE layers of this stage that read it."""

    def __init__(self, context: ExemptContext | None, layers: list):
        self.context = context
        self.layers = layers
        self.install()

    def install(self) -> None:
        for layer in self.layers:
            layer.exempt_context = self.context

    def bind(self, output: torch.Tensor) -> torch.Tensor:
        """Re-install this context when the backward of ``output`` starts (before any recompute)."""
        if self.layers and isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._on_backward)
        return output

    def _on_backward(self, grad: torch.Tensor) -> None:
        self.install()
        return None


def begin_micro_batch(model_chunks, sample_ids_B: torch.Tensor, *, step: int) -> MicroBatchScope:
    """Give every LossFreeMoELayer of ``model_chunks`` this micro-batch's exempt flags.

    Layers read fraction and seed from their ``lossfree`` config (one config per model). A stage without
    MoE layers gets an empty scope.
    """
    layers = find_lossfree_layers(model_chunks)
    context = None
    if layers:
        cfg = layers[0].lossfree
        context = make_context(sample_ids_B, step=step, seed=cfg.seed, fraction=cfg.exempt_fraction,
                               device=layers[0].local_assigned.device)
    return MicroBatchScope(context, layers)
