"""Megatron-LM integration: the hooks its ``pretrain_gpt.py`` offers, no patch.

Megatron-LM main (verified at the commit in docs/megatron_lm.md) builds the model from a
``GPTModelConfig`` (``megatron/training/models/gpt.py``), which has the three slots the plugin needs:

1. flags: ``parse_and_validate_args(extra_args_provider=add_lossfree_args)`` (``args.py``);
2. layer spec: ``GPTModelConfig.transformer_layer_spec`` may be a callable ``(model_config, vp_stage)``;
   ``--spec megatron_moe_lossfree.megatron.megatron_lm lossfree_gpt_layer_spec`` puts
   ``lossfree_gpt_layer_spec`` there (Megatron-LM calls it; it does NOT call a ``--spec`` function with
   ``num_experts``, so ``specs.get_lossfree_layer_local_spec`` is not a ``--spec`` target on main);
3. MTP layers: Megatron-LM's builders (``GPTModelBuilder``'s ``mtp_block_spec``, ``gpt_builders.py``) make
   them from Megatron's DEFAULT decoder layer spec, not from ``--spec``, so they would hold Megatron's
   router, whose bias the plugin (its one owner) never moves. A ``GPTModelConfig.pre_wrap_hooks`` entry
   (``UseLossFreeMTPLayers``) rebuilds each chunk's MTP block from that same default spec with the
   plugin's classes, before DDP wrapping, keeping every tensor Megatron built and the RNG states;
4. bias update: ``GPTModelConfig.post_wrap_hooks`` run after DDP wrapping, before ``train()``; our hook
   installs the ``BiasBalancer`` as ``config.finalize_model_grads_func``, which ``train()`` keeps
   ("only default it when unset", training.py), and the logger that writes the plugin's metrics to
   Megatron-LM's TensorBoard / W&B writers (``lm_logging.py``).

The router and MoE layer read ``config.lossfree``: it is set as an attribute on whatever
TransformerConfig class Megatron-LM chose (MLA and heterogeneous configs replace the class, so a
subclass would be lost).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from megatron_moe_lossfree.config import LossFreeConfig


def check_single_owner(transformer_config, lossfree: LossFreeConfig) -> None:
    """Megatron's flags against the plugin's (dropin.py): ``--moe-router-enable-expert-bias`` is mapped onto
    the plugin's balancer (one owner of ``expert_bias``); contradictions and unsupported flags are refused."""
    from megatron_moe_lossfree.megatron.dropin import resolve_lossfree

    resolve_lossfree(transformer_config, lossfree)


class InstallBalancerHook:
    """A ``post_wrap_hooks`` entry: installs the BiasBalancer on the wrapped model chunks."""

    def __init__(self, lossfree: LossFreeConfig):
        self.lossfree = lossfree
        self.balancer = None
        self.logger = None

    def __call__(self, model_chunks):
        from megatron.core.utils import get_model_config

        from megatron_moe_lossfree.megatron.balancer import install_bias_balancer
        from megatron_moe_lossfree.megatron.lm_logging import install_megatron_lm_logger

        refuse_megatron_routers(model_chunks)
        config = get_model_config(model_chunks[0])  # the object train() reads finalize_model_grads_func from
        self.balancer = install_bias_balancer(config, model_chunks, self.lossfree)
        self.balancer.progress_source = megatron_lm_progress
        # The plugin's metrics in Megatron-LM's TensorBoard / W&B logs, at its --log-interval (lm_logging.py).
        self.logger = install_megatron_lm_logger(self.balancer, model_chunks, config)
        return model_chunks


@contextlib.contextmanager
def _rng_states_kept():
    """Building a module draws initial weights: restore torch's CPU and CUDA generators and Megatron's
    model-parallel RNG tracker afterwards, so what runs next draws what it would have drawn."""
    from megatron.core import tensor_parallel

    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracked = {name: state.clone() for name, state in tracker.get_states().items()}
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        tracker.set_states(tracked)


