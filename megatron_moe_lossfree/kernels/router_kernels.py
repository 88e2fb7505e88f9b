"""Triton kernels of the fused router: one forward kernel, one backward kernel.

Pure maths: no Megatron import, no communication. The reference is the pure torch path (``routing.py``:
score functions, biased selection, group rules; ``quantile.py``: the top-(K+1) cutoff; the router's count
rule) and Megatron-Core's gate arithmetic (``moe_utils.topk_routing_with_score_function``).

Shape suffixes: T tokens, E experts, K top-k, G groups. One program routes BLOCK_T tokens; a token's whole
row of E logits (padded to the power of two E_PAD) lives in registers, so the logits are read once.

Forward, per token (LFB Alg. 1; V2 section 2.2.1; V3 eqs. 13-16 and section 2.1.2; Kimi K3 eq. 13):
  1. scores s = sigmoid / softmax / sqrt(softplus) of the logits, in fp32;
  2. selection values v = s (or the logits, for the quantile rule in Megatron's space), biased v + b or v * b;
  3. optional group limit: group score = max of the group (device rule) or the sum of its K/M largest (node
     rule, Megatron's moe_router_group_topk); the M best groups stay, the other experts are masked;
  4. top-K by K rounds of arg-max (the lowest index wins a tie), plus one round for the quantile rule's
     cutoff (the (K+1)-th largest biased value);
  5. gates with Megatron's arithmetic: softmax over the K chosen logits, or the chosen scores normalised by
     their sum + 1e-20 (K > 1), or the raw scores; times the scaling factor;
  6. probs [T, E] (gates in place, zero elsewhere) and routing_map [T, E] in Megatron's layout, gates and
     experts [T, K], int64 counts [E] of the valid tokens by atomic adds (no host synchronisation).
Backward: the gradient of the gates (probs) to the logits, recomputing the scores from the logits.

Triton's CPU interpreter (TRITON_INTERPRET=1) truncates fp32 -> bf16 conversions where a GPU rounds to
nearest even; ``_round_bf16`` rounds by integer arithmetic so both give torch's bf16 bit for bit.
Only Triton language features of Triton 3.3 and later are used.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

# Codes of the compile-time switches (kept in one place: ``fused_router.py`` maps names onto them).
SCORE_SIGMOID, SCORE_SOFTMAX, SCORE_SQRTSOFTPLUS = 0, 1, 2
BIAS_NONE, BIAS_ADD, BIAS_MUL = 0, 1, 2
LIMIT_NONE, LIMIT_DEVICE, LIMIT_NODE = 0, 1, 2
GATE_SOFTMAX_TOPK, GATE_NORMALIZED, GATE_RAW = 0, 1, 2
ROUND_NONE, ROUND_BF16, ROUND_FP16 = 0, 1, 2
GATE_NORM_EPS = 1e-20  # Megatron-Core's epsilon (routing.GATE_NORM_EPS); written as a literal in the kernels


@triton.jit
def _round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return ((bits >> 16) << 16).to(tl.float32, bitcast=True)  # shifts, not a mask: literals stay 32-bit


@triton.jit
def _round_to(x, ROUND: tl.constexpr):
    if ROUND == 1:
        x = _round_bf16(x)
    elif ROUND == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    """exp: the CUDA maths library's expf on a GPU (torch's, so scores match torch's bits there); the
    interpreter's numpy exp on the host (which has no libdevice)."""
    if PRECISE:
        return libdevice.exp(x)
    return tl.exp(x)


@triton.jit
def _log1p(u, PRECISE: tl.constexpr):
    """log(1 + u), accurate where u is tiny (Goldberg's correction on the host)."""
    if PRECISE:
        return libdevice.log1p(u)
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def _scores(x, col_ok, SCORE: tl.constexpr, PRECISE: tl.constexpr):
    """fp32 scores of fp32 logits x [BT, E_PAD] with torch's formulas and IEEE division/square root;
    padding columns give 0."""
    if SCORE == 1:
        xm = tl.where(col_ok, x, float("-inf"))
        ex = _exp(xm - tl.max(xm, axis=1)[:, None], PRECISE)
        s = tl.div_rn(ex, tl.sum(ex, axis=1)[:, None])
    elif SCORE == 2:  # torch's softplus: x above the threshold 20, else log1p(exp(x))
        s = tl.sqrt_rn(tl.where(x > 20.0, x, _log1p(_exp(tl.minimum(x, 20.0), PRECISE), PRECISE)))
    else:
        s = tl.div_rn(tl.zeros_like(x) + 1.0, 1.0 + _exp(-x, PRECISE))
    return tl.where(col_ok, s, 0.0)


