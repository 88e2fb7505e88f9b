"""The drop-in contract's unit side (megatron/dropin.py, the router and the balancer): every Megatron flag
the plugin cannot honour is refused with an exact message, conflicts name both flags, and the behaviours the
equivalence matrix (tests/distributed/test_dropin_equivalence.py) cannot show: padding masks, the router
dtype, pre-drop counting under Megatron's capacity, frozen and eval-mode routers, routing replay."""

import types

import pytest
import torch

from megatron_moe_lossfree.config import LossFreeConfig
from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.megatron.dropin import MEGATRON_ONLY, resolve_lossfree
from tests.unit.test_router import E, H, K, make_router


def megatron(**fields):
    """The TransformerConfig fields dropin reads, at Megatron's defaults unless given."""
    base = dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.0, moe_router_fusion=False,
                mtp_num_layers=None, cuda_graph_impl="none", transformer_impl="local",
                moe_expert_rank_capacity_factor=None, moe_router_num_groups=None, moe_router_group_topk=None,
                moe_expert_capacity_factor=None, moe_router_enable_expert_bias=False,
                moe_router_bias_update_rate=1e-3)
    base.update(fields)
    return types.SimpleNamespace(**base)


REFUSED = {
    "sinkhorn": (dict(moe_router_load_balancing_type="sinkhorn"), None,
                 "--moe-router-load-balancing-type (sinkhorn) is not supported by the plugin's router: use "
                 "--moe-router-enable-expert-bias or --lossfree-balancing bias (loss-free), or aux_loss"),
    "full-iteration graph 0.16": (dict(cuda_graph_impl="local", cuda_graph_scope="full_iteration"), None,
                                  "--cuda-graph-scope (full_iteration) captures finalize_model_grads, where the "
                                  "plugin's once-per-step bias update reads its counts on the host: use per-layer "
                                  "graphs (--cuda-graph-impl transformer_engine or local with --cuda-graph-scope "
                                  "moe_router,moe_preprocess,attn)"),
    "full-iteration graph 0.19": (dict(cuda_graph_impl="full_iteration", cuda_graph_modules=[]), None,
                                  "--cuda-graph-impl (full_iteration) captures finalize_model_grads, where the "
                                  "plugin's once-per-step bias update reads its counts on the host: use per-layer "
                                  "graphs (--cuda-graph-impl transformer_engine or local with --cuda-graph-modules "
                                  "moe_router,moe_preprocess,attn)"),
    "graph with plugin dropping": (dict(cuda_graph_impl="local", cuda_graph_scope="moe_router,moe_preprocess"),
                                   LossFreeConfig(drop="expert", capacity_factor=1.5),
                                   "--cuda-graph-scope (moe_preprocess,moe_router) captures the router and "
                                   "--lossfree-drop (expert) drops inside it with per-micro-batch exempt flags a "
                                   "graph cannot replay: use --lossfree-drop none, or --cuda-graph-scope attn"),
    "inference_optimized": (dict(transformer_impl="inference_optimized"), None,
                            "--transformer-impl (inference_optimized) is not supported: its dispatcher expects "
                            "dense [T, K] routing where the plugin returns Megatron's [T, E] map, use local or "
                            "transformer_engine"),
    "rule against megatron bias": (dict(moe_router_enable_expert_bias=True),
                                   LossFreeConfig(update_rule="proportional"),
                                   "--moe-router-enable-expert-bias (True, Megatron's sign rule) and "
                                   "--lossfree-update-rule (proportional) disagree: drop "
                                   "--moe-router-enable-expert-bias to use the proportional rule"),
    "rate against megatron rate": (dict(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=1e-3),
                                   LossFreeConfig(update_rate=1e-2),
                                   "--moe-router-bias-update-rate (0.001) and --lossfree-update-rate (0.01) "
                                   "disagree: give one rate"),
    "seq aux twice": (dict(moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-4),
                      LossFreeConfig(seq_aux_loss_coeff=1e-4),
                      "--moe-router-load-balancing-type seq_aux_loss with --moe-aux-loss-coeff (0.0001) and "
                      "--lossfree-seq-aux-loss-coeff (0.0001) are the same loss twice: keep one"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refusals_name_the_flag_the_value_and_the_fix(name):
    fields, lossfree, message = REFUSED[name]
    with pytest.raises(LossFreeConfigError) as info:
        resolve_lossfree(megatron(**fields), lossfree)
    assert str(info.value) == message


def test_every_problem_is_reported_at_once():
    with pytest.raises(LossFreeConfigError) as info:
        resolve_lossfree(megatron(moe_router_load_balancing_type="sinkhorn", transformer_impl="inference_optimized"))
    assert str(info.value).count("; ") == 1 and "--transformer-impl" in str(info.value)


def test_router_fusion_is_refused_by_name_where_it_cannot_run(monkeypatch):
    """Honoured by the plugin's Triton router; refused without Triton or a CUDA device (Megatron's own fused
    router raises at the first forward there: it needs Transformer Engine)."""
    import importlib.util

    import megatron_moe_lossfree.kernels as kernels

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LossFreeConfigError) as info:
        resolve_lossfree(megatron(moe_router_fusion=True))
    assert str(info.value).startswith("--moe-router-fusion (True) needs a CUDA device")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: None if name == "triton" else find_spec(name))
    with pytest.raises(LossFreeConfigError) as info:
        resolve_lossfree(megatron(moe_router_fusion=True))
    assert str(info.value) == ("--moe-router-fusion (True) needs Triton, which is not installed: pip install "
                               "'megatron_moe_lossfree[kernels]', or drop --moe-router-fusion")
    monkeypatch.setattr(kernels.importlib.util, "find_spec", find_spec)
    assert resolve_lossfree(megatron(moe_router_fusion=True)) is not None
    with pytest.raises(LossFreeConfigError) as info:
        resolve_lossfree(megatron(moe_router_fusion=True, moe_router_dtype="fp64"))
    assert str(info.value) == ("--moe-router-fusion (True) with --moe-router-dtype (fp64): the fused router computes "
                               "in fp32: use --moe-router-dtype fp32 or drop --moe-router-fusion")


