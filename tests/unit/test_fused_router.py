"""The fused Triton router against the pure torch path, under Triton's CPU interpreter (TRITON_INTERPRET=1).

Reference: ``routing.choose_experts`` (selection), ``quantile.qb_cutoff`` (the quantile rule's top-(K+1)),
``routing.count_tokens_per_expert`` (counts) and Megatron's gate arithmetic as the plugin's router applies it.
Selection, routing map, counts and cutoffs must be equal bit for bit; gates, probs and the logits' gradient
within the bounds of ``fused_router``'s docstring.

The logits are drawn without ties: each row is a permutation of multiples of 2^-6 in [-4, 4) (exact in bf16),
so no two experts' scores lie within a few ulps (torch.topk leaves ties unspecified; the kernel takes the
lowest index). Tokens are few (8 to 24): the interpreter runs the kernel in numpy.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
pytest.importorskip("triton")

from megatron_moe_lossfree import quantile, routing  # noqa: E402
from megatron_moe_lossfree.errors import LossFreeConfigError  # noqa: E402
from megatron_moe_lossfree.kernels.fused_router import RouterSpec, fused_route  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 bounds (stated in fused_router's docstring); bf16/fp16 outputs: one unit of the last place.
FP32_GATES = dict(rtol=2e-6, atol=1e-7)
LOW_GATES = dict(rtol=2 ** -7, atol=1e-6)


def distinct_logits(num_tokens, num_experts, dtype, seed):
    """Each row a permutation of distinct multiples of 2^-6 in [-4, 4)."""
    gen = torch.Generator().manual_seed(seed)
    grid = (torch.arange(512) - 256).float() / 64
    pick = torch.stack([torch.randperm(512, generator=gen)[:num_experts] for _ in range(num_tokens)])
    return grid[pick].to(dtype).to(DEVICE)


def make_bias(kind, num_experts, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(num_experts, generator=gen) * 0.05
    if kind is None:
        return None
    return (1.0 + noise if kind == "multiplicative" else noise).to(DEVICE)


def reference(logits_TE, bias_E, valid_T, spec: RouterSpec):
    """The unfused path: pure torch selection, Megatron's gate arithmetic, the router's count rule."""
    num_experts = logits_TE.shape[1]
    scores_TE = routing.compute_scores(logits_TE, spec.score_function)
    values_TE = logits_TE.detach().float() if spec.select_on_logits else scores_TE
    limit = dict(route_limit=spec.route_limit, num_groups=spec.num_groups, max_groups=spec.max_groups)
    cutoff_T = None
    if spec.with_cutoff:  # the quantile rule: additive bias, reachable experts chosen on the biased values
        reachable_TE = None
        if spec.route_limit != "none":
            masked_TE = routing.mask_unselected_groups(values_TE.detach() + bias_E, spec.topk, spec.num_groups,
                                                       spec.max_groups, routing.ROUTE_LIMITS[spec.route_limit])
            reachable_TE = torch.isfinite(masked_TE)
        cut = quantile.qb_cutoff(values_TE.detach(), bias_E, spec.topk, reachable_TE=reachable_TE)
        experts_TK, cutoff_T = cut.experts_TK, cut.cutoff_T
    else:
        experts_TK = routing.choose_experts(values_TE, bias_E if spec.bias_kind else None, spec.topk,
                                            bias_kind=spec.bias_kind or "additive", **limit)
    if spec.gate == "softmax_topk":
        gates_TK = torch.softmax(logits_TE.gather(1, experts_TK), dim=-1, dtype=torch.float32)
        gates_TK = gates_TK * spec.scaling_factor if spec.scaling_factor else gates_TK
    else:
        gates_TK = routing.gate_selected(scores_TE.to(spec.gate_dtype), experts_TK,
                                         normalize=spec.gate == "normalized", scaling_factor=spec.scaling_factor)
    gates_TK = gates_TK.to(logits_TE.dtype)
    probs_TE = torch.zeros_like(logits_TE).scatter(1, experts_TK, gates_TK)
    keep_TK = None if valid_T is None else valid_T.unsqueeze(1).expand_as(experts_TK)
    counts_E = routing.count_tokens_per_expert(experts_TK, num_experts, keep_TK)
    return probs_TE, experts_TK, gates_TK, counts_E, cutoff_T


def check(spec: RouterSpec, num_tokens, num_experts, dtype, padded, seed=0):
    logits_TE = distinct_logits(num_tokens, num_experts, dtype, seed)
    bias_E = make_bias("additive" if spec.with_cutoff else spec.bias_kind, num_experts, seed)
    valid_T = (torch.arange(num_tokens, device=DEVICE) % 3 != 1) if padded else None
    fused_in = logits_TE.clone().requires_grad_()
    ref_in = logits_TE.clone().requires_grad_()
    out = fused_route(fused_in, bias_E, valid_T, spec=spec)
    probs_TE, experts_TK, gates_TK, counts_E, cutoff_T = reference(ref_in, bias_E, valid_T, spec)

    assert torch.equal(out.experts_TK, experts_TK)
    assert torch.equal(out.routing_map_TE, probs_TE.detach() != 0)
    assert out.routing_map_TE.sum() == num_tokens * spec.topk
    assert out.counts_E.dtype == torch.int64 and torch.equal(out.counts_E, counts_E)
    if spec.with_cutoff:  # exact on logits; on scores the host's exp differs from torch's in the last bits
        torch.testing.assert_close(out.cutoff_T, cutoff_T, rtol=0 if spec.select_on_logits else 2e-7, atol=0)
    bound = FP32_GATES if dtype == torch.float32 and spec.gate_dtype == torch.float32 else LOW_GATES
    assert out.probs_TE.dtype == dtype and out.gates_TK.dtype == dtype
    torch.testing.assert_close(out.gates_TK.float(), gates_TK.detach().float(), **bound)
    torch.testing.assert_close(out.probs_TE.float(), probs_TE.detach().float(), **bound)

    weight_TE = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(seed + 2)).to(DEVICE)
    (out.probs_TE.float() * weight_TE).sum().backward()
    (probs_TE.float() * weight_TE).sum().backward()
    got, want = fused_in.grad.float(), ref_in.grad.float()
    scale = want.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    tol = 1e-5 if bound is FP32_GATES else 2 ** -6
    assert ((got - want).abs() <= tol * scale).all(), (got - want).abs().max()


# score function x bias kind x route limit (27 cases); E/K, dtype and padding rotate through them so that every
# pair of (score function, dtype), (bias kind, dtype), (route limit, dtype) occurs (the interpreter is slow)
SCORES = ("sigmoid", "softmax", "sqrtsoftplus")
BIASES = (None, "additive", "multiplicative")
LIMITS = (("none", None, None), ("device", 4, 2), ("node", 8, 2))
SHAPES = ((16, 4), (32, 6), (64, 8))
DTYPES = (torch.float32, torch.bfloat16)
MATRIX = [
    pytest.param(score, bias, limit, SHAPES[(i + j) % 3], DTYPES[(i + j + k) % 2], (i + 2 * j + k) % 2 == 1,
                 id=f"{score}-{bias}-{limit[0]}-E{SHAPES[(i + j) % 3][0]}-{str(DTYPES[(i + j + k) % 2])[6:]}"
                    f"{'-pad' if (i + 2 * j + k) % 2 else ''}")
    for i, score in enumerate(SCORES) for j, bias in enumerate(BIASES) for k, limit in enumerate(LIMITS)
]


@pytest.mark.parametrize("score, bias, limit, shape, dtype, padded", MATRIX)
def test_matrix_equals_the_unfused_path(score, bias, limit, shape, dtype, padded):
    num_experts, topk = shape
    route_limit, groups, keep = limit
    gate = "softmax_topk" if score == "softmax" else "normalized"
    spec = RouterSpec(topk=topk, score_function=score, bias_kind=bias, route_limit=route_limit, num_groups=groups,
                      max_groups=keep, gate=gate)
    check(spec, 12, num_experts, dtype, padded)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("num_experts, topk, limit, groups, keep", [
    (256, 8, "node", 8, 4),   # DeepSeek-V3's layout: 8 groups, 4 kept
    (256, 8, "device", 8, 4),
    (512, 10, "none", None, None),
    (512, 10, "node", 8, 2),
])
def test_recipe_shapes(num_experts, topk, limit, groups, keep, dtype):
    spec = RouterSpec(topk=topk, score_function="sigmoid", bias_kind="additive", route_limit=limit, num_groups=groups,
                      max_groups=keep, scaling_factor=2.5)
    check(spec, 8, num_experts, dtype, padded=True, seed=3)


@pytest.mark.parametrize("limit, groups, keep", [("none", None, None), ("device", 4, 2), ("node", 8, 2)])
@pytest.mark.parametrize("on_logits", (True, False), ids=("logits", "scores"))
def test_quantile_cutoff_is_the_biased_k_plus_first(limit, groups, keep, on_logits):
    spec = RouterSpec(topk=4, score_function="sigmoid", bias_kind="additive", route_limit=limit, num_groups=groups,
                      max_groups=keep, select_on_logits=on_logits, with_cutoff=True)
    check(spec, 16, 32, torch.float32, padded=on_logits)


@pytest.mark.parametrize("spec", [
    RouterSpec(topk=1, score_function="sigmoid", gate="raw"),                      # K == 1: no normalisation
    RouterSpec(topk=4, score_function="softmax", gate="raw", bias_kind=None),      # softmax before the top-K
    RouterSpec(topk=4, score_function="softmax", gate="softmax_topk", scaling_factor=1.5),
    RouterSpec(topk=16, score_function="sigmoid", bias_kind="additive"),           # K 16
], ids=("k1", "pre-softmax", "softmax-scaled", "k16"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_gate_rules(spec, dtype):
    check(spec, 8, 64, dtype, padded=False, seed=5)


def test_gates_in_the_logits_dtype_round_like_megatron_016():
    """megatron-core 0.16 casts the scores to the logits' dtype before normalising (compat.router_gate_dtype)."""
    spec = RouterSpec(topk=6, score_function="sigmoid", gate_dtype=torch.bfloat16, scaling_factor=2.0)
    check(spec, 16, 32, torch.bfloat16, padded=True, seed=7)


