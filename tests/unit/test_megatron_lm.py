"""Megatron-LM hooks (megatron_lm.py) that run without a Megatron-LM checkout: options attached to the
TransformerConfig, exactly one balancer hook, Megatron's own bias update refused."""

import types

import pytest

from megatron_moe_lossfree.config import LossFreeConfig
from megatron_moe_lossfree.megatron.megatron_lm import InstallBalancerHook, attach_lossfree


def model_config(**transformer):
    """The two attributes of Megatron-LM's GPTModelConfig that attach_lossfree uses."""
    defaults = dict(moe_router_enable_expert_bias=False)
    return types.SimpleNamespace(transformer=types.SimpleNamespace(**dict(defaults, **transformer)),
                                 post_wrap_hooks=[print])


def test_attach_sets_options_and_keeps_one_hook_after_the_others():
    config = model_config()
    first, second = LossFreeConfig(update_rate=1e-3), LossFreeConfig(update_rate=1e-2)
    attach_lossfree(config, first)
    attach_lossfree(config, second)
    assert config.transformer.lossfree is second
    assert config.post_wrap_hooks[0] is print
    hooks = config.post_wrap_hooks[1:]
    assert len(hooks) == 1 and isinstance(hooks[0], InstallBalancerHook) and hooks[0].lossfree is second


def test_megatron_expert_bias_and_plugin_bias_are_refused():
    with pytest.raises(ValueError) as info:
        attach_lossfree(model_config(moe_router_enable_expert_bias=True), LossFreeConfig())
    assert str(info.value) == (
        "--moe-router-enable-expert-bias (True) and --lossfree-balancing (bias) would both update expert_bias: "
        "drop --moe-router-enable-expert-bias, the plugin owns the update")


def test_megatron_expert_bias_is_allowed_when_the_plugin_does_not_balance():
    config = model_config(moe_router_enable_expert_bias=True)
    attach_lossfree(config, LossFreeConfig(balancing="none"))
    assert config.transformer.lossfree.balancing == "none"
