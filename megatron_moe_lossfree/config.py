"""The plugin's typed configuration: one frozen dataclass, validated once, every violation reported.

Megatron's own concepts keep Megatron's names and live in Megatron's TransformerConfig
(``num_moe_experts``, ``moe_router_topk``, ``moe_router_score_function`` ...). This config holds only what
the plugin adds; on the command line each field is ``--lossfree-<field with dashes>``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Optional

from megatron_moe_lossfree.errors import LossFreeConfigError

Balancing = Literal["none", "bias"]
UpdateRule = Literal["sign", "proportional", "sign_centered", "multiplicative", "quantile", "smebu", "phi", "bip"]
QuantileEstimator = Literal["exact", "histogram"]
QuantileSpace = Literal["logits", "scores"]
RateScheduleName = Literal["constant", "v3", "primal_dual"]
BiasKind = Literal["additive", "multiplicative"]
RouteLimit = Literal["none", "device", "node"]
AuxLossScope = Literal["sequence", "micro_batch"]
DropMode = Literal["none", "expert", "device"]
DropPolicy = Literal["probs", "position"]

CHOICES = {
    "balancing": ("none", "bias"),
    "update_rule": ("sign", "proportional", "sign_centered", "multiplicative", "quantile", "smebu", "phi", "bip"),
    "quantile_estimator": ("exact", "histogram"),
    "quantile_space": ("logits", "scores"),
    "rate_schedule": ("constant", "v3", "primal_dual"),
    "bias_kind": ("additive", "multiplicative"),
    "route_limit": ("none", "device", "node"),
    "aux_loss_scope": ("sequence", "micro_batch"),
    "drop": ("none", "expert", "device"),
    "drop_policy": ("probs", "position"),
}


@dataclass(frozen=True, kw_only=True)
class LossFreeConfig:
    """Aux-loss-free balancing, routing limits, balance losses, dropping and metrics."""

    balancing: Balancing = "bias"
    """"bias": per-expert routing bias updated after every step (LFB Alg. 1); "none": no bias."""
    update_rule: UpdateRule = "sign"
    """Bias update rule, a key of ``balancing.UPDATE_RULES`` (LFB section 3 / Tables 3-4). Default: sign."""
    update_rate: float = 1e-3
    """u, the bias update rate. LFB and V3 use 1e-3. 0: a fixed bias, used for selection, saved and loaded,
    never moved (loads are still counted and MaxVio logged): Megatron's ``moe_router_bias_update_rate 0``
    (GLM-4.5's recipes keep a bias loaded from the checkpoint fixed)."""
    rate_schedule: RateScheduleName = "constant"
    """"constant": u every step; "v3": u until ``freeze_bias_after_tokens`` tokens, then 0 (V3 4.2)."""
    freeze_bias_after_tokens: Optional[int] = None
    """Tokens after which the v3 schedule freezes the bias (V3: 14.3T). Required by "v3"."""
    rate_decay_steps: Optional[int] = None
    """tau of the "primal_dual" schedule u_t = u * tau / (tau + t) (our reading of Han & Zhong, arXiv
    2512.03915: steps ~ 1/t for their logarithmic regret). Required by "primal_dual"."""
    smebu_kappa: float = 2.0
    """SMEBU (arXiv 2602.17004): kappa of the soft clamp tanh(kappa * v). Trinity Large: 2."""
    smebu_momentum: float = 0.5
    """SMEBU: beta of the momentum m = beta * m + (1 - beta) * d. Trinity Large: 0.5 (its lambda, 5e-4,
    is --lossfree-update-rate)."""
    phi_ema: float = 0.9
    """phi-Balancing (arXiv 2605.15403): decay of the EMA of the routing distribution (ours: the paper's
    value was not in our sources; the scale is --lossfree-update-rate)."""
    bip_iterations: int = 4
    """BIP-based balancing (arXiv 2502.15451): alternating dual (ADMM) iterations per step (ours: the
    paper's value was not in our sources). Uses the quantile machinery: --lossfree-quantile-ema applies."""
    bias_kind: BiasKind = "additive"
    """"additive": select on s + b (b starts at 0); "multiplicative": select on s * b (b starts at 1)."""

    quantile_estimator: QuantileEstimator = "exact"
    """Quantile rule only. "exact": per micro-batch column quantile of the required bias, averaged over
    micro-batches and ranks (Megatron-Core 0.19 ``qb_dual_update``); "histogram": per-expert histograms
    summed over micro-batches and ranks, one quantile per step (Kimi K3 appendix D, torchtitan)."""
    quantile_space: QuantileSpace = "logits"
    """Quantile rule only: what the bias is added to for selection and solved on. "logits" (Megatron-Core
    0.19) or "scores" (after the score function: Kimi K3 / torchtitan, sigmoid scores)."""
    quantile_ema: float = 0.0
    """Quantile rule only: b = centre(ema * b + (1 - ema) * solution); 0 replaces the bias every step
    (Megatron-Core's ``moe_router_quantile_balancing_ema``, default 0)."""
    quantile_bins: int = 1000
    """Histogram estimator: bins over [min b - margin, max b + margin] (Kimi K3, torchtitan: 1000)."""
    quantile_margin: float = 1.0
    """Histogram estimator: the range margin. 1 covers sigmoid/softmax scores exactly; widen it in logit
    space (required biases there are unbounded; values outside are clamped into the edge bins)."""

    route_limit: RouteLimit = "none"
    """"device": V2 device-limited routing; "node": V3 node-limited routing (REFERENCE section 6)."""
    route_groups: Optional[int] = None
    """Number of groups (devices or nodes). Device rule default: the EP size."""
    route_max_groups: Optional[int] = None
    """M, groups a token may reach (V2: 3 devices, V3: 4 nodes)."""

    aux_loss_coeff: float = 0.0
    """alpha of the classic expert-level balance loss (LFB Eq. 2, V2 a1). 0 = off."""
    aux_loss_scope: AuxLossScope = "sequence"
    """Where f and P of the classic loss are counted: per sequence (LFB, V2) or per micro-batch."""
    seq_aux_loss_coeff: float = 0.0
    """alpha of the V3 complementary sequence-wise loss (V3 Eqs. 17-20; V3 uses 1e-4). 0 = off."""
    device_loss_coeff: float = 0.0
    """a2 of the V2 device-level balance loss (V2: 0.05). 0 = off."""
    comm_loss_coeff: float = 0.0
    """a3 of the V2 communication balance loss (V2: 0.02). 0 = off."""

    drop: DropMode = "none"
    """Token dropping: "none" (drop-free), "expert" capacity, or V2 "device" capacity (REFERENCE 7)."""
    capacity_factor: Optional[float] = None
    """cf of the expert- or device-level capacity. Required when ``drop`` is not "none" (V2: 1.0)."""
    drop_policy: DropPolicy = "probs"
    """Expert-level drop policy: keep the highest gates ("probs") or the earliest tokens ("position")."""
    exempt_fraction: float = 0.1
    """Fraction of training sequences never dropped (V2: ~10%)."""
    pad_to_capacity: bool = False
    """Pad every expert's input to its capacity (static shapes). Needs ``capacity_factor``."""

    seed: int = 1234
    """Seed of the exempt-sequence choice."""
    check_consistency: int = 0
    """Every N steps, all-gather a checksum of every layer's bias and fail if ranks disagree. 0 = off."""
    bias_warn_bound: float = 1.0
    """Warn once per layer when a bias magnitude exceeds this bound."""
    dump_loads: bool = False
    """mlf-pretrain only: write every optimizer step's per-layer, per-expert loads (pre-drop, summed over the
    ranks: the counts the bias update used) to ``OUT/loads.jsonl`` (``logger.LOADS_FILE``), one JSON row per
    step: ``{"step": N, "layers": [MoE layer numbers], "loads": [[tokens per expert] per layer]}``.
    metrics.jsonl holds the same loads at the logged steps only (``loads_layers``)."""

    def replace(self, **changes) -> "LossFreeConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "LossFreeConfig":
        """Raise one LossFreeConfigError listing every violation; return self when valid."""
        problems = list(_violations(self))
        if problems:
            raise LossFreeConfigError("; ".join(problems))
        return self


def flag(field_name: str) -> str:
    """The command-line flag of a config field."""
    return "--lossfree-" + field_name.replace("_", "-")


def _violations(cfg: LossFreeConfig):
    for name, choices in CHOICES.items():
        value = getattr(cfg, name)
        if value not in choices:
            yield f"{flag(name)} ({value!r}) is not a valid choice: use one of {', '.join(choices)}"
    if cfg.balancing == "bias":
        if not math.isfinite(cfg.update_rate) or cfg.update_rate < 0:
            yield (f"{flag('update_rate')} ({cfg.update_rate}) must be >= 0 with bias balancing: use e.g. "
                   f"1e-3 (the paper's value), 0 for a fixed bias, or --lossfree-balancing none")
        if cfg.rate_schedule == "v3" and not (cfg.freeze_bias_after_tokens or 0) > 0:
            yield (f"{flag('freeze_bias_after_tokens')} ({cfg.freeze_bias_after_tokens}) must be a positive "
                   f"token count with {flag('rate_schedule')} v3")
        if cfg.rate_schedule == "primal_dual" and not (cfg.rate_decay_steps or 0) > 0:
            yield (f"{flag('rate_decay_steps')} ({cfg.rate_decay_steps}) must be a positive step count with "
                   f"{flag('rate_schedule')} primal_dual: give tau of u * tau / (tau + t), e.g. a tenth of the run")
        if cfg.update_rule == "smebu" and not (math.isfinite(cfg.smebu_kappa) and cfg.smebu_kappa > 0):
            yield f"{flag('smebu_kappa')} ({cfg.smebu_kappa}) must be a finite number > 0, e.g. 2 (Trinity Large)"
        if cfg.update_rule == "smebu" and not 0.0 <= cfg.smebu_momentum < 1.0:
            yield f"{flag('smebu_momentum')} ({cfg.smebu_momentum}) must lie in [0, 1), e.g. 0.5 (Trinity Large)"
        if cfg.update_rule == "phi" and not 0.0 <= cfg.phi_ema < 1.0:
            yield f"{flag('phi_ema')} ({cfg.phi_ema}) must lie in [0, 1), e.g. 0.9"
        if cfg.update_rule == "bip" and (isinstance(cfg.bip_iterations, bool) or cfg.bip_iterations < 1):
            yield f"{flag('bip_iterations')} ({cfg.bip_iterations}) must be an integer >= 1, e.g. 4"
        if cfg.update_rule == "bip" and cfg.quantile_estimator != "exact":
            yield (f"{flag('update_rule')} bip solves the batch's dual exactly: drop {flag('quantile_estimator')} "
                   f"({cfg.quantile_estimator}) or set it to exact")
        if cfg.update_rule in ("quantile", "bip") and not 0.0 <= cfg.quantile_ema < 1.0:
            yield (f"{flag('quantile_ema')} ({cfg.quantile_ema}) must lie in [0, 1): 0 replaces the bias each "
                   f"step (Megatron-Core's default), 0.9 keeps 90% of the old one")
        if cfg.update_rule == "quantile" and cfg.quantile_estimator == "histogram" and cfg.quantile_bins < 2:
            yield f"{flag('quantile_bins')} ({cfg.quantile_bins}) must be >= 2, e.g. 1000 (Kimi K3)"
        if cfg.update_rule == "quantile" and not (math.isfinite(cfg.quantile_margin) and cfg.quantile_margin > 0):
            yield f"{flag('quantile_margin')} ({cfg.quantile_margin}) must be a finite number > 0, e.g. 1.0"
        if (cfg.update_rule == "multiplicative") != (cfg.bias_kind == "multiplicative"):
            yield (f"{flag('update_rule')} ({cfg.update_rule}) and {flag('bias_kind')} ({cfg.bias_kind}) "
                   f"disagree: the multiplicative rule goes with the multiplicative bias kind (LFB Table 4), so "
                   f"set both to multiplicative or neither")
    if cfg.rate_decay_steps is not None and cfg.rate_schedule != "primal_dual":
        yield (f"{flag('rate_decay_steps')} ({cfg.rate_decay_steps}) is only used by {flag('rate_schedule')} "
               f"primal_dual: drop it or choose that schedule")
    if cfg.freeze_bias_after_tokens is not None and cfg.freeze_bias_after_tokens < 0:
        yield f"{flag('freeze_bias_after_tokens')} ({cfg.freeze_bias_after_tokens}) must be >= 0"
    for name in ("aux_loss_coeff", "seq_aux_loss_coeff", "device_loss_coeff", "comm_loss_coeff"):
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0:
            yield f"{flag(name)} ({value}) must be a finite number >= 0 (0 turns the loss off)"
    if cfg.route_groups is not None and cfg.route_groups < 1:
        yield f"{flag('route_groups')} ({cfg.route_groups}) must be >= 1"
    if cfg.route_max_groups is not None and cfg.route_max_groups < 1:
        yield f"{flag('route_max_groups')} ({cfg.route_max_groups}) must be >= 1"
    if cfg.route_limit != "none" and cfg.route_max_groups is None:
        yield (f"{flag('route_max_groups')} is required with {flag('route_limit')} {cfg.route_limit}: "
               f"give M, e.g. 3 (V2) or 4 (V3)")
    if cfg.route_limit == "node" and cfg.route_groups is None:
        yield f"{flag('route_groups')} is required with {flag('route_limit')} node: give the node count"
    if cfg.capacity_factor is not None and (not math.isfinite(cfg.capacity_factor) or cfg.capacity_factor <= 0):
        yield f"{flag('capacity_factor')} ({cfg.capacity_factor}) must be > 0, e.g. 1.0 (V2) or 1.25"
    if cfg.drop != "none" and cfg.capacity_factor is None:
        yield f"{flag('capacity_factor')} is required with {flag('drop')} {cfg.drop}: give e.g. 1.0"
    if cfg.pad_to_capacity and cfg.drop == "none":
        yield (f"{flag('pad_to_capacity')} needs a capacity: set {flag('drop')} expert or device "
               f"and {flag('capacity_factor')}")
    if not 0.0 <= cfg.exempt_fraction <= 1.0:
        yield f"{flag('exempt_fraction')} ({cfg.exempt_fraction}) must lie in [0, 1], e.g. 0.1 (V2)"
    if cfg.check_consistency < 0:
        yield f"{flag('check_consistency')} ({cfg.check_consistency}) must be >= 0 (0 = off)"
    if not cfg.bias_warn_bound > 0:
        yield f"{flag('bias_warn_bound')} ({cfg.bias_warn_bound}) must be > 0"
