"""Balance metrics for the log, from counts the balancer already reduced (no extra work per step).

- MaxVio_batch (LFB Eq. 4, REFERENCE 2): per layer, on the global batch of the step (the bias
  update's own all-reduced counts).
- MaxVio_computation-batch (LFB 5.1): per layer and micro-batch, the counts of one micro-batch summed
  over the EP group (the ranks whose tokens meet at the experts), averaged over micro-batches. Needs one
  small all-reduce over the EP group, done on logging steps only.
- MaxVio_global: per layer, the counts of a whole evaluation (all eval iterations) summed first.
Pipeline stages hold their own layers; one all-reduce over the PP group assembles [L, E] tables, on
logging steps only. Layers are indexed by Megatron's global layer number; dense layers are skipped.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_moe_lossfree import metrics


def _by_layer(trainer, rows: torch.Tensor, *, with_mtp: bool = False):
    """Row i of ``rows`` [local routers, C] belongs to local router i. Returns the rows of every MoE layer
    of the decoder, in global layer order (and, ``with_mtp``, those of the MTP layers apart): the pipeline
    stages' rows are assembled by ONE all-reduce (every stage passes the same C) and read with ONE host
    sync."""
    from megatron.core import parallel_state as ps

    routers = trainer.balancer.routers
    device = rows.device  # the model's device: NCCL reduces GPU tensors only
    num_layers = trainer.config.num_layers
    present = torch.ones(len(routers), 1, dtype=torch.float64, device=device)
    table = torch.zeros(num_layers + (getattr(trainer.config, "mtp_num_layers", None) or 0), 1 + rows.shape[1],
                        dtype=torch.float64, device=device)
    table.index_copy_(0, torch.tensor([r.metric_layer_number() - 1 for r in routers], device=device),
                      torch.cat([present, rows.double()], dim=1))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(table, group=ps.get_pipeline_model_parallel_group())
    values = table.tolist()
    decoder = [row[1:] for row in values[:num_layers] if row[0] > 0]
    if not with_mtp:
        return decoder
    return decoder, [row[1:] for row in values[num_layers:] if row[0] > 0]


def _pp_max(value: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=ps.get_pipeline_model_parallel_group())
    return value


def _stack_or_pad(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """[n, width] float64: the rows stacked (one op when they have equal widths), zero-padded otherwise."""
    if all(r.numel() == width for r in rows):
        return torch.stack([r.reshape(-1) for r in rows]).double()
    out = torch.zeros(len(rows), width, dtype=torch.float64, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r.reshape(-1).double()
    return out


def _batch_maxvio(counts: list[torch.Tensor]) -> torch.Tensor:
    """[L] MaxVio of each local router's [E] counts (vectorised over layers of equal width)."""
    if len({c.numel() for c in counts}) == 1:
        return metrics.max_violation(torch.stack(counts))
    return torch.cat([metrics.max_violation(c.view(1, -1)) for c in counts])


def computation_batch_maxvio(trainer) -> torch.Tensor:
    """[L] per local router: mean over micro-batches of MaxVio of the EP-group-summed micro-batch counts
    (-1 where a router has no micro-batch counts)."""
    from megatron.core import parallel_state as ps

    stacks = trainer.balancer.last_micro_batch_counts
    if not stacks or any(s is None for s in stacks):
        counts = trainer.balancer.last_counts
        return torch.full((len(stacks),), -1.0, dtype=torch.float64, device=counts[0].device if counts else None)
    flat = torch.cat([s.flatten() for s in stacks])
    if ps.get_expert_model_parallel_world_size() > 1:
        dist.all_reduce(flat, group=ps.get_expert_model_parallel_group())
    if len({tuple(s.shape) for s in stacks}) == 1:  # [L, M, E]: one vectorised MaxVio
        L, (M, E) = len(stacks), stacks[0].shape
        return metrics.max_violation(flat.view(L * M, E)).view(L, M).mean(dim=1)
    values, offset = [], 0
    for s in stacks:
        values.append(metrics.max_violation(flat[offset: offset + s.numel()].view_as(s)).mean())
        offset += s.numel()
    return torch.stack(values)


