"""Routing maths: score functions, biased top-k, device- and node-limited routing.

Pure torch: no Megatron import, no communication. Definitions: REFERENCE.md sections 1 and 6.

Shape suffixes: T tokens, E experts, K top-k, L layers, D devices, G groups,
B sequences, S sequence length. ``scores_TE`` is [T, E], ``bias_E`` [E], ``experts_TK`` [T, K].

Papers: LFB = arXiv 2408.15664 (aux-loss-free balancing), V2 = arXiv 2405.04434 (DeepSeek-V2),
V3 = arXiv 2412.19437 (DeepSeek-V3).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from megatron_moe_lossfree.errors import LossFreeConfigError

# Megatron-Core adds the same epsilon when it normalises the selected sigmoid gates
# (moe_utils.topk_routing_with_score_function); keeping it makes our gates bit-comparable.
GATE_NORM_EPS = 1e-20


# --------------------------------------------------------------------------------------------------
# Score functions: logits [T, E] -> affinities s[t, i] [T, E], always in fp32.
# --------------------------------------------------------------------------------------------------


def score_sigmoid(logits_TE: torch.Tensor) -> torch.Tensor:
    """V3 eq. 15: s[t, i] = sigmoid(u_t . e_i); each expert scored independently of the others."""
    return torch.sigmoid(logits_TE.float())


def score_softmax(logits_TE: torch.Tensor) -> torch.Tensor:
    """V2 eq. 13 / LFB eq. 1: s[t, i] = softmax over the E experts of u_t . e_i."""
    return torch.softmax(logits_TE.float(), dim=-1)


def score_sqrtsoftplus(logits_TE: torch.Tensor) -> torch.Tensor:
    """s[t, i] = sqrt(softplus(u_t . e_i)): positive, unbounded, grows like sqrt(x).

    Not in LFB/V2/V3; offered as an ablation arm next to sigmoid (independent per expert).
    """
    return torch.sqrt(F.softplus(logits_TE.float()))


SCORE_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": score_sigmoid,
    "softmax": score_softmax,
    "sqrtsoftplus": score_sqrtsoftplus,
}


def compute_scores(logits_TE: torch.Tensor, score_function: str) -> torch.Tensor:
    """Apply the named score function in fp32 (upcast: bf16 sigmoid/softmax loses the small gaps
    between experts that the bias is meant to shift). Returns fp32 scores_TE. What the top-K is taken
    on is the caller's choice (the Megatron router rounds these back as Megatron does)."""
    return lookup_choice(SCORE_FUNCTIONS, score_function, "score_function")(logits_TE)


# --------------------------------------------------------------------------------------------------
# Bias kinds: how the bias enters the SELECTION scores (never the gate; LFB Alg. 1).
# --------------------------------------------------------------------------------------------------


def bias_additive(scores_TE: torch.Tensor, bias_E: torch.Tensor) -> torch.Tensor:
    """LFB Alg. 1 / V3 eq. 16: select on s[t, i] + b[i]; b starts at 0."""
    return scores_TE + bias_E


def bias_multiplicative(scores_TE: torch.Tensor, bias_E: torch.Tensor) -> torch.Tensor:
    """LFB Table 4 (ablation): select on s[t, i] * b[i]; b starts at 1."""
    return scores_TE * bias_E


BIAS_KINDS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "additive": bias_additive,
    "multiplicative": bias_multiplicative,
}


# --------------------------------------------------------------------------------------------------
# Group rules for limited routing: selection scores [T, G, E/G] -> group scores [T, G].
# --------------------------------------------------------------------------------------------------


def group_score_device(select_TGX: torch.Tensor, topk: int, max_groups: int) -> torch.Tensor:
    """V2 section 2.2.1 (device-limited routing): a device scores the MAX affinity among its
    experts; each token keeps the M devices holding its highest-affinity experts."""
    return select_TGX.max(dim=-1).values


