"""Layer specs: Megatron-Core's GPT decoder block spec with the plugin's router and MoE layer.

From code: ``get_lossfree_block_spec(config, ...)`` (per-block, with dense first layers),
``get_lossfree_mtp_block_spec(config, block_spec)`` (Megatron's MTP block from it) or
``get_lossfree_layer_local_spec(...)`` (per-layer); a recipe's own layer specs: ``replace_in_layer_specs``,
which refuses a MoE layer or router class that is not Megatron's (by class and slot). From Megatron-LM
main, whose ``--spec`` function is called with a ``GPTModelConfig``:
``--spec megatron_moe_lossfree.megatron.megatron_lm lossfree_gpt_layer_spec`` (docs/megatron_lm.md).
The spec is a function of the config; nothing in Megatron is patched.
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


def foreign_moe_classes(layer_specs) -> list[str]:
    """One line per MoE layer spec whose MoE layer class or router slot is not Megatron's own ``MoELayer`` /
    ``TopKRouter`` (nor already the plugin's): a model's own classes (Gemma-4's router normalises its input
    and scales the probs, MiniMax-M3's gates in fp32) would be lost if the plugin put its classes there."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.router import TopKRouter

    classes = plugin_classes()
    problems = []
    for index, spec in enumerate(layer_specs):
        found = compat.moe_classes(spec.submodules.mlp)
        if found is None:
            continue
        for slot, held, megatron_cls, ours in (("mlp", found[0], MoELayer, classes["layer"]),
                                               ("mlp.submodules.router", found[1], TopKRouter, classes["router"])):
            if held not in (megatron_cls, ours):
                name = getattr(held, "__qualname__", repr(held))
                problems.append(
                    f"layer spec {index} holds {getattr(held, '__module__', '?')}.{name} in its {slot} slot, not "
                    f"Megatron's {megatron_cls.__name__}: the plugin would replace it and lose what it adds, so "
                    f"build that model with its own spec (without the plugin)")
    return problems


def replace_in_layer_specs(layer_specs) -> list:
    """Every MoE layer spec with the plugin's router and MoE layer; refuses foreign classes (one error)."""
    from megatron_moe_lossfree.errors import LossFreeConfigError

    problems = foreign_moe_classes(layer_specs)
    if problems:
        raise LossFreeConfigError("; ".join(problems))
    classes = plugin_classes()
    compat.quiet_subclass_warning()
    return [compat.replace_moe_in_layer_spec(spec, **classes) for spec in layer_specs]


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
    return dataclasses.replace(block, layer_specs=replace_in_layer_specs(block.layer_specs))


def get_lossfree_layer_local_spec(num_experts: Optional[int] = None, moe_grouped_gemm: bool = False, **kwargs):
    """Drop-in for Megatron-Core's ``get_gpt_layer_local_spec`` with the plugin's MoE pieces."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, **kwargs)
    return replace_in_layer_specs([spec])[0]


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
