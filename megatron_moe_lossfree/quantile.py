"""Quantile balancing (QB) maths: the exact estimator (Megatron-Core 0.19.2's), the histogram estimator
(Kimi K3 / torchtitan) and the step-level finish (average, EMA, centring).

Pure torch: no Megatron import, no communication (the caller sums histograms or solutions across ranks).
Definitions: REFERENCE.md section 10. Shape suffixes: T tokens, E experts, K top-k, L layers, B bins.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from megatron_moe_lossfree.balancing import _describe
from megatron_moe_lossfree.errors import LossFreeConfigError

# --------------------------------------------------------------------------------------------------
# Quantile balancing (QB): REFERENCE.md section 10. Instead of nudging b by +-u, solve each step
# for the bias that would have balanced the batch (each expert receiving T*K/E assignments).
#
# Sources: Su Jianlin, "MoE Odyssey 6: optimal allocation for equilibrium" (kexue.fm 11619), the
# dual coordinate descent: alpha_t = (K+1)-th largest of s_t - beta, then beta_i = the column
# quantile of s_{:,i} - alpha; Kimi K3 technical report section 2.3.3, Eqs. 13-14 (the cutoff and
# the required-bias quantile) and appendix D (the histogram estimator); Megatron-Core 0.19.2
# ``moe_utils.qb_dual_update`` (exact, per micro-batch) and
# ``finalize_model_grads._update_router_qb_beta`` (average, EMA, centring, once per step);
# torchtitan ``QuantileBalancer`` (histogram).
#
# Sign convention. The plugin's bias is ADDED to the selection score (select on s + b, as LFB
# Alg. 1); Megatron-Core SUBTRACTS its ``qb_beta`` (select on x - beta). So b = -beta, and every
# function here returns b. With b = -beta the arithmetic is bit-for-bit Megatron's: x + (-beta) is
# x - beta in IEEE arithmetic, alpha - x is -(x - alpha), and the k-th smallest of -v is minus
# the k-th largest of v.
#
# In b's terms: token t selects expert i iff s[t, i] + b[i] beats the token's cutoff
#   cutoff_t = (K+1)-th largest of s[t, :] + b            (Megatron's alpha_t)
# i.e. iff b[i] > r[t, i] := cutoff_t - s[t, i], the bias expert i NEEDS to win token t
# (Kimi K3's "required bias"). Holding the cutoffs fixed, b[i] = the (c+1)-th smallest r[:, i]
# leaves exactly c required biases strictly below it: expert i gets c = T*K/E tokens (one
# dual coordinate-descent step; the cutoffs then move, so one step balances the batch only
# approximately, and repeating the step on one batch converges towards balance).
#
# "scores" below means whatever the caller routes on: router LOGITS (Megatron-Core's space) or
# sigmoid/softmax SCORES (Kimi K3's space). The functions do not care.
# --------------------------------------------------------------------------------------------------


class QBCutoff(NamedTuple):
    """What one biased top-(K+1) gives: the selection and each token's cutoff."""

    experts_TK: torch.Tensor
    """int64 [T, K]: top-K of (scores + bias) over the reachable experts, by descending value
    (Megatron-Core's ``topk(k + 1).indices[:, :-1]``)."""
    cutoff_T: torch.Tensor
    """[T]: the (K+1)-th largest reachable biased value (Megatron-Core's alpha); -inf for a token
    with fewer than K+1 reachable experts (it takes all of them whatever the bias)."""


def qb_cutoff(
    scores_TE: torch.Tensor,
    bias_E: torch.Tensor,
    topk: int,
    *,
    reachable_TE: torch.Tensor | None = None,
) -> QBCutoff:
    """Biased top-(K+1) per token: the K selected experts and the cutoff (Kimi K3 Eq. 13; the
    first half of Megatron-Core's ``qb_dual_update``).

    Computed in float32 at least (bf16/fp16 scores are upcast; fp64 stays fp64), with no grad.
    ``reachable_TE`` (bool [T, E]) marks the experts a token may reach under device/node-limited
    routing (V2 section 2.2.1, V3 section 2.1.2); the others are set to -inf before the top-(K+1),
    so they are never selected and never the cutoff. Pass the mask the router used for THIS
    selection (it is itself chosen on the biased scores).
    """
    _check_qb_args(scores_TE, bias_E, topk, None, reachable_TE)
    with torch.no_grad():
        biased_TE = _qb_work(scores_TE, bias_E) + _qb_work(bias_E, scores_TE)
        if reachable_TE is not None:
            biased_TE = biased_TE.masked_fill(~reachable_TE, float("-inf"))
        top = torch.topk(biased_TE, k=topk + 1, dim=1)
        return QBCutoff(top.indices[:, :topk].long(), top.values[:, topk])


