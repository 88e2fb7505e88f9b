"""Triton kernels (the fused router). Pure maths: no Megatron import, no communication.

Triton is an optional extra (``pip install 'megatron_moe_lossfree[kernels]'``): importing this package never
needs it; ``unavailable_reason()`` says why the kernels cannot run here, and ``fused_router`` imports Triton.
"""

from __future__ import annotations

import importlib.util
import os


def interpreting() -> bool:
    """True under Triton's CPU interpreter (``TRITON_INTERPRET=1``: tests only, slow)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(device_is_cuda: bool | None = None) -> str | None:
    """Why the fused router cannot run on this machine (one clause), or None when it can.

    It runs on a CUDA device, or on the host under Triton's interpreter (TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        return "needs Triton, which is not installed: pip install 'megatron_moe_lossfree[kernels]'"
    if device_is_cuda is None:
        import torch

        device_is_cuda = torch.cuda.is_available()
    if not device_is_cuda and not interpreting():
        return ("needs a CUDA device (the fused router is a Triton GPU kernel, and TRITON_INTERPRET=1 runs it on the "
                "host for tests only): run on a GPU")
    return None
