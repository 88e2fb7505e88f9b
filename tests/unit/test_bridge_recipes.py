"""Megatron-Bridge recipe families: each family's router settings through ``dropin.resolve_lossfree``.

The settings are read off Megatron-Bridge's sources (github.com/NVIDIA-NeMo/Megatron-Bridge at 067f987df:
``src/megatron/bridge/models/*/*_bridge.py`` and ``*_provider.py``, which the recipes in
``src/megatron/bridge/recipes`` build from, plus the Hugging Face config values the bridges map:
``n_group`` -> moe_router_num_groups, ``topk_group`` -> moe_router_group_topk, ``routed_scaling_factor`` ->
moe_router_topk_scaling_factor). Megatron-Bridge does not install here (Python 3.12, GPU-only packages), so the
values are written out; the README's recipe table is the same list. MTP, CUDA graphs over the router and the
fused router are separate items and left out of these settings (their refusals are tested in test_dropin.py).
Families whose spec holds their own router or MoE layer class (Gemma-4, MiniMax-M3, Kimi-K3) are refused by
``specs.replace_in_layer_specs`` (tested in test_dropin_messages.py), not by these settings.
"""

import pytest

from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.megatron.dropin import MEGATRON_ONLY, resolve_lossfree
from tests.unit.test_dropin import megatron

