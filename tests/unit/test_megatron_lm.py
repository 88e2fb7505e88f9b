"""Megatron-LM hooks (megatron_lm.py) that run without a Megatron-LM checkout: options attached to the
TransformerConfig, exactly one balancer hook, Megatron's own bias flag mapped onto the plugin."""

import sys
import types

import pytest

from megatron_moe_lossfree.config import LossFreeConfig
from megatron_moe_lossfree.megatron.megatron_lm import InstallBalancerHook, UseLossFreeMTPLayers, attach_lossfree


def model_config(**transformer):
    """The two attributes of Megatron-LM's GPTModelConfig that attach_lossfree uses."""
    defaults = dict(moe_router_enable_expert_bias=False)
    return types.SimpleNamespace(transformer=types.SimpleNamespace(**dict(defaults, **transformer)),
                                 pre_wrap_hooks=[print], post_wrap_hooks=[print])


def test_attach_sets_options_and_keeps_one_hook_after_the_others():
    config = model_config()
    first, second = LossFreeConfig(update_rate=1e-3), LossFreeConfig(update_rate=1e-2)
    attach_lossfree(config, first)
    attach_lossfree(config, second)
    assert config.transformer.lossfree is second
    assert config.post_wrap_hooks[0] is print
    hooks = config.post_wrap_hooks[1:]
    assert len(hooks) == 1 and isinstance(hooks[0], InstallBalancerHook) and hooks[0].lossfree is second
    assert config.pre_wrap_hooks[0] is print
    assert [type(h) for h in config.pre_wrap_hooks[1:]] == [UseLossFreeMTPLayers]


def test_megatron_expert_bias_is_mapped_onto_the_plugin_balancer():
    config = model_config(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=2e-3)
    attach_lossfree(config, LossFreeConfig())
    from megatron_moe_lossfree.megatron.dropin import resolve_lossfree

    effective = resolve_lossfree(config.transformer)
    assert (effective.balancing, effective.update_rule, effective.update_rate) == ("bias", "sign", 2e-3)


def test_megatron_expert_bias_with_plugin_balancing_none_is_refused_by_both_names():
    """Was a TypeError at step 1 (Megatron's update stacked the plugin's None bias)."""
    config = model_config(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=1e-3)
    with pytest.raises(ValueError) as info:
        attach_lossfree(config, LossFreeConfig(balancing="none"))
    assert str(info.value) == (
        "--moe-router-enable-expert-bias (True) and --lossfree-balancing (none) disagree: drop one (the plugin's "
        "bias then follows --moe-router-enable-expert-bias)")


@pytest.fixture
def megatron_lm_args(monkeypatch):
    """A stand-in for ``megatron.training.global_vars`` (Megatron-LM is not installed here): a job resumed
    after 3 iterations of 4 samples x 64 tokens."""
    args = types.SimpleNamespace(iteration=3, consumed_train_samples=12, seq_length=64)
    module = types.ModuleType("megatron.training.global_vars")
    module.get_args = lambda: args
    monkeypatch.setitem(sys.modules, "megatron.training", types.ModuleType("megatron.training"))
    monkeypatch.setitem(sys.modules, "megatron.training.global_vars", module)
    return args


def _v3_balancer(megatron_world, freeze_after_tokens):
    import torch

    from megatron_moe_lossfree.megatron.balancer import BiasBalancer
    from megatron_moe_lossfree.megatron.megatron_lm import megatron_lm_progress
    from tests.unit.test_router import K, make_router

    lossfree = LossFreeConfig(update_rate=1e-3, rate_schedule="v3", freeze_bias_after_tokens=freeze_after_tokens)
    model = torch.nn.ModuleList([make_router(megatron_world, lossfree=lossfree)])
    balancer = BiasBalancer([model], lossfree, group=None, topk=K)
    balancer.progress_source = megatron_lm_progress
    counts = torch.tensor([60, 4, 4, 4, 4, 4, 4, 44])  # 128 assignments = 64 tokens x K 2

    def step():
        model[0].local_tokens_per_expert.copy_(counts)
        balancer([model], None)
        return model[0].expert_bias.clone()

    return balancer, step


def test_resumed_megatron_lm_run_keeps_the_v3_freeze_point(megatron_world, megatron_lm_args):
    import torch

    # Megatron-LM's checkpoints do not hold the balancer: its step and token counts come from
    # args.iteration and args.consumed_train_samples x --seq-length at the first update.
    balancer, step = _v3_balancer(megatron_world, freeze_after_tokens=800)
    first = step()
    assert (balancer.steps, balancer.tokens_seen) == (4, 12 * 64 + 64)
    assert torch.equal(first.abs(), torch.full_like(first, 1e-3))  # 768 tokens < 800: the rate is u
    assert torch.equal(step(), first)  # 832 tokens >= 800: frozen, as in the uninterrupted run


