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
    """The TopKRouters of a trainer's model (or of a model)."""
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in getattr(trainer, "model", trainer).modules() if isinstance(m, TopKRouter)]


def _rng_state():
    """The RNG streams a router may draw from in training (Megatron's input jitter and forced random logits):
    torch's global generator and Megatron's model-parallel tracker."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return torch.get_rng_state(), get_cuda_rng_tracker().get_states()


def _set_rng_state(state) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state[0])
    get_cuda_rng_tracker().set_states(state[1])


def replayed_experts_TK(num_tokens: int, topk: int, num_experts: int) -> torch.Tensor:
    """A choice no router makes, for REPLAY_FORWARD: token t takes expert 0 and experts 1 + (t + j) % (E - 1),
    j < K - 1 (expert 0 overloaded, so a bias learning from these loads moves)."""
    others = 1 + (torch.arange(num_tokens).unsqueeze(1) + torch.arange(topk - 1)) % (num_experts - 1)
    return torch.cat([torch.zeros(num_tokens, 1, dtype=torch.long), others], dim=1)


def _arm_replay(trainer, replay: str | None) -> None:
    """RouterReplay's action on every router of ``trainer``: "record", or "forward" (replay a fixed choice
    of ``replayed_experts_TK`` on every call)."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    if replay is None:
        return
    tokens = trainer.args.seq_length * trainer.args.micro_batch_size
    for router in _routers(trainer):
        if replay == "record":
            router.router_replay.set_router_replay_action(RouterReplayAction.RECORD)
        else:
            experts_TK = replayed_experts_TK(tokens, router.topk, router.config.num_moe_experts)
            router.router_replay.set_target_indices(experts_TK)
            router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)


def _recorded(trainer) -> list:
    return [r.router_replay.get_recorded_indices() for r in _routers(trainer) if r.router_replay is not None]


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


