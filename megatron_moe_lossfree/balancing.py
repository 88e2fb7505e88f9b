"""Balancing maths: bias update rules, rate schedules, and balance losses.

Pure torch: no Megatron import, no communication (the caller all-reduces the counts first).
Definitions: REFERENCE.md sections 1, 3, 4 and 5.

Shape suffixes: T tokens, E experts, K top-k, L layers, D devices, G groups,
B sequences, S sequence length. ``bias_E`` / ``bias_LE`` are biases, ``counts_LE`` loads.

Papers: LFB = arXiv 2408.15664, V2 = arXiv 2405.04434, V3 = arXiv 2412.19437.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.routing import lookup_choice

# --------------------------------------------------------------------------------------------------
# Bias update rules: (bias, error e = mean(c) - c, mean(c), rate) -> new bias; all float64.
# --------------------------------------------------------------------------------------------------


def rule_sign(bias: torch.Tensor, error: torch.Tensor, mean: torch.Tensor, rate: float):
    """LFB Alg. 1 / V3 section 2.1.2: b[i] += u * sign(mean(c) - c[i]).

    Same as Megatron-Core's ``get_updated_expert_bias`` (sign rule, not centred), bit for bit: the step
    u * sign(e) is rounded to fp32 first, as Megatron computes it on the fp32 bias, so the float64 sum
    of two fp32 numbers rounds back to exactly Megatron's fp32 sum.
    torchtitan additionally subtracts the mean of the update: that is ``sign_centered``.
    """
    return bias + (rate * torch.sign(error)).float().double()


def rule_proportional(bias: torch.Tensor, error: torch.Tensor, mean: torch.Tensor, rate: float):
    """LFB Table 3 ("u * e_i"): b[i] += u * (mean(c) - c[i]) / mean(c).

    Normalisation (ours; the paper does not state one): e is divided by the mean load, so u is a
    fraction of the balanced load and does not depend on the batch size. A layer with mean load 0
    (no tokens) is left unchanged. Neither Megatron-Core (sign, not centred) nor torchtitan
    (sign, centred) offers this rule.
    """
    scaled = torch.where(mean > 0, error / mean.clamp_min(1e-300), torch.zeros_like(error))
    return bias + rate * scaled


def rule_sign_centered(bias: torch.Tensor, error: torch.Tensor, mean: torch.Tensor, rate: float):
    """torchtitan's rule: d = u * sign(e); b += d - mean(d), so mean(b) stays where it started.

    Not in the paper (departs from LFB Alg. 1 by the centring). Megatron-Core does not centre.
    """
    delta = rate * torch.sign(error)
    return bias + delta - delta.mean(dim=-1, keepdim=True)


def rule_multiplicative(bias: torch.Tensor, error: torch.Tensor, mean: torch.Tensor, rate: float):
    """LFB Table 4 (multiplicative bias): b[i] *= 1 + u * sign(e[i]); b starts at 1, and the
    router selects on s * b (routing bias_kind 'multiplicative'). Neither Megatron-Core nor
    torchtitan offers it (both add a sign step, torchtitan centred)."""
    return bias * (1.0 + rate * torch.sign(error))


UPDATE_RULES: dict[str, Callable] = {
    "sign": rule_sign,
    "proportional": rule_proportional,
    "sign_centered": rule_sign_centered,
    "multiplicative": rule_multiplicative,
}


# --------------------------------------------------------------------------------------------------
# Rules with state (2025-2026): (bias, error, mean, rate, state, params) -> (new bias, new state).
# The state is per layer and expert like the bias ([E] or [L, E]); the balancer keeps it in a persistent
# router buffer (``lossfree_rule_state``), so checkpoints carry it and a resumed run continues exactly.
# A rate of 0 (a frozen schedule) leaves bias and state untouched (``apply_stateful_rule``).
# --------------------------------------------------------------------------------------------------


def rule_smebu(bias, error, mean, rate, momentum, *, kappa: float, beta: float):
    """SMEBU, Arcee Trinity Large (arXiv 2602.17004, section on MoE load balancing):
    v = (mean(c) - c) / mean(c)  (normalised violation, independent of batch size);
    d = u * tanh(kappa * v);  d -= mean(d)  (soft clamp, mean-centred);
    m = beta * m + (1 - beta) * d;  b += m  (momentum).
    Trinity Large: u (lambda) = 5e-4, beta = 0.5, kappa = 2. Read from two independent write-ups of the
    report's update (its PDF was not in our sources); the order (centre, then momentum) is theirs.
    A layer with mean load 0 gets v = 0."""
    violation = torch.where(mean > 0, error / mean.clamp_min(1e-300), torch.zeros_like(error))
    delta = rate * torch.tanh(kappa * violation)
    delta = delta - delta.mean(dim=-1, keepdim=True)
    momentum = beta * momentum + (1.0 - beta) * delta
    return bias + momentum, momentum


def rule_phi(bias, error, mean, rate, share, *, ema: float):
    """phi-Balancing (arXiv 2605.15403): mirror descent on the dual of min phi(E[routing distribution])
    gives an EMA of the routing distribution and a bias from the potential's gradient at it.

    OUR READING (the paper's equations were not in our sources, only its abstract): the routing
    distribution of a step is p = c / sum(c); the state q is its EMA, q = ema * q + (1 - ema) * p (q starts
    uniform, 1/E); phi is the negative entropy sum q log q (strictly convex, symmetric, differentiable, as
    the abstract asks), so grad phi = log q + 1, and the bias is b = -u * (log(E q) - mean(log(E q))) with
    u the scale (--lossfree-update-rate). An overloaded expert (q > 1/E) gets a negative bias; q is floored
    at 1e-30 inside the log only. The bias is a function of q (not accumulated): a persistent router
    preference is met by a persistent share above 1/E, by design of a potential, unlike the sign rule."""
    counts = mean - error
    total = counts.sum(dim=-1, keepdim=True)
    step_share = torch.where(total > 0, counts / total.clamp_min(1e-300), share)
    share = ema * share + (1.0 - ema) * step_share
    grad = torch.log(share.clamp_min(1e-30) * share.shape[-1])
    return -rate * (grad - grad.mean(dim=-1, keepdim=True)), share


@dataclasses.dataclass(frozen=True)
class StatefulRule:
    """A rule with per-expert state: its function, the state's initial value, and the config fields of its
    hyperparameters (``fn(..., **{param: config value})``)."""

    fn: Callable
    initial_state: Callable[[int], float]
    """E -> the state's value for every expert at step 0."""
    params: dict[str, str]
    """keyword of ``fn`` -> LossFreeConfig field."""


STATEFUL_RULES: dict[str, StatefulRule] = {
    "smebu": StatefulRule(rule_smebu, lambda experts: 0.0, {"kappa": "smebu_kappa", "beta": "smebu_momentum"}),
    "phi": StatefulRule(rule_phi, lambda experts: 1.0 / experts, {"ema": "phi_ema"}),
}


def apply_stateful_rule(
    rule: StatefulRule, bias: torch.Tensor, counts: torch.Tensor, state: torch.Tensor, rate: float, **params
) -> tuple[torch.Tensor, torch.Tensor]:
    """(new bias, new state) after one step's loads, in float64, cast back to the inputs' dtypes. Pure: the
    inputs are not modified. Rate 0 (a frozen schedule) returns exact copies: the bias stops moving."""
    if rate == 0.0:
        return bias.detach().clone(), state.detach().clone()
    counts_f64 = counts.to(device=bias.device, dtype=torch.float64)
    mean = counts_f64.mean(dim=-1, keepdim=True)
    new_bias, new_state = rule.fn(bias.detach().to(torch.float64), mean - counts_f64, mean, rate,
                                  state.detach().to(torch.float64), **params)
    return new_bias.to(bias.dtype), new_state.to(state.dtype)


def update_bias_with_state(
    bias: torch.Tensor, counts: torch.Tensor, state: torch.Tensor, *, rule: str, rate: float, **params
) -> tuple[torch.Tensor, torch.Tensor]:
    """``update_bias`` for a rule of STATEFUL_RULES: returns (new bias, new state); state has the bias's
    shape (``initial_rule_state`` gives step 0's)."""
    stateful = lookup_choice(STATEFUL_RULES, rule, "rule")
    check_rate(rate, "rate")
    _check_bias_counts(bias, counts)
    if not isinstance(state, torch.Tensor) or state.shape != bias.shape or not state.is_floating_point():
        raise LossFreeConfigError(
            f"state ({_describe(state)}) must be a floating tensor shaped like the bias {tuple(bias.shape)}: "
            f"start from initial_rule_state")
    with torch.no_grad():
        return apply_stateful_rule(stateful, bias, counts, state, float(rate), **params)


def initial_rule_state(rule: str, shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """The state of a STATEFUL_RULES rule before its first update (experts on the last dim)."""
    stateful = lookup_choice(STATEFUL_RULES, rule, "rule")
    return torch.full(tuple(shape), stateful.initial_state(tuple(shape)[-1]), dtype=dtype, device=device)


def update_bias(
    bias: torch.Tensor, counts: torch.Tensor, *, rule: str, rate: float
) -> torch.Tensor:
    """Return a NEW bias after one step's loads (LFB Alg. 1); never modifies ``bias``.

    bias: [E] or [L, E] floating (fp32); counts: integral, same shape, counted over the whole
    global batch BEFORE dropping. The error e = mean(c) - c is taken along the last dim (per layer)
    and the rule is evaluated in float64, then cast back to the bias dtype once: integral counts
    and float64 keep the sign exact (REFERENCE section 9, Megatron-Core's bf16 count trap).
    """
    if rule in STATEFUL_RULES:
        raise LossFreeConfigError(
            f"rule ({rule!r}) keeps state between steps: call update_bias_with_state (the balancer keeps the "
            f"state in a checkpointed router buffer)")
    rule_fn = lookup_choice(UPDATE_RULES, rule, "rule")
    check_rate(rate, "rate")
    _check_bias_counts(bias, counts)
    with torch.no_grad():
        return apply_update_rule(rule_fn, bias, counts, float(rate))


def _check_bias_counts(bias, counts) -> None:
    """The argument checks shared by ``update_bias`` and ``update_bias_with_state``."""
    if (
        not isinstance(bias, torch.Tensor)
        or not bias.is_floating_point()
        or bias.dim() not in (1, 2)
    ):
        raise LossFreeConfigError(
            f"bias ({_describe(bias)}) must be a floating tensor of shape [E] or [L, E]: "
            f"keep the expert bias as an fp32 buffer"
        )
    if (
        not isinstance(counts, torch.Tensor)
        or counts.is_floating_point()
        or counts.is_complex()
        or counts.dtype == torch.bool
    ):
        raise LossFreeConfigError(
            f"counts ({_describe(counts)}) must be an integral tensor: count tokens in int64 "
            f"(all-reduce in int64 or float64, then cast back with .long())"
        )
    if counts.shape != bias.shape:
        raise LossFreeConfigError(
            f"counts shape {tuple(counts.shape)} must equal bias shape {tuple(bias.shape)}: "
            f"pass one count per expert (per layer)"
        )


def apply_update_rule(rule_fn: Callable, bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    """The arithmetic of ``update_bias`` without its argument checks, for a caller that checked its
    (fixed) buffers once (``BiasBalancer``). e = mean(c) - c per layer, in float64."""
    counts_f64 = counts.to(device=bias.device, dtype=torch.float64)
    mean = counts_f64.mean(dim=-1, keepdim=True)
    new_bias = rule_fn(bias.detach().to(torch.float64), mean - counts_f64, mean, rate)
    return new_bias.to(bias.dtype)


def check_rate(rate: float, field: str) -> None:
    """A rate must be a finite number >= 0 (0 freezes the bias)."""
    if (
        isinstance(rate, bool)
        or not isinstance(rate, (int, float))
        or not math.isfinite(rate)
        or rate < 0
    ):
        raise LossFreeConfigError(
            f"{field} ({rate!r}) must be a finite number >= 0: the paper uses 0.001 (0 freezes "
            f"the bias)"
        )


# --------------------------------------------------------------------------------------------------
# Rate schedules: (rate, freeze_after_tokens, tokens_seen) -> rate for this step
# --------------------------------------------------------------------------------------------------


def schedule_constant(rate: float, freeze_after_tokens: int | None, tokens_seen: int) -> float:
    """LFB: one rate u for the whole run (u = 1e-3 in the paper)."""
    return rate


def schedule_v3(rate: float, freeze_after_tokens: int | None, tokens_seen: int) -> float:
    """V3 section 4.2: u = 0.001 for the first 14.3T tokens, then 0 for the last 500B.
    The rate is u while tokens_seen < freeze_after_tokens, and exactly 0 from then on."""
    return rate if tokens_seen < freeze_after_tokens else 0.0


def schedule_primal_dual(rate: float, decay_steps: int, steps_done: int) -> float:
    """Han & Zhong (arXiv 2512.03915): aux-loss-free balancing as a one-step primal-dual method; in their
    online formulation the objective is strongly convex and the expected regret is logarithmic "under
    certain step-size choices". For a strongly convex online problem that choice is the classical step
    ~ 1/t (online gradient descent with eta_t = 1/(mu t)).
    OUR READING (the theorem's constant 1/mu, mu the strong-convexity modulus, is not observable in
    training): u_t = u * tau / (tau + t) for the update after t steps -- u for the first update, then
    ~ u tau / t. tau is --lossfree-rate-decay-steps."""
    return rate * decay_steps / (decay_steps + steps_done)


RATE_SCHEDULES: dict[str, Callable[[float, int | None, int], float]] = {
    "constant": schedule_constant,
    "v3": schedule_v3,
}
STEP_SCHEDULES: dict[str, Callable[[float, int, int], float]] = {"primal_dual": schedule_primal_dual}
"""Schedules of the step count (rate, decay_steps, steps_done) rather than of the tokens seen."""


@dataclasses.dataclass(frozen=True)
class RateSchedule:
    """The bias update rate as a function of the tokens seen so far (validated on creation)."""

    name: str
    """Key of RATE_SCHEDULES: 'constant' (LFB) or 'v3' (V3 section 4.2 freeze)."""
    rate: float
    """u, the update rate (LFB / V3: 0.001)."""
    freeze_after_tokens: int | None = None
    """'v3' only: tokens after which u becomes 0 (V3: 14.3e12)."""
    decay_steps: int | None = None
    """'primal_dual' only: tau of u_t = u * tau / (tau + t)."""

    def __post_init__(self) -> None:
        lookup_choice({**RATE_SCHEDULES, **STEP_SCHEDULES}, self.name, "name")
        check_rate(self.rate, "rate")
        steps = self.decay_steps
        if self.name in STEP_SCHEDULES and (steps is None or isinstance(steps, bool) or steps <= 0):
            raise LossFreeConfigError(
                f"decay_steps ({steps!r}) must be a positive step count with schedule {self.name!r}: set "
                f"it (e.g. a tenth of the run)")
        if self.name not in STEP_SCHEDULES and steps is not None:
            raise LossFreeConfigError(
                f"decay_steps ({steps!r}) is only used by schedule 'primal_dual': drop it or choose that "
                f"schedule")
        tokens = self.freeze_after_tokens
        if self.name == "v3" and (tokens is None or isinstance(tokens, bool) or tokens <= 0):
            raise LossFreeConfigError(
                f"freeze_after_tokens ({tokens!r}) must be a positive token count with schedule "
                f"'v3': set it (V3 froze the bias after 14.3T tokens)"
            )
        if self.name != "v3" and tokens is not None:
            raise LossFreeConfigError(
                f"freeze_after_tokens ({tokens!r}) is only used by schedule 'v3': "
                f"drop it or choose name 'v3'"
            )

    def rate_at(self, tokens_seen: int, steps_done: int = 0) -> float:
        """Rate for the update after ``tokens_seen`` tokens (and ``steps_done`` updates) so far."""
        if self.name in STEP_SCHEDULES:
            return float(STEP_SCHEDULES[self.name](self.rate, self.decay_steps, steps_done))
        return float(RATE_SCHEDULES[self.name](self.rate, self.freeze_after_tokens, tokens_seen))


def make_rate_schedule(
    name: str, rate: float, freeze_after_tokens: int | None = None, decay_steps: int | None = None
) -> RateSchedule:
    """Build a validated RateSchedule (raises LossFreeConfigError with the fix)."""
    return RateSchedule(name=name, rate=rate, freeze_after_tokens=freeze_after_tokens, decay_steps=decay_steps)


# --------------------------------------------------------------------------------------------------
# Balance losses. f terms are counts (no gradient); P terms are means of scores (gradient).
# Tokens of B sequences are laid out sequence-major: t = b * S + s. Megatron-Core flattens
# [S, B] hidden states as t = s * B + b: reorder with view(S, B, E).transpose(0, 1) first.
# --------------------------------------------------------------------------------------------------


def unbiased_topk(scores_TE: torch.Tensor, topk: int) -> torch.Tensor:
    """experts_TK (int64) of the top-K of the UNBIASED scores: V3 eq. 18 counts f on these."""
    with torch.no_grad():
        return torch.topk(scores_TE.detach(), k=topk, dim=-1).indices.long()


def aux_loss(
    scores_TE: torch.Tensor, experts_TK: torch.Tensor, *, alpha: float, num_sequences: int = 1
) -> torch.Tensor:
    """LFB eq. 2 / V2 eqs. 12-14 (L_ExpBal): alpha * sum_i f_i P_i with
    f_i = E / (K*S) * #(tokens choosing i), P_i = mean_t s[t, i].

    Computed per sequence (S = T / B tokens) and averaged over the B sequences.
    """
    f_BE, p_BE = _expert_terms(scores_TE, experts_TK, num_sequences, "aux_loss")
    return alpha * (f_BE * p_BE).sum(dim=-1).mean()


def sequence_aux_loss(
    scores_TE: torch.Tensor, experts_TK: torch.Tensor, *, alpha: float, num_sequences: int
) -> torch.Tensor:
    """V3 eqs. 17-20: alpha * sum_i f_i P_i per sequence, averaged over sequences, with
    s'[t, i] = s[t, i] / sum_j s[t, j] (eq. 19) and f counted on the UNBIASED top-K (eq. 18;
    pass ``unbiased_topk(scores_TE, K)``). The 1e-20 in the denominator is ours (as in
    Megatron-Core), so an all-zero row gives 0 instead of NaN."""
    norm_TE = scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)
    f_BE, p_BE = _expert_terms(norm_TE, experts_TK, num_sequences, "sequence_aux_loss")
    return alpha * (f_BE * p_BE).sum(dim=-1).mean()


def device_balance_loss(
    scores_TE: torch.Tensor,
    experts_TK: torch.Tensor,
    *,
    alpha: float,
    num_devices: int,
    num_sequences: int = 1,
) -> torch.Tensor:
    """V2 eqs. 15-17 (L_DevBal): alpha * sum_d f'_d P'_d, f'_d = mean of f_i over device d's
    experts, P'_d = sum of P_i over them; device d holds experts [d*E/D, (d+1)*E/D)."""
    f_BE, p_BE = _expert_terms(scores_TE, experts_TK, num_sequences, "device_balance_loss")
    num_experts = f_BE.shape[-1]
    _check_devices(num_experts, num_devices)
    f_BD = f_BE.view(f_BE.shape[0], num_devices, -1).mean(dim=-1)
    p_BD = p_BE.view(p_BE.shape[0], num_devices, -1).sum(dim=-1)
    return alpha * (f_BD * p_BD).sum(dim=-1).mean()


def comm_balance_loss(
    scores_TE: torch.Tensor,
    experts_TK: torch.Tensor,
    *,
    alpha: float,
    num_devices: int,
    max_devices: int,
    num_sequences: int = 1,
) -> torch.Tensor:
    """V2 eqs. 18-20 (L_CommBal): alpha * sum_d f''_d P''_d, f''_d = D / (M*S) * #(tokens sent
    to device d) (a token counts once per device, however many of its experts live there),
    P''_d = sum of P_i over device d's experts."""
    _, p_BE = _expert_terms(scores_TE, experts_TK, num_sequences, "comm_balance_loss")
    num_sequences_, num_experts = p_BE.shape
    _check_devices(num_experts, num_devices)
    if not 1 <= max_devices <= num_devices:
        raise LossFreeConfigError(
            f"max_devices ({max_devices}) must be between 1 and num_devices ({num_devices}): "
            f"use the M of device-limited routing"
        )
    seq_len = scores_TE.shape[0] // num_sequences
    with torch.no_grad():
        device_TK = experts_TK.long() // (num_experts // num_devices)
        sent_TD = torch.zeros(
            scores_TE.shape[0], num_devices, dtype=torch.bool, device=experts_TK.device
        ).scatter_(1, device_TK, True)
        sent_BD = sent_TD.view(num_sequences, seq_len, num_devices).sum(dim=1).to(p_BE.dtype)
        f_BD = sent_BD * (num_devices / (max_devices * seq_len))
    p_BD = p_BE.view(num_sequences_, num_devices, -1).sum(dim=-1)
    return alpha * (f_BD * p_BD).sum(dim=-1).mean()


def _expert_terms(
    scores_TE: torch.Tensor, experts_TK: torch.Tensor, num_sequences: int, caller: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: f_BE = E/(K*S) * counts (no grad), P_BE = mean over the S tokens (grad)."""
    if scores_TE.dim() != 2 or experts_TK.dim() != 2 or experts_TK.shape[0] != scores_TE.shape[0]:
        raise LossFreeConfigError(
            f"{caller}: scores_TE {tuple(scores_TE.shape)} and experts_TK "
            f"{tuple(experts_TK.shape)} must be [T, E] and [T, K] with the same T"
        )
    num_tokens, num_experts = scores_TE.shape
    topk = experts_TK.shape[1]
    if num_sequences < 1 or num_tokens % num_sequences != 0:
        raise LossFreeConfigError(
            f"num_sequences ({num_sequences}) must divide the {num_tokens} tokens: "
            f"pass the number of sequences in this batch"
        )
    seq_len = num_tokens // num_sequences
    with torch.no_grad():
        experts_BN = experts_TK.long().reshape(num_sequences, seq_len * topk)
        counts_BE = torch.zeros(
            num_sequences, num_experts, dtype=torch.float32, device=scores_TE.device
        ).scatter_add_(1, experts_BN, torch.ones_like(experts_BN, dtype=torch.float32))
        f_BE = counts_BE * (num_experts / (topk * seq_len))
    p_BE = scores_TE.float().view(num_sequences, seq_len, num_experts).mean(dim=1)
    return f_BE, p_BE


def _check_devices(num_experts: int, num_devices: int) -> None:
    if num_devices < 1 or num_experts % num_devices != 0:
        raise LossFreeConfigError(
            f"num_devices ({num_devices}) must divide num_experts ({num_experts}): "
            f"choose a divisor of {num_experts}"
        )


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype}, shape {tuple(value.shape)}"
    return repr(value)
