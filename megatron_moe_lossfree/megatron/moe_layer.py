"""LossFreeMoELayer: Megatron-Core's MoELayer with the plugin's dropping policy; Megatron's dispatchers.

Placed through the layer spec (``specs.py``); the dispatcher type string stays Megatron's own.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_moe_lossfree.config import LossFreeConfig


class LossFreeMoELayer(MoELayer):
    """MoELayer that tells its router the EP layout (device-limited routing) and applies dropping."""

    def __init__(self, config, submodules=None, layer_number: Optional[int] = None, pg_collection=None,
                 lossfree: Optional[LossFreeConfig] = None, **kwargs):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection, **kwargs)
        self.lossfree = lossfree or getattr(config, "lossfree", None) or LossFreeConfig()
        self.ep_size = self.ep_group.size() if getattr(self, "ep_group", None) is not None else 1
        if hasattr(self.router, "ep_size"):
            self.router.ep_size = self.ep_size