def lossfree_mtp_block_spec(config, vp_stage: Optional[int] = None):
    """What Megatron-LM's builders give an MTP block (the last of Megatron's default decoder layer specs,
    with the config's normalization and qk_l2_norm), with the plugin's router and MoE layer in it."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs, get_gpt_mtp_block_spec

    from megatron_moe_lossfree.megatron import specs

    use_te = config.transformer_impl == "transformer_engine"
    last = get_gpt_decoder_layer_specs(config, use_transformer_engine=use_te, normalization=config.normalization,
                                       qk_l2_norm=getattr(config, "qk_l2_norm", False), vp_stage=vp_stage)[-1]
    return get_gpt_mtp_block_spec(config, specs.replace_in_layer_specs([last])[0], use_transformer_engine=use_te,
                                  vp_stage=vp_stage)


def use_lossfree_mtp_layers(model) -> bool:
    """Rebuild ``model.mtp`` with the plugin's router and MoE layer when it holds Megatron's (see the module
    docstring, item 3); True when it did. Every tensor of the built block is copied into the new one, which
    must have exactly the same names and shapes (plus the plugin's own buffers), else the block came from
    another spec and this refuses it by name."""
    import inspect

    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionBlock

    from megatron_moe_lossfree.errors import LossFreeConfigError
    from megatron_moe_lossfree.megatron.specs import plugin_classes

    mtp = getattr(model, "mtp", None)
    ours = plugin_classes()["layer"]
    if mtp is None or not any(isinstance(m, MoELayer) and not isinstance(m, ours) for m in mtp.modules()):
        return False
    config, vp_stage = model.config, getattr(model, "vp_stage", None)
    spec = lossfree_mtp_block_spec(config, vp_stage)
    kwargs = dict(config=config, spec=spec, vp_stage=vp_stage)
    if "pg_collection" in inspect.signature(MultiTokenPredictionBlock.__init__).parameters:
        kwargs["pg_collection"] = getattr(model, "pg_collection", None)
    with _rng_states_kept():
        new = MultiTokenPredictionBlock(**kwargs)
    built, fresh = mtp.state_dict(keep_vars=True), new.state_dict(keep_vars=True)
    unmatched = sorted(k for k, v in built.items() if isinstance(v, torch.Tensor) and
                       (k not in fresh or fresh[k].shape != v.shape))
    if unmatched:
        raise LossFreeConfigError(
            f"--mtp-num-layers ({config.mtp_num_layers}): this MTP block was not built from Megatron's default "
            f"decoder layer spec ({unmatched[0]} has no counterpart), so the plugin cannot give it its router: "
            f"build the model with the plugin's spec (specs.get_lossfree_mtp_block_spec) or without the plugin")
    with torch.no_grad():
        for key, value in built.items():
            if isinstance(value, torch.Tensor):
                fresh[key].copy_(value)
    model.mtp = new
    if hasattr(model, "mtp_block_spec"):
        model.mtp_block_spec = spec
    return True


class UseLossFreeMTPLayers:
    """A ``pre_wrap_hooks`` entry: ``use_lossfree_mtp_layers`` on every model chunk."""

    def __call__(self, model_chunks):
        for chunk in model_chunks:
            use_lossfree_mtp_layers(chunk)
        return model_chunks


def refuse_megatron_routers(model_chunks) -> None:
    """With the plugin on, every router is the plugin's: a Megatron ``TopKRouter`` left in the model (a
    builder that ignored ``--spec``) would route on a bias that nobody moves, since the plugin owns the
    bias update. Refused by module name."""
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_moe_lossfree.errors import LossFreeConfigError
    from megatron_moe_lossfree.megatron.specs import plugin_classes

    ours = plugin_classes()["router"]
    for chunk in model_chunks:
        for name, module in chunk.named_modules():
            if isinstance(module, TopKRouter) and not isinstance(module, ours):
                raise LossFreeConfigError(
                    f"--spec lossfree_gpt_layer_spec: {name} is Megatron's {type(module).__name__}, built from "
                    f"another spec, and the plugin (the one owner of expert_bias) would never update it: build "
                    f"every MoE layer from the plugin's spec, or run without the plugin")


def megatron_lm_progress() -> tuple[int, int]:
    """(steps, tokens seen) from Megatron-LM's own counters, which its checkpoints restore: the balancer's
    are not in them. Read at the first bias update, when ``args.iteration`` and
    ``args.consumed_train_samples`` hold the steps and samples trained before this job (0 for a fresh
    run). Every token of a sample is routed (masked ones too), so tokens = samples x ``--seq-length``:
    the V3 freeze point (``--lossfree-rate-schedule v3``) survives a Megatron-LM resume."""
    from megatron.training.global_vars import get_args

    args = get_args()
    return int(args.iteration), int(args.consumed_train_samples) * int(args.seq_length)


def attach_lossfree(model_config, lossfree: LossFreeConfig) -> None:
    """Give the TransformerConfig inside ``model_config`` the plugin's options and register the balancer
    hook; idempotent (a second call replaces the options, keeps one hook)."""
    transformer = model_config.transformer
    check_single_owner(transformer, lossfree)
    transformer.lossfree = lossfree
    hooks = model_config.post_wrap_hooks
    hooks[:] = [h for h in hooks if not isinstance(h, InstallBalancerHook)] + [InstallBalancerHook(lossfree)]
    pre = model_config.pre_wrap_hooks
    pre[:] = [h for h in pre if not isinstance(h, UseLossFreeMTPLayers)] + [UseLossFreeMTPLayers()]


def lossfree_config_from_megatron_args() -> LossFreeConfig:
    """The plugin's options from Megatron-LM's parsed args; when the flags were not added (stock
    ``pretrain_gpt.py`` has no ``extra_args_provider`` for them) Megatron's own flags decide alone."""
    from megatron.training.global_vars import get_args

    from megatron_moe_lossfree.megatron.args import lossfree_config_from_args
    from megatron_moe_lossfree.megatron.dropin import MEGATRON_ONLY

    args = get_args()
    if not hasattr(args, "lossfree_balancing"):  # stock flags: Megatron's decide (no bias unless asked)
        return MEGATRON_ONLY
    if getattr(args, "lossfree_dump_loads", False):
        from megatron_moe_lossfree.errors import LossFreeConfigError

        raise LossFreeConfigError("--lossfree-dump-loads (True) is written by mlf-pretrain only (it needs its "
                                  "--out): under Megatron-LM drop it")
    return lossfree_config_from_args(args)


