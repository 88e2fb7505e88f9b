"""Every refusal and conflict message of the drop-in contract (``dropin.refusals``, ``dropin.conflicts``) and
every plugin config violation (``config._violations``) is one line that a joined multi-problem error can be
split back into: no newline, no "; " inside a message. Refusals and conflicts also name a flag, its value in
parentheses and, after ": ", what to use. The cases below trigger every ``yield`` of those functions (counted
from their source, so a new message must come with a case here). Also: Megatron settings the plugin honours
with a caveat are said once in the log, and a spec with a model's own router or MoE layer class is refused by
class and slot."""

import dataclasses
import inspect
import logging

import pytest

from megatron_moe_lossfree import config as config_module
from megatron_moe_lossfree.config import LossFreeConfig
from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.megatron import dropin
from tests.unit.test_dropin import megatron

QB = dict(moe_router_load_balancing_type="quantile_balancing")
BIAS = dict(moe_router_enable_expert_bias=True)
REFUSAL_CASES = [  # (Megatron fields, plugin options)
    (dict(moe_router_load_balancing_type="sinkhorn"), None),
    (dict(moe_router_load_balancing_type=["quantile_balancing", "aux_loss"]), None),
    (dict(moe_router_load_balancing_type="softmax_loss"), None),
    (dict(moe_router_fusion=True), None),  # on a machine without CUDA
    (dict(moe_router_fusion=True, moe_router_dtype="fp64"), None),
    (dict(cuda_graph_impl="local", cuda_graph_scope="full_iteration"), None),
    (dict(cuda_graph_impl="local", cuda_graph_scope="moe_router"), LossFreeConfig(drop="expert", capacity_factor=1.5)),
    (dict(transformer_impl="inference_optimized"), None),
    (dict(num_moe_experts=16, moe_router_topk=4, moe_router_num_groups=8, moe_router_group_topk=5), None),
    (dict(num_moe_experts=16, moe_router_topk=4, moe_router_num_groups=16, moe_router_group_topk=2), None),
    (dict(moe_router_num_groups=4, moe_router_group_topk=2), LossFreeConfig(route_limit="device", route_max_groups=2)),
    (dict(moe_expert_capacity_factor=1.0), LossFreeConfig(drop="expert", capacity_factor=1.0)),
    (dict(moe_aux_loss_coeff=1e-2), LossFreeConfig(aux_loss_coeff=1e-3)),
    (dict(QB, **BIAS), None),
    (QB, LossFreeConfig(update_rule="proportional")),
    (QB, LossFreeConfig(quantile_ema=0.5)),
    (QB, LossFreeConfig(quantile_estimator="histogram")),
    (QB, LossFreeConfig(balancing="none")),
    (BIAS, LossFreeConfig(balancing="none")),
    (BIAS, LossFreeConfig(update_rule="proportional")),
    (BIAS, LossFreeConfig(update_rate=5e-3)),
    (BIAS, LossFreeConfig(bias_kind="multiplicative", update_rule="multiplicative")),
]
VIOLATION_CASES = [
    dict(balancing="bias_loss"), dict(update_rate=-1.0), dict(rate_schedule="v3"),
    dict(update_rule="quantile", quantile_ema=1.0),
    dict(update_rule="quantile", quantile_estimator="histogram", quantile_bins=1),
    dict(update_rule="quantile", quantile_margin=0.0), dict(bias_kind="multiplicative"),
    dict(freeze_bias_after_tokens=-1), dict(aux_loss_coeff=-1.0), dict(route_groups=0), dict(route_max_groups=0),
    dict(route_limit="device"), dict(route_limit="node", route_max_groups=2), dict(capacity_factor=0.0),
    dict(drop="expert"), dict(pad_to_capacity=True), dict(exempt_fraction=2.0), dict(check_consistency=-1),
    dict(bias_warn_bound=0.0),
    dict(rate_schedule="primal_dual"), dict(update_rule="smebu", smebu_kappa=0.0),
    dict(update_rule="smebu", smebu_momentum=1.0), dict(update_rule="phi", phi_ema=1.0),
    dict(update_rule="bip", bip_iterations=0), dict(update_rule="bip", quantile_estimator="histogram"),
    dict(rate_decay_steps=100),
]


def yields_in(*functions) -> int:
    return sum(inspect.getsource(f).count("yield (") + inspect.getsource(f).count("yield f") for f in functions)


def refusal_messages() -> list[str]:
    out = []
    for fields, lossfree in REFUSAL_CASES:
        base = lossfree or dropin.MEGATRON_ONLY
        out += list(dropin.refusals(megatron(**fields), base)) + list(dropin.conflicts(megatron(**fields), base))
    return out


def violation_messages() -> list[str]:
    out = []
    for fields in VIOLATION_CASES:
        out += list(config_module._violations(dataclasses.replace(LossFreeConfig(), **fields)))
    return out


def check_one_line(message: str) -> None:
    assert "\n" not in message and "; " not in message, message