@triton.jit
def _take_max(work, cols, E_PAD: tl.constexpr):
    """Per row: the largest value and its lowest column; that column is then masked out of ``work``."""
    best = tl.max(work, axis=1)
    idx = tl.min(tl.where(work == best[:, None], cols[None, :], E_PAD), axis=1)
    return best, idx, tl.where(cols[None, :] == idx[:, None], float("-inf"), work)


@triton.jit
def _limit_groups(work, cols, col_ok, G: tl.constexpr, G_PAD: tl.constexpr, M: tl.constexpr,
                  PER_GROUP: tl.constexpr, LIMIT: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
                  BLOCK_T: tl.constexpr):
    """Mask every expert outside the token's M best groups (``routing.mask_unselected_groups``)."""
    gid = cols // (E // G)
    gcols = tl.arange(0, G_PAD)
    gscore = tl.full((BLOCK_T, G_PAD), float("-inf"), tl.float32)
    for g in tl.static_range(G):
        vals = tl.where((gid == g)[None, :] & col_ok, work, float("-inf"))
        if LIMIT == 1:  # device rule: the group's best expert
            score = tl.max(vals, axis=1)
        else:  # node rule: the sum of the group's K/M best, added in descending order
            score, _i, vals = _take_max(vals, cols, E_PAD)
            for _j in tl.static_range(PER_GROUP - 1):
                nxt, _i, vals = _take_max(vals, cols, E_PAD)
                score = score + nxt
        gscore = tl.where(gcols[None, :] == g, score[:, None], gscore)
    keep = tl.zeros((BLOCK_T, E_PAD), tl.int32) != 0
    for _m in tl.static_range(M):
        best = tl.max(gscore, axis=1)
        pick = tl.min(tl.where((gscore == best[:, None]) & (gcols[None, :] < G), gcols[None, :], G_PAD), axis=1)
        gscore = tl.where(gcols[None, :] == pick[:, None], float("-inf"), gscore)
        keep = keep | (gid[None, :] == pick[:, None])
    return tl.where(keep, work, float("-inf"))


