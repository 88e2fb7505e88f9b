"""The drop-in contract: every Megatron router/MoE field is honoured, mapped onto the plugin, or refused.

``resolve_lossfree(config, lossfree)`` is called by the router, the MoE layer and the balancer with the
same arguments, so all three act on one effective plugin config. It reads Megatron-Core's
``TransformerConfig`` (0.16 .. 0.19 field names) and:

| Megatron field                                   | what the plugin does                                      |
|--------------------------------------------------|-----------------------------------------------------------|
| moe_router_score_function, moe_router_pre_softmax,| honoured by the router: selects on Megatron's values in   |
| moe_router_topk_scaling_factor, moe_router_dtype | its dtype, same gates and probs dtype                     |
| moe_router_num_groups / moe_router_group_topk    | mapped: ``--lossfree-route-limit node`` (the same V3 rule,|
|                                                  | K // M, groups ranked on Megatron's values)               |
| moe_router_enable_expert_bias, *_bias_update_rate| mapped: ``--lossfree-balancing bias``, rule sign, that rate|
| moe_router_load_balancing_type aux_loss,         | honoured: Megatron's own loss code runs in the router     |
| seq_aux_loss, global_aux_loss (+ lists), none,   |                                                           |
| moe_aux_loss_coeff, moe_z_loss_coeff             |                                                           |
| moe_expert_capacity_factor, moe_token_drop_policy,| honoured: Megatron's own dropping, after the plugin counts|
| moe_pad_expert_input_to_capacity                 | (loads are counted BEFORE dropping: REFERENCE 9)          |
| moe_router_force_load_balancing, _force_biased,  | honoured: Megatron's ``TopKRouter.forward`` is inherited  |
| moe_input_jitter_eps                             |                                                           |
| moe_enable_routing_replay                        | honoured: the plugin's selection is recorded / replayed   |
|                                                  | (every rule; under REPLAY the count rules see the replayed|
|                                                  | loads, the quantile rule still solves on the scores; Mega-|
|                                                  | tron 0.19's own QB bypasses replay: router.py, phase 3)   |
| quantile_balancing, moe_router_quantile_balancing| mapped: ``--lossfree-update-rule quantile``, exact on logits|
| _ema                                             | with that EMA (the plugin's bias is -qb_beta)             |
| moe_router_enable_expert_bias with               | honoured: a fixed bias (selects, saved/loaded, never      |
| moe_router_bias_update_rate 0                    | moves; loads counted and MaxVio logged as usual)          |
| moe_expert_rank_capacity_factor (0.19, flex)     | honoured: loads counted before the dispatcher's drops;    |
|                                                  | drop_fraction counts only the plugin's (``notes``, logged)|
| moe_router_fusion                                | honoured: the plugin's Triton router (fused_routing.py);  |
|                                                  | refused by name without Triton, or without CUDA           |
| cuda_graph_impl / cuda_graph_scope (0.16) /      | honoured: the router's training forward and backward are  |
| cuda_graph_modules (0.19), every per-layer scope | capturable (no host reads, counts in static buffers); not |
|                                                  | with the plugin's dropping (conflict)                     |
| mtp_num_layers, mtp_loss_scaling_factor,         | honoured: Megatron builds the MTP layers from the decoder's|
| mtp_use_repeated_layer (0.19)                    | last layer spec, so they carry the plugin's router; the   |
|                                                  | balancer counts and moves their biases (specs.py)         |
| sinkhorn, full-iteration CUDA graphs,            | refused by name                                           |
| inference_optimized                              |                                                           |
| a router / MoE layer class in the spec that is   | refused by class and slot (``specs.py``)                  |
| not Megatron's TopKRouter / MoELayer             |                                                           |

A Megatron field at a non-default value and a ``--lossfree-*`` field at a non-default value that set the
same thing differently are refused together, naming both flags. Every problem is collected and raised as
one ``LossFreeConfigError``, the messages joined by "; " (no message holds "; ", so the list splits back).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Optional

from megatron_moe_lossfree.config import LossFreeConfig, flag
from megatron_moe_lossfree.errors import LossFreeConfigError

DEFAULTS = LossFreeConfig()
# The plugin's options when a Megatron config carries none (stock Megatron-LM flags with the plugin's
# ``--spec``): Megatron's flags alone decide, so no bias unless ``--moe-router-enable-expert-bias``.
MEGATRON_ONLY = LossFreeConfig(balancing="none")

MEGATRON_LOSSES = ("aux_loss", "seq_aux_loss", "global_aux_loss")
# CUDA-graph scopes that leave the router and the MoE preprocess outside the captured region.
_GRAPH_SAFE_SCOPES = {"attn", "mamba", "mlp"}


def cli(field: str) -> str:
    """Megatron-LM's command-line spelling of a TransformerConfig field."""
    return "--" + field.replace("_", "-")


