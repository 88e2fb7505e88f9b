"""GPU-only: the TE spec with the plugin's router, bf16 vs FP8. Skipped (with the reason) without CUDA/TE.

Run on a GPU machine: ``pytest -m "gpu or fp8" tests/gpu``.
"""

import importlib.util

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_te = pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                              reason="needs Transformer Engine (pip install 'megatron_moe_lossfree[te]')")


def _layer(fp8: bool):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_moe_lossfree.megatron.specs import get_lossfree_block_spec
    from megatron_moe_lossfree.megatron.te import fp8_config_fields
    from megatron_moe_lossfree.megatron.transformer_config import LossFreeTransformerConfig
    from megatron_moe_lossfree.training.pretrain import init_distributed

    init_distributed()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(0)
    torch.manual_seed(0)
    config = LossFreeTransformerConfig(
        num_layers=2, hidden_size=256, num_attention_heads=4, ffn_hidden_size=512, moe_ffn_hidden_size=256,
        num_moe_experts=8, moe_router_topk=2, moe_grouped_gemm=True, moe_router_score_function="sigmoid",
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, bf16=True, params_dtype=torch.bfloat16,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        **fp8_config_fields("hybrid" if fp8 else None, "tensorwise"))
    spec = get_lossfree_block_spec(config, use_transformer_engine=True)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=512, max_sequence_length=128,
                    position_embedding_type="rope").cuda().bfloat16()


@pytest.mark.gpu
@needs_cuda
@needs_te
def test_te_spec_forward_backward_bf16():
    from megatron_moe_lossfree.megatron.balancer import find_routers

    model = _layer(fp8=False)
    tokens = torch.randint(0, 512, (2, 128), device="cuda")
    loss = model(tokens, torch.arange(128, device="cuda").expand(2, 128), None, labels=tokens).float().mean()
    loss.backward()
    routers = find_routers([model])
    assert all(r.expert_bias.dtype == torch.float32 for r in routers)
    assert all(int(r.local_tokens_per_expert.sum()) == 256 * 2 for r in routers)


@pytest.mark.fp8
@needs_cuda
@needs_te
def test_fp8_matches_bf16_within_tolerance_and_counts_agree():
    """Same weights and tokens: FP8 logits within 5% relative L2 of bf16; routing loads identical in layer 1
    (its router input does not pass through an FP8 GEMM); padding never counted."""
    from megatron_moe_lossfree.megatron.balancer import find_routers

    tokens = torch.randint(0, 512, (2, 128), device="cuda")
    pos = torch.arange(128, device="cuda").expand(2, 128)
    outs, counts = [], []
    for fp8 in (False, True):
        model = _layer(fp8)
        outs.append(model(tokens, pos, None).float())
        counts.append([r.local_tokens_per_expert.clone() for r in find_routers([model])])
    rel = (outs[1] - outs[0]).norm() / outs[0].norm()
    assert rel < 0.05
    assert torch.equal(counts[0][0], counts[1][0])
    assert all(int(c.sum()) == 256 * 2 for c in counts[1])