def lossfree_gpt_layer_spec(model_config, vp_stage: Optional[int] = None):
    """``--spec`` target: Megatron's GPT decoder block spec with the plugin's router and MoE layer.

    Called by Megatron-LM's ``GPTModelBuilder.build_model`` once per model chunk. When the launcher did
    not attach the options (stock ``pretrain_gpt.py``), they come from the args, and the balancer hook
    is registered here: ``post_wrap_hooks`` are read after every chunk is built.
    """
    from megatron_moe_lossfree.megatron import specs

    transformer = model_config.transformer
    if getattr(transformer, "lossfree", None) is None:
        attach_lossfree(model_config, lossfree_config_from_megatron_args())
    return specs.get_lossfree_block_spec(
        transformer, use_transformer_engine=transformer.transformer_impl == "transformer_engine",
        vp_stage=vp_stage, normalization=transformer.normalization,
        qk_l2_norm=getattr(transformer, "qk_l2_norm", False))


def gpt_model_config_from_args(args):
    """Megatron-LM's ``gpt_config_from_args`` plus the plugin: options attached, spec set (unless the
    user gave ``--spec``), balancer hook registered."""
    from megatron.training.argument_utils import gpt_config_from_args

    from megatron_moe_lossfree.megatron.args import lossfree_config_from_args

    model_config = gpt_config_from_args(args)
    if model_config.transformer_layer_spec is None:
        model_config.transformer_layer_spec = lossfree_gpt_layer_spec
    attach_lossfree(model_config, lossfree_config_from_args(args))
    return model_config
