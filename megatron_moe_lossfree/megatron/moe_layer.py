"""LossFreeMoELayer: Megatron-Core's MoELayer with the plugin's token dropping; Megatron's dispatchers.

Placed through the layer spec (``specs.py``); the dispatcher type string stays Megatron's own.
Shape suffixes: T tokens (local to this rank), K top-k, E experts, D devices (EP ranks), B sequences,
S sequence rows on this rank. Megatron flattens the MoE input [S, B, H] as t = s*B + b.

Forward, in phases (only ``route`` differs from Megatron's MoELayer):
1. route: the router picks K experts per token; it counts its loads BEFORE any dropping (REFERENCE 1,
   and unlike Megatron-Core, REFERENCE 9), so the bias sees the overload that dropping would hide.
2. drop (training mode only, REFERENCE 7: nothing is dropped at evaluation):
   - "none": drop-free, nothing changes;
   - "expert": Switch/GShard capacity ceil(cf*T*K/E) per expert on this rank's tokens, policy "probs"
     or "position": Megatron-Core's ``apply_router_token_dropping`` semantics;
   - "device": V2 section 2.2.4, each EP rank's budget is ceil(cf*T*K/D) assignments with T = tokens of
     the WHOLE EP group; the lowest-gate assignments arriving at a device are dropped until it is within
     budget; tokens of exempt sequences (``exempt.py``) are never dropped and count against the budget
     first. Every EP rank all-gathers the gate values, expert ids and exempt flags of the group (never
     the hidden states), computes ``dropping.device_keep_mask`` on that same global view and keeps its
     own rows, so all ranks agree without another exchange.
   A dropped assignment gets prob 0 and leaves the routing map: the token skips that expert and the
   residual path carries it (a fully dropped token's MoE output is only the shared expert's, if any).
3. dispatch / experts / combine: Megatron's alltoall or allgather dispatcher, unchanged. The dispatcher is
   given ``moe_expert_capacity_factor`` so that it treats its output size as dynamic (as it does for its
   own dropping), and ``moe_pad_expert_input_to_capacity`` for ``--lossfree-pad-to-capacity``.

Cost of device-level dropping: ONE all_gather per MoE layer and micro-batch over the EP group of an int32
tensor [T_local, 2K+1] (K fp32 gate bit patterns, K expert ids, 1 exempt flag): each rank sends
4*(2K+1)*T_local bytes and receives 4*(2K+1)*T_local*D bytes. Example: T_local = 4096 tokens, K = 6,
D = 8: 208 KiB sent and 1.6 MiB received per layer per micro-batch, against 4096*6*H*2 bytes of hidden
states dispatched (H = 2048, bf16: 96 MiB). The same exchange runs again in the recompute pass of
activation checkpointing (in its backward), like the dispatcher's own collectives.

Departures, stated:
- Dropping runs in every TRAINING-mode forward, also without grad: Megatron's activation recompute does
  its first forward under ``torch.no_grad()`` and the recomputed forward must make the same decision.
  Evaluation (``model.eval()``) never drops. Drop counters, like the router's loads, count only forwards
  with grad, so each token is counted once per step with or without recompute.
- Exempt sequences apply to device-level dropping only (V2's scheme); expert-level dropping keeps
  Megatron-Core's (Switch/GShard) rule without exemptions.
"""

from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import utils as mcore_utils
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from megatron_moe_lossfree import dropping
from megatron_moe_lossfree.config import LossFreeConfig, flag
from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.dropping import ExemptContext
from megatron_moe_lossfree.megatron.dropin import resolve_lossfree
from megatron_moe_lossfree.megatron.router import buffer_device


class DroppingWarning(UserWarning):
    """A dropping setting that is valid but probably not what was meant."""