@triton.jit
def router_fwd_kernel(
    logits_ptr, bias_ptr, valid_ptr,
    probs_ptr, map_ptr, gates_ptr, experts_ptr, counts_ptr, cutoff_ptr,
    T, scaling,
    E: tl.constexpr, E_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    SCORE: tl.constexpr, ON_LOGITS: tl.constexpr, BIAS: tl.constexpr,
    LIMIT: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, M: tl.constexpr, PER_GROUP: tl.constexpr,
    CUTOFF: tl.constexpr, GATE: tl.constexpr, ROUND: tl.constexpr, OUT_ROUND: tl.constexpr,
    HAS_SCALING: tl.constexpr, HAS_VALID: tl.constexpr, COUNT: tl.constexpr, PRECISE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    row_ok = rows < T
    col_ok = (cols < E)[None, :]
    ok = row_ok[:, None] & col_ok
    offs = rows.to(tl.int64)[:, None] * E + cols[None, :]
    x = tl.load(logits_ptr + offs, mask=ok, other=0.0).to(tl.float32)

    # 1-2. scores and biased selection values
    s = _scores(x, col_ok, SCORE, PRECISE)
    if ON_LOGITS:
        work = x
    else:
        work = s
    if BIAS == 1:
        work = work + tl.load(bias_ptr + cols, mask=cols < E, other=0.0)[None, :]
    elif BIAS == 2:
        work = work * tl.load(bias_ptr + cols, mask=cols < E, other=0.0)[None, :]
    work = tl.where(col_ok, work, float("-inf"))
    # 3. group limit
    if LIMIT != 0:
        work = _limit_groups(work, cols, col_ok, G, G_PAD, M, PER_GROUP, LIMIT, E, E_PAD, BLOCK_T)

    # 4. top-K (and the cutoff) by arg-max rounds; the gate source value of each pick is kept
    kcols = tl.arange(0, K_PAD)
    if GATE == 0:
        src = x
        picked = tl.full((BLOCK_T, K_PAD), float("-inf"), tl.float32)
    else:
        src = _round_to(s, ROUND)
        picked = tl.zeros((BLOCK_T, K_PAD), tl.float32)
    experts = tl.zeros((BLOCK_T, K_PAD), tl.int64)
    selected = tl.zeros((BLOCK_T, E_PAD), tl.int32) != 0
    for k in tl.static_range(K):
        _best, idx, work = _take_max(work, cols, E_PAD)
        idx = tl.minimum(idx, E - 1)  # only a NaN row finds no maximum
        hit = cols[None, :] == idx[:, None]
        selected = selected | hit
        experts = tl.where(kcols[None, :] == k, idx.to(tl.int64)[:, None], experts)
        value = tl.sum(tl.where(hit, src, 0.0), axis=1)
        picked = tl.where(kcols[None, :] == k, value[:, None], picked)
    if CUTOFF:
        cutoff = tl.max(work, axis=1)
        tl.store(cutoff_ptr + rows, cutoff, mask=row_ok)

    # 5. gates: Megatron's arithmetic on the K picks; the probs row repeats it on the chosen columns
    if GATE == 0:
        top = tl.max(picked, axis=1)
        ek = _exp(picked - top[:, None], PRECISE)
        den = tl.sum(ek, axis=1)
        gates = tl.div_rn(ek, den[:, None])
        probs = tl.div_rn(_exp(x - top[:, None], PRECISE), den[:, None])
    elif GATE == 1:
        den = _round_to(_round_to(tl.sum(picked, axis=1), ROUND) + 1e-20, ROUND)
        gates = _round_to(tl.div_rn(picked, den[:, None]), ROUND)
        probs = _round_to(tl.div_rn(src, den[:, None]), ROUND)
    else:
        gates = picked
        probs = src
    if HAS_SCALING:
        gates = _round_to(gates * scaling, ROUND)
        probs = _round_to(probs * scaling, ROUND)
    probs = tl.where(selected, probs, 0.0)

    # 6. outputs in Megatron's layout, and the counts of the valid tokens
    tl.store(probs_ptr + offs, _round_to(probs, OUT_ROUND).to(probs_ptr.dtype.element_ty), mask=ok)
    tl.store(map_ptr + offs, selected.to(tl.uint8), mask=ok)
    koffs = rows.to(tl.int64)[:, None] * K + kcols[None, :]
    kok = row_ok[:, None] & (kcols < K)[None, :]
    tl.store(gates_ptr + koffs, _round_to(gates, OUT_ROUND).to(gates_ptr.dtype.element_ty), mask=kok)
    tl.store(experts_ptr + koffs, experts, mask=kok)
    if COUNT:
        counted = selected & row_ok[:, None]
        if HAS_VALID:
            valid = tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0
            counted = counted & valid[:, None]
        tl.atomic_add(counts_ptr + cols, tl.sum(counted.to(tl.int32), axis=0).to(tl.int64), mask=cols < E)


@triton.jit
def router_bwd_kernel(
    grad_probs_ptr, logits_ptr, map_ptr, grad_logits_ptr,
    T, scaling,
    E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    SCORE: tl.constexpr, GATE: tl.constexpr, ROUND: tl.constexpr, HAS_SCALING: tl.constexpr,
    PRECISE: tl.constexpr,
):
    """d loss / d logits from d loss / d probs (zero outside the chosen experts; the bias gets none)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    col_ok = (cols < E)[None, :]
    ok = (rows < T)[:, None] & col_ok
    offs = rows.to(tl.int64)[:, None] * E + cols[None, :]
    x = tl.load(logits_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(grad_probs_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    selected = (tl.load(map_ptr + offs, mask=ok, other=0) != 0) & ok
    g = tl.where(selected, g, 0.0)
    if HAS_SCALING:
        g = g * scaling
    if GATE == 0:  # softmax over the chosen logits: p (g - <g, p>)
        top = tl.max(tl.where(selected, x, float("-inf")), axis=1)
        top = tl.where(top == float("-inf"), 0.0, top)  # rows past T select nothing
        ex = tl.where(selected, _exp(x - top[:, None], PRECISE), 0.0)
        p = ex / tl.maximum(tl.sum(ex, axis=1), 1.0)[:, None]  # the sum is >= 1 where a row selects
        grad = p * (g - tl.sum(g * p, axis=1)[:, None])
    else:
        s = _scores(x, col_ok, SCORE, PRECISE)
        if GATE == 1:  # q = s / (S + eps) on the chosen: dq/ds = (g - <g, q>) / (S + eps)
            src = tl.where(selected, _round_to(s, ROUND), 0.0)
            den = _round_to(_round_to(tl.sum(src, axis=1), ROUND) + 1e-20, ROUND)
            den = tl.where(rows < T, den, 1.0)  # rows past T select nothing (and 1e-20 is 0 in fp16)
            q = src / den[:, None]
            grad_s = tl.where(selected, (g - tl.sum(g * q, axis=1)[:, None]) / den[:, None], 0.0)
        else:
            grad_s = g
        if SCORE == 1:  # softmax over all E before the top-K
            grad = s * (grad_s - tl.sum(grad_s * s, axis=1)[:, None])
        elif SCORE == 2:  # d sqrt(softplus(x)) / dx = sigmoid(x) / (2 s)
            grad = tl.where(s > 0.0, grad_s * tl.sigmoid(x) / tl.where(s > 0.0, 2.0 * s, 1.0), 0.0)
        else:
            grad = grad_s * s * (1.0 - s)
    tl.store(grad_logits_ptr + offs, grad.to(grad_logits_ptr.dtype.element_ty), mask=ok)