def test_fp16_logits():
    check(RouterSpec(topk=4, score_function="sqrtsoftplus", bias_kind="additive", gate_dtype=torch.float16),
          12, 32, torch.float16, padded=True, seed=13)


def test_counts_leave_out_padding_and_no_count_writes_none():
    logits_TE = distinct_logits(8, 16, torch.float32, 11)
    spec = RouterSpec(topk=2, bias_kind=None)
    out = fused_route(logits_TE, None, torch.zeros(8, dtype=torch.bool, device=DEVICE), spec=spec)
    assert torch.equal(out.counts_E, torch.zeros(16, dtype=torch.int64, device=DEVICE))
    assert fused_route(logits_TE, None, spec=RouterSpec(topk=2, bias_kind=None, count=False)).counts_E is None


@pytest.mark.parametrize("spec, num_experts, message", [
    (RouterSpec(topk=40), 64, r"fused router topk \(40\) must be between 1 and 32"),
    (RouterSpec(topk=4, route_limit="node", num_groups=8, max_groups=3), 64, r"topk \(4\) must be divisible"),
    (RouterSpec(topk=4, score_function="relu"), 64, r"fused router score_function \('relu'\) is not known"),
])
def test_refusals_name_the_field(spec, num_experts, message):
    with pytest.raises(LossFreeConfigError, match=message):
        fused_route(torch.zeros(2, num_experts, device=DEVICE), torch.zeros(num_experts, device=DEVICE), spec=spec)