def test_graph_scope_outside_the_router_and_the_megatron_mappings_are_accepted():
    cfg = resolve_lossfree(megatron(cuda_graph_impl="transformer_engine", cuda_graph_scope=["attn"],
                                    moe_router_num_groups=4, moe_router_group_topk=2,
                                    moe_router_enable_expert_bias=True, moe_router_bias_update_rate=5e-3))
    assert (cfg.route_limit, cfg.route_groups, cfg.route_max_groups) == ("node", 4, 2)
    assert (cfg.balancing, cfg.update_rule, cfg.update_rate) == ("bias", "sign", 5e-3)
    assert resolve_lossfree(megatron()) is MEGATRON_ONLY  # Megatron's flags alone: no bias
    # a Megatron loss list with a coefficient list; the plugin's own V2 device loss beside it is fine
    cfg = resolve_lossfree(megatron(moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"],
                                    moe_aux_loss_coeff=[1e-2, 1e-3]), LossFreeConfig(device_loss_coeff=0.05))
    assert cfg.device_loss_coeff == 0.05


GRAPH_SCOPES = {  # (config fields, regions dropin sees): both releases' spellings, before/after __post_init__
    "0.16 enable_cuda_graph default scope": (dict(enable_cuda_graph=True, cuda_graph_impl="none",
                                                  cuda_graph_scope="full"), {"full"}),
    "0.16 TE router + preprocess": (dict(cuda_graph_impl="transformer_engine",
                                         cuda_graph_scope="attn,moe_router,moe_preprocess"),
                                    {"attn", "moe_router", "moe_preprocess"}),
    "0.16 local whole layer (post-init [])": (dict(cuda_graph_impl="local", cuda_graph_scope=[]), {"full"}),
    "0.16 moe scope": (dict(cuda_graph_impl="local", cuda_graph_scope=["moe"]), {"moe"}),
    "0.19 modules enums": (dict(cuda_graph_impl="transformer_engine", cuda_graph_scope=None,
                                cuda_graph_modules=[types.SimpleNamespace(name="moe_router"),
                                                    types.SimpleNamespace(name="moe_preprocess")]),
                           {"moe_router", "moe_preprocess"}),
    "0.19 whole layer": (dict(cuda_graph_impl="local", cuda_graph_scope=None, cuda_graph_modules=[]), {"full"}),
}


