"""Per-rank cases of the drop-in equivalence matrix (run by ``harness.launch_cases``).

Each case builds two trainers in one process from the same seed, flags and batches:
- native: ``--megatron-router``, Megatron-Core's own TopKRouter, MoELayer and finalize (bias update);
- plugin: the plugin's router, MoE layer and balancer, given ONLY Megatron's flags (the plugin's own
  ``--lossfree-balancing`` is left at "none" unless Megatron's expert bias maps onto it).
The plugin starts from the native model's exact weights (``load_state_dict``, strict: same keys), both
train ``STEPS`` optimizer steps, and the case reports the per-step losses, the largest parameter
difference, whether every ``expert_bias`` is bitwise equal and whether every routing map of every
router call (all layers, micro-batches and steps) is equal.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from tests.distributed import layout_cases

STEPS = 3
# layout_cases' tiny GPT-MoE (4 layers, first dense, 8 experts top-2, a shared expert, fp32), without its
# plugin-only --lossfree-update-rate.
MODEL = [f for f in layout_cases.TINY_MODEL if f not in ("--lossfree-update-rate", "1e-2")]
MODEL[MODEL.index("--train-iters") + 1] = str(STEPS)


def plugin_flags(flags: Sequence[str]) -> list[str]:
    """Only Megatron's flags; the plugin's default bias is turned off unless Megatron's flag maps onto it."""
    megatron_bias = "--moe-router-enable-expert-bias" in flags or "quantile_balancing" in flags
    return list(flags) if megatron_bias else [*flags, "--lossfree-balancing", "none"]


def is_bias(key: str) -> bool:
    return key.endswith("expert_bias") or key.endswith("qb_beta")


def _setup(flags: Sequence[str], out: str):
    from megatron_moe_lossfree.training.arguments import parse_args
    from megatron_moe_lossfree.training.pretrain import setup

    trainer = setup(parse_args([*MODEL, *flags, "--out", out]))
    for part in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        for group in part.optimizer.param_groups:
            group["eps"] = layout_cases.ADAM_EPS
    return trainer


def _routers(trainer) -> list:
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in trainer.model.modules() if isinstance(m, TopKRouter)]


def _run(trainer) -> tuple[list, list, dict]:
    maps = []
    hooks = [r.register_forward_hook(lambda module, args, out: maps.append(out[1].detach().clone()))
             for r in _routers(trainer)]
    losses, mtp_losses = [], []
    for _ in range(STEPS):
        losses.append(trainer.train_step())
        mtp_losses.append(trainer.mtp_losses)  # Megatron's MTP losses (None without MTP / off the last stage)
    for hook in hooks:
        hook.remove()
    state = trainer.model.module.state_dict()
    trainer.mtp_loss_history = mtp_losses
    return losses, maps, {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def pair_case(workdir: str, name: str, flags: Sequence[str]) -> dict:
    """Native against plugin on this rank; plain numbers and booleans (picklable)."""
    from megatron_moe_lossfree.megatron.router import LossFreeRouter
    from megatron_moe_lossfree.training.checkpoint import unwrap

    native = _setup(["--megatron-router", "--lossfree-balancing", "none", *flags], os.path.join(workdir, f"n-{name}"))
    plugin = _setup(plugin_flags(flags), os.path.join(workdir, f"p-{name}"))
    assert all(isinstance(r, LossFreeRouter) for r in _routers(plugin)) and _routers(plugin)
    assert not any(isinstance(r, LossFreeRouter) for r in _routers(native))
    unwrap(plugin.model).load_state_dict(unwrap(native.model).state_dict(), strict=True)

    native_losses, native_maps, native_state = _run(native)
    plugin_losses, plugin_maps, plugin_state = _run(plugin)
    param_diff = max(float((native_state[k].double() - plugin_state[k].double()).abs().max())
                     for k in native_state if not is_bias(k) and native_state[k].is_floating_point())
    # Megatron's quantile balancing keeps qb_beta; the plugin's bias is expert_bias = -qb_beta.
    pairs = [(k, k, 1.0) for k in native_state if k.endswith("expert_bias")]
    pairs += [(k, k[: -len("qb_beta")] + "expert_bias", -1.0) for k in native_state if k.endswith("qb_beta")]
    for trainer in (native, plugin):
        trainer.logger.close()
    return {
        "native_losses": native_losses, "plugin_losses": plugin_losses, "param_diff": param_diff,
        "bias_keys": len(pairs),
        "bias_equal": all(torch.equal(sign * native_state[n], plugin_state[p]) for n, p, sign in pairs),
        "bias_diff": {n: [x for x in (sign * native_state[n] - plugin_state[p]).tolist() if x] for n, p, sign in pairs},
        "bias_moved": any(bool(native_state[n].abs().sum() > 0) for n, _, _ in pairs),
        "mtp_bias_keys": [n for n, _, _ in pairs if n.startswith("mtp.")],
        "mtp_bias_moved": all(bool(native_state[n].abs().sum() > 0) for n, _, _ in pairs if n.startswith("mtp.")),
        "native_mtp_losses": native.mtp_loss_history, "plugin_mtp_losses": plugin.mtp_loss_history,
        "maps": len(native_maps),
        "maps_equal": len(native_maps) == len(plugin_maps)
        and all(torch.equal(a, b) for a, b in zip(native_maps, plugin_maps)),
        "dropped": sum(int(m.sum()) for m in native_maps) < sum(m.shape[0] for m in native_maps) * 2,
    }