def test_kernels_are_pure_maths():
    """kernels/ imports neither Megatron nor torch.distributed (the pure-maths rule of DESIGN.md)."""
    import ast
    import pathlib

    import megatron_moe_lossfree.kernels as kernels

    for path in pathlib.Path(kernels.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("megatron.", "torch.distributed")) and name != "megatron", (path, name)


COMPILE_FOR_SM90 = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megatron_moe_lossfree.kernels import fused_router, router_kernels as rk
types = {"logits_ptr": "*bf16", "bias_ptr": "*fp32", "valid_ptr": "*u8", "probs_ptr": "*bf16", "map_ptr": "*u8",
         "gates_ptr": "*bf16", "experts_ptr": "*i64", "counts_ptr": "*i64", "cutoff_ptr": "*fp32", "T": "i32",
         "scaling": "fp32", "grad_probs_ptr": "*bf16", "grad_logits_ptr": "*bf16"}
spec = fused_router.RouterSpec(topk=8, route_limit="node", num_groups=8, max_groups=4, gate_dtype=torch.bfloat16,
                               scaling_factor=2.5, with_cutoff=True)
const = dict(fused_router._constants(spec, 256, torch.bfloat16), BLOCK_T=16, HAS_VALID=True, COUNT=True, PRECISE=True)
backward = ("E", "E_PAD", "BLOCK_T", "SCORE", "GATE", "ROUND", "HAS_SCALING", "PRECISE")
for kernel, names in ((rk.router_fwd_kernel, tuple(const)), (rk.router_bwd_kernel, backward)):
    signature = {n: types.get(n, "constexpr") for n in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs={n: const[n] for n in names}),
                              target=GPUTarget("cuda", 90, 32))
    print(kernel.__name__, len(compiled.asm["cubin"]), "bytes of sm_90 cubin")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests compile and run the kernels")
def test_kernels_compile_for_a_gpu_without_one():
    """Compile both kernels for sm_90 with Triton's own ptxas (no GPU needed), outside the interpreter: catches
    what the interpreter accepts and the GPU compiler refuses (it caught a non-constexpr global)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                          timeout=300)
    if done.returncode and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("Triton's ptxas is missing on this install")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("bytes of sm_90 cubin") == 2