def balancing_types(config) -> list[str]:
    value = getattr(config, "moe_router_load_balancing_type", "none") or "none"
    return list(value) if isinstance(value, (list, tuple)) else [value]


def megatron_loss_coeff(config, loss_type: str) -> float:
    """Megatron's ``TopKRouter.get_aux_loss_coeff``: the coefficient of one loss type (0 when absent)."""
    types = balancing_types(config)
    if loss_type not in types:
        return 0.0
    coeff = config.moe_aux_loss_coeff
    if isinstance(coeff, (list, tuple)):
        return float(coeff[types.index(loss_type)])
    return float(coeff) if len(types) == 1 else 0.0


def _graph_scopes(config) -> Optional[set]:
    """The CUDA-graph capture regions in force, or None when CUDA graphs are off: lower-case names of
    0.16's ``cuda_graph_scope`` / 0.19's ``cuda_graph_modules`` (strings, comma lists or enums, before or
    after ``__post_init__``), "full" for whole layers (Megatron's "full" or an empty list), and
    "full_iteration" for a whole-iteration graph (0.16's scope, 0.19's ``cuda_graph_impl``)."""
    impl = getattr(config, "cuda_graph_impl", "none") or "none"
    if impl == "none" and not (getattr(config, "enable_cuda_graph", False)
                               or getattr(config, "external_cuda_graph", False)):
        return None
    if impl == "full_iteration":
        return {"full_iteration"}
    scope = getattr(config, "cuda_graph_modules", None)
    if scope is None or scope == []:
        scope = getattr(config, "cuda_graph_scope", None)
    if isinstance(scope, str):
        scope = scope.split(",")
    items = scope if isinstance(scope, (list, tuple)) else [scope]
    names = {str(getattr(s, "name", s)).strip().lower() for s in items if s is not None}
    return (names - {""}) or {"full"}


def _graph_flag(config) -> str:
    return cli("cuda_graph_modules") if hasattr(config, "cuda_graph_modules") else cli("cuda_graph_scope")


def graph_captures_router(config) -> bool:
    """Does a CUDA graph capture the router's forward and backward? (the plugin's router is capturable:
    tests/unit/test_graph_capture.py, tests/gpu/test_cuda_graph_router.py)"""
    scopes = _graph_scopes(config)
    return scopes is not None and not scopes <= _GRAPH_SAFE_SCOPES


def refusals(config, lossfree: LossFreeConfig):
    """Megatron settings the plugin's router cannot honour (one line each: flag, value, what to use)."""
    types = balancing_types(config)
    if "sinkhorn" in types:
        yield (f"{cli('moe_router_load_balancing_type')} (sinkhorn) is not supported by the plugin's router: "
               f"use --moe-router-enable-expert-bias or {flag('balancing')} bias (loss-free), or aux_loss")
    if "quantile_balancing" in types and len(types) > 1:
        yield (f"{cli('moe_router_load_balancing_type')} ({' '.join(types)}): Megatron enables quantile_balancing "
               f"only as the sole type (in a list it is ignored): give it alone, or use {flag('update_rule')} "
               f"quantile with the other losses")
    unknown = [t for t in types if t not in MEGATRON_LOSSES + ("none", "sinkhorn", "quantile_balancing")]
    if unknown:
        yield (f"{cli('moe_router_load_balancing_type')} ({', '.join(unknown)}) is unknown to the plugin: use "
               f"aux_loss, seq_aux_loss, global_aux_loss or none")
    if getattr(config, "moe_router_fusion", False):  # honoured by the plugin's Triton router (fused_routing.py)
        from megatron_moe_lossfree import kernels

        reason = kernels.unavailable_reason()
        if reason:
            yield f"{cli('moe_router_fusion')} (True) {reason}, or drop {cli('moe_router_fusion')}"
        if getattr(config, "moe_router_dtype", None) == "fp64":
            yield (f"{cli('moe_router_fusion')} (True) with {cli('moe_router_dtype')} (fp64): the fused router "
                   f"computes in fp32: use {cli('moe_router_dtype')} fp32 or drop {cli('moe_router_fusion')}")
    if "full_iteration" in (_graph_scopes(config) or ()):
        where = (f"{cli('cuda_graph_impl')} (full_iteration)" if getattr(config, "cuda_graph_impl", "") == "full_iteration"
                 else f"{_graph_flag(config)} (full_iteration)")
        yield (f"{where} captures finalize_model_grads, where the plugin's once-per-step bias update reads its "
               f"counts on the host: use per-layer graphs ({cli('cuda_graph_impl')} transformer_engine or local "
               f"with {_graph_flag(config)} moe_router,moe_preprocess,attn)")
    if getattr(config, "transformer_impl", "local") == "inference_optimized":
        yield (f"{cli('transformer_impl')} (inference_optimized) is not supported: its dispatcher expects dense "
               f"[T, K] routing where the plugin returns Megatron's [T, E] map, use local or transformer_engine")
    yield from group_limit_refusals(config)


