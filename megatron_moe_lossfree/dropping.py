"""Token-dropping maths: capacities, expert- and device-level keep masks, exempt sequences.

Pure torch: no Megatron import, no communication. Definitions: REFERENCE.md section 7.
A keep mask is bool [T, K] over the token-expert assignments of ``experts_TK``; a dropped
assignment contributes nothing (the residual path carries the token).

Shape suffixes: T tokens, E experts, K top-k, L layers, D devices, G groups,
B sequences, S sequence length. ``N`` = T*K flattened assignments (token-major: n = t*K + k).

Papers: V2 = arXiv 2405.04434 (section 2.2.4, token dropping), GShard / Switch (expert capacity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.routing import count_tokens_per_expert, lookup_choice

# --------------------------------------------------------------------------------------------------
# Capacities
# --------------------------------------------------------------------------------------------------


def expert_capacity(num_tokens: int, topk: int, num_experts: int, capacity_factor: float) -> int:
    """Switch / GShard per-expert capacity: ceil(cf * T * K / E) assignments.

    Evaluated as ceil((T*K / E) * cf), the exact float order of Megatron-Core's
    ``get_capacity(T*K, E, cf)``, so both round identically.
    """
    _check_capacity_factor(capacity_factor)
    return math.ceil((num_tokens * topk / num_experts) * capacity_factor)


def device_budget(num_tokens: int, topk: int, num_devices: int, capacity_factor: float) -> int:
    """V2 section 2.2.4: a device's budget is the average computation per device times the
    capacity factor, ceil(cf * T * K / D) assignments, T = all tokens of the EP group."""
    _check_capacity_factor(capacity_factor)
    return math.ceil((num_tokens * topk / num_devices) * capacity_factor)


# --------------------------------------------------------------------------------------------------
# Expert-level dropping (Switch / GShard; Megatron-Core's apply_router_token_dropping)
# --------------------------------------------------------------------------------------------------


def order_by_gate(gates_N: torch.Tensor) -> torch.Tensor:
    """'probs': highest gate first, ties to the earlier assignment (stable sort)."""
    return torch.sort(gates_N.float(), descending=True, stable=True).indices


def order_by_position(gates_N: torch.Tensor) -> torch.Tensor:
    """'position': earliest token first (first come, first served, Switch Transformer)."""
    return torch.arange(gates_N.numel(), device=gates_N.device)


DROP_POLICIES = {
    "probs": order_by_gate,
    "position": order_by_position,
}


def expert_keep_mask(
    gates_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    *,
    num_experts: int,
    capacity_factor: float,
    policy: str = "probs",
) -> torch.Tensor:
    """Keep at most ``expert_capacity(T, K, E, cf)`` assignments per expert, chosen by ``policy``.

    Equals Megatron-Core's ``apply_router_token_dropping(pad_to_capacity=False)`` for 'probs'
    (with distinct gates). For 'position' it keeps exactly the earliest tokens; Megatron-Core
    picks by torch.topk over a 0/1 map, whose choice among the tied ones is unspecified, so it
    keeps the same NUMBER per expert but not always the earliest ones.
    """
    order_fn = lookup_choice(DROP_POLICIES, policy, "policy")
    _check_assignments(gates_TK, experts_TK)
    num_tokens, topk = experts_TK.shape
    capacity = expert_capacity(num_tokens, topk, num_experts, capacity_factor)
    _check_expert_ids(experts_TK, num_experts)
    owner_N = experts_TK.reshape(-1).long()
    order_N = order_fn(gates_TK.detach().reshape(-1))
    rank_N = _rank_within_owner(owner_N, order_N, num_experts)
    return (rank_N < capacity).view(num_tokens, topk)


# --------------------------------------------------------------------------------------------------
# Device-level dropping (V2 section 2.2.4)
# --------------------------------------------------------------------------------------------------


def device_keep_mask(
    gates: torch.Tensor,
    experts: torch.Tensor,
    *,
    num_devices: int,
    capacity_factor: float,
    exempt: torch.Tensor | None,
    num_experts: int | None = None,
) -> torch.Tensor:
    """V2 device-level dropping over the whole EP group's micro-batch (T = all its tokens).

    Device of an assignment = expert // (E/D). Each device keeps ``device_budget(T, K, D, cf)``
    assignments: first every assignment of an exempt token (always kept, even over budget), then
    the non-exempt ones with the HIGHEST gate; the lowest-affinity ones are dropped (V2: "drop
    the tokens with the lowest affinity scores on each device until reaching the budget").
    Ties go to the lower token index (then the lower k), so every rank computes the same mask.

    Args:
        gates: [T, K] gate values (the unbiased affinities of the chosen experts).
        experts: [T, K] expert ids.
        exempt: bool [T] (tokens of exempt sequences) or None.
        num_experts: E. If None, inferred as the smallest multiple of num_devices greater than
            experts.max() (a read of the ids on the host, which waits for a GPU); pass it whenever the
            last device may have received no token, and on a GPU.
    Returns:
        bool [T, K], True = keep.
    """
    gates_TK, experts_TK = gates, experts
    _check_assignments(gates_TK, experts_TK)
    num_tokens, topk = experts_TK.shape
    if num_devices < 1:
        raise LossFreeConfigError(
            f"num_devices ({num_devices}) must be >= 1: pass the expert-parallel size"
        )
    if num_experts is None:
        max_expert = int(experts_TK.max()) if experts_TK.numel() else 0
        num_experts = (max_expert // num_devices + 1) * num_devices
    if num_experts % num_devices != 0:
        raise LossFreeConfigError(
            f"num_devices ({num_devices}) must divide num_experts ({num_experts}): "
            f"choose a divisor of {num_experts}"
        )
    _check_expert_ids(experts_TK, num_experts)
    exempt_T = _check_exempt(exempt, num_tokens, gates_TK.device)
    budget = device_budget(num_tokens, topk, num_devices, capacity_factor)

    device_N = experts_TK.reshape(-1).long() // (num_experts // num_devices)
    exempt_N = exempt_T.unsqueeze(1).expand(-1, topk).reshape(-1)  # token-major, like experts_TK
    # Priority within a device: exempt first, then highest gate, then earliest (stable sorts).
    order_N = order_by_gate(gates_TK.detach().reshape(-1))
    order_N = order_N[torch.sort((~exempt_N[order_N]).to(torch.uint8), stable=True).indices]
    rank_N = _rank_within_owner(device_N, order_N, num_devices)
    return (exempt_N | (rank_N < budget)).view(num_tokens, topk)


def _rank_within_owner(owner_N: torch.Tensor, order_N: torch.Tensor, num_owners: int):
    """rank_N[n] = position of assignment n among its owner's assignments in priority ``order_N``.

    One stable sort by owner keeps the priority order inside each owner; subtracting the owner's
    start offset turns global positions into per-owner ranks. No loop over tokens.
    """
    by_owner = order_N[torch.sort(owner_N[order_N], stable=True).indices]
    counts = count_tokens_per_expert(owner_N, num_owners)  # assignments per owner, without a host sync
    starts = torch.cumsum(counts, dim=0) - counts
    position = torch.arange(owner_N.numel(), device=owner_N.device)
    rank_N = torch.empty_like(position)
    rank_N[by_owner] = position - starts[owner_N[by_owner]]
    return rank_N


# --------------------------------------------------------------------------------------------------
# Exempt sequences (V2: ~10% of training sequences are never dropped)
# --------------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One splitmix64 step (Steele et al. 2014) on a python int: a well-mixed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def hash_uniform(seed: int, step: int, sample_id: int) -> float:
    """Counter-based uniform in [0, 1) from (seed, step, sample id): the top 53 bits of a chained
    splitmix64. Plain python ints, so every process (any TP/CP rank, PP stage, recompute) agrees."""
    h = _splitmix64(
        _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64)) ^ (sample_id & _MASK64)
    )
    return (h >> 11) / float(1 << 53)


def select_exempt_sequences(
    global_sample_ids_B: torch.Tensor, *, seed: int, step: int, fraction: float
) -> torch.Tensor:
    """bool [B]: True for the sequences whose tokens are never dropped this step.

    V2 keeps ~10% of training sequences undropped (training/inference consistency); which ones is
    our choice: hash_uniform(seed, step, global sample id) < fraction. A function of the global
    sample index, not of the rank, so it is identical on every rank and under recompute.
    fraction 0 exempts none, 1 exempts all.
    """
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0.0 <= fraction <= 1.0
    ):
        raise LossFreeConfigError(
            f"fraction ({fraction!r}) must be in [0, 1]: V2 exempts 0.1 of the sequences"
        )
    ids = global_sample_ids_B
    if (
        not isinstance(ids, torch.Tensor)
        or ids.dim() != 1
        or ids.is_floating_point()
        or ids.dtype == torch.bool
    ):
        described = f"{ids.dtype}, shape {tuple(ids.shape)}" if torch.is_tensor(ids) else repr(ids)
        raise LossFreeConfigError(
            f"global_sample_ids_B ({described}) must be a 1-D integer tensor: "
            f"pass the global sample index of each sequence"
        )
    flags = [hash_uniform(int(seed), int(step), sample_id) < fraction for sample_id in ids.tolist()]
    return torch.tensor(flags, dtype=torch.bool, device=ids.device)


@dataclass(frozen=True)
class ExemptContext:
    """One micro-batch's exempt flags, fixed when its forward starts.

    Made by ``megatron.exempt.make_context`` and read by ``LossFreeMoELayer``; it lives here, below both,
    so that the layer does not import the module that hands the context out.
    """

    step: int
    """Optimizer step the micro-batch belongs to (seeds the choice, REFERENCE 7)."""
    sample_ids_B: torch.Tensor
    """int64 [B]: global sample index of each sequence of the micro-batch."""
    exempt_B: torch.Tensor
    """bool [B]: True for the sequences whose tokens are never dropped."""


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _check_capacity_factor(capacity_factor: float) -> None:
    if (
        isinstance(capacity_factor, bool)
        or not isinstance(capacity_factor, (int, float))
        or not (math.isfinite(capacity_factor) and capacity_factor > 0)
    ):
        raise LossFreeConfigError(
            f"capacity_factor ({capacity_factor!r}) must be a finite number > 0: "
            f"V2 uses 1.0; use no dropping instead of an infinite factor"
        )


def _check_assignments(gates_TK: torch.Tensor, experts_TK: torch.Tensor) -> None:
    if experts_TK.dim() != 2 or gates_TK.shape != experts_TK.shape:
        raise LossFreeConfigError(
            f"gates shape {tuple(gates_TK.shape)} and experts shape {tuple(experts_TK.shape)} "
            f"must both be [T, K]: pass select_experts' outputs"
        )


def _check_expert_ids(experts_TK: torch.Tensor, num_experts: int) -> None:
    """Every id in [0, num_experts). Read on the host only: reading a GPU tensor's values waits for the
    device and stalls the launch queue of every MoE layer, and there the ids are the router's own top-k
    over num_experts columns (an id out of range would stop the scatter-add with a device-side assert)."""
    if experts_TK.device.type != "cpu" or not experts_TK.numel():
        return
    low, high = int(experts_TK.min()), int(experts_TK.max())
    if low < 0 or high >= num_experts:
        raise LossFreeConfigError(
            f"experts holds expert {low if low < 0 else high} but num_experts is {num_experts}: "
            f"pass the layer's number of experts"
        )


def _check_exempt(exempt: torch.Tensor | None, num_tokens: int, device) -> torch.Tensor:
    if exempt is None:
        return torch.zeros(num_tokens, dtype=torch.bool, device=device)
    if exempt.dtype != torch.bool or tuple(exempt.shape) != (num_tokens,):
        raise LossFreeConfigError(
            f"exempt ({exempt.dtype}, shape {tuple(exempt.shape)}) must be bool of shape "
            f"({num_tokens},): one flag per token, or None"
        )
    return exempt.to(device)
