"""megatron_moe_lossfree: DeepSeek-style load balancing for Megatron-Core MoE models.

Pure maths (no Megatron import, no communication): ``routing``, ``balancing``, ``dropping``, ``metrics``.
Megatron adapters: ``megatron_moe_lossfree.megatron``. Training entry: ``megatron_moe_lossfree.training``.
"""

__version__ = "0.1.0"
