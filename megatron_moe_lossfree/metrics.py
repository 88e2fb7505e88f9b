"""Balance metrics: MaxVio (LFB eq. 4) and friends. Returns numbers, never logs.

Pure torch: no Megatron import, no communication. Definitions: REFERENCE.md section 2.
Which counts go in decides which MaxVio it is: one step's global batch (MaxVio_batch), a whole
validation set (MaxVio_global), or one computation batch (MaxVio_computation-batch, LFB 5.1).

Shape suffixes: T tokens, E experts, K top-k, L layers, D devices, G groups,
B sequences, S sequence length. ``counts_E`` / ``counts_LE`` are loads.

Papers: LFB = arXiv 2408.15664.
"""

from __future__ import annotations

import math

import torch

from megatron_moe_lossfree.errors import LossFreeConfigError


def max_violation(counts: torch.Tensor) -> float | torch.Tensor:
    """LFB eq. 4: MaxVio = (max_i Load_i - mean Load) / mean Load.

    The mean is the load under perfect balance. counts [E] -> python float; counts [L, E] ->
    float64 tensor [L], one value per layer. A row with no tokens (mean 0) gives 0.0, not NaN.
    """
    if not isinstance(counts, torch.Tensor) or counts.dim() not in (1, 2) or counts.shape[-1] == 0:
        raise LossFreeConfigError(
            f"counts ({_describe(counts)}) must be a tensor of shape [E] or [L, E]: "
            f"pass the tokens per expert (per layer)"
        )
    counts_LE = counts.detach().to(torch.float64).reshape(-1, counts.shape[-1])
    mean_L = counts_LE.mean(dim=-1)
    excess_L = counts_LE.max(dim=-1).values - mean_L
    vio_L = torch.where(mean_L > 0, excess_L / mean_L.clamp_min(1e-300), torch.zeros_like(mean_L))
    return float(vio_L[0]) if counts.dim() == 1 else vio_L


def mean_max_violation(counts_LE: torch.Tensor) -> float:
    """The paper's reported value: MaxVio averaged over the MoE layers (LFB section 4)."""
    if not isinstance(counts_LE, torch.Tensor) or counts_LE.dim() != 2 or counts_LE.shape[0] == 0:
        raise LossFreeConfigError(
            f"counts_LE ({_describe(counts_LE)}) must be a tensor of shape [L, E] with L >= 1: "
            f"stack the per-layer counts"
        )
    return float(max_violation(counts_LE).mean())


def load_stats(counts: torch.Tensor) -> dict[str, float]:
    """min / max / mean / std (population, over all entries) of a load tensor, as python floats."""
    if not isinstance(counts, torch.Tensor) or counts.numel() == 0:
        raise LossFreeConfigError(
            f"counts ({_describe(counts)}) must be a non-empty tensor: pass the tokens per expert"
        )
    values = counts.detach().to(torch.float64).reshape(-1)
    return {
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean()),
        "std": float(values.std(correction=0)),
    }


def drop_fraction(num_dropped: int | torch.Tensor, num_assigned: int | torch.Tensor) -> float:
    """Dropped token-expert assignments / routed assignments (0.0 when nothing was routed).

    Either argument may be a python number or a tensor of counts (summed, e.g. over layers)."""
    dropped, assigned = _as_number(num_dropped), _as_number(num_assigned)
    if not 0 <= dropped <= assigned:
        raise LossFreeConfigError(
            f"num_dropped ({dropped}) must be between 0 and num_assigned ({assigned}): "
            f"count both over the same assignments"
        )
    return dropped / assigned if assigned > 0 else 0.0


def bias_stats(bias: torch.Tensor) -> dict[str, float]:
    """mean / min / max / L2 norm of a bias ([E] or [L, E], over all entries), as python floats."""
    if not isinstance(bias, torch.Tensor) or bias.numel() == 0 or not bias.is_floating_point():
        raise LossFreeConfigError(
            f"bias ({_describe(bias)}) must be a non-empty floating tensor: pass the expert bias"
        )
    values = bias.detach().to(torch.float64).reshape(-1)
    return {
        "mean": float(values.mean()),
        "min": float(values.min()),
        "max": float(values.max()),
        "norm": float(torch.linalg.vector_norm(values)),
    }


def _as_number(value: int | float | torch.Tensor) -> float:
    number = float(value.detach().sum()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(number):
        raise LossFreeConfigError(f"count ({number}) must be finite: pass token counts")
    return number


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype}, shape {tuple(value.shape)}"
    return repr(value)
