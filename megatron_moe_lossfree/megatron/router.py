"""LossFreeRouter: Megatron-Core's TopKRouter with aux-loss-free (biased) top-k selection.

Shape suffixes: T tokens, E experts, K top-k.

Forward, in phases (Megatron's ``TopKRouter.routing`` order; Megatron's flags per ``dropin.py``):
1. logits_TE = gate(hidden) (Megatron's router GEMM in ``moe_router_dtype``), checked finite; Megatron's
   own z-loss (padding-aware, per-token scaled, tracked).
2. scores_TE = score_function(logits_TE) in fp32               (sigmoid / softmax / sqrtsoftplus)
3. experts_TK = biased top-K (LFB Alg. 1: bias for selection only) on the values Megatron selects on
   (``selection_values``: its dtype, logits for softmax after the top-K), or on logits for the quantile
   rule in Megatron's space; through Megatron's RouterReplay when replay is on. The quantile rule's top-(K+1)
   also gives each token's cutoff, and its per-micro-batch statistic is taken here, in every replay mode
   (RECORD records that top-K; REPLAY_* dispatches and counts the recorded experts, while the quantile
   still solves for the bias that balances the router's own choice on these scores).
4. counts_E += a scatter-add count of experts_TK over the non-padding tokens -- BEFORE any dropping, int64, only in a
   training forward with grad enabled, so eval, no-grad forwards and the no-grad first pass of activation
   recompute never count, and the recompute pass in backward counts each token exactly once.
5. gates with Megatron's arithmetic and dtype; the plugin's balance losses (classic, V3 sequence-wise, V2
   device/communication) attached through Megatron's attach-and-log.
6. probs_TE / routing_map_TE in Megatron's layout; Megatron's own expert capacity (if set); Megatron's own
   aux / seq-aux / global-aux losses (if set).

The bias update itself is not here: ``balancer.BiasBalancer`` does it once per optimizer step for every
layer in one collective. Megatron forbids a bias with softmax; this router allows it (LFB appendix C).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    apply_router_token_dropping,
    compute_routing_scores_for_aux_loss,
)
from megatron.core.transformer.moe.router import TopKRouter

from megatron_moe_lossfree import balancing, quantile, routing
from megatron_moe_lossfree.config import LossFreeConfig, flag
from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.megatron import compat, dropin, fused_routing


class NonFiniteRouterError(FloatingPointError):
    """Router logits or counts are NaN/inf: names the layer (and step when known)."""


def buffer_device(weight: Optional[torch.Tensor] = None):
    """Where the router's buffers live: Megatron's router registers its own on the current GPU (and moves a
    host-initialised weight there at its first forward), so the plugin's join them; the weight's device
    (the host) without CUDA, and the host when no weight is given (a stage without MoE layers that still
    joins a metric collective)."""
    if torch.cuda.is_available():
        return torch.cuda.current_device()
    return weight.device if weight is not None else torch.device("cpu")


class LossFreeRouter(TopKRouter):
    """TopKRouter whose ``expert_bias`` is owned by the plugin (fp32, persistent, Megatron's name)."""

    def __init__(self, config, pg_collection=None, lossfree: Optional[LossFreeConfig] = None, **kwargs):
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        # Megatron's flags mapped onto the plugin, or refused by name (dropin.py: the drop-in contract).
        self.lossfree = dropin.resolve_lossfree(config, lossfree)
        for note in dropin.notes(config):  # honoured with a caveat: said once in the log
            dropin.log_note_once(note)
        num_experts = config.num_moe_experts
        use_bias = self.lossfree.balancing == "bias"
        # Megatron registers these only when its own update is on; the plugin owns the update (the
        # balancer hides moe_router_enable_expert_bias from Megatron's finalize: one owner).
        initial = 1.0 if self.lossfree.bias_kind == "multiplicative" else 0.0
        del self.expert_bias, self.local_tokens_per_expert
        device = buffer_device(self.weight)
        self.register_buffer("expert_bias", torch.full((num_experts,), initial, dtype=torch.float32,
                                                       device=device) if use_bias else None)
        self.register_buffer("local_tokens_per_expert", torch.zeros(num_experts, dtype=torch.int64,
                                                                    device=device), persistent=False)
        # Evaluation loads (MaxVio_global) are kept apart so that evaluation never moves the bias.
        self.register_buffer("eval_tokens_per_expert", torch.zeros(num_experts, dtype=torch.int64,
                                                                   device=device), persistent=False)
        # Per micro-batch local counts of this step (MaxVio_computation-batch), in static buffers so that a
        # CUDA graph replays into the same memory: row i is micro-batch i, and the extra last row absorbs
        # micro-batches beyond the capacity (the balancer then reports none for that step and grows it).
        self.register_buffer("micro_batch_index", torch.zeros((), dtype=torch.int64, device=device),
                             persistent=False)
        self.reserve_micro_batches(1)
        # int64 so the balancer can fold it into the one count all-reduce of the step
        self.register_buffer("nonfinite_logits", torch.zeros((), dtype=torch.int64, device=device),
                             persistent=False)
        # Set by the MoE layer (device-limited routing and the V2 losses need the EP layout).
        self.ep_size = 1
        # The plugin's balance losses of the last counting forward, copied into one static fp32 buffer
        # (``last_aux_losses`` reads it): a per-call dict would be Python state a CUDA graph cannot replay.
        self.register_buffer("balance_loss_values", torch.zeros(len(self.TRACKER_NAMES), dtype=torch.float32,
                                                                device=device), persistent=False)
        # True keeps ``last_selection`` (gates_TK, experts_TK) of each forward, for tests (an attribute
        # assignment per call: off by default, so that the forward is capturable).
        self.keep_selection = False
        # Set to a list by ``metrics_log.record_valid_routing``: evaluation forwards append their selection
        # values there (the ablations' best bias found; None, the default, records nothing).
        self.eval_record: Optional[list[torch.Tensor]] = None
        self.frozen_expert_bias = getattr(self, "frozen_expert_bias", False)  # 0.19's flag; 0.16 lacks it
        self.register_quantile_state()
        self.register_rule_state()

    def register_rule_state(self) -> None:
        """The state of a rule that keeps one (SMEBU's momentum, phi-Balancing's EMA: balancing.STATEFUL_RULES)
        as a persistent fp32 buffer beside ``expert_bias``: Megatron's sharded state dict (replicated, like the
        bias) and so every checkpoint carry it, and a resumed or resharded run continues exactly. None (no
        checkpoint key) for the other rules."""
        cfg = self.lossfree
        state = None
        if cfg.balancing == "bias" and cfg.update_rule in balancing.STATEFUL_RULES:
            state = balancing.initial_rule_state(cfg.update_rule, (self.config.num_moe_experts,),
                                                 device=buffer_device(self.weight))
        self.register_buffer("lossfree_rule_state", state)

    def reserve_micro_batches(self, capacity: int) -> None:
        """Room for ``capacity`` micro-batches per step in ``micro_batch_counts_ME`` (re-allocated only when
        larger: call outside a CUDA-graph capture, before the first captured step)."""
        capacity *= self.calls_per_micro_batch()
        current = getattr(self, "micro_batch_counts_ME", None)
        if current is not None and current.shape[0] - 1 >= capacity:
            return
        self.register_buffer("micro_batch_counts_ME", torch.zeros(
            capacity + 1, self.config.num_moe_experts, dtype=torch.int64, device=self.micro_batch_index.device),
            persistent=False)

    def micro_batch_capacity(self) -> int:
        return self.micro_batch_counts_ME.shape[0] - 1

    @property
    def last_aux_losses(self) -> dict[str, torch.Tensor]:
        """The plugin's balance losses (name -> 0-d fp32) of the last training forward with grad, for the
        losses that are on (0 before the first one)."""
        cfg = self.lossfree
        on = [cfg.aux_loss_coeff, cfg.seq_aux_loss_coeff, cfg.device_loss_coeff, cfg.comm_loss_coeff]
        return {name: self.balance_loss_values[i] for i, name in enumerate(self.TRACKER_NAMES) if on[i]}

    # -- quantile rule state ------------------------------------------------------------------------
    def register_quantile_state(self) -> None:
        """Per-step accumulators of the quantile rule (not checkpointed: a step's solutions or histograms
        are consumed by the balancer at the step's end, before any save; the EMA state is the bias).

        Megatron 0.19 registers ``qb_beta``/``qb_beta_accum``/``qb_beta_count`` for its own QB; the plugin's
        bias is ``expert_bias`` (= -qb_beta), so those are removed and ``qb_beta_accum`` left None, which
        Megatron's finalize skips (one owner)."""
        for name in ("qb_beta", "qb_beta_accum", "qb_beta_count"):
            if name in self._buffers:
                del self._buffers[name]
            setattr(self, name, None)
        cfg, num_experts = self.lossfree, self.config.num_moe_experts
        self.quantile = cfg.balancing == "bias" and cfg.update_rule in ("quantile", "bip")
        exact = self.quantile and cfg.quantile_estimator == "exact"
        histogram = self.quantile and cfg.quantile_estimator == "histogram"
        device = buffer_device(self.weight)
        self.register_buffer("qb_solution_sum", torch.zeros(num_experts, dtype=torch.float32, device=device)
                             if exact else None, persistent=False)
        self.register_buffer("qb_histogram", torch.zeros(num_experts, cfg.quantile_bins, dtype=torch.int64,
                                                         device=device) if histogram else None, persistent=False)
        # exact: micro-batches solved; histogram: valid tokens behind the histograms (the n of n*K/E)
        self.register_buffer("qb_observed", torch.zeros((), dtype=torch.int64, device=device)
                             if self.quantile else None, persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A Megatron-native quantile-balancing checkpoint holds ``qb_beta``: the plugin's bias is -qb_beta."""
        beta = state_dict.pop(prefix + "qb_beta", None)
        if beta is not None and prefix + "expert_bias" not in state_dict and self.expert_bias is not None:
            state_dict[prefix + "expert_bias"] = -beta.float()
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- fp32 bias under bf16/fp16 wrappers ---------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        """Float16Module casts every floating buffer; the bias must stay fp32 (REFERENCE section 9), and so
        must the quantile rule's fp32 solution sums."""
        kept = {name: getattr(self, name, None)
                for name in ("expert_bias", "qb_solution_sum", "lossfree_rule_state", "balance_loss_values")}
        module = super()._apply(fn, *args, **kwargs)
        for name, before in kept.items():
            after = getattr(self, name, None)
            if before is not None and after is not None and after.dtype != torch.float32:
                setattr(self, name, before.to(device=after.device, dtype=torch.float32))
        return module

    # -- evaluation boundaries (Megatron-LM's logger) --------------------------------------------------
    evaluation_observer: Optional[Callable[[str], None]] = None
    """Called with "start" when this router goes from training to eval mode and "end" when it comes back
    (Megatron-LM's ``evaluate()`` brackets every evaluation with ``model.eval()`` / ``model.train()``); set by
    ``megatron/lm_logging.py``, None elsewhere."""

    def train(self, mode: bool = True):
        changed = bool(mode) != self.training
        module = super().train(mode)
        if changed and self.evaluation_observer is not None:
            self.evaluation_observer("end" if mode else "start")
        return module

    # -- routing ------------------------------------------------------------------------------------
    def layer_name(self) -> str:
        mtp = compat.mtp_layer_index(self)
        return f"MTP layer {mtp}" if mtp is not None else f"layer {getattr(self, 'layer_number', '?')}"

    def metric_layer_number(self) -> int:
        """1-based row of this router in the plugin's per-layer metrics: decoder layers 1..num_layers, then
        the MTP layers (num_layers + k), in both releases' numbering."""
        mtp = compat.mtp_layer_index(self)
        return self.layer_number if mtp is None else self.config.num_layers + mtp

    def calls_per_micro_batch(self) -> int:
        """0.19's repeated MTP layer routes every micro-batch once per MTP depth (one module, N calls)."""
        if getattr(self, "is_mtp_layer", False) and getattr(self.config, "mtp_use_repeated_layer", False):
            return self.config.mtp_num_layers or 1
        return 1

    def is_counting(self) -> bool:
        """Count loads only in a training forward with grad enabled: once per token per step (and not in
        the warm-up runs of a CUDA-graph capture, whose inputs are placeholders)."""
        return self.training and torch.is_grad_enabled() and not compat.is_graph_warmup()

    def count_loads(self, experts_TK: torch.Tensor, valid_T: Optional[torch.Tensor] = None) -> None:
        """Pre-drop loads of the valid (non-padding) tokens: training counts drive the bias; evaluation
        counts only feed MaxVio_global."""
        if not (self.is_counting() or not self.training):
            return
        with torch.no_grad():
            keep_TK = None if valid_T is None else valid_T.unsqueeze(1).expand_as(experts_TK)
            counts_E = routing.count_tokens_per_expert(experts_TK, self.config.num_moe_experts, keep_TK)
        self.add_loads(counts_E)

    def add_loads(self, counts_E: torch.Tensor) -> None:
        """Add one forward's int64 counts: to the training loads (and this micro-batch's) in a counting forward,
        to the evaluation loads in an evaluation forward (the caller checked that this forward counts at all:
        a training forward without grad never does)."""
        with torch.no_grad():
            if self.training:
                self.local_tokens_per_expert += counts_E
                # device-side row choice: no host read of the index (capturable)
                row = self.micro_batch_index.clamp(max=self.micro_batch_capacity()).view(1)
                self.micro_batch_counts_ME.index_add_(0, row, counts_E.view(1, -1))
                self.micro_batch_index += 1
            else:
                self.eval_tokens_per_expert += counts_E

    def route_limit_groups(self) -> Optional[int]:
        cfg = self.lossfree
        if cfg.route_limit == "none":
            return None
        return cfg.route_groups or (self.ep_size if cfg.route_limit == "device" else None)

    def gates_are_normalized(self) -> bool:
        """Megatron normalises the K gates unless K == 1 or softmax is taken before the top-K."""
        return self.topk > 1 and not (self.score_function == "softmax" and self.config.moe_router_pre_softmax)

    def select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """experts_TK of the biased top-k (pure ``routing.choose_experts``); ``megatron_gates`` gates them."""
        cfg = self.lossfree
        return routing.choose_experts(
            scores_TE, self.expert_bias, self.topk, bias_kind=cfg.bias_kind, route_limit=cfg.route_limit,
            num_groups=self.route_limit_groups(),
            max_groups=cfg.route_max_groups if cfg.route_limit != "none" else None,
            sort=compat.router_topk_sorted())

    def selection_values(self, logits_TE: torch.Tensor, scores_TE: torch.Tensor) -> torch.Tensor:
        """What the top-K is taken on: exactly the values Megatron's ``topk_routing_with_score_function``
        selects on (before the bias), so the plugin picks Megatron's experts in every dtype, ties and group
        ranking included (REFERENCE 13):
        - softmax after the top-K, no bias: the logits themselves (their dtype; groups ranked on logits);
        - sigmoid, sqrtsoftplus, softmax before the top-K: the fp32 scores, rounded to the logits' dtype
          where Megatron rounds them (0.16 without ``moe_router_dtype``: bf16; ``compat``);
        - the quantile rule: the fp32 logits in Megatron's space (its bias is -qb_beta on logits), the fp32
          scores in score space (Kimi K3);
        - softmax after the top-K WITH a bias (the plugin's LFB appendix C, Megatron has none): the fp32
          probabilities, so that the bias shifts probabilities."""
        if self.quantile:
            return logits_TE.detach().float() if self.selects_on_logits() else scores_TE
        if self.score_function == "softmax" and not self.config.moe_router_pre_softmax:
            return scores_TE if self.expert_bias is not None else logits_TE.detach()
        return scores_TE.detach().to(compat.router_selection_dtype(logits_TE.dtype))

    def select_or_replay(self, scores_TE: torch.Tensor, chosen_TK: Optional[torch.Tensor] = None) -> torch.Tensor:
        """experts_TK of ``select`` (or ``chosen_TK``, the quantile rule's own choice), through Megatron's
        RouterReplay when ``moe_enable_routing_replay`` is on: RECORD stores the plugin's (biased) choice,
        REPLAY_* routes on the recorded experts."""
        if self.router_replay is None:
            return self.select(scores_TE) if chosen_TK is None else chosen_TK

        def compute_topk(scores, topk, num_groups=None, group_topk=None):
            # (values, indices): only the indices are used or recorded
            return None, self.select(scores) if chosen_TK is None else chosen_TK

        return self.router_replay.get_replay_topk(scores_TE, self.topk, None, None, compute_topk)[1].long()

    def selects_on_logits(self) -> bool:
        return self.quantile and self.lossfree.quantile_space == "logits"

    def observe_quantile(self, select_TE: torch.Tensor, valid_T: Optional[torch.Tensor],
                         cutoff_T: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The quantile rule's per-micro-batch work (pure maths in ``quantile.py``), in a training forward
        with grad only (so activation recompute observes each micro-batch once, like the counts).

        - exact (Megatron-Core 0.19 ``qb_dual_update``): the values are all-gathered over TP x CP first, as
          Megatron does, so every rank solves the whole sequence's quantile; the solution is summed;
        - histogram (Kimi K3 / torchtitan): this rank's tokens only; histograms add up in the balancer's
          one all-reduce (no gather).
        Padding leaves the quantile (``valid_T``); under device/node-limited routing the quantile is taken
        over the experts each token could reach (``reachable_TE``: beyond Megatron, which refuses groups).

        Returns this rank's experts_TK: the top-K of the same biased top-(K+1) that gives the cutoffs (as
        Megatron's ``qb_dual_update``), so the selection costs no second top-K. The fused router passes the
        cutoffs of its own top-(K+1) (``cutoff_T``, this rank's rows): then no top-(K+1) runs here (unless the
        rows were gathered) and None is returned.
        """
        cfg = self.lossfree
        with torch.no_grad():
            values_TE = select_TE.detach().float()
            rows = slice(None)
            if cfg.quantile_estimator == "exact":
                values_TE, valid_T, rows = self.gather_tp_cp(values_TE, valid_T)
            reachable_TE = self.reachable_experts(values_TE)
            cut = None
            if cutoff_T is None or rows != slice(None):
                cut = quantile.qb_cutoff(values_TE, self.expert_bias, self.topk, reachable_TE=reachable_TE)
                cutoff_T = cut.cutoff_T
            if cfg.update_rule == "bip":
                solved_E = quantile.bip_solve_E(values_TE, self.expert_bias, self.topk, iterations=cfg.bip_iterations,
                                                valid_T=valid_T, reachable_TE=reachable_TE)
                quantile.qb_accumulate(self.qb_solution_sum, solved_E)
                self.qb_observed += 1
            elif cfg.quantile_estimator == "exact":
                solved_E = quantile.qb_exact_solve_E(values_TE, self.expert_bias, self.topk, valid_T=valid_T,
                                                     reachable_TE=reachable_TE, cutoff_T=cutoff_T)
                quantile.qb_accumulate(self.qb_solution_sum, solved_E)
                self.qb_observed += 1
            else:
                self.qb_histogram += quantile.qb_histogram_EB(
                    values_TE, self.expert_bias, self.topk, bins=cfg.quantile_bins, margin=cfg.quantile_margin,
                    valid_T=valid_T, reachable_TE=reachable_TE, cutoff_T=cutoff_T)
                self.qb_observed += values_TE.shape[0] if valid_T is None else valid_T.sum()
            return cut.experts_TK[rows] if cut is not None else None

    def reachable_experts(self, values_TE: torch.Tensor) -> Optional[torch.Tensor]:
        """bool [T, E] of the experts the route limit left each token (chosen on the biased values, as the
        selection did), or None without a limit."""
        cfg = self.lossfree
        if cfg.route_limit == "none":
            return None
        biased_TE = routing.BIAS_KINDS[cfg.bias_kind](values_TE, self.expert_bias.float())
        masked_TE = routing.mask_unselected_groups(biased_TE, self.topk, self.route_limit_groups(),
                                                   cfg.route_max_groups, routing.ROUTE_LIMITS[cfg.route_limit])
        return torch.isfinite(masked_TE)

    def gather_tp_cp(self, values_TE: torch.Tensor, valid_T: Optional[torch.Tensor]):
        """All-gather the rows over TP x CP (Megatron-Core 0.19's QB gathers its logits the same way); also
        returns the slice of this rank's rows."""
        group = self.tp_cp_group
        size = group.size() if group is not None else 1
        if size == 1:
            return values_TE, valid_T, slice(None)
        import torch.distributed as dist

        local = values_TE.shape[0]
        rank = dist.get_rank(group=group)

        full_TE = values_TE.new_empty((values_TE.shape[0] * size, values_TE.shape[1]))
        dist.all_gather_into_tensor(full_TE, values_TE.contiguous(), group=group)
        if valid_T is not None:  # as uint8: gloo has no bool collectives
            full_T = torch.empty(valid_T.shape[0] * size, dtype=torch.uint8, device=valid_T.device)
            dist.all_gather_into_tensor(full_T, valid_T.to(torch.uint8).contiguous(), group=group)
            valid_T = full_T.bool()
        return full_TE, valid_T, slice(rank * local, (rank + 1) * local)

    def reset_quantile_state(self) -> None:
        for buffer in (self.qb_solution_sum, self.qb_histogram, self.qb_observed):
            if buffer is not None:
                buffer.zero_()

    def megatron_gates(self, logits_TE: torch.Tensor, scores_TE: torch.Tensor, experts_TK: torch.Tensor):
        """The gates of the chosen experts with Megatron's arithmetic and dtype
        (``topk_routing_with_score_function``): softmax after the top-K is the softmax of the K chosen
        logits; sigmoid (or softmax before the top-K) gates are normalised in the precision Megatron uses
        (``compat.router_gate_dtype``); they come back in the logits' dtype (bf16 by default, fp32/fp64
        with ``moe_router_dtype``). The selection was made on ``selection_values``."""
        scaling = self.config.moe_router_topk_scaling_factor
        if self.score_function == "softmax" and not self.config.moe_router_pre_softmax:
            gates_TK = torch.softmax(logits_TE.gather(1, experts_TK), dim=-1, dtype=torch.float32)
            gates_TK = gates_TK * scaling if scaling else gates_TK
        else:
            gate_scores_TE = scores_TE.to(compat.router_gate_dtype(logits_TE.dtype))
            gates_TK = routing.gate_selected(gate_scores_TE, experts_TK, normalize=self.gates_are_normalized(),
                                             scaling_factor=scaling)
        return gates_TK.to(logits_TE.dtype)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, **kwargs):
        """Megatron's ``TopKRouter.routing`` in the same order, with the plugin's selection and counts.

        ``padding_mask`` [S, B], True for padding (Megatron's convention): padded tokens are routed (the
        dispatcher needs every row) but never counted, and Megatron's losses and z-loss skip them.
        """
        if fused_routing.applies(self):  # --moe-router-fusion: the same answer from the Triton kernels
            return fused_routing.route(self, logits, padding_mask)
        seq_length, batch = logits.shape[:2]
        logits_TE = logits.view(-1, self.config.num_moe_experts)
        pad_T = padding_mask.reshape(-1) if padding_mask is not None else None
        self.note_nonfinite(logits_TE)
        logits_TE = self.apply_z_loss(logits_TE, padding_mask=pad_T)  # Megatron's (scaling, tracker)
        scores_TE = routing.compute_scores(logits_TE, self.score_function)  # fp32
        select_TE = self.selection_values(logits_TE, scores_TE)  # Megatron's (the quantile rule: logits)
        valid_T = None if pad_T is None else ~pad_T
        # The quantile rule observes every training micro-batch, replay or not: its solution depends on the
        # scores and the bias only, never on which experts a replay imposes (docs/notes_qb_megatron.md).
        chosen_TK = self.observe_quantile(select_TE, valid_T) if self.quantile and self.is_counting() else None
        experts_TK = self.select_or_replay(select_TE, chosen_TK)  # top-(K+1)'s top-K, or the replayed experts
        self.count_loads(experts_TK, valid_T)
        if self.eval_record is not None and not self.training:
            # the fp32 values a bias is added to (scores; logits for the quantile rule in logit space)
            self.record_eval(select_TE if self.selects_on_logits() else scores_TE, valid_T)
        gates_TK = self.megatron_gates(logits_TE, scores_TE, experts_TK)
        gates_TK = self.apply_balance_losses(gates_TK, scores_TE, experts_TK, num_sequences=batch, pad_T=pad_T)
        if self.keep_selection:
            self.last_selection = (gates_TK.detach(), experts_TK)
        probs_TE = torch.zeros_like(logits_TE).scatter(1, experts_TK, gates_TK)
        routing_map_TE = torch.zeros_like(logits_TE, dtype=torch.bool).scatter(1, experts_TK, True)
        capacity = dropin.megatron_capacity(self.config)
        if capacity is not None:  # Megatron's own expert capacity, after the plugin counted (REFERENCE 9)
            probs_TE, routing_map_TE = apply_router_token_dropping(
                probs_TE, routing_map_TE, router_topk=self.topk, capacity_factor=capacity,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity)
        probs_TE = self.apply_megatron_losses(probs_TE, logits_TE, pad_T, seq_length, batch)
        return probs_TE, routing_map_TE

    def record_eval(self, select_TE: torch.Tensor, valid_T: Optional[torch.Tensor]) -> None:
        """Append an evaluation forward's selection values to ``eval_record`` (a host copy: evaluation
        only, never inside a CUDA-graph capture)."""
        if compat.is_graph_capturing():
            raise RuntimeError(f"{self.layer_name()}: the evaluation record (metrics_log.record_valid_routing) "
                               f"copies to the host and cannot run inside a CUDA-graph capture: evaluate eagerly")
        self.eval_record.append((select_TE if valid_T is None else select_TE[valid_T]).detach().float().cpu())

    def apply_megatron_losses(self, probs_TE, logits_TE, pad_T, seq_length: int, batch: int):
        """Megatron's aux_loss / seq_aux_loss / global_aux_loss, by Megatron's own code (same scores on
        the UNBIASED top-K, token counts, padding, per-token scaling and tracker names)."""
        if not (self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled()):
            return probs_TE
        map_TE, scores_TE = compute_routing_scores_for_aux_loss(
            logits_TE, self.topk, self.score_function, fused=False, padding_mask=pad_T)
        masked = pad_T is not None
        probs_TE = self._apply_aux_loss(probs_TE, scores_TE, map_TE, with_padding_mask=masked)
        probs_TE = self._apply_seq_aux_loss(probs_TE, scores_TE, map_TE, seq_length, batch, with_padding_mask=masked)
        return self._apply_global_aux_loss(probs_TE, scores_TE, map_TE, with_padding_mask=masked)

    # The plugin's losses are logged under Megatron's tracker names (Megatron-LM's log shows them).
    TRACKER_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
                     "device_loss": "device_balance_loss", "comm_loss": "comm_balance_loss"}

    def apply_balance_losses(self, gates_TK, scores_TE, experts_TK, *, num_sequences: int, pad_T=None):
        """Attach the plugin's balance losses to the gates through Megatron's
        ``attach_and_log_load_balancing_loss``: the same per-token-loss scaling (times the local token
        count under ``calculate_per_token_loss``), MTP scaling and aux-loss tracker as Megatron's own
        losses. Only in a training forward with grad, like Megatron's.

        Tokens are reordered to sequence-major (Megatron flattens [S, B] as t = s*B + b). Each rank
        computes the losses on the tokens it routes: under sequence/context parallelism a "sequence"
        is the rank's slice of it (Megatron reduces its seq-aux counts over TP x CP; we do not, stated
        in the docs). The device and communication losses count devices from the actual EP layout.
        """
        cfg = self.lossfree
        coeffs = {"aux_loss": cfg.aux_loss_coeff, "seq_aux_loss": cfg.seq_aux_loss_coeff,
                  "device_loss": cfg.device_loss_coeff, "comm_loss": cfg.comm_loss_coeff}
        if not any(coeffs.values()) or not (self.training and torch.is_grad_enabled()):
            return gates_TK
        if pad_T is not None:
            on = [flag(f"{name}_coeff") for name, c in coeffs.items() if c]
            raise LossFreeConfigError(
                f"a padding_mask reached {self.layer_name()} with {', '.join(on)} on: the plugin's per-sequence "
                f"losses do not take padding yet; use Megatron's --moe-router-load-balancing-type "
                f"aux_loss/seq_aux_loss (they honour the mask) or unpadded batches")
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
        names = list(self.TRACKER_NAMES)
        for name, loss in losses.items():
            gates_TK = self.attach_loss(gates_TK, coeffs[name], loss, name)
            self.balance_loss_values[names.index(name)].copy_(loss.detach())
        return gates_TK

    def attach_loss(self, gates_TK, coeff: float, loss, name: str):
        """Megatron's attach-and-log when the router knows its layer (the tracker needs it), else the bare
        autoscaler (a router built outside a MoE layer, as in unit tests).

        Under sequence/context parallelism every TP x CP rank computes the plugin's loss on its own slice and
        the router's gradients are summed over TP, so each rank's loss is divided by the TP x CP size: the
        gradient is that of the mean slice loss, not TP x CP times it (Megatron 0.19 divides its z-loss
        coefficient the same way; its aux losses are partial sums over globally reduced counts instead)."""
        size = self.tp_cp_group.size() if self.tp_cp_group is not None else 1
        if size > 1:
            loss = loss / size
        if self.layer_number is None:
            return MoEAuxLossAutoScaler.apply(gates_TK, loss)
        return self.attach_and_log_load_balancing_loss(
            gates_TK, coeff, loss, self.TRACKER_NAMES[name], self.tp_cp_group, valid_token_count=gates_TK.shape[0])

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
