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

from megatron_moe_lossfree import balancing, quantile
from megatron_moe_lossfree.config import LossFreeConfig
from megatron_moe_lossfree.megatron.dropin import resolve_lossfree
from megatron_moe_lossfree.megatron.router import LossFreeRouter
from megatron_moe_lossfree.routing import lookup_choice


def find_routers(model_chunks) -> list[LossFreeRouter]:
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, LossFreeRouter)]


def count_reduction_group(sequence_parallel: bool):
    """The ranks that routed distinct tokens: TP x DP x CP under SP (or TP = 1), else DP x CP."""
    from megatron.core import parallel_state as ps

    if sequence_parallel or ps.get_tensor_model_parallel_world_size() == 1:
        return ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
    return ps.get_data_parallel_group(with_context_parallel=True)


def known_micro_batches(default: int = 8) -> int:
    """Micro-batches per step from Megatron's calculator when a Megatron-LM run initialised it, else
    ``default`` (the per-micro-batch count buffers grow at the first step that needs more)."""
    try:
        from megatron.core.num_microbatches_calculator import get_num_microbatches

        return max(int(get_num_microbatches()), default)
    except (AttributeError, ImportError):  # no calculator outside Megatron-LM's training
        return default


class BiasInconsistencyError(RuntimeError):
    """Ranks that must hold the same bias disagree: names the layer and the ranks."""


def bias_checksum(bias: torch.Tensor) -> int:
    """An exact fingerprint of an fp32 bias: its bit patterns, position-weighted, summed in int64."""
    bits = bias.detach().float().contiguous().view(torch.int32).long()
    return int((bits * torch.arange(1, bits.numel() + 1, device=bits.device)).sum())


