"""The fused router: ``fused_route(logits_TE, bias_E, valid_T, spec)`` -> probs, map, gates, experts, counts.

Pure maths: no Megatron import, no communication; the kernels are in ``router_kernels.py``. One forward
kernel and one backward kernel; no host synchronisation (outputs are allocated, counts zeroed and added on
the device), so a call can be captured in a CUDA graph.

Shape suffixes: T tokens, E experts, K top-k.

Agreement with the unfused path (``routing.choose_experts`` + Megatron's gate arithmetic), tested under
Triton's interpreter in tests/unit/test_fused_router.py:
  * selection (experts_TK, in descending order), routing map and counts equal it bit for bit wherever no two
    candidate values lie within a few fp32 ulps of each other, and so does the quantile rule's cutoff on
    logits (on scores it is within 2e-7 relative). Two sources of last-bit differences remain: the
    exponential (on a GPU the kernel calls libdevice's expf, the CUDA maths library torch's own kernels use,
    with IEEE division and square root, so its sigmoid/sqrt-softplus scores are expected to carry torch's
    bits there; not yet verified on a GPU; under the interpreter numpy's exp differs from torch's CPU exp in
    the last bit for about 1 in 6 inputs), and ties, which the kernel gives to the lowest expert index where
    torch.topk leaves them unspecified;
  * gates and probs within 2e-6 relative + 1e-7 absolute in fp32, or one unit of the last place (2^-7
    relative) in bf16/fp16; the logits' gradient within 1e-5 of the row's largest gradient in fp32 (2^-6 in
    bf16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import triton

from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.kernels import interpreting
from megatron_moe_lossfree.kernels import router_kernels as rk

SCORES = {"sigmoid": rk.SCORE_SIGMOID, "softmax": rk.SCORE_SOFTMAX, "sqrtsoftplus": rk.SCORE_SQRTSOFTPLUS}
BIASES = {None: rk.BIAS_NONE, "additive": rk.BIAS_ADD, "multiplicative": rk.BIAS_MUL}
LIMITS = {"none": rk.LIMIT_NONE, "device": rk.LIMIT_DEVICE, "node": rk.LIMIT_NODE}
GATES = {"softmax_topk": rk.GATE_SOFTMAX_TOPK, "normalized": rk.GATE_NORMALIZED, "raw": rk.GATE_RAW}
ROUNDS = {torch.float32: rk.ROUND_NONE, torch.bfloat16: rk.ROUND_BF16, torch.float16: rk.ROUND_FP16}
MAX_EXPERTS, MAX_TOPK = 1024, 32
TILE_ELEMENTS = 2048  # logits per program: BLOCK_T * E_PAD (see block_tokens)


@dataclass(frozen=True)
class RouterSpec:
    """What the fused router computes (all of it fixed at compile time but the scaling factor).

    gate: "softmax_topk" (softmax over the K chosen logits: Megatron's softmax after the top-K),
          "normalized" (chosen scores / (their sum + 1e-20): sigmoid/sqrtsoftplus with K > 1),
          "raw" (the chosen scores: K == 1, or softmax before the top-K).
    gate_dtype: the dtype Megatron normalises the gates in (fp32, or the logits' dtype in megatron-core 0.16).
    select_on_logits: select on the logits (+ bias) instead of the scores (the quantile rule in Megatron's space).
    with_cutoff: also return each token's (K+1)-th largest biased value (the quantile rule's cutoff).
    count: return int64 counts [E] of the valid tokens' choices (else zeros are not even written).
    """

    topk: int
    score_function: str = "sigmoid"
    bias_kind: Optional[str] = "additive"
    route_limit: str = "none"
    num_groups: Optional[int] = None
    max_groups: Optional[int] = None
    gate: str = "normalized"
    gate_dtype: torch.dtype = torch.float32
    scaling_factor: Optional[float] = None
    select_on_logits: bool = False
    with_cutoff: bool = False
    count: bool = True

    def check(self, num_experts: int) -> None:
        """Refuse what the kernel does not cover, naming the field, its value and the fix."""
        for field, value, table in (("score_function", self.score_function, SCORES),
                                    ("bias_kind", self.bias_kind, BIASES), ("route_limit", self.route_limit, LIMITS),
                                    ("gate", self.gate, GATES), ("gate_dtype", self.gate_dtype, ROUNDS)):
            if value not in table:
                raise LossFreeConfigError(f"fused router {field} ({value!r}) is not known: choose one of "
                                          f"{sorted(map(str, table))}")
        if not 1 <= self.topk <= min(num_experts - int(self.with_cutoff), MAX_TOPK):
            raise LossFreeConfigError(f"fused router topk ({self.topk}) must be between 1 and "
                                      f"{min(num_experts - int(self.with_cutoff), MAX_TOPK)} with {num_experts} "
                                      f"experts: lower --moe-router-topk or drop --moe-router-fusion")
        if num_experts > MAX_EXPERTS:
            raise LossFreeConfigError(f"fused router num_experts ({num_experts}) is above {MAX_EXPERTS}: drop "
                                      f"--moe-router-fusion")
        if self.route_limit != "none":
            groups, keep = self.num_groups, self.max_groups
            if not (groups and keep and num_experts % groups == 0 and keep <= groups
                    and keep * (num_experts // groups) >= self.topk):
                raise LossFreeConfigError(f"fused router groups ({groups}, keep {keep}) must divide {num_experts} "
                                          f"experts and hold topk ({self.topk}): fix the route limit")
            if self.route_limit == "node" and self.topk % keep:
                raise LossFreeConfigError(f"fused router topk ({self.topk}) must be divisible by max_groups "
                                          f"({keep}) with route_limit 'node'")


class FusedRouting(NamedTuple):
    probs_TE: torch.Tensor  # [T, E], logits' dtype; gates of the chosen experts, 0 elsewhere (differentiable)
    routing_map_TE: torch.Tensor  # bool [T, E]
    gates_TK: torch.Tensor  # [T, K], logits' dtype, in the order of experts_TK (no gradient)
    experts_TK: torch.Tensor  # int64 [T, K], by descending selection value
    counts_E: Optional[torch.Tensor]  # int64 [E] of the valid tokens, or None when spec.count is False
    cutoff_T: Optional[torch.Tensor]  # fp32 [T] (with_cutoff), else None


def block_tokens(num_tokens: int, e_pad: int) -> int:
    """Tokens per program: TILE_ELEMENTS logits, at most 16 tokens and no more than the batch holds.

    Measured with ptxas for sm_90 (the forward kernel, bf16): no register spills at E 16 / 64 (groups 8/2) /
    256 (groups 8/4) / 512; 32 tokens at E 64 with groups spilled 108 bytes, 64 tokens at E 64 K 8 268 bytes."""
    return max(1, min(16, TILE_ELEMENTS // e_pad, triton.next_power_of_2(max(num_tokens, 1))))


def warps_for(block: int, e_pad: int) -> int:
    """One warp per 256 logits of the tile, 1 to 4 (a 16 x 16 tile does not need 128 threads)."""
    return max(1, min(4, block * e_pad // 256))


def _constants(spec: RouterSpec, num_experts: int, dtype: torch.dtype) -> dict:
    groups = spec.num_groups if spec.route_limit != "none" else 1
    keep = spec.max_groups if spec.route_limit != "none" else 1
    return dict(
        E=num_experts, E_PAD=triton.next_power_of_2(num_experts), SCORE=SCORES[spec.score_function],
        GATE=GATES[spec.gate], ROUND=ROUNDS[spec.gate_dtype], HAS_SCALING=bool(spec.scaling_factor),
        BIAS=BIASES[spec.bias_kind], ON_LOGITS=spec.select_on_logits, LIMIT=LIMITS[spec.route_limit],
        G=groups, G_PAD=triton.next_power_of_2(groups), M=keep,
        PER_GROUP=spec.topk // keep if spec.route_limit == "node" else 1,
        K=spec.topk, K_PAD=triton.next_power_of_2(spec.topk), CUTOFF=spec.with_cutoff,
        OUT_ROUND=ROUNDS[dtype], PRECISE=not interpreting())


def _forward(logits_TE, bias_E, valid_T, spec: RouterSpec) -> FusedRouting:
    num_tokens, num_experts = logits_TE.shape
    c = _constants(spec, num_experts, logits_TE.dtype)
    device, k = logits_TE.device, spec.topk
    probs_TE = torch.empty_like(logits_TE)
    map_TE = torch.empty((num_tokens, num_experts), dtype=torch.bool, device=device)
    gates_TK = torch.empty((num_tokens, k), dtype=logits_TE.dtype, device=device)
    experts_TK = torch.empty((num_tokens, k), dtype=torch.int64, device=device)
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=device) if spec.count else None
    cutoff_T = torch.empty(num_tokens, dtype=torch.float32, device=device) if spec.with_cutoff else None
    block = block_tokens(num_tokens, c["E_PAD"])
    if num_tokens:
        valid = valid_T.to(torch.uint8) if valid_T is not None else None
        rk.router_fwd_kernel[(triton.cdiv(num_tokens, block),)](
            logits_TE, bias_E if bias_E is not None else logits_TE, valid if valid is not None else map_TE,
            probs_TE, map_TE.view(torch.uint8), gates_TK, experts_TK,
            counts_E if counts_E is not None else experts_TK, cutoff_T if cutoff_T is not None else probs_TE,
            num_tokens, float(spec.scaling_factor or 1.0), BLOCK_T=block, HAS_VALID=valid is not None,
            COUNT=spec.count, num_warps=warps_for(block, c["E_PAD"]), **c)
    return FusedRouting(probs_TE, map_TE, gates_TK, experts_TK, counts_E, cutoff_T)


def _backward(grad_probs_TE, logits_TE, map_TE, spec: RouterSpec) -> torch.Tensor:
    num_tokens, num_experts = logits_TE.shape
    c = _constants(spec, num_experts, logits_TE.dtype)
    grad_TE = torch.empty_like(logits_TE)
    block = block_tokens(num_tokens, c["E_PAD"])
    if num_tokens:
        rk.router_bwd_kernel[(triton.cdiv(num_tokens, block),)](
            grad_probs_TE.contiguous(), logits_TE, map_TE.view(torch.uint8), grad_TE, num_tokens,
            float(spec.scaling_factor or 1.0), E=num_experts, E_PAD=c["E_PAD"], BLOCK_T=block, SCORE=c["SCORE"],
            GATE=c["GATE"], ROUND=c["ROUND"], HAS_SCALING=c["HAS_SCALING"], PRECISE=c["PRECISE"],
            num_warps=warps_for(block, c["E_PAD"]))
    return grad_TE


class _FusedRouterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, bias_E, valid_T, spec):
        out = _forward(logits_TE, bias_E, valid_T, spec)
        ctx.spec = spec
        ctx.save_for_backward(logits_TE, out.routing_map_TE)
        ctx.mark_non_differentiable(*(t for t in out[1:] if t is not None))
        return tuple(out)

    @staticmethod
    def backward(ctx, grad_probs_TE, *unused):
        logits_TE, map_TE = ctx.saved_tensors
        if grad_probs_TE is None:
            return None, None, None, None
        return _backward(grad_probs_TE, logits_TE, map_TE, ctx.spec), None, None, None


def fused_route(
    logits_TE: torch.Tensor,
    bias_E: Optional[torch.Tensor],
    valid_T: Optional[torch.Tensor] = None,
    *,
    spec: RouterSpec,
) -> FusedRouting:
    """Route [T, E] logits in one kernel (see the module docstring); differentiable in the logits through
    ``probs_TE``. ``bias_E`` fp32 [E] (ignored when ``spec.bias_kind`` is None); ``valid_T`` bool [T] (False:
    padding, routed but not counted) or None."""
    if logits_TE.dim() != 2 or logits_TE.dtype not in ROUNDS:
        raise LossFreeConfigError(f"fused router logits ({tuple(logits_TE.shape)}, {logits_TE.dtype}) must be "
                                  f"[T, E] in fp32, bf16 or fp16: use --moe-router-dtype fp32 or drop "
                                  f"--moe-router-fusion")
    spec.check(logits_TE.shape[1])
    if spec.bias_kind is not None:
        if bias_E is None or tuple(bias_E.shape) != (logits_TE.shape[1],):
            raise LossFreeConfigError(f"fused router bias ({None if bias_E is None else tuple(bias_E.shape)}) "
                                      f"must be [{logits_TE.shape[1]}] with bias_kind {spec.bias_kind!r}")
        bias_E = bias_E.detach().float().contiguous()
    else:
        bias_E = None
    if valid_T is not None:
        valid_T = valid_T.reshape(-1)
    out = _FusedRouterFunction.apply(logits_TE.contiguous(), bias_E, valid_T, spec)
    return FusedRouting(*out)
