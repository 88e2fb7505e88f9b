"""Every adapter that differs between megatron-core releases (0.16.1 .. 0.19.x) lives here.

| concern                        | 0.16                                   | 0.19                                     |
|--------------------------------|----------------------------------------|------------------------------------------|
| MoE spec in a layer spec       | ``ModuleSpec(MoELayer, MoESubmodules)`` | ``functools.partial(MoELayer, submodules=...)`` |
| ``moe/ops/paged_stash.py``     | absent                                 | imports ``triton`` unconditionally       |
| ``moe_utils.te_general_gemm``  | undefined without TE (NameError)       | defined (None without TE)                |

| router gate arithmetic         | scores cast to the logits dtype, then normalised | normalised in fp32, cast at the end |
| router selection values        | sigmoid / pre-softmax scores cast to the logits dtype | fp32 scores            |
| plain top-K outside autograd   | sorted                                 | unsorted (``sorted=torch.is_grad_enabled()``) |
| MTP loss tracker               | ``tracker["values"]``                  | ``tracker["loss_values"]``               |
| MTP router                     | layer_number = num_layers + k          | ``is_mtp_layer``, layer_number = k       |
| CUDA-graph flags               | ``cuda_graph_scope`` (``enable_cuda_graph`` deprecated) | ``cuda_graph_modules``, impl ``full_iteration`` |

Other modules call these helpers instead of branching on the version themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import sys
import types
from typing import Any, Optional

from packaging.version import Version

_PAGED_STASH = "megatron.core.transformer.moe.ops.paged_stash"


@functools.lru_cache(maxsize=None)
def megatron_core_version() -> Version:
    """The installed megatron-core version (without importing megatron.core itself)."""
    from importlib.metadata import version

    return Version(version("megatron-core"))


def install_import_placeholders() -> None:
    """0.19's ``paged_stash`` imports triton at module import; give it a placeholder when triton is
    absent (CPU installs), so ``megatron.core.transformer.moe`` imports. Harmless on 0.16."""
    if importlib.util.find_spec("triton") is not None or _PAGED_STASH in sys.modules:
        return
    placeholder = types.ModuleType(_PAGED_STASH)
    placeholder.__doc__ = "megatron_moe_lossfree placeholder: triton is not installed (CPU)."
    placeholder.GLOBAL_BLOCK_SIZE = 1024
    placeholder.paged_stash_copy_kernel = None
    placeholder.paged_stash_pop_kernel = None
    sys.modules[_PAGED_STASH] = placeholder


def define_missing_te_names() -> None:
    """0.16.1 references ``te_general_gemm`` in moe_utils even without Transformer Engine."""
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


class _PluginMlpWarningFilter:
    """0.16's TransformerLayer passes ``pg_collection`` only to the exact MoELayer class and logs
    "Unknown MLP type" for subclasses; our subclass then takes Megatron's default process groups
    (parallel_state), which is what Megatron-Core itself builds. The message is expected: drop it."""

    def filter(self, record) -> bool:
        return "Unknown MLP type" not in record.getMessage()


def quiet_subclass_warning() -> None:
    import logging

    logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    if not any(isinstance(f, _PluginMlpWarningFilter) for f in logger.filters):
        logger.addFilter(_PluginMlpWarningFilter())


def seed_model_parallel_rng(seed: int) -> None:
    """Megatron's model-parallel RNG seeding; on CPU the inference tracker (no CUDA RNG state)."""
    import torch
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not torch.cuda.is_available())


def _moe_parts(mlp_spec: Any) -> Optional[tuple[type, Any]]:
    """(layer class, MoESubmodules) of a MoE mlp spec in either release's form, else None."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(mlp_spec, ModuleSpec) and isinstance(mlp_spec.module, type):
        if issubclass(mlp_spec.module, MoELayer):
            return mlp_spec.module, mlp_spec.submodules
    if isinstance(mlp_spec, functools.partial) and isinstance(mlp_spec.func, type):
        if issubclass(mlp_spec.func, MoELayer):
            return mlp_spec.func, mlp_spec.keywords.get("submodules")
    return None


def moe_classes(mlp_spec: Any) -> Optional[tuple[type, Any]]:
    """(MoE layer class, router-slot entry) of a MoE mlp spec in either release's form, else None."""
    parts = _moe_parts(mlp_spec)
    if parts is None:
        return None
    layer_cls, submodules = parts
    return layer_cls, getattr(submodules, "router", None)


def replace_moe_spec(mlp_spec: Any, *, router: Optional[type] = None, layer: Optional[type] = None) -> Any:
    """Return ``mlp_spec`` with the router slot and/or the MoE layer class replaced.

    Non-MoE specs (dense layers) come back unchanged. Works on 0.16 ModuleSpec and 0.19 partial alike.
    """
    parts = _moe_parts(mlp_spec)
    if parts is None:
        return mlp_spec
    layer_cls, submodules = parts
    if router is not None:
        submodules = dataclasses.replace(submodules, router=router)
    layer_cls = layer or layer_cls
    if isinstance(mlp_spec, functools.partial):
        return functools.partial(layer_cls, *mlp_spec.args, **dict(mlp_spec.keywords, submodules=submodules))
    return dataclasses.replace(mlp_spec, module=layer_cls, submodules=submodules)