def step_metrics(trainer) -> dict:
    """MaxVio_batch / computation-batch (mean and per layer), loads, biases and balance losses.

    Cheap enough for every step: the per-layer values are computed as [L, ...] tensors, packed into ONE
    table (PP: one all-reduce assembles the stages' layers) and read with ONE host sync.
    """
    balancer = trainer.balancer
    if balancer is None or not balancer.routers or not balancer.last_counts:
        return {}
    routers, counts = balancer.routers, balancer.last_counts
    device = counts[0].device  # the model's device: NCCL reduces GPU tensors only
    width = int(_pp_max(torch.tensor([max(c.numel() for c in counts)], device=device))[0])
    has_bias = routers[0].expert_bias is not None  # balancing "none" has no bias (the same on every stage)
    motion = getattr(balancer, "last_bias_motion", None) if has_bias else None
    # Columns: MaxVio_batch, width, MaxVio_computation (-1: none), loads [width], bias [width], bias motion.
    columns = [
        _batch_maxvio(counts).view(-1, 1),
        torch.tensor([[float(c.numel())] for c in counts], dtype=torch.float64, device=device),
        computation_batch_maxvio(trainer).view(-1, 1),
        _stack_or_pad(counts, width),
    ]
    if has_bias:
        columns.append(_stack_or_pad([r.expert_bias.detach() for r in routers], width))
        columns.append(motion.view(-1, 1) if motion is not None
                       else torch.zeros(len(routers), 1, dtype=torch.float64, device=device))
    layers, mtp_layers = _by_layer(trainer, torch.cat(columns, dim=1), with_mtp=True)
    out = _layer_metrics(layers, width, has_bias) if layers else {}
    if mtp_layers:  # the MTP layers' own keys: the decoder's means stay the decoder's
        out.update({"mtp_" + key: value for key, value in _layer_metrics(mtp_layers, width, has_bias).items()})
    out.update(aux_loss_metrics(trainer))
    out.update(drop_metrics(trainer))
    return out


def _layer_metrics(layers: list, width: int, has_bias: bool) -> dict:
    """The logged values of step_metrics' table rows (one row per layer)."""
    maxvio = [row[0] for row in layers]
    widths = [int(row[1]) for row in layers]
    compute = [row[2] for row in layers if row[2] >= 0]
    out = {
        "maxvio_batch": sum(maxvio) / len(maxvio),
        "maxvio_batch_layers": maxvio,
        "loads_layers": [[int(x) for x in row[3: 3 + w]] for row, w in zip(layers, widths)],
    }
    if has_bias:
        bias = [row[3 + width: 3 + width + w] for row, w in zip(layers, widths)]
        out.update(bias_layers=bias, bias_absmax_layers=[max(abs(x) for x in b) for b in bias],
                   **_bias_moments(bias), bias_motion_layers=[row[3 + 2 * width] for row in layers])
    if len(compute) == len(maxvio):
        out["maxvio_compute"] = sum(compute) / len(compute)
        out["maxvio_compute_layers"] = compute
    return out


def step_loads(trainer) -> dict:
    """Every MoE layer's loads of the step just taken (``--lossfree-dump-loads``): ``layers`` (global layer
    numbers) and ``loads`` (int per expert), in layer order. Every rank calls it (PP: one all-reduce)."""
    balancer = trainer.balancer
    if balancer is None or not balancer.routers or not balancer.last_counts:
        return {"layers": [], "loads": []}
    counts = balancer.last_counts
    device = counts[0].device
    width = int(_pp_max(torch.tensor([max(c.numel() for c in counts)], device=device))[0])
    columns = [torch.tensor([[float(r.layer_number), float(c.numel())] for r, c in zip(balancer.routers, counts)],
                            dtype=torch.float64, device=device), _stack_or_pad(counts, width)]
    rows = _by_layer(trainer, torch.cat(columns, dim=1))
    return {"layers": [int(row[0]) for row in rows],
            "loads": [[int(x) for x in row[2: 2 + int(row[1])]] for row in rows]}


def _bias_moments(bias: list[list[float]]) -> dict:
    """Per layer: the mean and the population standard deviation of the expert biases (host floats)."""
    means = [sum(b) / len(b) for b in bias]
    stds = [(sum((x - m) ** 2 for x in b) / len(b)) ** 0.5 for b, m in zip(bias, means)]
    return {"bias_mean_layers": means, "bias_std_layers": stds}


def drop_metrics(trainer) -> dict:
    """drop_fraction: dropped / assigned (token, expert) pairs, summed over all MoE layers, since the
    previous call (the counters reset here). Reduced over the balancer's group (the ranks that route
    distinct tokens) and the pipeline stages."""
    if not dropping_enabled(trainer):
        return {}
    dropped, assigned = drop_window(trainer)
    return {"drop_fraction": dropped / assigned} if assigned else {}


def dropping_enabled(trainer) -> bool:
    return getattr(getattr(trainer.config, "lossfree", None), "drop", "none") != "none"


def drop_window(trainer) -> tuple[int, int]:
    """(dropped, assigned) since the previous call, global, and the counters reset (a collective).

    The window may span a checkpoint: ``trainer.drop_carry`` holds what a save took out of the layers
    (and what a resumed job loaded), and is added here once.
    """
    from megatron.core import parallel_state as ps

    from megatron_moe_lossfree.megatron.moe_layer import find_lossfree_layers
    from megatron_moe_lossfree.megatron.router import buffer_device

    layers = find_lossfree_layers(trainer.model)
    # On the layers' device (NCCL reduces GPU tensors only); read once, below.
    device = layers[0].local_dropped.device if layers else buffer_device()
    totals = torch.zeros(2, dtype=torch.int64, device=device)
    if layers:
        totals += torch.stack([torch.stack([l.local_dropped, l.local_assigned]) for l in layers]).sum(0)
    for layer in layers:
        layer.reset_drop_counts()
    group = trainer.balancer.group if trainer.balancer is not None else None
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(totals, group=group)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(totals, group=ps.get_pipeline_model_parallel_group())
    carried, trainer.drop_carry = trainer.drop_carry, (0, 0)
    dropped, assigned = totals.tolist()
    return dropped + carried[0], assigned + carried[1]