def pair_case(workdir: str, name: str, flags: Sequence[str], initial_bias: bool = False,
              replay: str | None = None) -> dict:
    """Native against plugin on this rank; plain numbers and booleans (picklable). ``initial_bias``: start
    both from the same non-zero bias (as loaded from a checkpoint), for the fixed bias of rate 0. ``replay``:
    RouterReplay's action on every router of both ("record" or "forward", with ``--moe-enable-routing-replay``)."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    from megatron_moe_lossfree.megatron.router import LossFreeRouter
    from megatron_moe_lossfree.training.checkpoint import unwrap

    RouterReplay.clear_global_router_replay_instances()  # the previous case's routers
    native = _setup(["--megatron-router", "--lossfree-balancing", "none", *flags], os.path.join(workdir, f"n-{name}"))
    plugin = _setup(plugin_flags(flags), os.path.join(workdir, f"p-{name}"))
    assert all(isinstance(r, LossFreeRouter) for r in _routers(plugin)) and _routers(plugin)
    assert not any(isinstance(r, LossFreeRouter) for r in _routers(native))
    start = {}
    for router in _routers(native) if initial_bias else ():
        router.expert_bias.copy_(torch.linspace(-0.05, 0.05, router.expert_bias.numel()).roll(router.layer_number))
        start[router.layer_number] = router.expert_bias.clone()
    unwrap(plugin.model).load_state_dict(unwrap(native.model).state_dict(), strict=True)
    for trainer in (native, plugin):
        _arm_replay(trainer, replay)

    rng = _rng_state()  # both runs draw the same jitter and random logits
    native_losses, native_maps, native_state = _run(native)
    _set_rng_state(rng)
    plugin_losses, plugin_maps, plugin_state = _run(plugin)
    recorded = [_recorded(t) for t in (native, plugin)]
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
        "bias_fixed": bool(start) and all(torch.equal(r.expert_bias, start[r.layer_number])
                                          for trainer in (native, plugin) for r in _routers(trainer)),
        "mtp_bias_keys": [n for n, _, _ in pairs if n.startswith("mtp.")],
        "mtp_bias_moved": all(bool(native_state[n].abs().sum() > 0) for n, _, _ in pairs if n.startswith("mtp.")),
        "native_mtp_losses": native.mtp_loss_history, "plugin_mtp_losses": plugin.mtp_loss_history,
        "maps": len(native_maps),
        "maps_equal": len(native_maps) == len(plugin_maps)
        and all(torch.equal(a, b) for a, b in zip(native_maps, plugin_maps)),
        "dropped": sum(int(m.sum()) for m in native_maps) < sum(m.shape[0] for m in native_maps) * 2,
        # RECORD: both recorded every router's last choice, the same one
        "recorded": sum(x is not None for x in recorded[0]),
        "recorded_equal": len(recorded[0]) == len(recorded[1]) and all(
            a is not None and b is not None and torch.equal(a, b) for a, b in zip(*recorded)),
        # REPLAY_FORWARD: every routing map is the replayed choice
        "maps_replayed": replay == "forward" and all(
            torch.equal(m, torch.zeros_like(m).scatter(1, replayed_experts_TK(m.shape[0], 2, m.shape[1]), True))
            for m in native_maps),
    }


# -- bf16 (CPU): the router in Megatron's default precision ----------------------------------------------
# mlf-pretrain refuses --bf16 without CUDA (Megatron's mixed-precision optimizer checks CUDA tensor types), so
# these cases build the two GPT models themselves under Float16Module (bf16 weights, activations and router
# logits, no moe_router_dtype) and train them with plain bf16 SGD on the same random token batches: per step,
# every micro-batch's forward and backward, then Megatron's own expert-bias update (native) or the plugin's
# balancer (plugin), then the same SGD step on both.
# One dense and two MoE layers, 2 steps of 2 micro-batches (the bias moves after step 1 and routes step 2).
BF16_STEPS, BF16_MICRO_BATCHES, BF16_LR = 2, 2, 0.05
BF16_MODEL = ["--num-layers", "3"]


def _bf16_model(flags: Sequence[str], plugin: bool):
    import dataclasses

    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.module import Float16Module

    from megatron_moe_lossfree.megatron import compat, cpu_runtime
    from megatron_moe_lossfree.megatron.specs import get_lossfree_block_spec
    from megatron_moe_lossfree.training.arguments import parse_args
    from megatron_moe_lossfree.training.model import transformer_config_from_args
    from megatron_moe_lossfree.training.pretrain import init_distributed, init_model_parallel

    args = parse_args([*MODEL, *BF16_MODEL, *(plugin_flags(flags) if plugin else
                                               ["--megatron-router", "--lossfree-balancing", "none", *flags])])
    cpu_runtime.activate()
    init_distributed()
    init_model_parallel(args)
    compat.seed_model_parallel_rng(args.seed)
    torch.manual_seed(args.seed)
    # Megatron's default router precision (mlf-pretrain's --moe-router-dtype defaults to fp32)
    config = dataclasses.replace(transformer_config_from_args(args), bf16=True, params_dtype=torch.bfloat16,
                                 pipeline_dtype=torch.bfloat16, moe_router_dtype=None)
    model = GPTModel(config=config, transformer_layer_spec=get_lossfree_block_spec(config, use_plugin=plugin),
                     vocab_size=args.vocab_size, max_sequence_length=args.seq_length,
                     position_embedding_type="rope", share_embeddings_and_output_weights=False)
    return args, config, Float16Module(config, model)


def _bf16_train(args, config, model, plugin: bool) -> tuple[list, list]:
    from megatron.core.distributed.finalize_model_grads import (
        _update_router_expert_bias,
        reset_model_temporary_tensors,
    )

    from megatron_moe_lossfree.megatron.balancer import BiasBalancer, find_routers
    from megatron_moe_lossfree.megatron.dropin import resolve_lossfree

    balancer = None
    if plugin:
        balancer = BiasBalancer([model], resolve_lossfree(config), group=None, topk=config.moe_router_topk)
    maps = []
    hooks = [r.register_forward_hook(lambda module, inputs, out: maps.append(out[1].detach().clone()))
             for r in _routers(model)]
    generator = torch.Generator().manual_seed(7)
    losses = []
    for _ in range(BF16_STEPS):
        step_loss = 0.0
        for _ in range(BF16_MICRO_BATCHES):
            tokens = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length + 1),
                                   generator=generator)
            positions = torch.arange(args.seq_length).expand(args.micro_batch_size, -1)
            out = model(tokens[:, :-1], positions, attention_mask=None, labels=tokens[:, 1:])
            loss = out.float().mean() / BF16_MICRO_BATCHES
            loss.backward()
            step_loss += float(loss)
        if plugin:
            balancer.step()
        elif config.moe_router_enable_expert_bias:
            _update_router_expert_bias([model], config)
            reset_model_temporary_tensors(config, [model])
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-BF16_LR)
                    p.grad = None
        losses.append(step_loss)
    for hook in hooks:
        hook.remove()
    assert not plugin or find_routers([model])
    return losses, maps


def bf16_pair_case(workdir: str, name: str, flags: Sequence[str]) -> dict:
    """Native against plugin in bf16 on one rank; the same report as ``pair_case``."""
    native_args, native_config, native = _bf16_model(flags, plugin=False)
    _, plugin_config, plugin = _bf16_model(flags, plugin=True)
    assert native_config.moe_router_dtype is None and next(native.parameters()).dtype == torch.bfloat16
    plugin.module.load_state_dict(native.module.state_dict(), strict=True)
    native_losses, native_maps = _bf16_train(native_args, native_config, native, plugin=False)
    plugin_losses, plugin_maps = _bf16_train(native_args, plugin_config, plugin, plugin=True)
    native_state, plugin_state = native.module.state_dict(), plugin.module.state_dict()
    tensors = [k for k, v in native_state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    biases = [k for k in tensors if is_bias(k)]
    return {
        "native_losses": native_losses, "plugin_losses": plugin_losses,
        "param_diff": max(float((native_state[k].double() - plugin_state[k].double()).abs().max())
                          for k in tensors if not is_bias(k)),
        "bias_keys": len(biases), "bias_equal": all(torch.equal(native_state[k], plugin_state[k]) for k in biases),
        "bias_diff": {k: (native_state[k] - plugin_state[k]).tolist() for k in biases},
        "bias_moved": any(bool(native_state[k].abs().sum() > 0) for k in biases),
        "bias_fp32": all(plugin_state[k].dtype == native_state[k].dtype == torch.float32 for k in biases),
        "maps": len(native_maps),
        "maps_equal": len(native_maps) == len(plugin_maps)
        and all(torch.equal(a, b) for a, b in zip(native_maps, plugin_maps)),
        "dropped": False,
    }