SIGMOID_BIAS = dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_dtype="fp32")
FAMILIES = {
    # family: (Megatron router fields, what the plugin's effective config must be)
    "DeepSeek-V3 (V3, V3.1)": (
        dict(SIGMOID_BIAS, num_moe_experts=256, moe_router_topk=8, moe_router_pre_softmax=True,
             moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-4, moe_router_num_groups=8,
             moe_router_group_topk=4, moe_router_topk_scaling_factor=2.5),
        dict(balancing="bias", update_rule="sign", update_rate=1e-3, route_limit="node", route_groups=8,
             route_max_groups=4)),
    "Kimi-K2, Moonlight (DeepSeek-V3 architecture, one group)": (
        dict(SIGMOID_BIAS, num_moe_experts=384, moe_router_topk=8, moe_router_pre_softmax=True,
             moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-3, moe_router_num_groups=1,
             moe_router_group_topk=1, moe_router_topk_scaling_factor=2.827),
        dict(balancing="bias", update_rule="sign", update_rate=1e-3, route_limit="node", route_groups=1,
             route_max_groups=1)),
    "DeepSeek-V2": (
        dict(moe_router_score_function="softmax", num_moe_experts=160, moe_router_topk=6, moe_router_pre_softmax=True,
             moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-3, moe_router_dtype="fp32",
             moe_router_num_groups=8, moe_router_group_topk=3, moe_router_topk_scaling_factor=16.0),
        dict(balancing="none", route_limit="node", route_groups=8, route_max_groups=3)),
    "DeepSeek-V2-Lite": (
        dict(moe_router_score_function="softmax", num_moe_experts=64, moe_router_topk=6, moe_router_pre_softmax=True,
             moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-3, moe_router_dtype="fp32",
             moe_router_num_groups=1, moe_router_group_topk=1),
        dict(balancing="none", route_limit="node", route_groups=1, route_max_groups=1)),
    "Qwen3-MoE (30B-A3B, 235B-A22B)": (
        dict(moe_router_score_function="softmax", num_moe_experts=128, moe_router_topk=8, moe_router_pre_softmax=False,
             moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-3),
        dict(balancing="none", route_limit="none")),
    "Qwen3-Next, Qwen3.5-MoE": (
        dict(moe_router_score_function="softmax", num_moe_experts=512, moe_router_topk=10, moe_router_pre_softmax=False,
             moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=1e-3, moe_router_dtype="fp32"),
        dict(balancing="none", route_limit="none")),
    "GPT-OSS (20B, 120B)": (
        dict(moe_router_score_function="softmax", num_moe_experts=128, moe_router_topk=4, moe_router_pre_softmax=False,
             moe_router_load_balancing_type="none"),
        dict(balancing="none", route_limit="none")),
    "OLMoE": (
        dict(moe_router_score_function="softmax", num_moe_experts=64, moe_router_topk=8, moe_router_pre_softmax=True,
             moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-2, moe_router_dtype="fp32"),
        dict(balancing="none", route_limit="none")),
    "GLM-4.5, GLM-4.5-Air, GLM-4.5V, GLM-4.7-Flash, HY-v3 (fixed bias)": (
        dict(SIGMOID_BIAS, num_moe_experts=160, moe_router_topk=8, moe_router_pre_softmax=False,
             moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-3, moe_router_bias_update_rate=0.0,
             moe_router_num_groups=1, moe_router_group_topk=1, moe_router_topk_scaling_factor=2.5),
        dict(balancing="bias", update_rule="sign", update_rate=0.0, route_limit="node")),
    "Kimi-K3 settings (fixed bias; its own MoE layer class is refused)": (
        dict(SIGMOID_BIAS, moe_router_pre_softmax=True, moe_router_load_balancing_type="none",
             moe_router_bias_update_rate=0.0),
        dict(balancing="bias", update_rate=0.0)),
    "GLM-5, Nemotron-3 (Nano, Super, Ultra), Nemotron-VL/Omni, Kimi-K2.5-VL": (
        dict(SIGMOID_BIAS, moe_router_pre_softmax=True, moe_router_load_balancing_type="seq_aux_loss",
             moe_aux_loss_coeff=1e-4),
        dict(balancing="bias", update_rule="sign", update_rate=1e-3, route_limit="none")),
    "MiniMax-M2, ERNIE-4.5, Step-3.5 (MiniMax-M3's own router is refused)": (
        dict(SIGMOID_BIAS, moe_router_pre_softmax=False, moe_router_load_balancing_type="aux_loss",
             moe_aux_loss_coeff=1e-3),
        dict(balancing="bias", update_rule="sign", update_rate=1e-3)),
    "EXAONE-MoE": (
        dict(SIGMOID_BIAS, moe_router_pre_softmax=True, moe_router_load_balancing_type="global_aux_loss",
             moe_aux_loss_coeff=1e-2, moe_router_topk_scaling_factor=2.5),
        dict(balancing="bias", update_rule="sign", update_rate=1e-3)),
    "Bailing-MoE-v2 (Ling), MiMo-V2-Flash": (
        dict(SIGMOID_BIAS, moe_router_pre_softmax=True, moe_router_load_balancing_type="none"),
        dict(balancing="bias", update_rule="sign", update_rate=1e-3)),
    "Gemma-4 settings (its own router and MoE layer classes are refused)": (
        dict(moe_router_score_function="softmax", moe_router_pre_softmax=True, moe_router_load_balancing_type="aux_loss",
             moe_aux_loss_coeff=1e-3, moe_router_dtype="fp32"),
        dict(balancing="none")),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_router_settings_are_honoured_or_mapped(family):
    fields, expected = FAMILIES[family]
    cfg = resolve_lossfree(megatron(**fields))
    assert {k: getattr(cfg, k) for k in expected} == expected
    if not fields.get("moe_router_enable_expert_bias"):
        assert cfg.balancing == "none"  # Megatron's flags alone: no plugin bias beside Megatron's losses
    # Megatron's own losses run in the plugin's router: the plugin adds none of its own
    assert (cfg.aux_loss_coeff, cfg.seq_aux_loss_coeff, cfg.device_loss_coeff) == (0.0, 0.0, 0.0)


def test_deepseek_v4_needs_a_newer_megatron_core():
    """DeepSeek-V4's bridge sets moe_router_load_balancing_type "noaux_tc", a type no released megatron-core
    (up to 0.19.2) has: refused by name, as Megatron itself would."""
    with pytest.raises(LossFreeConfigError) as info:
        resolve_lossfree(megatron(moe_router_load_balancing_type="noaux_tc", moe_router_score_function="sqrtsoftplus",
                                  moe_router_enable_expert_bias=True))
    assert str(info.value) == ("--moe-router-load-balancing-type (noaux_tc) is unknown to the plugin: use aux_loss, "
                               "seq_aux_loss, global_aux_loss or none")


def test_megatron_only_settings_without_a_bias_leave_the_plugin_idle():
    assert resolve_lossfree(megatron(moe_router_load_balancing_type="none")) is MEGATRON_ONLY