class BiasBalancer:
    """Owns the per-step bias update of every LossFreeRouter in ``model_chunks``."""

    def __init__(self, model_chunks, lossfree: LossFreeConfig, *, group=None, topk: int,
                 original_finalize: Optional[Callable] = None, megatron_config=None, qb_duplicate: bool = False):
        self.routers = find_routers(model_chunks)
        # True on a rank whose exact quantile solutions duplicate another rank's of ``group``: a TP rank > 0
        # under sequence parallelism (the values were all-gathered over TP, so every TP rank solved the same
        # rows). It then adds weight 0 to the average, which is over DP x CP as Megatron's (install_bias_balancer).
        self.qb_duplicate = qb_duplicate
        self.megatron_config = megatron_config
        self.lossfree = lossfree
        self.group = group
        self.topk = topk
        self.original_finalize = original_finalize
        self.schedule = balancing.make_rate_schedule(
            lossfree.rate_schedule, lossfree.update_rate, lossfree.freeze_bias_after_tokens, lossfree.rate_decay_steps)
        # Where a bias starts: the large-bias warning measures |b - origin|.
        self.bias_origin = 1.0 if lossfree.bias_kind == "multiplicative" else 0.0
        self.tokens_seen = 0
        self.steps = 0
        self.last_counts: list[torch.Tensor] = []
        self.last_micro_batch_counts: list = []
        self.last_quantile: Optional[torch.Tensor] = None
        # [L] float64 on the device: mean |b_after - b_before| over experts of the last update (None without a
        # bias); logged as the bias motion (the quantile rule replaces the bias each step, the sign rule moves
        # it by at most u). Kept on the device: reading it is the logger's host sync, on logging steps only.
        self.last_bias_motion: Optional[torch.Tensor] = None
        # Called with this balancer at the end of every step (the Megatron-LM logger: megatron/lm_logging.py).
        self.after_step_hooks: list[Callable[["BiasBalancer"], None]] = []
        # The flat buffers are built here with fixed dtypes and shapes (fp32 [L, E] bias, int64 [L, E]
        # counts) and the rate is checked by the schedule, so the step applies the rule without
        # ``update_bias``'s per-call argument checks.
        self.quantile = lossfree.balancing == "bias" and lossfree.update_rule in ("quantile", "bip")
        # A rule with state (SMEBU, phi): its state is each router's ``lossfree_rule_state`` buffer.
        self._stateful = balancing.STATEFUL_RULES.get(lossfree.update_rule) if lossfree.balancing == "bias" else None
        self._rule_params = ({key: getattr(lossfree, field) for key, field in self._stateful.params.items()}
                             if self._stateful else {})
        self._rule_fn = None if (self.quantile or self._stateful) else lookup_choice(
            balancing.UPDATE_RULES, lossfree.update_rule, "update_rule")
        # Where a training loop that does not save the balancer's state keeps its own progress:
        # () -> (steps, tokens_seen), read once, at the first step, unless load_state_dict ran.
        self.progress_source: Optional[Callable[[], tuple[int, int]]] = None
        self._progress_known = False
        self._bind_flat_buffers()
        self.reserve_micro_batches(known_micro_batches())

    def _bind_flat_buffers(self) -> None:
        """Re-seat every router's counts (and non-finite flag) as views of ONE int64 buffer, and, when all
        layers have the same expert count, every bias as a row of one [L, E] fp32 buffer. The step then
        all-reduces, updates and zeroes all layers with single tensor ops instead of per-layer loops.
        Call after the model is on its final device (a later ``.to(device)`` would re-allocate buffers).
        """
        if not self.routers:
            self.flat_counts, self.flat_bias = None, None
            return
        self.widths = [r.local_tokens_per_expert.numel() for r in self.routers]
        device = self.routers[0].local_tokens_per_expert.device
        self.flat_counts = torch.zeros(sum(self.widths) + len(self.routers), dtype=torch.int64, device=device)
        views = self.flat_counts.split(self.widths + [len(self.routers)])
        for router, view, flag in zip(self.routers, views, views[-1].unbind()):
            view.copy_(router.local_tokens_per_expert)
            router.local_tokens_per_expert = view
            flag.copy_(router.nonfinite_logits)
            router.nonfinite_logits = flag
        biases = [r.expert_bias for r in self.routers]
        self.flat_bias, self.flat_state = None, None
        if all(b is not None for b in biases) and len(set(self.widths)) == 1:
            self.flat_bias = torch.stack(biases).float()
            for router, row in zip(self.routers, self.flat_bias.unbind()):
                router.expert_bias = row
            if self._stateful is not None:
                self.flat_state = torch.stack([r.lossfree_rule_state for r in self.routers]).float()
                for router, row in zip(self.routers, self.flat_state.unbind()):
                    router.lossfree_rule_state = row

    # Megatron calls config.finalize_model_grads_func(model, num_tokens, ...).
    def __call__(self, *args, **kwargs):
        result = self.call_original(*args, **kwargs)
        if not self._progress_known:
            self._progress_known = True
            if self.progress_source is not None:
                self.steps, self.tokens_seen = (int(x) for x in self.progress_source())
        self.step()
        return result

    def call_original(self, *args, **kwargs):
        """Megatron's finalize with ``moe_router_enable_expert_bias`` hidden for the call: the flag is
        mapped onto this balancer (dropin.py), and Megatron's own update would move the plugin's bias a
        second time and zero its counts first (one owner, DESIGN.md)."""
        if self.original_finalize is None:
            return None
        config = self.megatron_config
        hide = config is not None and getattr(config, "moe_router_enable_expert_bias", False)
        if hide:
            config.moe_router_enable_expert_bias = False
        try:
            return self.original_finalize(*args, **kwargs)
        finally:
            if hide:
                config.moe_router_enable_expert_bias = True

    def moving_routers(self) -> list[bool]:
        """Per router: does its bias move this step? Like Megatron (0.19), a router in eval mode (a
        distillation teacher) or with ``frozen_expert_bias`` keeps its bias."""
        return [r.training and not getattr(r, "frozen_expert_bias", False) for r in self.routers]

    def updating_rows(self) -> Optional[torch.Tensor]:
        """bool [L] of ``moving_routers``; None when all move."""
        rows = self.moving_routers()
        return None if all(rows) else torch.tensor(rows, device=self.flat_counts.device)

    def reduce_counts(self) -> torch.Tensor:
        """All-reduce every layer's counts and non-finite flags -- and the quantile rule's statistics --
        in ONE collective; returns a copy (the live buffers are zeroed for the next step).

        The quantile statistics ride along: the exact estimator's per-rank mean solution and a rank weight
        in a float64 payload (``exact_rank_stats``; counts stay exact below 2**53), or the histogram
        estimator's int64 histograms and token counts in the int64 one. ``self.last_quantile`` keeps the
        reduced statistics."""
        parts = [self.flat_counts]
        if self.quantile:
            for router in self.routers:
                if router.qb_solution_sum is not None:
                    parts += self.exact_rank_stats(router)
                else:
                    parts += [router.qb_histogram.reshape(-1), router.qb_observed.reshape(1)]
        dtype = torch.float64 if any(p.is_floating_point() for p in parts) else torch.int64
        payload = torch.cat([p.to(dtype) for p in parts]) if len(parts) > 1 else parts[0].clone()
        if self.group is not None and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(payload, group=self.group)
        self.flat_counts.zero_()
        for router in self.routers if self.quantile else ():
            router.reset_quantile_state()
        reduced = payload[: self.flat_counts.numel()]
        self.last_quantile = payload[self.flat_counts.numel():]
        return reduced.long() if dtype != torch.int64 else reduced

    def exact_rank_stats(self, router) -> list[torch.Tensor]:
        """This rank's part of the exact estimator's average, in Megatron-Core 0.19.2's order
        (``_update_router_qb_beta``): the mean of this rank's micro-batch solutions first, in fp32
        (``quantile.qb_mean_solution``: the fp32 sum in micro-batch order over the count), then, after the
        all-reduce, the mean of those means over the ranks (``update_quantile``). The weight is 1 for a
        rank that solved a micro-batch and is no TP duplicate, else 0 (such a rank's mean is zeroed)."""
        weight = (router.qb_observed > 0) & (not self.qb_duplicate)
        mean_E = quantile.qb_mean_solution(router.qb_solution_sum, router.qb_observed)
        return [torch.where(weight, mean_E, torch.zeros_like(mean_E)), weight.long().reshape(1)]

    def step(self) -> None:
        if not self.routers:
            self.steps += 1
            return
        reduced = self.reduce_counts()
        counts = list(reduced.split(self.widths + [len(self.routers)]))
        flags = counts.pop()
        self.last_counts = counts
        # The rate of this update is the one in force for the tokens of this step (V3 4.2: u for
        # the first N tokens), known before the step: no host sync needed to pick it.
        rate = self.schedule.rate_at(self.tokens_seen, self.steps)
        before = self.snapshot_bias()
        over_bound = None
        if self.quantile:
            over_bound = self.update_quantile(rate)
        elif self.lossfree.balancing == "bias":
            if self.flat_bias is not None:
                over_bound = self.update_flat_bias(reduced[: self.flat_bias.numel()].view_as(self.flat_bias), rate)
            else:
                self.update_biases(counts, rate)
        self.last_bias_motion = self.measure_bias_motion(before)
        # One host sync for the step: non-finite flags, token count, large-bias check, micro-batches seen.
        probe = [flags.sum(), counts[0].sum()] + ([over_bound] if over_bound is not None else [])
        values = torch.stack(probe + [r.micro_batch_index for r in self.routers]).tolist()  # all int64
        values, seen = values[: len(probe)], values[len(probe):]
        if values[0]:  # summed over ranks: every rank raises, naming the same layer
            for router, flag in zip(self.routers, flags.tolist()):
                router.nonfinite_logits.fill_(flag)
                router.raise_if_nonfinite(self.steps + 1)
        # Every MoE layer routes every token of the step exactly K times.
        self.tokens_seen += values[1] // self.topk
        if len(values) > 2 and values[2]:
            self.check_bias_bound(list(range(len(self.routers))), self.flat_bias)
        self.last_micro_batch_counts = self.take_micro_batch_counts(seen)
        self.steps += 1
        every = self.lossfree.check_consistency
        if every and self.steps % every == 0:
            self.check_consistency()
        for hook in self.after_step_hooks:
            hook(self)

    def snapshot_bias(self) -> Optional[list[torch.Tensor]]:
        """Device copies of the biases before this step's update (no host sync), for ``measure_bias_motion``."""
        if self.lossfree.balancing != "bias":
            return None
        if self.flat_bias is not None:
            return [self.flat_bias.clone()]
        return [r.expert_bias.detach().clone() for r in self.routers]

    def measure_bias_motion(self, before: Optional[list[torch.Tensor]]) -> Optional[torch.Tensor]:
        """[L] float64: per layer, the mean over experts of |b_after - b_before| of this step's update."""
        if before is None:
            return None
        if self.flat_bias is not None:
            return (self.flat_bias - before[0]).abs().mean(dim=1).double()
        return torch.stack([(r.expert_bias - b).abs().mean() for r, b in zip(self.routers, before)]).double()

    def reserve_micro_batches(self, capacity: int) -> None:
        """Room for ``capacity`` micro-batches per step in every router's static per-micro-batch counts;
        call before CUDA graphs are captured (a training loop knows its number of micro-batches)."""
        for router in self.routers:
            router.reserve_micro_batches(capacity)

    def take_micro_batch_counts(self, seen: list[int]) -> list:
        """Per router, its [M, E] micro-batch counts of this step (None when it saw none, or more than its
        capacity: then the capacity grows for the next step, with a warning); the buffers are zeroed."""
        stacks = []
        for router, count in zip(self.routers, seen):
            fits = 0 < count <= router.micro_batch_capacity()
            stacks.append(router.micro_batch_counts_ME[:count].clone() if fits else None)
            router.micro_batch_counts_ME.zero_()
            router.micro_batch_index.zero_()
        # micro-batches per router (a repeated MTP layer routes each one several times)
        over = [-(-count // r.calls_per_micro_batch()) for r, count in zip(self.routers, seen)
                if count > r.micro_batch_capacity()]
        if over:
            most = max(over)
            warnings.warn(f"step {self.steps + 1} ran {most} micro-batches, more than the routers had room for: "
                          f"MaxVio_computation-batch is not reported for it; room is now made for {most} (call "
                          f"BiasBalancer.reserve_micro_batches before the first step)", RuntimeWarning, stacklevel=3)
            self.reserve_micro_batches(most)
        return stacks

    @torch.no_grad()
    def update_flat_bias(self, counts_LE: torch.Tensor, rate: float) -> torch.Tensor:
        """All layers at once; returns a 0-d int64 tensor: does any layer exceed the warning bound?"""
        if self._stateful is not None:
            new_LE, state_LE = balancing.apply_stateful_rule(self._stateful, self.flat_bias, counts_LE,
                                                             self.flat_state, rate, **self._rule_params)
        else:
            new_LE = balancing.apply_update_rule(self._rule_fn, self.flat_bias, counts_LE, rate)
        rows_L = self.updating_rows()
        if rows_L is not None:
            new_LE = torch.where(rows_L.unsqueeze(1), new_LE, self.flat_bias)
            if self._stateful is not None:
                state_LE = torch.where(rows_L.unsqueeze(1), state_LE, self.flat_state)
        self.flat_bias.copy_(new_LE)
        if self._stateful is not None:
            self.flat_state.copy_(state_LE)
        return ((new_LE - self.bias_origin).abs() > self.lossfree.bias_warn_bound).any().long()

    @torch.no_grad()
    def update_quantile(self, rate: float) -> Optional[torch.Tensor]:
        """The quantile rule from the reduced statistics (pure maths: ``quantile.py``): exact, the mean over
        ranks of each rank's mean solution (``exact_rank_stats``; the summed fp32 means, rounded to fp32 once,
        over the ranks: ``qb_mean_solution``); histogram, the k/E quantile of the summed histograms. Then
        ``centre(ema*b + (1-ema)*solution)`` per layer (``qb_blend_center``), Megatron's
        ``_update_router_qb_beta``. A layer that observed nothing, a frozen or eval-mode router, and a bias
        frozen by the v3 schedule (rate 0) keep their bias. Returns the large-bias flag.

        Bits: one rank, or two, give Megatron-Core 0.19.2's ``qb_beta`` bit for bit. With three or more ranks
        the sum over ranks is exact here (fp64, then one rounding), where Megatron's fp32 ``all_reduce(AVG)``
        rounds at each addition in an order the backend picks (gloo: ring order by element position, then
        / n; NCCL: each value premultiplied by 1/n): the two can differ in the last bits of the mean (by about
        one ulp of the largest rank's mean; docs/notes_qb_megatron.md), and no reduction but Megatron's own
        call would match."""
        if rate == 0.0:
            return None
        cfg = self.lossfree
        bins = cfg.quantile_bins if cfg.quantile_estimator == "histogram" else 1
        spans, offset = [], 0  # per layer: (start, width); the layer's observed count follows its stats
        for router in self.routers:
            spans.append((offset, router.expert_bias.numel()))
            offset += router.expert_bias.numel() * bins + 1
        observed_L = self.last_quantile[[start + width * bins for start, width in spans]]
        seen = observed_L.tolist()  # the step's one host sync (which layers observed anything)
        for i, (router, (start, width), moving) in enumerate(zip(self.routers, spans, self.moving_routers())):
            if seen[i] <= 0 or not moving:
                continue
            stats, observed = self.last_quantile[start: start + width * bins], observed_L[i]
            if cfg.quantile_estimator == "exact":
                solution_E = quantile.qb_mean_solution(stats.float(), observed.long())
            else:
                solution_E = quantile.qb_histogram_quantile_E(
                    stats.view(width, cfg.quantile_bins), router.expert_bias, self.topk, num_tokens=observed,
                    margin=cfg.quantile_margin).float()
            finish = quantile.bip_blend if cfg.update_rule == "bip" else quantile.qb_blend_center
            router.expert_bias.copy_(finish(router.expert_bias, solution_E, cfg.quantile_ema))
        if self.flat_bias is None:
            self.check_bias_bound(list(range(len(self.routers))), torch.stack([r.expert_bias for r in self.routers]))
            return None
        return (self.flat_bias.abs() > cfg.bias_warn_bound).any().long()

    @torch.no_grad()
    def update_biases(self, counts: list[torch.Tensor], rate: float) -> None:
        """Apply the rule to every layer: one vectorised ``update_bias`` per distinct expert count
        (normally one call for the whole model), then the large-bias check on the stacked result."""
        by_width: dict[int, list[int]] = {}
        for i, router in enumerate(self.routers):
            if router.expert_bias is not None and router.training and not getattr(router, "frozen_expert_bias", False):
                by_width.setdefault(router.expert_bias.numel(), []).append(i)
        for members in by_width.values():
            bias_LE = torch.stack([self.routers[i].expert_bias for i in members])
            counts_LE = torch.stack([counts[i] for i in members])
            if self._stateful is not None:
                state_LE = torch.stack([self.routers[i].lossfree_rule_state for i in members])
                new_LE, state_LE = balancing.update_bias_with_state(
                    bias_LE, counts_LE, state_LE, rule=self.lossfree.update_rule, rate=rate, **self._rule_params)
                for i, row in zip(members, state_LE):
                    self.routers[i].lossfree_rule_state.copy_(row)
            else:
                new_LE = balancing.update_bias(bias_LE, counts_LE, rule=self.lossfree.update_rule, rate=rate)
            for i, row in zip(members, new_LE):
                self.routers[i].expert_bias.copy_(row)
            self.check_bias_bound(members, new_LE)

    def check_bias_bound(self, members: list[int], bias_LE: torch.Tensor) -> None:
        peaks_L = (bias_LE - self.bias_origin).abs().amax(dim=-1)
        if bool((peaks_L > self.lossfree.bias_warn_bound).any()):
            for i, peak in zip(members, peaks_L.tolist()):
                self.warn_large_bias(self.routers[i], peak)

    def warn_large_bias(self, router, peak: float) -> None:
        """Warn once per layer when |bias| exceeds the configured bound (a sign of a stuck expert)."""
        bound = self.lossfree.bias_warn_bound
        if peak > bound and not getattr(router, "_bias_warned", False):
            router._bias_warned = True
            warnings.warn(f"expert_bias of {router.layer_name()} reached |b - {self.bias_origin:g}| = {peak:.4g} > "
                          f"--lossfree-bias-warn-bound ({bound:g}) at step {self.steps + 1}: an expert may be "
                          f"starved or the update rate too high", RuntimeWarning, stacklevel=2)

    def check_consistency(self) -> None:
        """All-gather every layer's bias checksum over the ranks of this pipeline stage; fail on mismatch."""
        if not self.routers or self.group is None or not dist.is_initialized():
            return
        local = torch.tensor([bias_checksum(r.expert_bias) if r.expert_bias is not None else 0
                              for r in self.routers], dtype=torch.int64, device=self.flat_counts.device)
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
        self._progress_known = True


def install_bias_balancer(config, model_chunks, lossfree: LossFreeConfig) -> BiasBalancer:
    """Wrap ``config.finalize_model_grads_func`` (Megatron's if unset) with the plugin's bias update."""
    from megatron.core.distributed import finalize_model_grads

    lossfree = resolve_lossfree(config, lossfree)  # the routers' effective config (Megatron's flags mapped)
    original = config.finalize_model_grads_func or finalize_model_grads
    if isinstance(original, BiasBalancer):
        original = original.original_finalize
    from megatron.core import parallel_state as ps

    # Under SP the count group holds every TP rank, whose exact solutions are the same (gathered over TP).
    duplicate = bool(config.sequence_parallel) and ps.get_tensor_model_parallel_rank() != 0
    balancer = BiasBalancer(model_chunks, lossfree, group=count_reduction_group(config.sequence_parallel),
                            topk=config.moe_router_topk, original_finalize=original, megatron_config=config,
                            qb_duplicate=duplicate)
    config.finalize_model_grads_func = balancer
    return balancer