def test_loaded_balancer_state_wins_over_the_progress_source(megatron_world, megatron_lm_args):
    balancer, step = _v3_balancer(megatron_world, freeze_after_tokens=800)
    balancer.load_state_dict({"steps": 10, "tokens_seen": 100})
    step()
    assert (balancer.steps, balancer.tokens_seen) == (11, 164)


def test_dump_loads_is_refused_under_megatron_lm_in_one_line(megatron_lm_args):
    """mlf-pretrain writes OUT/loads.jsonl; Megatron-LM has no --out, so the flag would be read by nothing."""
    import argparse

    from megatron_moe_lossfree.errors import LossFreeConfigError
    from megatron_moe_lossfree.megatron.args import add_lossfree_args
    from megatron_moe_lossfree.megatron.megatron_lm import lossfree_config_from_megatron_args

    parsed = add_lossfree_args(argparse.ArgumentParser()).parse_args(["--lossfree-dump-loads"])
    vars(megatron_lm_args).update(vars(parsed))
    with pytest.raises(LossFreeConfigError) as info:
        lossfree_config_from_megatron_args()
    assert str(info.value) == ("--lossfree-dump-loads (True) is written by mlf-pretrain only (it needs its --out): "
                               "under Megatron-LM drop it")


def test_mtp_layers_from_megatrons_default_spec_get_the_plugins_router_and_keep_every_tensor(megatron_world):
    """Megatron-LM builds the MTP block from Megatron's default decoder layer spec whatever ``--spec`` says
    (GPTModelBuilder's mtp_block_spec): the pre-wrap hook gives it the plugin's router and MoE layer, keeps
    every tensor and the RNG state, and the model then trains exactly as Megatron's own (bias 0, Megatron's
    flags: the drop-in contract): the same loss and the same gradient of every parameter."""
    import torch
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs, get_gpt_mtp_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_moe_lossfree.errors import LossFreeConfigError
    from megatron_moe_lossfree.megatron.megatron_lm import refuse_megatron_routers, use_lossfree_mtp_layers
    from megatron_moe_lossfree.megatron.router import LossFreeRouter
    from megatron_moe_lossfree.megatron.specs import get_lossfree_block_spec
    from tests.unit.test_mtp import clear_megatrons_loss_trackers
    from tests.unit.test_router import make_config

    config = make_config(mtp_num_layers=1, transformer_impl="local")
    block = get_lossfree_block_spec(config)
    last = get_gpt_decoder_layer_specs(config, use_transformer_engine=False, normalization=config.normalization)[-1]
    megatrons_mtp = get_gpt_mtp_block_spec(config, last, use_transformer_engine=False)

    def build():
        torch.manual_seed(0)
        return GPTModel(config=config, transformer_layer_spec=block, vocab_size=64, max_sequence_length=16,
                        position_embedding_type="rope", mtp_block_spec=megatrons_mtp)

    native, model = build(), build()
    assert [type(m) for m in model.mtp.modules() if isinstance(m, TopKRouter)] == [TopKRouter]
    # Without the pre-wrap hook, the balancer hook refuses Megatron's router by its module name.
    with pytest.raises(LossFreeConfigError, match=r"^--spec lossfree_gpt_layer_spec: mtp\.layers\.0\..*mlp\.router "
                                                  r"is Megatron's TopKRouter, built from another spec"):
        refuse_megatron_routers([model])
    rng = torch.get_rng_state()
    assert use_lossfree_mtp_layers(model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [type(m) for m in model.mtp.modules() if isinstance(m, TopKRouter)] == [LossFreeRouter]
    assert not use_lossfree_mtp_layers(model)  # already the plugin's: nothing to do
    refuse_megatron_routers([model])
    mine, megatrons = model.state_dict(), native.state_dict()
    for key, value in megatrons.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(mine[key], value), key
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for m in (native, model):
        clear_megatrons_loss_trackers()
        loss = m(tokens, torch.arange(16).expand(2, 16), attention_mask=None, labels=tokens).float().mean()
        loss.backward()
        losses.append(loss)
    clear_megatrons_loss_trackers()  # process-global, sized by the first model that logs: leave them empty
    assert torch.equal(losses[0], losses[1])
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name, param in native.named_parameters():
        assert param.grad is not None and torch.equal(grads[name], param.grad), name