def group_limit_refusals(config):
    """Megatron's group-limited routing checked at construction (Megatron's own __post_init__ already asserts
    ``num_experts % moe_router_num_groups == 0`` and ``group_topk <= num_groups``). Megatron scores a group by
    its top ``topk // group_topk`` experts (a floor: top-4 over 3 kept groups is honoured, one expert per
    group); the two layouts refused here make Megatron score every group 0 or select masked experts."""
    kept, groups = getattr(config, "moe_router_group_topk", None), getattr(config, "moe_router_num_groups", None)
    topk, experts = getattr(config, "moe_router_topk", None), getattr(config, "num_moe_experts", None)
    if not (kept and groups and topk and experts) or experts % groups:
        return
    if kept > topk:
        yield (f"{cli('moe_router_group_topk')} ({kept}) is larger than {cli('moe_router_topk')} ({topk}): each kept "
               f"group is scored by its top {cli('moe_router_topk')} // {cli('moe_router_group_topk')} experts, "
               f"none here, so use a {cli('moe_router_group_topk')} of at most {topk}")
    elif kept * (experts // groups) < topk:
        yield (f"{cli('moe_router_group_topk')} ({kept}) groups of {experts // groups} experts cannot hold "
               f"{cli('moe_router_topk')} ({topk}) experts: raise {cli('moe_router_group_topk')} to at least "
               f"{-(-topk // (experts // groups))}")


def notes(config) -> list[str]:
    """What the plugin says once in the log about Megatron settings it honours with a caveat."""
    out = []
    factor = getattr(config, "moe_expert_rank_capacity_factor", None)
    if factor is not None:
        out.append(f"{cli('moe_expert_rank_capacity_factor')} ({factor}): the flex dispatcher (HybridEP) drops "
                   f"tokens over each EP rank's budget after routing. The plugin counts its loads (bias, MaxVio) "
                   f"before any drop, and its drop_fraction counts only the plugin's own {flag('drop')} drops, "
                   f"not the dispatcher's (Megatron flags those as over_budget)")
    return out


@functools.lru_cache(maxsize=None)
def log_note_once(note: str) -> None:
    logging.getLogger("megatron_moe_lossfree").warning(note)


def conflicts(config, lossfree: LossFreeConfig):
    """A Megatron flag and a ``--lossfree-*`` flag that set the same thing to different values."""
    if lossfree.drop != "none" and graph_captures_router(config):
        yield (f"{_graph_flag(config)} ({','.join(sorted(_graph_scopes(config)))}) captures the router and "
               f"{flag('drop')} ({lossfree.drop}) drops inside it with per-micro-batch exempt flags a graph "
               f"cannot replay: use {flag('drop')} none, or {_graph_flag(config)} attn")
    groups = getattr(config, "moe_router_group_topk", None)
    if groups and lossfree.route_limit != "none":
        yield (f"{cli('moe_router_num_groups')}/{cli('moe_router_group_topk')} "
               f"({config.moe_router_num_groups}/{groups}) and {flag('route_limit')} ({lossfree.route_limit}) "
               f"both limit routing: keep one")
    if getattr(config, "moe_expert_capacity_factor", None) is not None and lossfree.drop != "none":
        yield (f"{cli('moe_expert_capacity_factor')} ({config.moe_expert_capacity_factor}) and {flag('drop')} "
               f"({lossfree.drop}) both drop tokens: keep Megatron's expert capacity or the plugin's dropping")
    for megatron_type, field in (("aux_loss", "aux_loss_coeff"), ("seq_aux_loss", "seq_aux_loss_coeff")):
        coeff = megatron_loss_coeff(config, megatron_type)
        if coeff > 0 and getattr(lossfree, field) > 0:
            yield (f"{cli('moe_router_load_balancing_type')} {megatron_type} with {cli('moe_aux_loss_coeff')} "
                   f"({coeff:g}) and {flag(field)} ({getattr(lossfree, field):g}) are the same loss twice: keep one")
    if megatron_quantile(config):
        if getattr(config, "moe_router_enable_expert_bias", False):
            yield (f"{cli('moe_router_enable_expert_bias')} (True) and {cli('moe_router_load_balancing_type')} "
                   f"(quantile_balancing) both set the plugin's bias rule: keep one")
        if lossfree.update_rule not in (DEFAULTS.update_rule, "quantile"):
            yield (f"{cli('moe_router_load_balancing_type')} (quantile_balancing) and {flag('update_rule')} "
                   f"({lossfree.update_rule}) disagree: keep one")
        ema = getattr(config, "moe_router_quantile_balancing_ema", 0.0)
        if lossfree.quantile_ema not in (DEFAULTS.quantile_ema, ema):
            yield (f"{cli('moe_router_quantile_balancing_ema')} ({ema:g}) and {flag('quantile_ema')} "
                   f"({lossfree.quantile_ema:g}) disagree: give one")
        for field in ("quantile_estimator", "quantile_space"):
            if getattr(lossfree, field) != getattr(DEFAULTS, field):
                yield (f"{cli('moe_router_load_balancing_type')} (quantile_balancing) is Megatron's exact estimator "
                       f"on logits, and {flag(field)} ({getattr(lossfree, field)}) asks otherwise: use "
                       f"{flag('update_rule')} quantile instead of Megatron's flag")
        if lossfree.balancing == "none" and lossfree is not MEGATRON_ONLY:
            yield (f"{cli('moe_router_load_balancing_type')} (quantile_balancing) and {flag('balancing')} (none) "
                   f"disagree: drop one")
    if getattr(config, "moe_router_enable_expert_bias", False):
        rate = config.moe_router_bias_update_rate
        if lossfree.balancing == "none" and lossfree is not MEGATRON_ONLY:
            yield (f"{cli('moe_router_enable_expert_bias')} (True) and {flag('balancing')} (none) disagree: drop "
                   f"one (the plugin's bias then follows {cli('moe_router_enable_expert_bias')})")
        if lossfree.update_rule != DEFAULTS.update_rule:
            yield (f"{cli('moe_router_enable_expert_bias')} (True, Megatron's sign rule) and {flag('update_rule')} "
                   f"({lossfree.update_rule}) disagree: drop {cli('moe_router_enable_expert_bias')} to use "
                   f"the {lossfree.update_rule} rule")
        if lossfree.update_rate not in (DEFAULTS.update_rate, rate):
            yield (f"{cli('moe_router_bias_update_rate')} ({rate:g}) and {flag('update_rate')} "
                   f"({lossfree.update_rate:g}) disagree: give one rate")
        if lossfree.bias_kind != DEFAULTS.bias_kind:
            yield (f"{cli('moe_router_enable_expert_bias')} (True, additive bias) and {flag('bias_kind')} "
                   f"({lossfree.bias_kind}) disagree: drop {cli('moe_router_enable_expert_bias')}")


def megatron_quantile(config) -> bool:
    """Megatron enables its quantile balancing only for the plain string type."""
    return getattr(config, "moe_router_load_balancing_type", None) == "quantile_balancing"


def mapped(config, lossfree: LossFreeConfig) -> LossFreeConfig:
    """The plugin config with Megatron's group limit and expert-bias flags carried onto it."""
    changes = {}
    groups = getattr(config, "moe_router_group_topk", None)
    if groups:
        # Megatron's group_limited_topk: group score = sum of the top K/M scores, top-M groups (V3 2.1.2).
        changes.update(route_limit="node", route_groups=config.moe_router_num_groups, route_max_groups=groups)
    if getattr(config, "moe_router_enable_expert_bias", False):
        changes.update(balancing="bias", update_rule="sign", update_rate=config.moe_router_bias_update_rate)
    if megatron_quantile(config):
        # Megatron-Core 0.19's QB: exact estimator on logits, its EMA (REFERENCE 10; docs/notes_qb_megatron.md)
        changes.update(balancing="bias", update_rule="quantile", quantile_estimator="exact", quantile_space="logits",
                       quantile_ema=float(getattr(config, "moe_router_quantile_balancing_ema", 0.0)))
    return dataclasses.replace(lossfree, **changes) if changes else lossfree


def resolve_lossfree(config, lossfree: Optional[LossFreeConfig] = None) -> LossFreeConfig:
    """The effective plugin config for a Megatron ``TransformerConfig``; refuses what cannot be honoured.

    ``lossfree``: the plugin's options (``config.lossfree`` when None; Megatron-only when neither).
    """
    base = lossfree or getattr(config, "lossfree", None) or MEGATRON_ONLY
    problems = list(refusals(config, base)) + list(conflicts(config, base))
    if problems:
        raise LossFreeConfigError("; ".join(problems))
    return mapped(config, base).validate()


def megatron_capacity(config) -> Optional[float]:
    """Megatron's own expert capacity (honoured by Megatron's ``apply_router_token_dropping``)."""
    return getattr(config, "moe_expert_capacity_factor", None)