def aux_loss_metrics(trainer) -> dict:
    """The balance losses of the last micro-batch, mean over this stage's layers (logged when on)."""
    losses: dict[str, list[torch.Tensor]] = {}
    num_layers = trainer.config.num_layers
    for router in trainer.balancer.routers:
        prefix = "mtp_" if router.metric_layer_number() > num_layers else ""  # MTP layers apart
        for name, value in router.last_aux_losses.items():
            losses.setdefault(prefix + name, []).append(value.detach().reshape(()).double())
    if not losses:
        return {}
    means = torch.stack([torch.stack(v).mean() for v in losses.values()]).tolist()  # one host sync
    return dict(zip(losses, means))


def reset_eval_counts(trainer) -> None:
    if trainer.balancer is not None:
        for router in trainer.balancer.routers:
            router.eval_tokens_per_expert.zero_()


def eval_metrics(trainer) -> dict:
    """MaxVio_global of the evaluation that just ran: counts over all eval iterations, then the ratio."""
    balancer = trainer.balancer
    if balancer is None or not balancer.routers:
        return {}
    counts = torch.cat([r.eval_tokens_per_expert for r in balancer.routers])
    if balancer.group is not None and dist.get_world_size(balancer.group) > 1:
        dist.all_reduce(counts, group=balancer.group)
    rows = list(counts.split([r.eval_tokens_per_expert.numel() for r in balancer.routers]))
    layers, mtp_layers = _by_layer(trainer, _batch_maxvio(rows).view(-1, 1), with_mtp=True)
    out = {}
    for prefix, values in (("", [row[0] for row in layers]), ("mtp_", [row[0] for row in mtp_layers])):
        if values:
            out.update({f"{prefix}maxvio_global": sum(values) / len(values), f"{prefix}maxvio_global_layers": values})
    return out


# ----------------------------------------------------------------------------- the best-bias search's dump

VALID_ROUTING = "valid_routing.pt"
VALID_ROUTING_FORMAT = "mlf-valid-routing/1"
"""``OUT/valid_routing.pt``, written at the final evaluation; read by ``ablation/floors.py``."""


def record_valid_routing(trainer) -> None:
    """Make the next evaluation keep every routed token's selection values (``collect_valid_routing``)."""
    if trainer.balancer is not None:
        for router in trainer.balancer.routers:
            router.eval_record = []


def collect_valid_routing(trainer, step: int) -> Optional[dict]:
    """What ``record_valid_routing`` kept, as the ``valid_routing.pt`` dict (docs/ablations/README.md), on
    every rank; None without balancing. A collective on every rank (call it on all of them).

    Per MoE layer: ``scores`` [T, E] fp32, the values the bias is applied to for selection (scores, or
    logits for quantile balancing in logit space), over the ranks that route distinct tokens (the
    balancer's group) and assembled over pipeline stages; ``bias`` the bias the evaluation routed with;
    ``counts`` the evaluation's global loads (its MaxVio_global). The gathers are object gathers: this
    runs once per run, at the end.
    """
    from megatron.core import parallel_state as ps

    balancer = trainer.balancer
    if balancer is None:
        return None
    local = {}
    for router in balancer.routers:
        rows, router.eval_record = router.eval_record or [], None
        width = router.config.num_moe_experts
        bias = router.expert_bias
        local[router.metric_layer_number()] = {  # MTP layers after the decoder's
            "scores": torch.cat(rows) if rows else torch.zeros(0, width),
            "counts": router.eval_tokens_per_expert.detach().cpu().clone(),
            "bias": None if bias is None else bias.detach().float().cpu().clone()}
    group = balancer.group
    if group is not None and dist.get_world_size(group) > 1:
        parts = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, local, group=group)
        local = {n: {"scores": torch.cat([p[n]["scores"] for p in parts]),
                     "counts": torch.stack([p[n]["counts"] for p in parts]).sum(0), "bias": entry["bias"]}
                 for n, entry in local.items()}
    if ps.get_pipeline_model_parallel_world_size() > 1:
        parts = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(parts, local, group=ps.get_pipeline_model_parallel_group())
        local = {n: entry for part in parts for n, entry in part.items()}
    layers = sorted(local)
    return {"format": VALID_ROUTING_FORMAT, "step": int(step), "topk": int(balancer.topk),
            "bias_kind": balancer.lossfree.bias_kind, "layers": layers,
            "scores": [local[n]["scores"] for n in layers], "bias": [local[n]["bias"] for n in layers],
            "counts": [local[n]["counts"] for n in layers]}
