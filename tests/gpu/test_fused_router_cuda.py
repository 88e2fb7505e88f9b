"""The fused Triton router compiled for a CUDA GPU (the CPU suite runs it under Triton's interpreter).

Run on a GPU machine: ``pytest -m gpu tests/gpu/test_fused_router_cuda.py`` (``make gpu-check`` does). Checks:
  * the kernel against the pure torch path at recipe shapes (T 4096: E 256 K 8 groups 8/4 in bf16, E 512 K 10
    device-limited with a multiplicative bias, softmax, the quantile cutoff), with the interpreter tests' checks
    and bounds (``tests/unit/test_fused_router.py``); few cases, as each kernel variant compiles (seconds);
  * T 65536, E 512, K 16 (the largest shape covered) routes every token to K distinct experts and counts T*K;
  * capture in a CUDA graph: replaying it on new logits equals an eager call (no host synchronisation);
  * the plugin's router with ``--moe-router-fusion`` equals the unfused router on the GPU.
"""

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("triton")
# DeepSeek-V3's routing: E 256, K 8, 8 groups of which 4 kept, scaling 2.5 (shared by two tests: one compile)
V3 = dict(topk=8, score_function="sigmoid", bias_kind="additive", route_limit="node", num_groups=8, max_groups=4,
          scaling_factor=2.5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fields, dtype", [
    (V3, torch.bfloat16),
    (dict(topk=10, score_function="sqrtsoftplus", bias_kind="multiplicative", route_limit="device", num_groups=8,
          max_groups=4), torch.float32),
    (dict(topk=6, score_function="softmax", bias_kind="additive", gate="softmax_topk"), torch.float32),
    (dict(topk=8, score_function="sigmoid", bias_kind="additive", select_on_logits=True, with_cutoff=True),
     torch.float32),
], ids=("v3-groups-bf16", "e512-k10-device-mult", "softmax", "quantile"))  # few: each variant compiles (seconds)
def test_kernel_equals_the_torch_path_on_cuda(fields, dtype):
    from megatron_moe_lossfree.kernels.fused_router import RouterSpec
    from tests.unit.test_fused_router import check

    num_experts = 512 if fields["topk"] == 10 else 256
    check(RouterSpec(**fields), 4096, num_experts, dtype, padded=True, seed=9)


@pytest.mark.gpu
@needs_cuda
def test_largest_shape_routes_every_token():
    from megatron_moe_lossfree.kernels.fused_router import RouterSpec, fused_route

    tokens, experts, topk = 65536, 512, 16
    logits_TE = torch.randn(tokens, experts, device="cuda", dtype=torch.bfloat16)
    out = fused_route(logits_TE, torch.zeros(experts, device="cuda"), spec=RouterSpec(topk=topk))
    assert int(out.counts_E.sum()) == tokens * topk
    assert torch.equal(out.routing_map_TE.sum(1), torch.full((tokens,), topk, device="cuda"))
    assert bool((out.experts_TK.sort(1).values.diff(dim=1) > 0).all())  # K distinct experts per token


@pytest.mark.gpu
@needs_cuda
def test_capture_in_a_cuda_graph():
    from megatron_moe_lossfree.kernels.fused_router import RouterSpec, fused_route

    spec = RouterSpec(**V3)
    static_TE = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16)
    bias_E = 0.01 * torch.randn(256, device="cuda")
    valid_T = torch.rand(4096, device="cuda") > 0.1
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles) outside the capture
        fused_route(static_TE, bias_E, valid_T, spec=spec)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_route(static_TE, bias_E, valid_T, spec=spec)
    fresh_TE = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16)
    static_TE.copy_(fresh_TE)
    graph.replay()
    eager = fused_route(fresh_TE, bias_E, valid_T, spec=spec)
    for got, want in zip(captured, eager):
        if got is not None:
            assert torch.equal(got, want)
    assert int(captured.counts_E.sum()) == int(valid_T.sum()) * 8


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ["megatron-groups"])
def test_plugin_router_with_fusion_equals_unfused_on_cuda(megatron_world, name):
    from tests.unit.test_router import H
    from tests.unit.test_router_fusion import CASES, pair

    fields, lossfree = CASES[name]
    plain, fused = pair(megatron_world, fields, lossfree, torch.float32)
    plain, fused = plain.cuda(), fused.cuda()
    x = torch.randn(512, 8, H, device="cuda")
    outputs = []
    for router in (fused, plain):
        inp = x.clone().requires_grad_()
        probs_TE, map_TE = router(inp)[:2]
        probs_TE.square().sum().backward()
        outputs.append((probs_TE, map_TE, inp.grad))
    (got_probs, got_map, got_grad), (want_probs, want_map, want_grad) = outputs
    assert torch.equal(got_map, want_map)
    assert torch.equal(fused.local_tokens_per_expert, plain.local_tokens_per_expert)
    torch.testing.assert_close(got_probs, want_probs, rtol=2e-6, atol=1e-7)
    assert (got_grad - want_grad).abs().max() <= 1e-5 * want_grad.abs().max()
