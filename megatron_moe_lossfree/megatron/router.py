"""LossFreeRouter: Megatron-Core's TopKRouter with aux-loss-free (biased) top-k selection.

Shape suffixes: T tokens, E experts, K top-k.

Forward, in phases:
1. logits_TE = gate(hidden) (Megatron's fp32 router GEMM), checked finite; Megatron's z-loss if configured.
2. scores_TE = score_function(logits_TE)                       (sigmoid / softmax / sqrtsoftplus)
3. gates_TK, experts_TK = select_experts(scores_TE, expert_bias_E, K)  (LFB Alg. 1: bias for selection only)
4. counts_E += bincount(experts_TK)  -- BEFORE any dropping, int64, only in a training forward with grad
   enabled, so eval, no-grad forwards and the no-grad first pass of activation recompute never count, and
   the recompute pass in backward counts each token exactly once.
5. balance losses (classic, V3 sequence-wise, V2 device/communication) attached to the gates.
6. probs_TE / routing_map_TE in Megatron's layout for the dispatcher.

The bias update itself is not here: ``balancer.BiasBalancer`` does it once per optimizer step for every
layer in one collective. Megatron forbids a bias with softmax; this router allows it (LFB appendix C).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_moe_lossfree import balancing, routing
from megatron_moe_lossfree.config import LossFreeConfig


class NonFiniteRouterError(FloatingPointError):
    """Router logits or counts are NaN/inf: names the layer (and step when known)."""


class LossFreeRouter(TopKRouter):
    """TopKRouter whose ``expert_bias`` is owned by the plugin (fp32, persistent, Megatron's name)."""

    def __init__(self, config, pg_collection=None, lossfree: Optional[LossFreeConfig] = None, **kwargs):
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        self.lossfree = lossfree or getattr(config, "lossfree", None) or LossFreeConfig()
        num_experts = config.num_moe_experts
        use_bias = self.lossfree.balancing == "bias"
        # Megatron registers these only when its own update is on; the plugin keeps it off (one owner).
        initial = 1.0 if self.lossfree.bias_kind == "multiplicative" else 0.0
        del self.expert_bias, self.local_tokens_per_expert  # TopKRouter set them to plain None
        self.register_buffer("expert_bias", torch.full((num_experts,), initial, dtype=torch.float32)
                             if use_bias else None)
        self.register_buffer("local_tokens_per_expert", torch.zeros(num_experts, dtype=torch.int64),
                             persistent=False)
        # Evaluation loads (MaxVio_global) are kept apart so that evaluation never moves the bias.
        self.register_buffer("eval_tokens_per_expert", torch.zeros(num_experts, dtype=torch.int64),
                             persistent=False)
        # Per micro-batch local counts of this step (MaxVio_computation-batch); cleared by the balancer.
        self.micro_batch_counts: list[torch.Tensor] = []
        # int64 so the balancer can fold it into the one count all-reduce of the step
        self.register_buffer("nonfinite_logits", torch.zeros((), dtype=torch.int64), persistent=False)
        # Set by the MoE layer (device-limited routing and the V2 losses need the EP layout).
        self.ep_size = 1
        self.last_aux_losses: dict[str, torch.Tensor] = {}

    # -- fp32 bias under bf16/fp16 wrappers ---------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        """Float16Module casts every floating buffer; the bias must stay fp32 (REFERENCE section 9)."""
        bias = self.expert_bias
        module = super()._apply(fn, *args, **kwargs)
        if bias is not None and self.expert_bias.dtype != torch.float32:
            self.expert_bias = bias.to(device=self.expert_bias.device, dtype=torch.float32)
        return module

    # -- routing ------------------------------------------------------------------------------------
    def layer_name(self) -> str:
        return f"layer {getattr(self, 'layer_number', '?')}"

    def is_counting(self) -> bool:
        """Count loads only in a training forward with grad enabled: once per token per step."""
        return self.training and torch.is_grad_enabled()

    def count_loads(self, experts_TK: torch.Tensor) -> None:
        """Pre-drop loads: training counts drive the bias; evaluation counts only feed MaxVio_global."""
        if self.is_counting():
            with torch.no_grad():
                counts_E = routing.count_tokens_per_expert(experts_TK, self.config.num_moe_experts)
                self.local_tokens_per_expert += counts_E
                self.micro_batch_counts.append(counts_E)
        elif not self.training:
            with torch.no_grad():
                self.eval_tokens_per_expert += routing.count_tokens_per_expert(
                    experts_TK, self.config.num_moe_experts)

    def route_limit_groups(self) -> Optional[int]:
        cfg = self.lossfree
        if cfg.route_limit == "none":
            return None
        return cfg.route_groups or (self.ep_size if cfg.route_limit == "device" else None)

    def select(self, scores_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Biased top-k selection with unbiased gates (pure ``routing.select_experts``)."""
        cfg = self.lossfree
        normalize = self.topk > 1 and not (self.score_function == "softmax" and self.config.moe_router_pre_softmax)
        return routing.select_experts(
            scores_TE, self.expert_bias, self.topk, bias_kind=cfg.bias_kind, normalize=normalize,
            scaling_factor=self.config.moe_router_topk_scaling_factor, route_limit=cfg.route_limit,
            num_groups=self.route_limit_groups(),
            max_groups=cfg.route_max_groups if cfg.route_limit != "none" else None)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, **kwargs):
        seq_length, batch = logits.shape[:2]
        logits_TE = logits.view(-1, self.config.num_moe_experts)
        self.note_nonfinite(logits_TE)
        logits_TE = self.apply_z_loss(logits_TE)
        scores_TE = routing.compute_scores(logits_TE, self.score_function)
        gates_TK, experts_TK = self.select(scores_TE)
        self.count_loads(experts_TK)
        gates_TK = self.apply_balance_losses(gates_TK, scores_TE, experts_TK, num_sequences=batch)
        self.last_selection = (gates_TK.detach(), experts_TK)
        probs_TE = torch.zeros_like(scores_TE).scatter(1, experts_TK, gates_TK)
        routing_map_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter(1, experts_TK, True)
        return probs_TE, routing_map_TE

    def apply_balance_losses(self, gates_TK, scores_TE, experts_TK, *, num_sequences: int):
        """Attach the configured balance losses to the gates (Megatron's MoEAuxLossAutoScaler adds
        their gradient in backward). Only in a training forward with grad, like Megatron's own losses.

        Tokens are reordered to sequence-major (Megatron flattens [S, B] as t = s*B + b). Each rank
        computes the losses on the tokens it routes: under sequence/context parallelism a "sequence"
        is the rank's slice of it (Megatron reduces its seq-aux counts over TP x CP; we do not, stated
        in the docs). The device and communication losses count devices from the actual EP layout.
        """
        cfg = self.lossfree
        coeffs = (cfg.aux_loss_coeff, cfg.seq_aux_loss_coeff, cfg.device_loss_coeff, cfg.comm_loss_coeff)
        if not any(coeffs) or not self.is_counting():
            return gates_TK
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        num_experts = scores_TE.shape[-1]
        seq_len = scores_TE.shape[0] // num_sequences
        scores_BSE = scores_TE.view(seq_len, num_sequences, num_experts).transpose(0, 1)
        scores_NE = scores_BSE.reshape(-1, num_experts)
        experts_NK = experts_TK.view(seq_len, num_sequences, -1).transpose(0, 1).reshape(-1, experts_TK.shape[-1])
        losses = {}
        if cfg.aux_loss_coeff:
            per = num_sequences if cfg.aux_loss_scope == "sequence" else 1
            losses["aux_loss"] = balancing.aux_loss(scores_NE, experts_NK, alpha=cfg.aux_loss_coeff,
                                                    num_sequences=per)
        if cfg.seq_aux_loss_coeff:
            losses["seq_aux_loss"] = balancing.sequence_aux_loss(
                scores_NE, balancing.unbiased_topk(scores_NE, self.topk), alpha=cfg.seq_aux_loss_coeff,
                num_sequences=num_sequences)
        devices = self.ep_size
        if cfg.device_loss_coeff:
            losses["device_loss"] = balancing.device_balance_loss(
                scores_NE, experts_NK, alpha=cfg.device_loss_coeff, num_devices=devices,
                num_sequences=num_sequences)
        if cfg.comm_loss_coeff:
            max_devices = min(cfg.route_max_groups or devices, devices)
            losses["comm_loss"] = balancing.comm_balance_loss(
                scores_NE, experts_NK, alpha=cfg.comm_loss_coeff, num_devices=devices,
                max_devices=max_devices, num_sequences=num_sequences)
        for name, loss in losses.items():
            gates_TK = MoEAuxLossAutoScaler.apply(gates_TK, loss)
            self.last_aux_losses[name] = loss.detach()
        return gates_TK

    def note_nonfinite(self, logits_TE: torch.Tensor) -> None:
        """Remember NaN/inf logits without a host sync; ``raise_if_nonfinite`` reports once per step.

        One fp32 reduction instead of an elementwise ``isfinite`` pass (measured: the router's only
        visible overhead on CPU): a NaN or inf logit makes the sum NaN or inf. The sum of finite logits
        could only overflow if they reached ~1e32, a divergence worth the same error.
        """
        with torch.no_grad():
            self.nonfinite_logits += ~torch.isfinite(logits_TE.sum(dtype=torch.float32))

    def raise_if_nonfinite(self, step: Optional[int] = None) -> None:
        if bool(self.nonfinite_logits):
            self.nonfinite_logits.zero_()
            at = f" at step {step}" if step is not None else ""
            raise NonFiniteRouterError(
                f"router logits of {self.layer_name()}{at} contain NaN or inf: lower the learning rate, "
                f"enable gradient clipping (--clip-grad 1.0), or check the input data")