@pytest.mark.parametrize("name", list(GRAPH_SCOPES))
def test_cuda_graphs_over_the_router_are_accepted(name):
    from megatron_moe_lossfree.megatron import dropin

    fields, regions = GRAPH_SCOPES[name]
    config = megatron(moe_router_enable_expert_bias=True, **fields)
    assert dropin._graph_scopes(config) == regions
    assert dropin.graph_captures_router(config)
    assert resolve_lossfree(config).balancing == "bias"
    config.moe_router_enable_expert_bias = False
    assert resolve_lossfree(config, LossFreeConfig(update_rule="quantile")).update_rule == "quantile"


def test_padded_tokens_are_routed_but_never_counted(megatron_world):
    """T = 18 tokens != E = 8 experts (the shape where Megatron 0.16.1/0.19.2 crash: issue 6111)."""
    router = make_router(megatron_world)
    router.expert_bias.copy_(torch.linspace(-0.05, 0.05, E))
    x = torch.randn(6, 3, H)
    padding = torch.zeros(6, 3, dtype=torch.bool)
    padding[3:] = True  # the last 3 rows of every sequence are padding
    probs_TE, map_TE = router(x, padding_mask=padding)
    assert int(map_TE.sum()) == 18 * K  # padded tokens still reach the dispatcher
    valid_T = ~padding.reshape(-1)
    expected = torch.bincount(map_TE[valid_T].nonzero()[:, 1], minlength=E)
    assert int(expected.sum()) == 9 * K
    assert torch.equal(router.local_tokens_per_expert, expected)


def test_plugin_losses_refuse_a_padding_mask(megatron_world):
    router = make_router(megatron_world, lossfree=LossFreeConfig(seq_aux_loss_coeff=1e-4))
    padding = torch.zeros(6, 3, dtype=torch.bool)
    padding[-1] = True
    with pytest.raises(LossFreeConfigError) as info:
        router(torch.randn(6, 3, H), padding_mask=padding)
    assert str(info.value) == (
        "a padding_mask reached layer 1 with --lossfree-seq-aux-loss-coeff on: the plugin's per-sequence losses "
        "do not take padding yet; use Megatron's --moe-router-load-balancing-type aux_loss/seq_aux_loss (they "
        "honour the mask) or unpadded batches")