class LossFreeMoELayer(MoELayer):
    """MoELayer that tells its router the EP layout (device-limited routing) and applies dropping."""

    def __init__(self, config, submodules=None, layer_number: Optional[int] = None, pg_collection=None,
                 lossfree: Optional[LossFreeConfig] = None, **kwargs):
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection, **kwargs)
        # The router resolved Megatron's flags against the plugin's (dropin.py); use the same result.
        self.lossfree = getattr(self.router, "lossfree", None) or resolve_lossfree(config, lossfree)
        self.ep_size = mcore_utils.get_pg_size(self.ep_group)
        self.ep_rank = mcore_utils.get_pg_rank(self.ep_group)
        if hasattr(self.router, "ep_size"):
            self.router.ep_size = self.ep_size
        validate_dropping(self.lossfree, ep_size=self.ep_size,
                          dispatcher_type=config.moe_token_dispatcher_type, warn=False)
        # Evaluation never drops (REFERENCE 7), so it keeps Megatron's dropless dispatcher: the dropping
        # copy pads and cuts by capacity, which would drop tokens in eval with --lossfree-pad-to-capacity.
        self.dropless_dispatcher = self.token_dispatcher
        self.dropping_dispatcher = None
        if self.lossfree.drop != "none":
            self.dropping_dispatcher = self._dropping_dispatcher(pg_collection)
            self.token_dispatcher = self.dropping_dispatcher
        # Assignments (token, expert) seen and dropped in training forwards with grad since the last
        # reset_drop_counts(): the drop fraction of the log (metrics_log.drop_metrics).
        # Where Megatron registers its router's buffers: the current GPU (the host without CUDA).
        device = buffer_device(self.router.weight)
        self.register_buffer("local_assigned", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("local_dropped", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        # Set per micro-batch by exempt.begin_micro_batch (and re-set before its recompute).
        self.exempt_context: Optional[ExemptContext] = None
        self.last_keep_TK: Optional[torch.Tensor] = None
        self._warned_no_context = False

    def _dropping_dispatcher(self, pg_collection):
        """Megatron's own dispatcher class, built on a config copy that announces the capacity.

        With ``moe_expert_capacity_factor`` set the alltoall dispatcher sizes its permutation by the
        routing map (dynamic, what dropping needs) instead of the static T*K of drop-free runs; with
        ``moe_pad_expert_input_to_capacity`` it pads every expert's input to ceil(cf*T*K/E) rows, the
        same capacity as ``dropping.expert_capacity``. The layer's own config is not touched.
        """
        dispatch_config = copy.copy(self.config)
        dispatch_config.moe_expert_capacity_factor = self.lossfree.capacity_factor
        dispatch_config.moe_pad_expert_input_to_capacity = self.lossfree.pad_to_capacity
        dispatcher = type(self.token_dispatcher)(
            self.num_local_experts, self.local_expert_indices, config=dispatch_config,
            pg_collection=pg_collection)
        if self.use_shared_expert and self.shared_expert_overlap:
            dispatcher.set_shared_experts(self.shared_experts)
        return dispatcher

    # -- phase 1 + 2 --------------------------------------------------------------------------------
    def route(self, hidden_states: torch.Tensor, *args, **kwargs):
        probs_TE, routing_map_TE = super().route(hidden_states, *args, **kwargs)
        if self.lossfree.drop == "none":
            return probs_TE, routing_map_TE
        # Phase 3 runs on the dispatcher chosen here (route is also re-run by activation recompute).
        self.token_dispatcher = self.dropping_dispatcher if self.training else self.dropless_dispatcher
        if not self.training:
            return probs_TE, routing_map_TE
        padding_mask = kwargs.get("padding_mask", args[0] if args else None)
        if padding_mask is not None:
            raise LossFreeConfigError(
                f"a padding_mask reached MoE layer {self.layer_number} with {flag('drop')} {self.lossfree.drop}: "
                f"the plugin's capacities do not leave padding out yet; use unpadded batches or "
                f"--moe-expert-capacity-factor (Megatron's dropping)")
        return self.apply_dropping(probs_TE, routing_map_TE, num_sequences=hidden_states.shape[1])

    def apply_dropping(self, probs_TE: torch.Tensor, routing_map_TE: torch.Tensor, *, num_sequences: int):
        """Zero the probs of dropped assignments and remove them from the routing map."""
        counting = self.training and torch.is_grad_enabled()  # decided outside the no_grad block
        with torch.no_grad():
            experts_TK = selected_experts(routing_map_TE, self.config.moe_router_topk)
            gates_TK = probs_TE.detach().gather(1, experts_TK)
            if self.lossfree.drop == "expert":
                keep_TK = self.expert_keep_mask(gates_TK, experts_TK)
            else:
                keep_TK = self.device_keep_mask(gates_TK, experts_TK, num_sequences)
            keep_TE = torch.zeros_like(routing_map_TE).scatter_(1, experts_TK, keep_TK)
            if counting:
                self.count_drops(keep_TK)
            self.last_keep_TK = keep_TK
        return probs_TE * keep_TE, routing_map_TE & keep_TE

    def expert_keep_mask(self, gates_TK: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        """Per-expert capacity on this rank's tokens (Megatron-Core's rule; REFERENCE 7, last item)."""
        cfg = self.lossfree
        num_tokens, topk = experts_TK.shape
        num_experts = self.config.num_moe_experts
        if cfg.pad_to_capacity:
            capacity = dropping.expert_capacity(num_tokens, topk, num_experts, cfg.capacity_factor)
            if capacity > num_tokens:
                raise LossFreeConfigError(
                    f"{flag('pad_to_capacity')} with {flag('capacity_factor')} ({cfg.capacity_factor}) gives "
                    f"an expert capacity of {capacity} rows but only {num_tokens} tokens reach the layer: "
                    f"lower the capacity factor below {num_experts / topk:g} or drop {flag('pad_to_capacity')}")
        return dropping.expert_keep_mask(gates_TK, experts_TK, num_experts=num_experts,
                                         capacity_factor=cfg.capacity_factor, policy=cfg.drop_policy)

    def device_keep_mask(self, gates_TK: torch.Tensor, experts_TK: torch.Tensor,
                         num_sequences: int) -> torch.Tensor:
        """V2 section 2.2.4 on the EP group's whole micro-batch; returns this rank's rows."""
        exempt_T = self.exempt_tokens(experts_TK.shape[0], num_sequences)
        gates_GK, experts_GK, exempt_G = self.gather_assignments(gates_TK, experts_TK, exempt_T)
        keep_GK = dropping.device_keep_mask(
            gates_GK, experts_GK, num_devices=self.ep_size, capacity_factor=self.lossfree.capacity_factor,
            exempt=exempt_G, num_experts=self.config.num_moe_experts)
        num_tokens = experts_TK.shape[0]
        return keep_GK[self.ep_rank * num_tokens: (self.ep_rank + 1) * num_tokens]

    def gather_assignments(self, gates_TK, experts_TK, exempt_T):
        """One all_gather over the EP group of [T, 2K+1] int32 (gate bits, expert ids, exempt flag).

        Rows come back in EP-rank order, so row block r holds EP rank r's tokens on every rank. The gate
        travels as its fp32 bit pattern: every rank compares exactly the values the owner computed.
        EP ranks route equally many tokens (same micro-batch shape), which all_gather requires.
        """
        topk = experts_TK.shape[1]
        packed_TP = torch.cat([gates_TK.float().contiguous().view(torch.int32), experts_TK.int(),
                               exempt_T.int().unsqueeze(1)], dim=1)
        if self.ep_size > 1:
            parts = [torch.empty_like(packed_TP) for _ in range(self.ep_size)]
            dist.all_gather(parts, packed_TP, group=self.ep_group)
            packed_TP = torch.cat(parts)
        gates = packed_TP[:, :topk].contiguous().view(torch.float32)
        experts = packed_TP[:, topk: 2 * topk].long()
        return gates, experts, packed_TP[:, 2 * topk].bool()

    def exempt_tokens(self, num_tokens: int, num_sequences: int) -> torch.Tensor:
        """bool [T]: tokens of this micro-batch's exempt sequences (t = s*B + b belongs to sequence b)."""
        context = self.exempt_context
        if context is None:
            if self.lossfree.exempt_fraction > 0 and not self._warned_no_context:
                self._warned_no_context = True
                warnings.warn(
                    f"MoE layer {self.layer_number}: {flag('exempt_fraction')} is "
                    f"{self.lossfree.exempt_fraction} but no micro-batch context was given, so no sequence "
                    f"is exempt: call megatron_moe_lossfree.megatron.exempt.begin_micro_batch in the "
                    f"forward step", DroppingWarning, stacklevel=2)
            return torch.zeros(num_tokens, dtype=torch.bool, device=self.local_assigned.device)
        exempt_B = context.exempt_B
        if exempt_B.numel() != num_sequences or num_tokens % num_sequences:
            raise RuntimeError(
                f"MoE layer {self.layer_number}: the micro-batch context holds {exempt_B.numel()} sequences "
                f"but the layer sees {num_sequences} ({num_tokens} tokens): call exempt.begin_micro_batch "
                f"with this micro-batch's sample_ids before its forward")
        return exempt_B.to(self.local_assigned.device).repeat(num_tokens // num_sequences)

    # -- drop fraction ------------------------------------------------------------------------------
    def count_drops(self, keep_TK: torch.Tensor) -> None:
        """Called for training forwards with grad only (the router's counting rule): once per token
        and step, also under activation recompute (its first, no-grad forward is not counted)."""
        self.local_assigned += keep_TK.numel()
        self.local_dropped += (~keep_TK).sum()  # a device add: no wait for the host

    def reset_drop_counts(self) -> None:
        self.local_assigned.zero_()
        self.local_dropped.zero_()


def selected_experts(routing_map_TE: torch.Tensor, topk: int) -> torch.Tensor:
    """experts_TK (ascending ids) from a drop-free routing map with exactly K experts per token.

    The plugin's router always selects K (Megatron's own dropping is refused beside the plugin's, dropin.py).
    The count is checked on host tensors only: on a GPU the check would wait for the device in every MoE layer.
    """
    per_token = routing_map_TE.sum(dim=1)
    if routing_map_TE.device.type == "cpu" and not bool((per_token == topk).all()):
        raise RuntimeError(
            f"dropping needs exactly moe_router_topk ({topk}) experts per token before dropping, got "
            f"between {int(per_token.min())} and {int(per_token.max())}: use the plugin's router")
    order = torch.sort(routing_map_TE.to(torch.uint8), dim=1, descending=True, stable=True).indices
    return order[:, :topk]


def find_lossfree_layers(model_chunks) -> list[LossFreeMoELayer]:
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, LossFreeMoELayer)]


# --------------------------------------------------------------------------------------------------
# Validation (called by training setup, and by every layer without the warning)
# --------------------------------------------------------------------------------------------------


def dropping_problems(cfg: LossFreeConfig, *, dispatcher_type: str):
    """Dropping settings the config alone accepts but Megatron's dispatchers cannot serve cleanly."""
    if cfg.drop != "none" and dispatcher_type not in ("alltoall", "allgather"):
        yield (f"{flag('drop')} {cfg.drop} needs --moe-token-dispatcher-type alltoall or allgather "
               f"(got {dispatcher_type}): the plugin drops before Megatron's alltoall/allgather dispatch")
    if cfg.pad_to_capacity and cfg.drop == "device":
        yield (f"{flag('pad_to_capacity')} (True) is not supported with {flag('drop')} device: a device budget "
               f"bounds a device's total, not each expert's input, and Megatron's padding "
               f"(moe_pad_expert_input_to_capacity) would cut every expert to ceil(cf*T*K/E) rows and drop "
               f"more; use {flag('drop')} expert with padding, or remove {flag('pad_to_capacity')}")
    if cfg.pad_to_capacity and dispatcher_type != "alltoall":
        yield (f"{flag('pad_to_capacity')} (True) needs --moe-token-dispatcher-type alltoall (got "
               f"{dispatcher_type}): only Megatron's alltoall dispatcher pads expert inputs to capacity")


def validate_dropping(args_or_config, ep_size: Optional[int] = None, dispatcher_type: Optional[str] = None,
                      *, warn: bool = True) -> LossFreeConfig:
    """Raise one LossFreeConfigError listing every dropping problem; warn about EP = 1 device budgets.

    ``args_or_config``: mlf-pretrain's parsed args (``args.lossfree``, ``--expert-model-parallel-size``,
    ``--moe-token-dispatcher-type`` are read from it) or a LossFreeConfig with ``ep_size`` and
    ``dispatcher_type`` given.
    """
    if isinstance(args_or_config, LossFreeConfig):
        cfg = args_or_config
    else:
        cfg = args_or_config.lossfree
        ep_size = ep_size or args_or_config.expert_model_parallel_size
        dispatcher_type = dispatcher_type or args_or_config.moe_token_dispatcher_type
    problems = []
    try:
        cfg.validate()  # capacity factor > 0, exempt fraction in [0, 1], padding needs a capacity, ...
    except LossFreeConfigError as exc:
        problems.append(str(exc))
    problems.extend(dropping_problems(cfg, dispatcher_type=dispatcher_type or "alltoall"))
    if problems:
        raise LossFreeConfigError("; ".join(problems))
    if warn and cfg.drop == "device" and (ep_size or 1) == 1:
        warnings.warn(
            f"{flag('drop')} device with --expert-model-parallel-size 1: the single device's budget "
            f"ceil(cf*T*K) binds only when {flag('capacity_factor')} ({cfg.capacity_factor}) is below 1, "
            f"so nothing is dropped otherwise; use {flag('drop')} expert for per-expert capacity on one device",
            DroppingWarning, stacklevel=2)
    return cfg