def replace_moe_in_layer_spec(layer_spec: Any, **replacements: Any) -> Any:
    """Apply ``replace_moe_spec`` to the mlp slot of a TransformerLayer spec."""
    submodules = layer_spec.submodules
    new_mlp = replace_moe_spec(submodules.mlp, **replacements)
    if new_mlp is submodules.mlp:
        return layer_spec
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(submodules, mlp=new_mlp))


def build_mlp(mlp_spec: Any, **kwargs: Any):
    """Instantiate an mlp spec of either release: 0.19's partials are called, 0.16's ModuleSpecs built."""
    if isinstance(mlp_spec, functools.partial):
        return mlp_spec(**kwargs)
    from megatron.core.transformer.spec_utils import build_module

    return build_module(mlp_spec, **kwargs)


def is_moe_layer_spec(layer_spec: Any) -> bool:
    return _moe_parts(layer_spec.submodules.mlp) is not None


def router_gate_dtype(logits_dtype):
    """The dtype Megatron's ``topk_routing_with_score_function`` normalises the chosen gates in: 0.16 casts
    the fp32 scores to the logits' dtype first (``.type_as(logits)``); 0.17+ keeps fp32 and casts the probs
    at the end. The plugin's router follows the installed release so its probs equal Megatron's."""
    import torch

    return torch.float32 if megatron_core_version() >= Version("0.17") else logits_dtype


def router_selection_dtype(logits_dtype):
    """The dtype of the scores Megatron's ``topk_routing_with_score_function`` takes its top-K on (sigmoid,
    sqrtsoftplus, softmax before the top-K): 0.16 rounds the fp32 scores back to the logits' dtype
    (``sigmoid(logits.float()).type_as(logits)``: bf16 without ``moe_router_dtype``), 0.17+ keeps fp32.
    Softmax after the top-K selects on the logits themselves in every release. Read in 0.16.1 and 0.19.2;
    the 0.17 cut is ``router_gate_dtype``'s (the same rewrite of that function)."""
    import torch

    return torch.float32 if megatron_core_version() >= Version("0.17") else logits_dtype


def router_topk_sorted() -> bool:
    """Whether Megatron's plain (not group-limited) router top-K sorts: 0.19 sorts only with grad enabled
    (``sorted=torch.is_grad_enabled()``), 0.16 always. Under ties the chosen set can follow the flag. Read in
    0.16.1 and 0.19.2 (0.17 / 0.18 not checked)."""
    import torch

    return torch.is_grad_enabled() if megatron_core_version() >= Version("0.19") else True
def is_graph_capturing() -> bool:
    """Is a CUDA graph being captured on the current stream (False without CUDA)?"""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def is_graph_warmup() -> bool:
    """Is this an eager warm-up run of a CUDA-graph capture (its outputs are thrown away)? Megatron's local
    graphs flag their warm-ups (``is_graph_warmup``, 0.16 and 0.19); Transformer Engine's
    ``make_graphed_callables`` warms up inside Megatron's capture window (``is_graph_capturing``) on a
    stream that is not capturing. The router counts nothing in a warm-up; the capture itself records the
    counting ops, so every replay counts."""
    import torch

    if not torch.cuda.is_available():
        return False
    from megatron.core.transformer import cuda_graphs

    return cuda_graphs.is_graph_warmup() or (cuda_graphs.is_graph_capturing()
                                             and not torch.cuda.is_current_stream_capturing())


def mtp_layer_index(router) -> Optional[int]:
    """The 1-based MTP layer of a router inside a multi-token-prediction layer, None for a decoder layer:
    0.19 flags its MTP routers (``is_mtp_layer``) and numbers them 1, 2, ..; 0.16 numbers them after the
    decoder (num_layers + 1, ..)."""
    number = getattr(router, "layer_number", None)
    if number is None:
        return None
    if getattr(router, "is_mtp_layer", False):
        return number
    num_layers = router.config.num_layers
    return number - num_layers if number > num_layers and getattr(router.config, "mtp_num_layers", None) else None


def take_mtp_losses(num_micro_batches: int) -> Optional[list]:
    """The step's per-depth MTP losses from Megatron's ``MTPLossLoggingHelper`` tracker (as Megatron-LM
    logs them: summed over micro-batches / their number, averaged over data-parallel ranks), then cleared
    (also of its size: the tracker is process-global, and the next model may have another MTP depth);
    None where this rank computed none (MTP off, or not the last pipeline stage)."""
    import torch
    import torch.distributed as dist
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tracker = MTPLossLoggingHelper.tracker
    key = "values" if "values" in tracker else "loss_values"
    if key not in tracker:
        return None
    values = tracker[key].detach().clone().float() / num_micro_batches
    group = tracker.get("avg_group")
    if group is not None and dist.get_world_size(group) > 1:  # gloo has no AVG: sum, then divide
        dist.all_reduce(values, group=group)
        values /= dist.get_world_size(group)
    tracker.clear()  # Megatron re-creates its entries at the next MTP forward, sized for that model
    return values.tolist()
