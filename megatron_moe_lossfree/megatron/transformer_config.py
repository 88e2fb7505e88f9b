"""Megatron's TransformerConfig carrying the plugin's config (a subclass, not a patch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_moe_lossfree.config import LossFreeConfig


@dataclass
class LossFreeTransformerConfig(TransformerConfig):
    """TransformerConfig + ``lossfree``: the router and MoE layer read the plugin's options from here."""

    lossfree: LossFreeConfig = field(default_factory=LossFreeConfig)
    """The plugin's options (``megatron_moe_lossfree.config.LossFreeConfig``)."""