def test_megatron_loss_under_a_padding_mask_equals_megatron_on_the_valid_tokens(megatron_world):
    """Megatron's own aux loss code runs inside the plugin's router: its value (the tracker entry) for a
    half-padded batch equals the loss of the valid half alone."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    router = make_router(megatron_world, lossfree=LossFreeConfig(balancing="none"),
                         moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2)
    x = torch.randn(4, 2, H)
    padding = torch.zeros(4, 2, dtype=torch.bool)
    padding[2:] = True

    def tracked(*args, **kwargs):
        clear_aux_losses_tracker()
        router(*args, **kwargs)
        return float(get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"][0])

    assert tracked(x, padding_mask=padding) == pytest.approx(tracked(x[:2]), rel=1e-6)


@pytest.mark.parametrize("router_dtype,dtype", [(None, torch.bfloat16), ("fp32", torch.float32),
                                                 ("fp64", torch.float64)])
def test_probs_come_back_in_megatron_s_router_dtype(megatron_world, router_dtype, dtype):
    router = make_router(megatron_world, moe_router_dtype=router_dtype)
    probs_TE, _ = router(torch.randn(4, 2, H, dtype=torch.bfloat16))
    assert probs_TE.dtype == dtype


def test_megatron_capacity_drops_after_the_plugin_counted(megatron_world):
    """Megatron's own capacity is honoured (assignments leave the map), but the bias sees the pre-drop
    loads (REFERENCE 9: Megatron counts after dropping, which hides the overload)."""
    router = make_router(megatron_world, moe_expert_capacity_factor=0.5)
    x = torch.randn(6, 4, H)
    _, map_TE = router(x)
    assert int(map_TE.sum()) < 24 * K
    assert int(router.local_tokens_per_expert.sum()) == 24 * K


def test_frozen_and_eval_mode_routers_keep_their_bias(megatron_world):
    from megatron_moe_lossfree.megatron.balancer import BiasBalancer

    routers = [make_router(megatron_world, layer_number=n, lossfree=LossFreeConfig(update_rate=0.1))
               for n in (1, 2, 3)]
    for router in routers:
        router(torch.randn(4, 2, H))
    routers[1].frozen_expert_bias = True
    routers[2].eval()
    balancer = BiasBalancer(torch.nn.ModuleList(routers), routers[0].lossfree, topk=K)
    balancer.step()
    assert routers[0].expert_bias.abs().sum() > 0
    assert torch.equal(routers[1].expert_bias, torch.zeros(E))
    assert torch.equal(routers[2].expert_bias, torch.zeros(E))


def test_routing_replay_records_and_replays_the_plugin_s_selection(megatron_world):
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    router = make_router(megatron_world, moe_enable_routing_replay=True)
    router.expert_bias.copy_(torch.linspace(-0.5, 0.5, E))  # the biased choice differs from the unbiased
    x = torch.randn(4, 2, H)
    router.router_replay.set_router_replay_action(RouterReplayAction.RECORD)
    _, recorded_map = router(x)
    recorded = router.router_replay.get_recorded_indices()
    assert torch.equal(torch.zeros_like(recorded_map).scatter(1, recorded, True), recorded_map)
    router.expert_bias.zero_()  # a replay must not re-select
    router.router_replay.set_target_indices(recorded)
    router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    probs_TE, replayed_map = router(x)
    assert torch.equal(replayed_map, recorded_map)
    torch.testing.assert_close(probs_TE.sum(-1), torch.ones(8))  # fresh, normalised gates
    RouterReplay.clear_global_router_replay_instances()


@pytest.mark.parametrize("per_token", [False, True])
def test_plugin_losses_take_megatron_s_scaling(megatron_world, per_token):
    """The plugin's loss reaches the router weight as Megatron's losses do: times the local token count
    under calculate_per_token_loss (finalize_model_grads divides by the global token count), and divided by
    the TP x CP size (each rank's loss is a whole slice's and router grads are summed over TP)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    def loss_grad(tp_cp_size):
        torch.manual_seed(0)
        router = make_router(megatron_world, lossfree=LossFreeConfig(balancing="none", seq_aux_loss_coeff=1e-2),
                             calculate_per_token_loss=per_token)
        router.tp_cp_group = types.SimpleNamespace(size=lambda: tp_cp_size)
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
        probs, _ = router(torch.randn(4, 2, H))
        (probs * 0).sum().backward()  # only the attached loss sends a gradient
        return router.weight.grad.clone()

    one, two = loss_grad(1), loss_grad(2)
    assert one.abs().sum() > 0
    # Megatron 0.19's attach multiplies per-token losses by the TP x CP size as well (finalize divides by
    # tokens counted on every TP rank); 0.16 does not. Either way the plugin's gradient is Megatron's
    # scaling of the mean slice loss.
    from megatron_moe_lossfree.megatron.compat import megatron_core_version

    factor = 1.0 if per_token and megatron_core_version().release >= (0, 19) else 0.5
    torch.testing.assert_close(two, one * factor)
    if per_token:
        torch.manual_seed(0)
        router = make_router(megatron_world, lossfree=LossFreeConfig(balancing="none", seq_aux_loss_coeff=1e-2))
        probs, _ = router(torch.randn(4, 2, H))
        (probs * 0).sum().backward()
        torch.testing.assert_close(one, router.weight.grad * 8)  # T_local = 8 tokens
