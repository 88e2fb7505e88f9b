"""Layer specs: Megatron-Core's GPT decoder block spec with the plugin's router and MoE layer.

From code: ``get_lossfree_block_spec(config, ...)`` (per-block, with dense first layers),
``get_lossfree_mtp_block_spec(config, block_spec)`` (Megatron's MTP block from it) or
``get_lossfree_layer_local_spec(...)`` (per-layer). From Megatron-LM main, whose ``--spec`` function is
called with a ``GPTModelConfig``: ``--spec megatron_moe_lossfree.megatron.megatron_lm lossfree_gpt_layer_spec``
(docs/megatron_lm.md). The spec is a function of the config; nothing in Megatron is patched.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_moe_lossfree.megatron import compat


def plugin_classes() -> dict:
    """The classes that fill Megatron's MoE slots: router slot and the MoE layer class."""
    from megatron_moe_lossfree.megatron.moe_layer import LossFreeMoELayer
    from megatron_moe_lossfree.megatron.router import LossFreeRouter

    return dict(router=LossFreeRouter, layer=LossFreeMoELayer)


def get_lossfree_block_spec(config, *, use_plugin: bool = True, use_transformer_engine: bool = False,
                            vp_stage: Optional[int] = None, normalization: Optional[str] = None,
                            qk_l2_norm: bool = False):
    """Megatron's ``get_gpt_decoder_block_spec`` with every MoE layer's router/layer replaced.

    ``config.moe_layer_freq`` decides which layers are MoE (e.g. ``[0] + [1] * 8``: first FFN dense).
    With ``use_plugin=False`` Megatron's own spec comes back unchanged (the built-in-router baseline).
    ``normalization`` / ``qk_l2_norm`` pass through to Megatron (Megatron-LM passes its args' values).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    block = get_gpt_decoder_block_spec(config, use_transformer_engine=use_transformer_engine,
                                       normalization=normalization, qk_l2_norm=qk_l2_norm, vp_stage=vp_stage)
    if not use_plugin:
        return block
    classes = plugin_classes()
    compat.quiet_subclass_warning()
    layers = [compat.replace_moe_in_layer_spec(spec, **classes) for spec in block.layer_specs]
    return dataclasses.replace(block, layer_specs=layers)


def get_lossfree_layer_local_spec(num_experts: Optional[int] = None, moe_grouped_gemm: bool = False, **kwargs):
    """Drop-in for Megatron-Core's ``get_gpt_layer_local_spec`` with the plugin's MoE pieces."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, **kwargs)
    compat.quiet_subclass_warning()
    return compat.replace_moe_in_layer_spec(spec, **plugin_classes())


def get_lossfree_mtp_block_spec(config, block_spec, *, use_transformer_engine: bool = False,
                                vp_stage: Optional[int] = None):
    """Megatron's ``get_gpt_mtp_block_spec``: the MTP layers repeat the decoder block's last layer spec, so
    with the plugin's block spec their MoE layers carry the plugin's router (0.16 and 0.19 alike). None
    without ``mtp_num_layers``, and on pipeline stages other than the last (Megatron places MTP there)."""
    if not getattr(config, "mtp_num_layers", None):
        return None
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    return get_gpt_mtp_block_spec(config, block_spec, use_transformer_engine=use_transformer_engine,
                                  vp_stage=vp_stage)
