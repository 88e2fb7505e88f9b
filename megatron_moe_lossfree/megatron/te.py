"""Transformer Engine and FP8: guards and config mapping. CPU installs never import TE.

FP8 expert GEMMs run through Megatron's own machinery: ``TransformerConfig.fp8`` / ``fp8_recipe`` make
Megatron's TransformerBlock enter its fp8 context (``megatron.core.fp8_utils.get_fp8_context``) per layer;
the plugin never calls TE's deprecated ``fp8_autocast`` itself. Token counts per expert are padded to the
FP8 GEMM alignment by Megatron's dispatcher (``moe_router_padding_for_quantization``: 16 rows, 32 for
mxfp8, ``get_align_size_for_quantization``). The plugin's loads are counted in the router from the
routing decision, before that padding and before dropping, so padding rows never count as load nor in
MaxVio.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

from megatron_moe_lossfree.errors import LossFreeConfigError

FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
# Minimum compute capability per recipe: FP8 tensor cores from Hopper (9.0; Ada 8.9 for delayed/tensorwise),
# MXFP8 from Blackwell (10.0).
_MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}


def have_transformer_engine() -> bool:
    """Whether TE is installed, without importing it."""
    return importlib.util.find_spec("transformer_engine") is not None


def _gpu_capability() -> Optional[tuple[int, int]]:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()


def check_te_request(transformer_impl: str, fp8_format: Optional[str], fp8_recipe: str,
                     *, have_te: Optional[bool] = None, capability=...) -> None:
    """Raise one clear error when TE or FP8 is asked for where it cannot run."""
    have_te = have_transformer_engine() if have_te is None else have_te
    capability = _gpu_capability() if capability is ... else capability
    if fp8_format is not None and fp8_format not in FP8_FORMATS:
        raise LossFreeConfigError(f"--fp8-format ({fp8_format}) must be one of {', '.join(FP8_FORMATS)}")
    if fp8_recipe not in FP8_RECIPES:
        raise LossFreeConfigError(f"--fp8-recipe ({fp8_recipe}) must be one of {', '.join(FP8_RECIPES)}")
    wants_te = transformer_impl == "transformer_engine" or fp8_format is not None
    if not wants_te:
        return
    what = f"--fp8-format {fp8_format}" if fp8_format else "--transformer-impl transformer_engine"
    if capability is None:
        raise LossFreeConfigError(
            f"{what} needs a CUDA GPU and Transformer Engine; this machine has no CUDA device: drop the flag "
            f"(the CPU path uses Megatron's local spec)")
    if not have_te:
        raise LossFreeConfigError(
            f"{what} needs Transformer Engine, which is not installed: pip install "
            f"'megatron_moe_lossfree[te]' on the GPU machine, or drop the flag")
    if fp8_format is not None:
        if transformer_impl != "transformer_engine":
            raise LossFreeConfigError(f"--fp8-format ({fp8_format}) needs --transformer-impl transformer_engine")
        need = _MIN_CAPABILITY[fp8_recipe]
        if tuple(capability) < need:
            raise LossFreeConfigError(
                f"--fp8-recipe ({fp8_recipe}) needs compute capability {need[0]}.{need[1]} or newer; this GPU has "
                f"{capability[0]}.{capability[1]}: use bf16, or --fp8-recipe tensorwise on Ada/Hopper")


def fp8_config_fields(fp8_format: Optional[str], fp8_recipe: str) -> dict:
    """TransformerConfig fields for FP8 expert GEMMs (Megatron's names)."""
    if fp8_format is None:
        return {}
    return dict(fp8=fp8_format, fp8_recipe=fp8_recipe, moe_router_padding_for_quantization=True)
