"""BiasBalancer: the one owner of the bias update, installed as ``config.finalize_model_grads_func``.

Once per optimizer step (Megatron calls finalize_model_grads after the last micro-batch's backward):
1. Megatron's own finalize runs (DP grad sync, SP/embedding all-reduces).
2. Every LossFreeRouter's pre-drop int64 counts, all layers of all local model chunks, are concatenated
   and all-reduced in ONE collective over the ranks that routed distinct tokens: TP x DP x CP (under
   sequence parallelism each TP rank routes its own slice; EP is carved out of DP, so the group already
   holds every EP rank's tokens; reducing over EP too would count them twice).
3. Each layer's bias moves by the rule and the scheduled rate (``balancing.update_bias``), counts reset.

Layers may have different expert counts: the counts are concatenated, never stacked. Pipeline stages
update their own layers; every MoE layer sees every token of the step, so all stages agree on the token
count that drives the V3 freeze schedule.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_moe_lossfree import balancing
from megatron_moe_lossfree.config import LossFreeConfig
from megatron_moe_lossfree.megatron.router import LossFreeRouter


def find_routers(model_chunks) -> list[LossFreeRouter]:
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, LossFreeRouter)]


def count_reduction_group(sequence_parallel: bool):
    """The ranks that routed distinct tokens: TP x DP x CP under SP (or TP = 1), else DP x CP."""
    from megatron.core import parallel_state as ps

    if sequence_parallel or ps.get_tensor_model_parallel_world_size() == 1:
        return ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
    return ps.get_data_parallel_group(with_context_parallel=True)


class BiasInconsistencyError(RuntimeError):
    """Ranks that must hold the same bias disagree: names the layer and the ranks."""


def bias_checksum(bias: torch.Tensor) -> int:
    """An exact fingerprint of an fp32 bias: its bit patterns, position-weighted, summed in int64."""
    bits = bias.detach().float().contiguous().view(torch.int32).long()
    return int((bits * torch.arange(1, bits.numel() + 1)).sum())


class BiasBalancer:
    """Owns the per-step bias update of every LossFreeRouter in ``model_chunks``."""

    def __init__(self, model_chunks, lossfree: LossFreeConfig, *, group=None, topk: int,
                 original_finalize: Optional[Callable] = None):
        self.routers = find_routers(model_chunks)
        self.lossfree = lossfree
        self.group = group
        self.topk = topk
        self.original_finalize = original_finalize
        self.schedule = balancing.make_rate_schedule(
            lossfree.rate_schedule, lossfree.update_rate, lossfree.freeze_bias_after_tokens)
        self.tokens_seen = 0
        self.steps = 0
        self.last_counts: list[torch.Tensor] = []
        self.last_micro_batch_counts: list = []

    # Megatron calls config.finalize_model_grads_func(model, num_tokens, ...).
    def __call__(self, *args, **kwargs):
        result = self.original_finalize(*args, **kwargs) if self.original_finalize is not None else None
        self.step()
        return result

    def reduce_counts(self) -> list[torch.Tensor]:
        """All-reduce every layer's counts in one collective; returns the global per-layer counts."""
        if not self.routers:
            return []
        local = torch.cat([r.local_tokens_per_expert for r in self.routers])
        if self.group is not None and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(local, group=self.group)
        return list(local.split([r.local_tokens_per_expert.numel() for r in self.routers]))

    def step(self) -> None:
        flags = torch.stack([r.nonfinite_logits for r in self.routers]) if self.routers else None
        if flags is not None and bool(flags.any()):  # one host sync per step for all layers
            for router in self.routers:
                router.raise_if_nonfinite(self.steps + 1)
        counts = self.reduce_counts()
        self.last_counts = counts
        if counts:
            # The rate of this update is the one in force for the tokens of this step (V3 4.2: u for
            # the first N tokens); every MoE layer routes every token of the step exactly K times.
            rate = self.schedule.rate_at(self.tokens_seen)
            self.tokens_seen += int(counts[0].sum()) // self.topk
            if self.lossfree.balancing == "bias":
                self.update_biases(counts, rate)
            for router in self.routers:
                router.local_tokens_per_expert.zero_()
        self.last_micro_batch_counts = [torch.stack(r.micro_batch_counts) if r.micro_batch_counts else None
                                        for r in self.routers]
        for router in self.routers:
            router.micro_batch_counts = []
        self.steps += 1
        every = self.lossfree.check_consistency
        if every and self.steps % every == 0:
            self.check_consistency()

    @torch.no_grad()
    def update_biases(self, counts: list[torch.Tensor], rate: float) -> None:
        """Apply the rule to every layer: one vectorised ``update_bias`` per distinct expert count
        (normally one call for the whole model), then the large-bias check on the stacked result."""
        by_width: dict[int, list[int]] = {}
        for i, router in enumerate(self.routers):
            if router.expert_bias is not None:
                by_width.setdefault(router.expert_bias.numel(), []).append(i)
        reference = 1.0 if self.lossfree.bias_kind == "multiplicative" else 0.0
        for members in by_width.values():
            bias_LE = torch.stack([self.routers[i].expert_bias for i in members])
            counts_LE = torch.stack([counts[i] for i in members])
            new_LE = balancing.update_bias(bias_LE, counts_LE, rule=self.lossfree.update_rule, rate=rate)
            for i, row in zip(members, new_LE):
                self.routers[i].expert_bias.copy_(row)
            peaks_L = (new_LE - reference).abs().amax(dim=-1)
            if bool((peaks_L > self.lossfree.bias_warn_bound).any()):
                for i, peak in zip(members, peaks_L.tolist()):
                    self.warn_large_bias(self.routers[i], peak, reference)

    def warn_large_bias(self, router, peak: float, reference: float) -> None:
        """Warn once per layer when |bias| exceeds the configured bound (a sign of a stuck expert)."""
        bound = self.lossfree.bias_warn_bound
        if peak > bound and not getattr(router, "_bias_warned", False):
            router._bias_warned = True
            warnings.warn(f"expert_bias of {router.layer_name()} reached |b - {reference:g}| = {peak:.4g} > "
                          f"--lossfree-bias-warn-bound ({bound:g}) at step {self.steps + 1}: an expert may be "
                          f"starved or the update rate too high", RuntimeWarning, stacklevel=2)

    def check_consistency(self) -> None:
        """All-gather every layer's bias checksum over the ranks of this pipeline stage; fail on mismatch."""
        if not self.routers or self.group is None or not dist.is_initialized():
            return
        local = torch.tensor([bias_checksum(r.expert_bias) if r.expert_bias is not None else 0
                              for r in self.routers], dtype=torch.int64)
        size = dist.get_world_size(self.group)
        gathered = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(gathered, local, group=self.group)
        ranks = dist.get_process_group_ranks(self.group)
        table = torch.stack(gathered)
        for i, router in enumerate(self.routers):
            column = table[:, i]
            if not bool((column == column[0]).all()):
                differ = [ranks[j] for j in range(size) if column[j] != column[0]]
                raise BiasInconsistencyError(
                    f"expert_bias of {router.layer_name()} differs across ranks at step {self.steps}: ranks "
                    f"{differ} disagree with rank {ranks[0]}; the count all-reduce group is misconfigured or "
                    f"a rank loaded another checkpoint")

    def state_dict(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.tokens_seen = int(state["tokens_seen"])
        self.steps = int(state["steps"])


def install_bias_balancer(config, model_chunks, lossfree: LossFreeConfig) -> BiasBalancer:
    """Wrap ``config.finalize_model_grads_func`` (Megatron's if unset) with the plugin's bias update."""
    from megatron.core.distributed import finalize_model_grads

    if config.moe_router_enable_expert_bias and lossfree.balancing == "bias":
        raise ValueError("moe_router_enable_expert_bias (Megatron's update) and lossfree balancing 'bias' "
                         "would both update the bias: turn Megatron's off")
    original = config.finalize_model_grads_func or finalize_model_grads
    if isinstance(original, BiasBalancer):
        original = original.original_finalize
    balancer = BiasBalancer(model_chunks, lossfree, group=count_reduction_group(config.sequence_parallel),
                            topk=config.moe_router_topk, original_finalize=original)
    config.finalize_model_grads_func = balancer
    return balancer
