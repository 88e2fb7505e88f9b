"""megatron_moe_lossfree: DeepSeek-style load balancing for Megatron-Core MoE models.

Pure maths (no Megatron import, no communication): ``routing``, ``balancing``, ``dropping``, ``metrics``.
Megatron adapters: ``megatron_moe_lossfree.megatron``. Training entry: ``megatron_moe_lossfree.training``.
"""

__version__ = "0.1.0"

# megatron-core >= 0.19 imports triton unconditionally in one MoE module; on CPU installs (no triton) a
# placeholder stands in for that module. Done here, before anything imports megatron.core (compat.py).
from megatron_moe_lossfree.megatron.compat import install_import_placeholders as _install_placeholders

_install_placeholders()
