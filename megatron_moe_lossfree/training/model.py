"""Model construction: TransformerConfig from arguments, GPTModel per pipeline stage, Megatron DDP."""

from __future__ import annotations

import argparse

import torch


def transformer_config_from_args(args: argparse.Namespace):
    """Megatron's TransformerConfig, fields named as Megatron names them."""
    from megatron_moe_lossfree.megatron.te import fp8_config_fields
    from megatron_moe_lossfree.megatron.transformer_config import LossFreeTransformerConfig

    dense = args.moe_first_dense_layers
    return LossFreeTransformerConfig(
        lossfree=args.lossfree,
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size, moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        num_moe_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
        moe_layer_freq=[0] * dense + [1] * (args.num_layers - dense),
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        **megatron_router_fields(args),
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_grouped_gemm=args.transformer_impl == "transformer_engine",  # TEGroupedMLP experts
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        sequence_parallel=args.sequence_parallel,
        pipeline_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32, bf16=args.bf16,
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=args.init_method_std, use_cpu_initialization=not torch.cuda.is_available(),
        recompute_granularity="full" if args.recompute_activations else None,
        recompute_method="uniform" if args.recompute_activations else None,
        recompute_num_layers=1 if args.recompute_activations else None,
        **fp8_config_fields(args.fp8_format, args.fp8_recipe),
        **mtp_fields(args),
    )


def mtp_fields(args: argparse.Namespace) -> dict:
    """Megatron's multi-token prediction fields, only when asked (Megatron's defaults otherwise)."""
    if not getattr(args, "mtp_num_layers", None):
        return {}
    fields = dict(mtp_num_layers=args.mtp_num_layers, mtp_loss_scaling_factor=args.mtp_loss_scaling_factor)
    if getattr(args, "mtp_use_repeated_layer", False):
        from megatron_moe_lossfree.errors import LossFreeConfigError
        from megatron_moe_lossfree.megatron.compat import megatron_core_version

        if megatron_core_version().release < (0, 19):
            raise LossFreeConfigError(f"--mtp-use-repeated-layer needs megatron-core >= 0.19 (installed "
                                      f"{megatron_core_version()}): drop it, or upgrade megatron-core")
        fields["mtp_use_repeated_layer"] = True
    return fields


def megatron_router_fields(args: argparse.Namespace) -> dict:
    """Megatron's router/MoE TransformerConfig fields from mlf-pretrain's flags (Megatron's names and
    meanings; with the plugin's router, ``megatron/dropin.py`` honours, maps or refuses each)."""
    types = args.moe_router_load_balancing_type
    coeffs = args.moe_aux_loss_coeff
    newer = {}
    if args.moe_router_quantile_balancing_ema:  # a 0.19 field: only set when asked (0.16 lacks it)
        newer["moe_router_quantile_balancing_ema"] = args.moe_router_quantile_balancing_ema
    if args.moe_router_force_biased is not None:  # a 0.19 field too
        newer["moe_router_force_biased"] = args.moe_router_force_biased
    return dict(
        **newer,
        moe_router_score_function=args.moe_router_score_function,
        moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=args.moe_router_bias_update_rate,
        moe_router_load_balancing_type=types[0] if len(types) == 1 else list(types),
        moe_aux_loss_coeff=coeffs[0] if len(coeffs) == 1 else list(coeffs),
        moe_z_loss_coeff=args.moe_z_loss_coeff,
        moe_router_num_groups=args.moe_router_num_groups, moe_router_group_topk=args.moe_router_group_topk,
        moe_router_dtype=args.moe_router_dtype,
        moe_expert_capacity_factor=args.moe_expert_capacity_factor,
        moe_token_drop_policy=args.moe_token_drop_policy,
        moe_pad_expert_input_to_capacity=args.moe_pad_expert_input_to_capacity,
        moe_router_force_load_balancing=args.moe_router_force_load_balancing,
        moe_input_jitter_eps=args.moe_input_jitter_eps,
        moe_enable_routing_replay=args.moe_enable_routing_replay,
    )


def build_model(args: argparse.Namespace, config, vocab_size: int):
    """One GPTModel chunk for this pipeline stage, wrapped in Megatron DDP."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_moe_lossfree.megatron.specs import get_lossfree_block_spec, get_lossfree_mtp_block_spec

    use_te = args.transformer_impl == "transformer_engine"
    spec = get_lossfree_block_spec(config, use_plugin=not args.megatron_router, use_transformer_engine=use_te)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab_size,
                     mtp_block_spec=get_lossfree_mtp_block_spec(config, spec, use_transformer_engine=use_te),
                     max_sequence_length=args.max_position_embeddings,
                     pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                     position_embedding_type="rope", share_embeddings_and_output_weights=False)
    if torch.cuda.is_available():
        # Megatron-LM's get_model does the same: the plugin's buffers (and any module built on the host)
        # join the parameters on this rank's GPU before DDP and the balancer take views of them.
        model.cuda(torch.cuda.current_device())
    if args.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    return DistributedDataParallel(config, DistributedDataParallelConfig(), model)
