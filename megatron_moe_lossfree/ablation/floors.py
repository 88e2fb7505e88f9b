"""The two floors a balance number is read against (issue 18, item 3).

- The **sampling floor**: the MaxVio (LFB Eq. 4, REFERENCE 2) of a router that picks K of E experts
  uniformly at random for each of T tokens. Any router whose choice depends on the token shows at least
  this much imbalance from sampling noise alone unless it balances on purpose; it is the value a
  "perfectly balanced in expectation" router reaches at this batch size. Seeded Monte-Carlo
  (``sampling_floor``): the loads are a sum of T i.i.d. uniform K-subsets, drawn exactly as a
  multinomial over the C(E, K) subsets when C(E, K) is small, otherwise from the normal approximation
  of that sum (stated in ``Floor.method``).
- The **best bias found**: the lowest MaxVio_global that ONE per-expert bias was found to reach on the
  validation set's own routing scores (``best_bias_found``), by a search that iterates the quantile solve
  (REFERENCE 10, Kimi K3 Eq. 14; ``balancing_bias_E``) on the whole validation set from the run's own bias
  and keeps the best bias seen. It is a reachable value (an upper bound of the true minimum over single
  biases), not a proven minimum: a bias the search never visits might do better. It needs the validation
  scores, which a run writes to ``valid_routing.pt`` (``VALID_ROUTING``; format in ``load_valid_routing``).
  Earlier versions called it the "oracle floor" (``oracle_floor.json``, key ``floor_oracle_global``).

Pure numpy/torch, no Megatron import, no communication. Shape suffixes: T tokens, E experts, K top-k,
L MoE layers, S Monte-Carlo samples, C subsets.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from dataclasses import dataclass
from itertools import combinations
from typing import Optional

import numpy as np
import torch

from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.metrics import max_violation
from megatron_moe_lossfree.training.metrics_log import VALID_ROUTING, VALID_ROUTING_FORMAT  # the writer's

SAMPLES = 4000
"""Monte-Carlo samples of the sampling floor (its standard error is reported with it)."""
EXACT_SUBSETS = 20000
"""Largest C(E, K) drawn exactly as a multinomial over subsets; above it, the normal approximation."""
SEARCH_ITERS = 200
"""Steps of the best-bias search (``search_best_bias_E``)."""


# ----------------------------------------------------------------------------- sampling floor


@dataclass(frozen=True)
class Floor:
    mean: float
    """Monte-Carlo estimate of E[MaxVio] of the uniform random router."""
    stderr: float
    samples: int
    method: str
    """"subsets" (exact draw of the loads) or "normal" (normal approximation of the loads)."""


def _check_floor_args(num_experts: int, topk: int, tokens: int, samples: int) -> None:
    problems = []
    if not (isinstance(num_experts, int) and num_experts >= 1):
        problems.append(f"num_experts ({num_experts}) must be an integer >= 1")
    elif not (isinstance(topk, int) and 1 <= topk <= num_experts):
        problems.append(f"topk ({topk}) must be an integer in [1, num_experts ({num_experts})]")
    if not (isinstance(tokens, int) and tokens >= 1):
        problems.append(f"tokens ({tokens}) must be an integer >= 1: pass the tokens the loads count")
    if not (isinstance(samples, int) and samples >= 2):
        problems.append(f"samples ({samples}) must be an integer >= 2")
    if problems:
        raise LossFreeConfigError("; ".join(problems))


def _maxvio_S(loads_SE: np.ndarray, mean_load: float) -> np.ndarray:
    return (loads_SE.max(axis=1) - mean_load) / mean_load


def sampling_floor(num_experts: int, topk: int, tokens: int, *, samples: int = SAMPLES, seed: int = 0) -> Floor:
    """E[MaxVio] of a router choosing K distinct experts uniformly at random for each of ``tokens``.

    Exact draws ("subsets"): the number of tokens taking each K-subset is Multinomial(T, 1/C) over the
    C = C(E, K) subsets, and an expert's load is the sum over the subsets holding it. Above
    ``EXACT_SUBSETS`` subsets ("normal"): the loads are T times the mean of i.i.d. K-hot vectors,
    approximately normal with Var = T p (1 - p), Cov = T p ((K - 1)/(E - 1) - p), p = K/E; the loads
    then equal T p + sqrt(T a) (g - mean(g)) with g ~ N(0, I_E) and a = p (1 - p) - Cov / T (the sum of
    the loads is fixed, so the common part has no variance).
    """
    _check_floor_args(num_experts, topk, tokens, samples)
    rng = np.random.default_rng(seed)
    mean_load = tokens * topk / num_experts
    if math.comb(num_experts, topk) <= EXACT_SUBSETS:
        subsets = list(combinations(range(num_experts), topk))
        incidence_CE = np.zeros((len(subsets), num_experts), dtype=np.int64)
        for c, experts in enumerate(subsets):
            incidence_CE[c, list(experts)] = 1
        taken_SC = rng.multinomial(tokens, np.full(len(subsets), 1.0 / len(subsets)), size=samples)
        vio_S = _maxvio_S(taken_SC @ incidence_CE, mean_load)
        method = "subsets"
    else:
        p = topk / num_experts
        cov = p * ((topk - 1) / (num_experts - 1) - p)
        g_SE = rng.standard_normal((samples, num_experts))
        loads_SE = mean_load + math.sqrt(tokens * (p * (1 - p) - cov)) * (g_SE - g_SE.mean(axis=1, keepdims=True))
        vio_S = _maxvio_S(loads_SE, mean_load)
        method = "normal"
    return Floor(mean=float(vio_S.mean()), stderr=float(vio_S.std(ddof=1) / math.sqrt(samples)),
                 samples=samples, method=method)


# ----------------------------------------------------------------------------- the validation dump


@dataclass(frozen=True)
class ValidRouting:
    """The routing scores of one evaluation, per MoE layer (what ``valid_routing.pt`` holds)."""

    step: int
    topk: int
    bias_kind: str
    """"additive" (select on s + b) or "multiplicative" (select on s * b)."""
    layers: tuple[int, ...]
    """Global layer numbers of the MoE layers (1-based, Megatron's)."""
    scores_LTE: tuple[torch.Tensor, ...]
    """Per layer [T, E] float: the scores the bias is applied to for selection (after the score
    function), one row per validation token the evaluation routed."""
    bias_LE: tuple[Optional[torch.Tensor], ...]
    """Per layer [E]: the bias the evaluation routed with (None: no bias, balancing "none")."""
    counts_LE: tuple[Optional[torch.Tensor], ...]
    """Per layer [E]: the loads the evaluation counted (its MaxVio_global), for a consistency check."""


def load_valid_routing(run_dir: str) -> Optional[ValidRouting]:
    """``RUN_DIR/valid_routing.pt`` as a ValidRouting; None when the run wrote none.

    The file is ``torch.save`` of a dict: ``format`` ("mlf-valid-routing/1"), ``step`` (int),
    ``topk`` (int), ``bias_kind`` ("additive"/"multiplicative"), ``layers`` (list of int), ``scores``
    (list of [T, E] float tensors), and optionally ``bias`` and ``counts`` (lists of [E] tensors or None).
    """
    path = os.path.join(run_dir, VALID_ROUTING)
    if not os.path.isfile(path):
        return None
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != VALID_ROUTING_FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise LossFreeConfigError(f"{path} (format {found}) is not a {VALID_ROUTING_FORMAT} dump: rewrite it "
                                  f"with this version of mlf-pretrain or delete it")
    scores = tuple(torch.as_tensor(s) for s in blob["scores"])
    num = len(scores)
    routing = ValidRouting(step=int(blob["step"]), topk=int(blob["topk"]),
                           bias_kind=blob.get("bias_kind", "additive"),
                           layers=tuple(int(x) for x in blob.get("layers", range(1, num + 1))), scores_LTE=scores,
                           bias_LE=tuple(blob.get("bias") or [None] * num),
                           counts_LE=tuple(blob.get("counts") or [None] * num))
    if not (len(routing.layers) == len(routing.bias_LE) == len(routing.counts_LE) == num):
        raise LossFreeConfigError(f"{path} has {num} score tables but {len(routing.layers)} layers, "
                                  f"{len(routing.bias_LE)} biases and {len(routing.counts_LE)} count rows: "
                                  f"one of each per MoE layer")
    return routing


# ----------------------------------------------------------------------------- the best bias found


def routed_counts_E(scores_TE: torch.Tensor, bias_E: Optional[torch.Tensor], topk: int,
                    bias_kind: str = "additive") -> torch.Tensor:
    """int64 [E] loads of top-K selection on s + b (additive) or s * b (multiplicative), LFB Alg. 1."""
    scores = scores_TE.double()
    if bias_E is None:
        selection_TE = scores
    elif bias_kind == "multiplicative":
        selection_TE = scores * bias_E.double()
    else:
        selection_TE = scores + bias_E.double()
    experts_TK = torch.topk(selection_TE, k=topk, dim=1).indices
    return torch.bincount(experts_TK.reshape(-1), minlength=scores_TE.shape[1])


def balancing_bias_E(scores_TE: torch.Tensor, bias_E: torch.Tensor, topk: int) -> torch.Tensor:
    """One dual coordinate-descent step towards the bias that balances these scores (Su, "MoE Odyssey 6";
    Kimi K3 Eq. 13-14; REFERENCE 10), centred: with the cutoffs of ``bias_E`` held fixed, expert i gets
    exactly c = floor(T K / E) tokens.

    cutoff_t = the (K+1)-th largest of s[t] + b; r[t, i] = cutoff_t - s[t, i] (the bias expert i needs to
    win token t); new b[i] = the midpoint of the c-th and (c+1)-th smallest r[:, i]. Departure from the
    training-time solve (``quantile.qb_exact_solve_E``, Megatron-Core's ``qb_dual_update``): that one
    takes the (c+1)-th order statistic itself, which ties one token per expert with its cutoff, so top-K's
    tie-breaking decides that token and repeated steps stall one or two tokens short of balance; the
    midpoint has no tie. Float64.
    """
    scores = scores_TE.double()
    num_tokens, num_experts = scores.shape
    cutoff_T = torch.topk(scores + bias_E.double(), k=topk + 1, dim=1).values[:, topk]
    need_ET = (cutoff_T[None, :] - scores.t()).contiguous()
    c = num_tokens * topk // num_experts
    below_E, above_E = _adjacent_order_statistics_E(need_ET, c)
    new_E = (below_E + above_E) / 2
    return new_E - new_E.mean()


def _adjacent_order_statistics_E(values_ET: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the c-th and (c+1)-th smallest values (1-based): ``sort(values)[c - 1]`` and ``[c]``, one
    below the smallest for c < 1 and one above the largest for c >= T. One ``kthvalue`` and a masked min
    instead of a full sort: 3x faster at the final evaluation's 262K tokens, the same numbers bit for bit."""
    num_tokens = values_ET.shape[1]
    if c < 1:
        lowest_E = values_ET.min(dim=1).values
        return lowest_E - 1.0, lowest_E
    below_E = torch.kthvalue(values_ET, c, dim=1).values
    if c >= num_tokens:
        return below_E, values_ET.max(dim=1).values + 1.0
    # the (c+1)-th equals the c-th when that value repeats past position c, else it is the next value up
    repeats_E = (values_ET <= below_E[:, None]).sum(dim=1) > c
    higher_E = torch.where(values_ET > below_E[:, None], values_ET, torch.full_like(values_ET, float("inf")))
    return below_E, torch.where(repeats_E, below_E, higher_E.min(dim=1).values)


def search_best_bias_E(scores_TE: torch.Tensor, topk: int, *, start_E: Optional[torch.Tensor] = None,
                       iters: int = SEARCH_ITERS) -> tuple[torch.Tensor, float]:
    """(bias [E], MaxVio) of the best additive bias found for these scores: ``iters`` steps of
    ``balancing_bias_E`` from ``start_E`` (default 0), keeping the bias with the lowest MaxVio seen (the
    start included, so the result never exceeds the start's MaxVio: by construction, not a finding).
    Stops early at MaxVio 0 or at a fixed point. Float64 throughout. A search, not a proof of optimality.
    """
    if not (isinstance(iters, int) and iters >= 0):
        raise LossFreeConfigError(f"iters ({iters}) must be an integer >= 0")
    scores = scores_TE.double()
    bias = torch.zeros(scores.shape[1], dtype=torch.float64) if start_E is None else start_E.double().clone()
    best_bias, best = bias, max_violation(routed_counts_E(scores, bias, topk))
    for _ in range(iters):
        if best == 0.0:
            break
        new = balancing_bias_E(scores, bias, topk)
        if torch.equal(new, bias):
            break
        bias = new
        vio = max_violation(routed_counts_E(scores, bias, topk))
        if vio < best:
            best_bias, best = bias, vio
    return best_bias, best


@dataclass(frozen=True)
class BestBiasFound:
    maxvio_global: float
    """Mean over MoE layers of the best MaxVio found (the reported MaxVio is a mean over layers, REFERENCE 2)."""
    layers: tuple[float, ...]
    learned: float
    """The same scores routed with the run's own bias (its MaxVio_global, recomputed from the dump)."""
    bias_LE: tuple[torch.Tensor, ...] = ()
    """Per layer, the additive bias that reaches ``layers`` on the dumped scores (float64 [E])."""


def best_bias_found(routing: ValidRouting, *, iters: int = SEARCH_ITERS) -> BestBiasFound:
    """The best bias found for one evaluation: per layer, the best single additive bias the search
    (``search_best_bias_E``, from the run's bias) found on the layer's own scores.

    Per layer, holding the layer's inputs fixed (the earlier layers keep their learned routing): a bias
    that balances layer 1 differently would change what layer 2 sees, which a dump cannot replay. For a
    multiplicative bias (select on s * b) the search is still over additive biases on s, started from 0.
    """
    layers, learned, biases = [], [], []
    for scores_TE, bias_E in zip(routing.scores_LTE, routing.bias_LE):
        start = bias_E if routing.bias_kind == "additive" else None
        bias, vio = search_best_bias_E(scores_TE, routing.topk, start_E=start, iters=iters)
        layers.append(vio)
        biases.append(bias)
        learned.append(max_violation(routed_counts_E(scores_TE, bias_E, routing.topk, routing.bias_kind)))
    return BestBiasFound(maxvio_global=sum(layers) / len(layers), layers=tuple(layers),
                         learned=sum(learned) / len(learned), bias_LE=tuple(biases))


# ----------------------------------------------------------------------------- the floors of one run


def floor_tokens(args: argparse.Namespace) -> dict[str, int]:
    """Tokens each MaxVio counts over: the global batch (MaxVio_batch), one micro-batch per EP group
    (MaxVio_computation-batch, LFB 5.1: micro-batch size x EP-DP size) and the final evaluation
    (MaxVio_global: ``--final-eval-iters`` global batches, else ``--eval-iters``; 0 without evaluation)."""
    from megatron_moe_lossfree.training.arguments import final_eval_iters

    per_sequence = args.seq_length
    return {"batch": args.global_batch_size * per_sequence,
            "compute": args.micro_batch_size * per_sequence * args.expert_model_parallel_size,
            "global": final_eval_iters(args) * args.global_batch_size * per_sequence}


@functools.lru_cache(maxsize=None)
def random_floor(num_experts: int, topk: int, tokens: int) -> float:
    """The sampling floor (``floors.sampling_floor``, its default seed and sample count), cached."""
    return sampling_floor(num_experts, topk, tokens).mean


BEST_BIAS_CACHE = "best_bias_found.json"
"""Per run: ``maxvio_global``, ``layers``, ``learned_bias_maxvio_global``, ``iters`` and ``bias_layers`` (the
biases that reach them)."""
OLD_CACHE = "oracle_floor.json"
"""The same cache (without ``bias_layers``) as runs before the rename wrote it; still read."""


def best_bias_maxvio_of_run(run_dir: str) -> Optional[float]:
    """The best bias found from ``RUN_DIR/valid_routing.pt`` (None without one), cached in
    best_bias_found.json next to it (or read from an older run's oracle_floor.json; recomputed when the dump
    is newer than the cache)."""
    dump = os.path.join(run_dir, VALID_ROUTING)
    if not os.path.isfile(dump):
        return None
    for name in (BEST_BIAS_CACHE, OLD_CACHE):
        cache = os.path.join(run_dir, name)
        if os.path.isfile(cache) and os.path.getmtime(cache) >= os.path.getmtime(dump):
            with open(cache) as fh:
                return json.load(fh)["maxvio_global"]
    result = best_bias_found(load_valid_routing(run_dir))
    with open(os.path.join(run_dir, BEST_BIAS_CACHE), "w") as fh:
        json.dump({"maxvio_global": result.maxvio_global, "layers": list(result.layers),
                   "learned_bias_maxvio_global": result.learned, "iters": SEARCH_ITERS,
                   "bias_layers": [b.tolist() for b in result.bias_LE]}, fh, indent=1)
    return result.maxvio_global


def run_floors(args: argparse.Namespace, run_dir: str) -> dict:
    """The floors of one run (``ablation.report.FLOORS`` keys) from its parsed mlf-pretrain arguments and
    its run directory: the random-router MaxVio over each metric's tokens, and the MaxVio_global of the best
    bias found (None without a validation dump)."""
    tokens = floor_tokens(args)
    experts, topk = args.num_experts, args.moe_router_topk
    return {
        "floor_random_global": random_floor(experts, topk, tokens["global"]) if tokens["global"] else None,
        "floor_best_bias_global": best_bias_maxvio_of_run(run_dir),
        "floor_random_batch": random_floor(experts, topk, tokens["batch"]),
        "floor_random_compute": random_floor(experts, topk, tokens["compute"]),
    }