def group_score_node(select_TGX: torch.Tensor, topk: int, max_groups: int) -> torch.Tensor:
    """V3 section 2.1.2 (node-limited routing): a node scores the SUM of its K/M highest
    (biased) affinities. This is Megatron-Core's moe_router_group_topk rule, K // M when M does not
    divide K (Megatron's floor: top-4 over 3 kept groups scores each group by its best expert). The sum
    runs in the dtype of the selection values, as Megatron's does (bf16 logits give bf16 group scores)."""
    return select_TGX.topk(topk // max_groups, dim=-1).values.sum(dim=-1)


ROUTE_LIMITS: dict[str, Callable[[torch.Tensor, int, int], torch.Tensor] | None] = {
    "none": None,  # plain top-K over all E experts
    "device": group_score_device,
    "node": group_score_node,
}


# --------------------------------------------------------------------------------------------------
# Top-K selection
# --------------------------------------------------------------------------------------------------


def select_experts(
    scores: torch.Tensor,
    bias: torch.Tensor | None,
    topk: int,
    *,
    bias_kind: str = "additive",
    normalize: bool = True,
    scaling_factor: float | None = None,
    route_limit: str = "none",
    num_groups: int | None = None,
    max_groups: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick K experts per token on the biased scores; gate them with the unbiased scores.

    Phases:
      1. selection scores = scores + bias (additive) or scores * bias (multiplicative), no grad;
      2. optional group limit (route_limit "device" V2 / "node" V3): keep the top ``max_groups``
         of ``num_groups`` contiguous expert groups per token, mask the other groups' experts;
      3. top-K of the (masked) selection scores -> experts_TK (int64, descending selection score);
      4. gates_TK gathered from the UNBIASED ``scores`` (LFB Alg. 1, V3 eq. 16), so the gradient
         reaches the scores and never the bias;
      5. if ``normalize`` and K > 1: gates / (sum of gates + 1e-20) (V3 eq. 13), then times
         ``scaling_factor`` if given.

    With softmax scores, step 5 equals Megatron-Core's default softmax over the top-K logits.
    Step 5 skips K == 1, as Megatron-Core does: a single normalised gate would be the constant 1
    and the router would receive no gradient from the language-model loss.

    Args:
        scores: [T, E] affinities, already through the score function.
        bias: [E] routing bias (an fp32 buffer) or None.
        topk: K, experts per token.
    Returns:
        (gates_TK in the dtype of ``scores``, experts_TK int64).
    """
    experts_TK = choose_experts(scores, bias, topk, bias_kind=bias_kind, route_limit=route_limit,
                                num_groups=num_groups, max_groups=max_groups)
    gates_TK = gate_selected(scores, experts_TK, normalize=normalize, scaling_factor=scaling_factor)
    return gates_TK, experts_TK


def choose_experts(
    scores: torch.Tensor,
    bias: torch.Tensor | None,
    topk: int,
    *,
    bias_kind: str = "additive",
    route_limit: str = "none",
    num_groups: int | None = None,
    max_groups: int | None = None,
    sort: bool = True,
) -> torch.Tensor:
    """Phases 1-3 of ``select_experts``: experts_TK (int64) of the biased, optionally group-limited top-K,
    without gates (for a caller that gates the choice itself, as the Megatron router does).

    The selection runs in the dtype of ``scores``; an fp32 bias promotes bf16 scores to fp32 (torch's
    type promotion, the same sum Megatron-Core forms), so a caller that passes Megatron's selection values
    gets Megatron's choice, ties included. ``sort=False`` returns the K in no particular order (Megatron
    0.19 skips the sort outside autograd; with ties the chosen set follows the same call)."""
    _check_select_args(scores, bias, topk, bias_kind, route_limit, num_groups, max_groups)
    with torch.no_grad():
        select_TE = scores.detach()
        if bias is not None:
            select_TE = BIAS_KINDS[bias_kind](select_TE, bias.detach().float())
        group_rule = ROUTE_LIMITS[route_limit]
        if group_rule is not None:
            select_TE = mask_unselected_groups(select_TE, topk, num_groups, max_groups, group_rule)
            sort = True  # Megatron's group-limited top-K is always sorted
        return torch.topk(select_TE, k=topk, dim=-1, sorted=sort).indices.long()


def gate_selected(
    scores_TE: torch.Tensor,
    experts_TK: torch.Tensor,
    *,
    normalize: bool = True,
    scaling_factor: float | None = None,
) -> torch.Tensor:
    """Phases 4-5 of ``select_experts`` for a given choice of experts (also a replayed one):
    gates from the UNBIASED scores, normalised over the K chosen when K > 1, times the factor."""
    gates_TK = torch.gather(scores_TE, dim=-1, index=experts_TK)
    if normalize and experts_TK.shape[-1] > 1:
        gates_TK = gates_TK / (gates_TK.sum(dim=-1, keepdim=True) + GATE_NORM_EPS)
    if scaling_factor is not None:
        gates_TK = gates_TK * scaling_factor
    return gates_TK


def mask_unselected_groups(
    select_TE: torch.Tensor,
    topk: int,
    num_groups: int,
    max_groups: int,
    group_rule: Callable[[torch.Tensor, int, int], torch.Tensor],
) -> torch.Tensor:
    """Set to -inf the selection scores of every expert outside the token's top-M groups.

    Exactly M groups survive per token (torch.topk returns distinct indices even under ties), and
    M * E/G >= K finite entries remain, so the following top-K never reaches a masked expert. The groups
    are taken by an unsorted top-M, the call Megatron-Core's ``group_limited_topk`` makes, so that tied
    group scores keep the same groups.
    """
    num_tokens, num_experts = select_TE.shape
    select_TGX = select_TE.view(num_tokens, num_groups, num_experts // num_groups)
    group_scores_TG = group_rule(select_TGX, topk, max_groups)
    groups_TM = torch.topk(group_scores_TG, k=max_groups, dim=-1, sorted=False).indices
    keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, groups_TM, True)
    keep_TE = keep_TG.unsqueeze(-1).expand_as(select_TGX).reshape(num_tokens, num_experts)
    return select_TE.masked_fill(~keep_TE, float("-inf"))


# --------------------------------------------------------------------------------------------------
# Helpers over the routing decision
# --------------------------------------------------------------------------------------------------


def routing_map_from_experts(experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Bool [T, E], True where token t selected expert i (Megatron-Core's ``routing_map``)."""
    map_TE = torch.zeros(
        experts_TK.shape[0], num_experts, dtype=torch.bool, device=experts_TK.device
    )
    return map_TE.scatter_(1, experts_TK.long(), True)


def count_tokens_per_expert(
    experts_TK: torch.Tensor, num_experts: int, keep_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """int64 [E]: assignments per expert. Counted from the routing decision; pass ``keep_TK``
    only to count what survived dropping (the bias update must count BEFORE dropping,
    REFERENCE section 1) or to leave out padding.

    A scatter-add of ones (of the keep mask) rather than ``bincount`` or boolean indexing: both of those
    synchronise with the host on CUDA (bincount reads the input's range, indexing the selected size),
    and this runs in every router call."""
    experts_N = experts_TK.reshape(-1).long()
    if keep_TK is None:
        ones_N = torch.ones_like(experts_N)
    elif keep_TK.shape != experts_TK.shape:
        raise LossFreeConfigError(
            f"keep_TK shape {tuple(keep_TK.shape)} must equal experts_TK shape "
            f"{tuple(experts_TK.shape)}: pass the keep mask of these assignments"
        )
    else:
        ones_N = keep_TK.reshape(-1).long()
    return torch.zeros(num_experts, dtype=torch.int64, device=experts_N.device).scatter_add_(0, experts_N, ones_N)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def lookup_choice(registry: dict, name: str, field: str):
    """registry[name], or LossFreeConfigError listing the valid choices."""
    if name not in registry:
        raise LossFreeConfigError(
            f"{field} ({name!r}) is not known: choose one of {sorted(registry)}"
        )
    return registry[name]


def _check_select_args(
    scores_TE: torch.Tensor,
    bias: torch.Tensor | None,
    topk: int,
    bias_kind: str,
    route_limit: str,
    num_groups: int | None,
    max_groups: int | None,
) -> None:
    lookup_choice(BIAS_KINDS, bias_kind, "bias_kind")
    lookup_choice(ROUTE_LIMITS, route_limit, "route_limit")
    if scores_TE.dim() != 2:
        raise LossFreeConfigError(
            f"scores shape {tuple(scores_TE.shape)} must be [T, E]: flatten the tokens first"
        )
    num_experts = scores_TE.shape[1]
    if bias is not None and tuple(bias.shape) != (num_experts,):
        raise LossFreeConfigError(
            f"bias shape {tuple(bias.shape)} must be ({num_experts},): one bias per expert"
        )
    if not 1 <= topk <= num_experts:
        raise LossFreeConfigError(
            f"topk ({topk}) must be between 1 and num_experts ({num_experts}): "
            f"choose at most {num_experts} experts per token"
        )
    if route_limit == "none":
        for name, value in (("num_groups", num_groups), ("max_groups", max_groups)):
            if value is not None:
                raise LossFreeConfigError(
                    f"{name} ({value}) is only used with route_limit 'device' or 'node': "
                    f"drop it or choose a route_limit"
                )
        return
    for name, value in (("num_groups", num_groups), ("max_groups", max_groups)):
        if value is None or value < 1:
            raise LossFreeConfigError(
                f"{name} ({value}) must be a positive integer with route_limit {route_limit!r}: "
                f"set it or use route_limit 'none'"
            )
    if num_experts % num_groups != 0:
        raise LossFreeConfigError(
            f"num_groups ({num_groups}) must divide num_experts ({num_experts}): "
            f"choose a divisor of {num_experts}"
        )
    if max_groups > num_groups:
        raise LossFreeConfigError(
            f"max_groups ({max_groups}) must be at most num_groups ({num_groups}): lower max_groups"
        )
    per_group = num_experts // num_groups
    if max_groups * per_group < topk:
        raise LossFreeConfigError(
            f"max_groups ({max_groups}) groups of {per_group} experts cannot hold topk ({topk}) "
            f"experts: raise max_groups to at least {-(-topk // per_group)}"
        )
    if route_limit == "node" and max_groups > topk:
        raise LossFreeConfigError(
            f"max_groups ({max_groups}) must be at most topk ({topk}) with route_limit 'node' (each "
            f"group scores its top K // M experts, none here): lower max_groups to at most {topk}"
        )