def qb_required_bias_TE(scores_TE: torch.Tensor, cutoff_T: torch.Tensor) -> torch.Tensor:
    """Kimi K3's required bias r[t, i] = cutoff_t - s[t, i] (section 2.3.3): expert i wins token t
    iff b[i] > r[t, i]. Equals -(x - alpha) of Megatron-Core's ``qb_dual_update`` bit for bit."""
    return cutoff_T.unsqueeze(1) - _qb_work(scores_TE, cutoff_T)


def qb_exact_solve_E(
    scores_TE: torch.Tensor,
    bias_E: torch.Tensor,
    topk: int,
    *,
    valid_T: torch.Tensor | None = None,
    reachable_TE: torch.Tensor | None = None,
    cutoff_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """One micro-batch's solved bias [E] (plugin convention, before averaging/EMA/centring).

    Kimi K3 Eq. 14 / Megatron-Core ``qb_dual_update``: per expert, the column quantile of the
    required bias r[t, i] = cutoff_t - s[t, i] at the balanced count. With P = n*K/E (n tokens)
    taken as a 0-indexed rank in ascending order of the column:
      * P an integer c: the (c+1)-th smallest r[:, i], which is EXACTLY -beta_local of Megatron-Core
        0.19.2 (its ``(x - alpha).topk(c + 1, dim=0).values[-1]``), bit for bit;
      * P not an integer: linear interpolation r_(floor P) + frac(P) * (r_(floor P + 1) -
        r_(floor P)) between the neighbouring order statistics (Megatron-Core asserts
        T*K % E == 0 instead).

    Masks:
      * ``valid_T`` (bool [T]; False = padding): masked tokens leave every column and n counts
        only valid tokens (Megatron-Core 0.19.2 asserts there is no padding mask instead);
      * ``reachable_TE`` (bool [T, E]; route-limited routing): an unreachable entry leaves its
        column (it counts as r = +inf: no bias wins it) and is not a candidate for the token's
        cutoff (see ``qb_cutoff``). The target stays n*K/E per expert.

    Columns with too few entries. Let n_i be the valid reachable entries of column i, and f_i of
    them "forced" (r = -inf: the token has fewer than K+1 reachable experts and takes them all).
    The rank P is clamped to [f_i, n_i - 1] before interpolating, so:
      * n_i <= P (too few reachable tokens for the target): the largest entry, the bias at which
        the expert wins every token it can reach (it stays short of the target);
      * f_i > P (more forced tokens than the target): the smallest finite entry (the expert is
        over the target at any bias; it wins no optional token beyond ties);
      * no finite entry (n_i == f_i, also an empty column): the current bias b[i], unchanged.
    No host synchronisation: the ranks stay on the device (also with ``valid_T``).

    Args:
        scores_TE: [T, E] routing values (logits or scores), any float dtype.
        bias_E: [E] current bias b (b = -qb_beta), the one used to route this batch.
        topk: K (1 <= K < E).
        cutoff_T: the cutoffs from ``qb_cutoff`` if the caller already has them (same inputs).
    Returns:
        [E] in the work dtype (float32, or float64 for float64 inputs).
    """
    _check_qb_args(scores_TE, bias_E, topk, valid_T, reachable_TE)
    with torch.no_grad():
        num_tokens, num_experts = scores_TE.shape
        bias_w = _qb_work(bias_E, scores_TE)
        if num_tokens == 0:
            return bias_w.clone()
        if cutoff_T is None:
            cutoff_T = qb_cutoff(scores_TE, bias_E, topk, reachable_TE=reachable_TE).cutoff_T
        required_TE = qb_required_bias_TE(scores_TE, _qb_work(cutoff_T, scores_TE))
        included_TE = _qb_included(num_tokens, num_experts, valid_T, reachable_TE, scores_TE.device)
        if included_TE is not None:
            required_TE = required_TE.masked_fill(~included_TE, float("inf"))

        # rank P = n*K/E = lo + rem/E (0-indexed, ascending); n = T, or the valid tokens.
        max_lo, max_rem = divmod(num_tokens * topk, num_experts)
        if valid_T is None:
            lo, rem = max_lo, max_rem
        else:
            n_valid = valid_T.sum().long()
            lo, rem = n_valid * topk // num_experts, n_valid * topk % num_experts
        # Sort only as deep as the ranks used: lo, and lo + 1 when P may be fractional (with
        # rem == 0 and no padding mask this is Megatron-Core's topk(c + 1)).
        depth = min(num_tokens, max_lo + (1 if valid_T is None and max_rem == 0 else 2))
        smallest_DE = torch.topk(required_TE, k=depth, dim=0, largest=False).values

        if included_TE is None and isinstance(lo, int) and lo + (rem > 0) < num_tokens:
            # Megatron-Core's case (no mask, every column full): no clamping can apply.
            v0_E = smallest_DE[lo]
            if rem == 0:
                return v0_E
            return v0_E + (rem / num_experts) * (smallest_DE[lo + 1] - v0_E)

        lo_t = torch.as_tensor(lo, device=scores_TE.device)
        rem_t = torch.as_tensor(rem, device=scores_TE.device)
        frac = rem_t.to(bias_w.dtype) / num_experts
        if included_TE is None:
            n_E = torch.full((num_experts,), num_tokens, device=scores_TE.device)
        else:
            n_E = included_TE.sum(dim=0)
        forced_E = (required_TE == float("-inf")).sum(dim=0)
        v0_E = smallest_DE.gather(0, lo_t.clamp(max=depth - 1).expand(1, num_experts)).squeeze(0)
        v1_E = smallest_DE.gather(0, (lo_t + 1).clamp(max=depth - 1).expand(1, num_experts)).squeeze(0)
        solved_E = torch.where(rem_t > 0, v0_E + frac * (v1_E - v0_E), v0_E)
        largest_E = required_TE.masked_fill(required_TE == float("inf"), float("-inf")).amax(dim=0)
        smallest_finite_E = required_TE.masked_fill(
            required_TE == float("-inf"), float("inf")
        ).amin(dim=0)
        too_few_E = lo_t + (rem_t > 0).long() > n_E - 1
        solved_E = torch.where(too_few_E, largest_E, solved_E)
        solved_E = torch.where(lo_t < forced_E, smallest_finite_E, solved_E)
        return torch.where(forced_E >= n_E, bias_w, solved_E)


def qb_histogram_range(
    bias_E: torch.Tensor, bins: int, margin: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, bin width) of the required-bias histogram: ``bins`` uniform bins over
    [min b - margin, max b + margin] (Kimi K3 appendix D, torchtitan ``QuantileBalancer``,
    margin 1).

    Why margin 1 for sigmoid or softmax scores: the cutoff is s[t, j] + b[j] for some j and
    s lies in (0, 1), so r[t, i] = s[t, j] + b[j] - s[t, i] lies in (b[j] - 1, b[j] + 1), inside
    the range. In logit space (Megatron-Core's) or with sqrtsoftplus scores r is unbounded: widen
    ``margin``. Values outside the range are CLAMPED into the edge bins (not dropped).
    Computed in the bias dtype, the same on every rank (the bias is replicated), so histograms
    built with it add up across ranks and micro-batches of one step.
    """
    _check_bins(bins, margin)
    low, high = bias_E.detach().min(), bias_E.detach().max()
    return low - margin, (high - low + 2.0 * margin) / bins


def qb_histogram_EB(
    scores_TE: torch.Tensor,
    bias_E: torch.Tensor,
    topk: int,
    *,
    bins: int = 1000,
    margin: float = 1.0,
    valid_T: torch.Tensor | None = None,
    reachable_TE: torch.Tensor | None = None,
    cutoff_T: torch.Tensor | None = None,
    dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """One micro-batch's required-bias histograms [E, bins] (Kimi K3 section 2.3.3 / appendix D,
    torchtitan ``QuantileBalancer.observe``): r[t, i] = cutoff_t - s[t, i] counted into the bins
    of ``qb_histogram_range(bias_E, bins, margin)``; out-of-range values (also the -inf of a forced
    token) are clamped into the first/last bin.

    ADDITIVE: histograms of one step (same bias, hence same range) may be summed over micro-batches
    and ranks (SP/CP/DP shards: no logits all-gather), then passed to ``qb_histogram_quantile_E``.
    ``dtype`` is the count dtype: int64 (exact) or float64 (exact up to 2**53 per bin).
    Masks as in ``qb_exact_solve_E``: excluded entries are not counted. With ``reachable_TE``,
    the column totals differ, so the quantile needs the token count (``num_tokens``).
    """
    _check_qb_args(scores_TE, bias_E, topk, valid_T, reachable_TE)
    lower, width = qb_histogram_range(bias_E, bins, margin)
    with torch.no_grad():
        num_tokens, num_experts = scores_TE.shape
        if cutoff_T is None:
            cutoff_T = qb_cutoff(scores_TE, bias_E, topk, reachable_TE=reachable_TE).cutoff_T
        required_TE = qb_required_bias_TE(scores_TE, _qb_work(cutoff_T, scores_TE))
        position_TE = (required_TE - lower.to(required_TE.dtype)) / width.to(required_TE.dtype)
        bin_TE = position_TE.floor().clamp(0, bins - 1).nan_to_num(0.0).long()
        flat_TE = bin_TE + torch.arange(num_experts, device=bin_TE.device) * bins
        included_TE = _qb_included(num_tokens, num_experts, valid_T, reachable_TE, scores_TE.device)
        if included_TE is None:
            weight_TE = torch.ones(flat_TE.shape, dtype=dtype, device=flat_TE.device)
        else:
            weight_TE = included_TE.to(dtype)
        histogram = torch.zeros(num_experts * bins, dtype=dtype, device=flat_TE.device)
        histogram.scatter_add_(0, flat_TE.reshape(-1), weight_TE.reshape(-1))
        return histogram.view(num_experts, bins)


QB_HISTOGRAM_INTERPOLATIONS = ("rank", "cdf")


def qb_histogram_quantile_E(
    histogram_EB: torch.Tensor,
    bias_E: torch.Tensor,
    topk: int,
    *,
    num_tokens: float | torch.Tensor | None = None,
    margin: float = 1.0,
    interpolation: str = "rank",
) -> torch.Tensor:
    """Solved bias [E] from SUMMED histograms (plugin convention, before EMA/centring): per expert,
    the required-bias quantile at the k/E fraction, linearly interpolated inside the bins.

    ``bias_E`` and ``margin`` must be those the histograms were built with (they fix the bins).
    ``num_tokens`` is n in the target n*K/E: the valid tokens behind the histograms (summed like
    them). None takes each column's own total, which is right without ``reachable_TE``
    (torchtitan's rule) and wrong with it (pass n then).

    interpolation:
      * "rank" (default, ours): the entries of a bin are taken as evenly spread, the m-th of the
        bin's h at lower + width * (bin + (m + 1/2) / h); the quantile interpolates these positions
        at rank P = n*K/E exactly as ``qb_exact_solve_E`` interpolates order statistics, with the
        same clamp of P to [0, n_i - 1]. Every position sits in the bin of the true order
        statistic, so the result is within one bin width of ``qb_exact_solve_E`` whenever no value
        was clamped into an edge bin.
      * "cdf" (torchtitan ``QuantileBalancer.estimate_expert_bias``): the point where the
        piecewise-linear CDF reaches the count n*K/E, i.e. the LOW end of the interval of biases
        that balance the batch, where Megatron-Core takes the high end; across an empty bin the
        two can differ by more than one bin width. torchtitan returns it already centred.
    An empty column gives the current bias b[i].
    Returns float64 [E] (the bin arithmetic is float64; cast to the bias dtype when storing).
    """
    if interpolation not in QB_HISTOGRAM_INTERPOLATIONS:
        raise LossFreeConfigError(
            f"interpolation ({interpolation!r}) is not known: choose one of "
            f"{sorted(QB_HISTOGRAM_INTERPOLATIONS)}"
        )
    if histogram_EB.dim() != 2 or histogram_EB.shape[0] != bias_E.shape[-1] or bias_E.dim() != 1:
        raise LossFreeConfigError(
            f"histogram_EB {tuple(histogram_EB.shape)} and bias_E {tuple(bias_E.shape)} must be "
            f"[E, bins] and [E]: pass one layer's summed histograms and its bias"
        )
    num_experts, bins = histogram_EB.shape
    _check_topk(topk, num_experts)
    lower, width = (v.double() for v in qb_histogram_range(bias_E, bins, margin))
    with torch.no_grad():
        counts_EB = histogram_EB.double()
        cumulative_EB = counts_EB.cumsum(dim=-1)
        total_E = cumulative_EB[:, -1]
        tokens_E = total_E if num_tokens is None else torch.as_tensor(
            num_tokens, dtype=torch.float64, device=counts_EB.device
        ).expand(num_experts)
        target_E = tokens_E * topk / num_experts
        if interpolation == "rank":
            rank_E = torch.minimum(target_E, total_E - 1).clamp_min(0.0)
            lo_E = rank_E.floor()
            frac_E = rank_E - lo_E
            hi_E = torch.minimum(lo_E + 1, (total_E - 1).clamp_min(0.0))
            pos0_E = _qb_rank_position(counts_EB, cumulative_EB, lo_E)
            pos1_E = _qb_rank_position(counts_EB, cumulative_EB, hi_E)
            position_E = pos0_E + frac_E * (pos1_E - pos0_E)
        else:
            target_E = torch.minimum(target_E, total_E)
            bin_E = (cumulative_EB < target_E.ceil().unsqueeze(-1)).sum(dim=-1).clamp(max=bins - 1)
            in_bin_E = counts_EB.gather(-1, bin_E.unsqueeze(-1)).squeeze(-1)
            before_E = cumulative_EB.gather(-1, bin_E.unsqueeze(-1)).squeeze(-1) - in_bin_E
            fraction_E = torch.where(
                in_bin_E > 0, (target_E - before_E) / in_bin_E.clamp_min(1.0), torch.zeros_like(in_bin_E)
            )
            position_E = bin_E.double() + fraction_E
        solved_E = lower + width * position_E
        return torch.where(total_E > 0, solved_E, bias_E.detach().double())


def qb_mean_solution(solved_sum: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """Average of the per-micro-batch solutions: sum / max(count, 1), in the sum's dtype.

    Megatron-Core ``_update_router_qb_beta``'s ``accum / count.clamp(min=1)`` (``qb_beta_accum``
    fp32, summed in micro-batch order from 0; ``qb_beta_count`` int64). Shapes [E] or [L, E] with
    count a scalar or [L] / [L, 1]. Megatron-Core then all-reduces this mean with AVG over DP x CP.
    Trap (not to inherit): with count 0 Megatron-Core averages in 0 and still blends it in below,
    pulling every bias towards 0; a caller should skip the update when no micro-batch was solved.
    """
    count_t = torch.as_tensor(count, device=solved_sum.device)
    if count_t.dim() == 1 and solved_sum.dim() == 2:
        count_t = count_t.unsqueeze(-1)
    return solved_sum / count_t.clamp(min=1).to(solved_sum.dtype)


def qb_blend_center(old_bias: torch.Tensor, mean_solution: torch.Tensor, ema: float) -> torch.Tensor:
    """New bias = centre(ema * old + (1 - ema) * mean_solution), centred over the last dim (experts).

    Megatron-Core ``_update_router_qb_beta``, same operations in the same order, so with
    b = -qb_beta the result is minus Megatron's, bit for bit. No special first step: the bias starts
    at 0, so the first update is (1 - ema) * mean_solution, centred. ema = 0 (Megatron's default)
    replaces the bias by the latest solution. Centring changes no routing decision (top-K is
    shift-invariant); it keeps the bias from drifting. ``ema`` must lie in [0, 1].
    """
    if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0.0 <= ema <= 1.0:
        raise LossFreeConfigError(
            f"ema ({ema!r}) must be a number in [0, 1]: 0 replaces the bias each step "
            f"(Megatron-Core's default), 0.9 keeps 90% of the old one"
        )
    blended = ema * old_bias + (1.0 - ema) * mean_solution.to(old_bias.dtype)
    return blended - blended.mean(dim=-1, keepdim=True)


def bip_solve_E(
    scores_TE: torch.Tensor,
    bias_E: torch.Tensor,
    topk: int,
    *,
    iterations: int,
    valid_T: torch.Tensor | None = None,
    reachable_TE: torch.Tensor | None = None,
) -> torch.Tensor:
    """BIP-based balancing (Sun, arXiv 2502.15451): the per-step dual of the binary integer programme
    max sum s[t, i] x[t, i] s.t. sum_i x[t, i] <= K, sum_t x[t, i] <= T*K/E, x binary, solved by
    ``iterations`` alternating (ADMM-style) updates of the token duals p_t and expert duals q_i:
      p_t = (K+1)-th largest of s[t, :] - q          (the cutoff, ``qb_cutoff``);
      q_i = max(0, (T*K/E + 1)-th largest of s[:, i] - p)   (the column quantile, ``qb_exact_solve_E``).
    In the plugin's sign convention b = -q: each iteration is one exact QB solve from the previous
    iterate, then b = min(b, 0) (q >= 0: the capacity constraint is an inequality, so an under-loaded
    expert's dual is 0, not negative). Warm-started from the current bias, as the paper keeps q across
    steps. OUR READINGS: the paper applies the solved q to route the batch it was solved on; the plugin
    routes the NEXT step with it (one update per step, no look at the current batch's own routing, LFB
    section 2), and averages the micro-batches' solutions as the quantile rule does.
    Returns [E] in the QB work dtype."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise LossFreeConfigError(f"iterations ({iterations!r}) must be an integer >= 1, e.g. 4")
    solved_E = _qb_work(bias_E, scores_TE).clone()
    for _ in range(iterations):
        solved_E = qb_exact_solve_E(scores_TE, solved_E, topk, valid_T=valid_T,
                                    reachable_TE=reachable_TE).clamp_max(0.0)
    return solved_E


def bip_blend(old_bias: torch.Tensor, mean_solution: torch.Tensor, ema: float) -> torch.Tensor:
    """The BIP rule's step finish: min(ema * old + (1 - ema) * mean_solution, 0). No centring: the
    expert duals q = -b are >= 0 and only their differences from 0 mean something (q = 0: not full)."""
    if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0.0 <= ema <= 1.0:
        raise LossFreeConfigError(f"ema ({ema!r}) must be a number in [0, 1]: 0 replaces the bias each step")
    return (ema * old_bias + (1.0 - ema) * mean_solution.to(old_bias.dtype)).clamp_max(0.0)


def qb_finish_step(
    old_bias: torch.Tensor, solved: list[torch.Tensor], ema: float
) -> torch.Tensor:
    """One process's whole step-level finish: accumulate the micro-batch solutions in order into a
    zero buffer of the bias dtype (as ``qb_beta_accum``), average (``qb_mean_solution``), EMA-blend
    and centre (``qb_blend_center``). Between the two, a parallel caller all-reduces the mean over
    the data-parallel ranks. No solution (empty list): the bias is returned unchanged (see the
    count-0 trap in ``qb_mean_solution``)."""
    if not solved:
        return old_bias.clone()
    accum = torch.zeros_like(old_bias)
    for solution in solved:
        qb_accumulate(accum, solution)
    return qb_blend_center(old_bias, qb_mean_solution(accum, len(solved)), ema)


def qb_accumulate(accum: torch.Tensor, solution: torch.Tensor) -> torch.Tensor:
    """``accum += solution`` in the accumulator's dtype, in place (Megatron-Core's
    ``qb_beta_accum.add_(beta_local)``, fp32): the router adds each micro-batch's solution in order."""
    return accum.add_(solution.to(accum.dtype))


def _qb_rank_position(
    counts_EB: torch.Tensor, cumulative_EB: torch.Tensor, rank_E: torch.Tensor
) -> torch.Tensor:
    """Position (in bins from the lower edge) of the entry of 0-indexed rank m per expert: its bin
    j is the first with cumulative count > m, and it sits at j + (m - before + 1/2) / h_j."""
    bins = counts_EB.shape[-1]
    bin_E = (cumulative_EB <= rank_E.unsqueeze(-1)).sum(dim=-1).clamp(max=bins - 1)
    in_bin_E = counts_EB.gather(-1, bin_E.unsqueeze(-1)).squeeze(-1)
    before_E = cumulative_EB.gather(-1, bin_E.unsqueeze(-1)).squeeze(-1) - in_bin_E
    return bin_E.double() + (rank_E - before_E + 0.5) / in_bin_E.clamp_min(1.0)


def _qb_work(value: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``value`` (detached) in the QB work dtype: float32, or float64 when either input is."""
    dtype = torch.float64 if torch.float64 in (value.dtype, other.dtype) else torch.float32
    return value.detach().to(dtype)


def _qb_included(num_tokens, num_experts, valid_T, reachable_TE, device) -> torch.Tensor | None:
    """Bool [T, E] of the entries that take part (valid token and reachable expert), or None."""
    if valid_T is None and reachable_TE is None:
        return None
    included_TE = torch.ones(num_tokens, num_experts, dtype=torch.bool, device=device)
    if valid_T is not None:
        included_TE = included_TE & valid_T.unsqueeze(1)
    if reachable_TE is not None:
        included_TE = included_TE & reachable_TE
    return included_TE


def _check_topk(topk: int, num_experts: int) -> None:
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk < num_experts:
        raise LossFreeConfigError(
            f"topk ({topk!r}) must be an integer in [1, {num_experts - 1}]: quantile balancing "
            f"needs a (K+1)-th expert per token for the cutoff"
        )


def _check_bins(bins: int, margin: float) -> None:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise LossFreeConfigError(
            f"bins ({bins!r}) must be a positive integer: Kimi K3 and torchtitan use 1000"
        )
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not (
        math.isfinite(margin) and margin > 0
    ):
        raise LossFreeConfigError(
            f"margin ({margin!r}) must be a finite number > 0: 1 covers sigmoid/softmax scores"
        )


def _check_qb_args(scores_TE, bias_E, topk, valid_T, reachable_TE) -> None:
    if (
        not isinstance(scores_TE, torch.Tensor)
        or scores_TE.dim() != 2
        or not scores_TE.is_floating_point()
    ):
        raise LossFreeConfigError(
            f"scores_TE ({_describe(scores_TE)}) must be a floating [T, E] tensor: flatten the "
            f"tokens first"
        )
    num_tokens, num_experts = scores_TE.shape
    if not isinstance(bias_E, torch.Tensor) or tuple(bias_E.shape) != (num_experts,):
        raise LossFreeConfigError(
            f"bias_E ({_describe(bias_E)}) must have shape [{num_experts}]: one bias per expert"
        )
    _check_topk(topk, num_experts)
    if valid_T is not None and (valid_T.dtype != torch.bool or tuple(valid_T.shape) != (num_tokens,)):
        raise LossFreeConfigError(
            f"valid_T ({_describe(valid_T)}) must be a bool tensor of shape [{num_tokens}] "
            f"(True = a real token, False = padding)"
        )
    if reachable_TE is not None and (
        reachable_TE.dtype != torch.bool or tuple(reachable_TE.shape) != (num_tokens, num_experts)
    ):
        raise LossFreeConfigError(
            f"reachable_TE ({_describe(reachable_TE)}) must be a bool tensor of shape "
            f"[{num_tokens}, {num_experts}] (True = the token may reach the expert)"
        )
