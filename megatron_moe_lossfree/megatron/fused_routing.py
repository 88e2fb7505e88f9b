"""``--moe-router-fusion`` in the plugin's router: ``LossFreeRouter.routing`` through the Triton kernels.

Megatron's flag keeps Megatron's meaning (a fused router). Megatron's own fused path is Transformer Engine's
``fused_topk_with_score_function``, which raises at the first forward when TE is missing (both 0.16 and
0.19: "fused_topk_with_score_function is not available. Please install TE >= 2.6.0.") and cannot see the
plugin's multiplicative bias, device limit, quantile cutoff or integer counts. The plugin's fused path is
its own kernel (``kernels/fused_router.py``) and covers every plugin rule; ``dropin.refusals`` refuses the
flag by name before training where it cannot run (no Triton, or no CUDA device outside Triton's interpreter).

The phases are ``LossFreeRouter.routing``'s, with steps 2-4 and 6 (scores, selection, counts, gates, probs and
routing map) in one forward kernel and the gates' gradient in one backward kernel. Megatron's z-loss, its
expert capacity and its aux / seq-aux / global-aux losses run Megatron's own code, unfused, as in the unfused
path; the plugin's balance losses (which need the scores with their gradient) compute the scores in torch.
Two router features take the unfused path, with the same answer: Megatron's routing replay (the selection
comes from the recording) and a routing record of evaluation forwards (``eval_record``: it keeps the scores).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping

from megatron_moe_lossfree import routing
from megatron_moe_lossfree.megatron import compat, dropin


def applies(router) -> bool:
    """Whether this forward of ``router`` takes the fused path."""
    if not getattr(router.config, "moe_router_fusion", False) or router.router_replay is not None:
        return False
    return router.eval_record is None or router.training


def spec_for(router, logits_dtype: torch.dtype, *, count: bool, cutoff: bool):
    """The kernel's ``RouterSpec`` for this router's effective config (Megatron's gate arithmetic)."""
    from megatron_moe_lossfree.kernels.fused_router import RouterSpec

    cfg = router.lossfree
    limited = cfg.route_limit != "none"
    if router.score_function == "softmax" and not router.config.moe_router_pre_softmax:
        gate = "softmax_topk"
    else:
        gate = "normalized" if router.gates_are_normalized() else "raw"
    return RouterSpec(
        topk=router.topk, score_function=router.score_function,
        bias_kind=cfg.bias_kind if router.expert_bias is not None else None, route_limit=cfg.route_limit,
        num_groups=router.route_limit_groups() if limited else None,
        max_groups=cfg.route_max_groups if limited else None, gate=gate,
        gate_dtype=compat.router_gate_dtype(logits_dtype), scaling_factor=router.config.moe_router_topk_scaling_factor,
        select_on_logits=router.selects_on_logits(), with_cutoff=cutoff, count=count)


def route(router, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
    """``LossFreeRouter.routing`` with the fused kernels: the same (probs_TE, routing_map_TE)."""
    from megatron_moe_lossfree.kernels.fused_router import fused_route

    seq_length, batch = logits.shape[:2]
    logits_TE = logits.view(-1, router.config.num_moe_experts)
    pad_T = padding_mask.reshape(-1) if padding_mask is not None else None
    router.note_nonfinite(logits_TE)
    logits_TE = router.apply_z_loss(logits_TE, padding_mask=pad_T)  # Megatron's (scaling, tracker)
    valid_T = None if pad_T is None else ~pad_T
    counting = router.is_counting()
    observing = router.quantile and counting  # the quantile rule's per-micro-batch statistic
    spec = spec_for(router, logits_TE.dtype, count=counting or not router.training, cutoff=observing)
    out = fused_route(logits_TE, router.expert_bias, valid_T, spec=spec)
    if out.counts_E is not None:
        router.add_loads(out.counts_E)
    if observing:
        values_TE = logits_TE.detach().float() if router.selects_on_logits() else \
            routing.compute_scores(logits_TE.detach(), router.score_function)
        router.observe_quantile(values_TE, valid_T, cutoff_T=out.cutoff_T)
    probs_TE, routing_map_TE = out.probs_TE, out.routing_map_TE
    cfg = router.lossfree
    if counting and any((cfg.aux_loss_coeff, cfg.seq_aux_loss_coeff, cfg.device_loss_coeff, cfg.comm_loss_coeff)):
        scores_TE = routing.compute_scores(logits_TE, router.score_function)  # with grad: the losses need it
        probs_TE = router.apply_balance_losses(probs_TE, scores_TE, out.experts_TK, num_sequences=batch, pad_T=pad_T)
    if router.keep_selection:  # tests only: no Python state changes per call otherwise (CUDA graphs)
        router.last_selection = (out.gates_TK, out.experts_TK)
    capacity = dropin.megatron_capacity(router.config)
    if capacity is not None:  # Megatron's own expert capacity, after the counts (REFERENCE 9)
        probs_TE, routing_map_TE = apply_router_token_dropping(
            probs_TE, routing_map_TE, router_topk=router.topk, capacity_factor=capacity,
            drop_policy=router.config.moe_token_drop_policy,
            pad_to_capacity=router.config.moe_pad_expert_input_to_capacity)
    return megatron_losses(router, probs_TE, logits_TE, pad_T, seq_length, batch), routing_map_TE


def megatron_losses(router, probs_TE, logits_TE, pad_T, seq_length: int, batch: int):
    """Megatron's aux / seq-aux / global-aux losses by Megatron's own code. That code reads
    ``moe_router_fusion`` too and then calls Transformer Engine's fused aux loss, raising where TE lacks it;
    there the flag is hidden for the call, so Megatron's unfused loss (the same maths) runs instead."""
    from megatron.core.transformer.moe import moe_utils

    if getattr(moe_utils, "HAVE_TE", False) and getattr(moe_utils, "fused_moe_aux_loss", None) is not None:
        return router.apply_megatron_losses(probs_TE, logits_TE, pad_T, seq_length, batch)
    router.config.moe_router_fusion = False
    try:
        return router.apply_megatron_losses(probs_TE, logits_TE, pad_T, seq_length, batch)
    finally:
        router.config.moe_router_fusion = True
