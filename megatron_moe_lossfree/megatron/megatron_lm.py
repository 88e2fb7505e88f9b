"""Megatron-LM integration: the hooks its ``pretrain_gpt.py`` offers, no patch.

Megatron-LM main (verified at the commit in docs/megatron_lm.md) builds the model from a
``GPTModelConfig`` (``megatron/training/models/gpt.py``), which has the three slots the plugin needs:

1. flags: ``parse_and_validate_args(extra_args_provider=add_lossfree_args)`` (``args.py``);
2. layer spec: ``GPTModelConfig.transformer_layer_spec`` may be a callable ``(model_config, vp_stage)``;
   ``--spec megatron_moe_lossfree.megatron.megatron_lm lossfree_gpt_layer_spec`` puts
   ``lossfree_gpt_layer_spec`` there (Megatron-LM calls it; it does NOT call a ``--spec`` function with
   ``num_experts``, so ``specs.get_lossfree_layer_local_spec`` is not a ``--spec`` target on main);
3. bias update: ``GPTModelConfig.post_wrap_hooks`` run after DDP wrapping, before ``train()``; our hook
   installs the ``BiasBalancer`` as ``config.finalize_model_grads_func``, which ``train()`` keeps
   ("only default it when unset", training.py), and the logger that writes the plugin's metrics to
   Megatron-LM's TensorBoard / W&B writers (``lm_logging.py``).

The router and MoE layer read ``config.lossfree``: it is set as an attribute on whatever
TransformerConfig class Megatron-LM chose (MLA and heterogeneous configs replace the class, so a
subclass would be lost).
"""

from __future__ import annotations

from typing import Optional

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

        config = get_model_config(model_chunks[0])  # the object train() reads finalize_model_grads_func from
        self.balancer = install_bias_balancer(config, model_chunks, self.lossfree)
        self.balancer.progress_source = megatron_lm_progress
        # The plugin's metrics in Megatron-LM's TensorBoard / W&B logs, at its --log-interval (lm_logging.py).
        self.logger = install_megatron_lm_logger(self.balancer, model_chunks, config)
        return model_chunks


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
