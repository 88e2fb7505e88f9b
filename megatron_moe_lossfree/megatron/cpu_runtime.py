"""CPU runtime: lets Megatron-Core's training stack run on a CPU-only torch with gloo.

This is the ONE module that changes Megatron/torch behaviour, and only when no CUDA device is present:
``activate()`` returns False and touches nothing on a GPU machine. It exists so that the demo, CI and
every test run the real Megatron-Core code paths (GPTModel with the local spec, Megatron DDP, Megatron's
optimizer, ``get_forward_backward_func`` schedules, dist_checkpointing) on a laptop CPU.

What it neutralises (see shared notes/megatron_core_map.md, "Running on CPU"):

1. ``torch.cuda.current_device()`` and streams/events: routers, grad buffers and the alltoall dispatcher
   ask for the CUDA device or a CUDA stream; here they get ``"cpu"`` and inert stream/event objects.
2. ``device="cuda"`` / ``.cuda()`` / ``.to("cuda")`` in forward code (causal masks, schedules, optimizer
   scalars): a TorchFunctionMode maps them to the CPU.
3. ``clip_grad_by_total_norm_fp32`` asserts ``torch.cuda.FloatTensor``: replaced by a CPU equivalent.
4. ``dist.all_to_all_single`` with split sizes given as tensors (torch 2.13 gloo wants lists), and
   ``dist.all_gather`` with uneven shapes (gloo needs equal shapes): thin wrappers.
5. ``WrappedTorchNorm`` refuses sequence parallelism: a norm that tags its params ``sequence_parallel``
   (Megatron all-reduces those grads over TP, as it does for TE's norms).
6. ``@jit_fuser`` is ``torch.compile``: a cold compile costs ~15 s per shape on CPU, so dynamo is disabled.

7. Activation recompute saves and restores the CUDA RNG state: there is none, so that part is inert
   (the CPU RNG state is still saved and restored by Megatron itself). The recompute runs inside
   autograd's backward, where the TorchFunctionMode of (2) is not active: it is entered there too.

Megatron's RNG tracker needs CUDA; ``seed_model_parallel_rng`` uses the inference (CPU) tracker instead.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_ACTIVE = False


def is_active() -> bool:
    """True once ``activate()`` has patched this process for CPU."""
    return _ACTIVE


def activate() -> bool:
    """Patch this process for CPU training when CUDA is absent; idempotent. Returns whether active.

    Call before building any Megatron object. It imports ``megatron.core`` pieces itself.
    """
    global _ACTIVE
    if _ACTIVE:
        return True
    if torch.cuda.is_available():
        return False
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    torch._dynamo.config.disable = True
    _patch_cuda_queries()
    _CudaToCpuMode().__enter__()
    _patch_collectives()
    _patch_megatron()
    _ACTIVE = True
    return True


# ----------------------------------------------------------------------------------------------------
# 1. CUDA device / stream queries


class _InertEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        return None

    def wait(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _InertStream(_InertEvent):
    def wait_stream(self, *args, **kwargs):
        return None

    def wait_event(self, *args, **kwargs):
        return None

    def record_event(self, event=None):
        return event or _InertEvent()

    def __eq__(self, other):
        return isinstance(other, _InertStream)

    def __hash__(self):
        return 0


_STREAM = _InertStream()


def _patch_cuda_queries() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.Stream, cuda.Event = _InertStream, _InertEvent
    cuda.current_stream = cuda.default_stream = lambda *a, **k: _STREAM
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.synchronize = lambda *a, **k: None
    cuda.is_current_stream_capturing = lambda: False
    cuda.get_device_capability = lambda *a, **k: (0, 0)
    cuda.empty_cache = lambda: None


# ----------------------------------------------------------------------------------------------------
# 2. device="cuda" in forward code


def _to_cpu_device(device):
    if isinstance(device, bool):
        return device
    if isinstance(device, int):
        return "cpu"
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device="cuda"``, ``.cuda()`` and ``.to("cuda")`` to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs:
            kwargs = dict(kwargs, device=_to_cpu_device(kwargs["device"]))
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, int, torch.device)):
            args = (args[0], _to_cpu_device(args[1])) + tuple(args[2:])
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------
# 4. gloo collectives


def _patch_collectives() -> None:
    all_to_all_single = dist.all_to_all_single
    all_gather = dist.all_gather

    def as_list(sizes):
        return [int(x) for x in sizes.tolist()] if hasattr(sizes, "tolist") else sizes

    def all_to_all_single_cpu(output, input, output_split_sizes=None, input_split_sizes=None, *a, **k):
        return all_to_all_single(output, input, as_list(output_split_sizes), as_list(input_split_sizes), *a, **k)

    def all_gather_cpu(tensor_list, tensor, group=None, async_op=False):
        shapes = {tuple(t.shape) for t in tensor_list} | {tuple(tensor.shape)}
        if len(shapes) == 1:
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        # gloo needs equal shapes: pad the leading dim to the longest, gather, then slice.
        rows = max(t.shape[0] for t in tensor_list)
        pad = tensor.new_zeros((rows - tensor.shape[0],) + tuple(tensor.shape[1:]))
        buffers = [tensor.new_empty((rows,) + tuple(tensor.shape[1:])) for _ in tensor_list]
        all_gather(buffers, torch.cat([tensor, pad]), group=group)
        for out, buf in zip(tensor_list, buffers):
            out.copy_(buf[: out.shape[0]])
        return None

    dist.all_to_all_single = all_to_all_single_cpu
    dist.all_gather = all_gather_cpu


# ----------------------------------------------------------------------------------------------------
# 3, 5. Megatron pieces


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    for param in parameters:
        grad = getattr(param, attr, None)
        if grad is not None:
            grad.detach().mul_(clip_coeff)


def _sequence_parallel_torch_norm(cls, config, hidden_size, eps=1e-5, **kwargs):
    norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
    norm = norm_cls(hidden_size, eps=eps)
    for param in norm.parameters():
        param.sequence_parallel = config.sequence_parallel
    return norm


def _patch_megatron() -> None:
    from megatron_moe_lossfree.megatron import compat

    compat.install_import_placeholders()
    import megatron.core.optimizer.optimizer as megatron_optimizer
    from megatron.core.transformer import torch_norm

    import megatron.core.tensor_parallel.random as megatron_random

    megatron_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    megatron_random._set_cuda_rng_state = lambda *args, **kwargs: None
    recompute_backward = megatron_random.CheckpointFunction.backward

    def backward_on_cpu(ctx, *grads):
        with _CudaToCpuMode():
            return recompute_backward(ctx, *grads)

    megatron_random.CheckpointFunction.backward = staticmethod(backward_on_cpu)
    torch_norm.WrappedTorchNorm.__new__ = _sequence_parallel_torch_norm
    compat.define_missing_te_names()
