"""GPU-only: the plugin's router captured in a ``torch.cuda.CUDAGraph`` (forward and backward) and replayed
over N micro-batches gives what eager runs give: bit-equal routing maps, step counts, per-micro-batch counts,
MaxVio_computation-batch and bias after the balancer's update; probs and router-weight gradients equal or
within 1e-6 relative. A second step replays the same graph on the moved bias (read in place).

    pytest -m gpu -s tests/gpu/test_cuda_graph_router.py      # ~10 s on one GPU; ``make gpu-check`` runs it

The warm-up runs before capture are flagged as Megatron flags its own (``cuda_graphs._set_warmup_start``),
so they count nothing. The CPU half (no host reads, no Python state change) is tests/unit/test_graph_capture.py.
"""

import types

import pytest
import torch

from megatron_moe_lossfree.config import LossFreeConfig

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

H, E, K, S, B, N = 64, 16, 4, 32, 4, 4

CASES = {
    "sign bias + V3 seq loss + Megatron z-loss": (LossFreeConfig(seq_aux_loss_coeff=1e-3), dict(moe_z_loss_coeff=1e-3)),
    "quantile, exact (Megatron's QB)": (LossFreeConfig(update_rule="quantile", quantile_ema=0.5), {}),
    "node-limited, Megatron's flags only": (None, dict(moe_router_num_groups=4, moe_router_group_topk=2,
                                                       moe_router_enable_expert_bias=True)),
}


def _router(lossfree, overrides):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_moe_lossfree.megatron.dropin import MEGATRON_ONLY
    from megatron_moe_lossfree.megatron.router import LossFreeRouter
    from megatron_moe_lossfree.megatron.transformer_config import LossFreeTransformerConfig

    config = LossFreeTransformerConfig(
        lossfree=lossfree or MEGATRON_ONLY, num_layers=1, hidden_size=H, num_attention_heads=4,
        num_moe_experts=E, moe_router_topk=K, moe_ffn_hidden_size=32, ffn_hidden_size=32,
        moe_router_score_function="sigmoid", moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        add_bias_linear=False, use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        normalization="RMSNorm", moe_router_dtype="fp32", **overrides)
    torch.manual_seed(0)
    router = LossFreeRouter(config=config, pg_collection=get_default_pg_collection())
    router.set_layer_number(1)
    return router.cuda()


def _pair(lossfree, overrides):
    """Two identical routers, each with its own balancer (built before capture: it re-seats the buffers)."""
    from megatron_moe_lossfree.megatron.balancer import BiasBalancer

    eager, graphed = _router(lossfree, overrides), _router(lossfree, overrides)
    graphed.load_state_dict(eager.state_dict())
    with torch.no_grad():
        graphed.weight.copy_(eager.weight)
    return [(r, BiasBalancer([r], r.lossfree, topk=K)) for r in (eager, graphed)]


def _loss(probs_TE, w_TE):
    return (probs_TE * w_TE).sum()


def _capture(router, x_static, w_static):
    """Megatron-style: warm up on a side stream (flagged, so nothing counts), then capture fwd + bwd."""
    from megatron.core.transformer import cuda_graphs

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda_graphs._set_warmup_start()
        try:
            for _ in range(3):
                _loss(router(x_static)[0], w_static).backward()
        finally:
            cuda_graphs._set_warmup_end()
    torch.cuda.current_stream().wait_stream(stream)
    assert int(router.local_tokens_per_expert.sum()) == 0 and int(router.micro_batch_index) == 0
    router.weight.grad = None  # the graph owns the gradient it writes
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        probs_TE, map_TE = router(x_static)
        _loss(probs_TE, w_static).backward()
    return graph, probs_TE, map_TE


def _report(name, step, key, a, b, *, exact=True):
    """Print one line per quantity; True when it matches (bit-equal, or within 1e-6 relative for the
    floating outputs and gradients, whose kernels a capture may schedule differently)."""
    same = torch.equal(a, b)
    diff = (a.double() - b.double()).abs().max().item() if a.numel() and a.is_floating_point() else 0.0
    close = same or (not exact and torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-9))
    verdict = "equal" if same else (f"close (max |d| {diff:.3g})" if close else f"DIFFER (max |d| {diff:.3g})")
    print(f"[cuda-graph router] {name} step {step} {key}: {verdict}")
    return close


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", list(CASES))
def test_captured_router_replays_exactly_like_eager(megatron_world, name):
    from megatron_moe_lossfree.training.metrics_log import computation_batch_maxvio

    (eager, eager_bal), (graphed, graphed_bal) = _pair(*CASES[name])
    g = torch.Generator().manual_seed(1)
    x_static = torch.zeros(S, B, H, device="cuda", requires_grad=True)
    w_static = torch.zeros(S * B, E, device="cuda")
    graph, probs_static, map_static = _capture(graphed, x_static, w_static)
    failures = []
    for step in (1, 2):
        batches = [(torch.randn(S, B, H, generator=g), torch.randn(S * B, E, generator=g)) for _ in range(N)]
        for i, (x, w) in enumerate(batches):
            eager.weight.grad = None
            probs_e, map_e = eager(x.cuda().requires_grad_(True))
            _loss(probs_e, w.cuda()).backward()
            with torch.no_grad():
                x_static.copy_(x)
                w_static.copy_(w)
            graph.replay()
            for key, a, b, exact in (("probs", probs_e, probs_static, False),
                                     ("routing map", map_e, map_static, True),
                                     ("router weight grad", eager.weight.grad, graphed.weight.grad, False)):
                if not _report(name, step, f"micro-batch {i} {key}", a, b, exact=exact):
                    failures.append(f"step {step} micro-batch {i} {key}")
        eager_bal.step()
        graphed_bal.step()
        pairs = [("counts", eager_bal.last_counts[0], graphed_bal.last_counts[0]),
                 ("micro-batch counts", eager_bal.last_micro_batch_counts[0], graphed_bal.last_micro_batch_counts[0]),
                 ("MaxVio_computation-batch", computation_batch_maxvio(types.SimpleNamespace(balancer=eager_bal)),
                  computation_batch_maxvio(types.SimpleNamespace(balancer=graphed_bal)))]
        if eager.expert_bias is not None:
            pairs.append(("bias after update", eager.expert_bias, graphed.expert_bias))
        for key, a, b in pairs:
            if not _report(name, step, key, a, b):
                failures.append(f"step {step} {key}")
        assert int(graphed_bal.last_counts[0].sum()) == N * S * B * K
        assert graphed_bal.last_micro_batch_counts[0].shape == (N, E)
    if eager.expert_bias is not None:
        assert not torch.equal(eager.expert_bias, torch.zeros_like(eager.expert_bias)), "the bias never moved"
    assert not failures, f"{name}: graph replay differs from eager in: {', '.join(failures)}"