def test_every_refusal_and_conflict_names_the_flag_its_value_and_the_fix(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the fused router's refusal on a host without CUDA
    messages = refusal_messages()
    functions = (dropin.refusals, dropin.group_limit_refusals, dropin.conflicts)
    assert len(set(messages)) == yields_in(*functions), (
        "a refusal or conflict was added without a case in REFUSAL_CASES (or a case no longer triggers)")
    for message in messages:
        check_one_line(message)
        assert message.startswith("--") and "(" in message.split(":")[0] and ": " in message, message


def test_every_config_violation_is_one_splittable_line():
    messages = violation_messages()
    assert len(set(messages)) == yields_in(config_module._violations), (
        "a config violation was added without a case in VIOLATION_CASES")
    for message in messages:
        check_one_line(message)
        assert message.startswith("--lossfree-"), message


def test_a_joined_error_splits_back_into_its_messages():
    fields = dict(moe_router_load_balancing_type="sinkhorn", transformer_impl="inference_optimized", **BIAS)
    lossfree = LossFreeConfig(update_rule="proportional", update_rate=5e-3)
    expected = list(dropin.refusals(megatron(**fields), lossfree)) + list(dropin.conflicts(megatron(**fields), lossfree))
    with pytest.raises(LossFreeConfigError) as info:
        dropin.resolve_lossfree(megatron(**fields), lossfree)
    assert len(expected) == 4 and str(info.value).split("; ") == expected


def test_rank_capacity_is_honoured_and_its_drop_counting_said_once_in_the_log(megatron_world, caplog):
    """0.19's moe_expert_rank_capacity_factor (flex dispatcher, HybridEP): accepted, the loads are counted
    before any drop, and the log says what drop_fraction does and does not count, once per process."""
    from tests.unit.test_router import make_router

    cfg = dropin.resolve_lossfree(megatron(moe_expert_rank_capacity_factor=1.5))
    assert cfg is dropin.MEGATRON_ONLY
    note = ("--moe-expert-rank-capacity-factor (1.5): the flex dispatcher (HybridEP) drops tokens over each EP "
            "rank's budget after routing. The plugin counts its loads (bias, MaxVio) before any drop, and its "
            "drop_fraction counts only the plugin's own --lossfree-drop drops, not the dispatcher's (Megatron "
            "flags those as over_budget)")
    assert dropin.notes(megatron(moe_expert_rank_capacity_factor=1.5)) == [note]
    assert dropin.notes(megatron()) == []
    dropin.log_note_once.cache_clear()
    router = make_router(megatron_world)
    with caplog.at_level(logging.WARNING, logger="megatron_moe_lossfree"):
        for _ in range(2):
            dropin.log_note_once(note)
    assert [r.getMessage() for r in caplog.records] == [note]
    assert router.lossfree.balancing == "bias"


def test_a_model_s_own_router_or_moe_layer_class_is_refused_by_class_and_slot(megatron_world):
    """Gemma-4 (router and layer) and MiniMax-M3 (router) put their own subclasses in Megatron's slots; the
    plugin refuses to overwrite them, naming the class and the slot of every layer spec at once."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_moe_lossfree.megatron import compat, specs

    class OwnRouter(TopKRouter):
        pass

    class OwnMoELayer(MoELayer):
        pass

    megatron_spec = get_gpt_layer_local_spec(num_experts=8)
    own_router = compat.replace_moe_in_layer_spec(megatron_spec, router=OwnRouter)
    own_both = compat.replace_moe_in_layer_spec(megatron_spec, router=OwnRouter, layer=OwnMoELayer)
    dense = get_gpt_layer_local_spec()
    with pytest.raises(LossFreeConfigError) as info:
        specs.replace_in_layer_specs([dense, own_router, megatron_spec, own_both])
    where = f"{__name__}.test_a_model_s_own_router_or_moe_layer_class_is_refused_by_class_and_slot.<locals>"
    fix = "the plugin would replace it and lose what it adds, so build that model with its own spec (without the plugin)"
    assert str(info.value).split("; ") == [
        f"layer spec 1 holds {where}.OwnRouter in its mlp.submodules.router slot, not Megatron's TopKRouter: {fix}",
        f"layer spec 3 holds {where}.OwnMoELayer in its mlp slot, not Megatron's MoELayer: {fix}",
        f"layer spec 3 holds {where}.OwnRouter in its mlp.submodules.router slot, not Megatron's TopKRouter: {fix}",
    ]
    replaced = specs.replace_in_layer_specs([dense, megatron_spec])
    assert compat.moe_classes(replaced[1].submodules.mlp) == tuple(specs.plugin_classes()[k] for k in ("layer", "router"))
    again = specs.replace_in_layer_specs(replaced)  # the plugin's own classes pass again
    assert compat.moe_classes(again[1].submodules.mlp) == compat.moe_classes(replaced[1].submodules.mlp)
