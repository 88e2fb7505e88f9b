"""LossFreeMoELayer token dropping inside Megatron-Core (one gloo rank, EP = 1, CPU).

Oracles: a dense loop over experts with the router's own gates (drop-free conservation), Megatron-Core's
own capacity dropping (expert mode), and ``dropping.device_keep_mask`` (device mode, REFERENCE 7).
"""

import argparse

import pytest
import torch

from megatron_moe_lossfree import dropping, routing
from megatron_moe_lossfree.config import LossFreeConfig
from megatron_moe_lossfree.errors import LossFreeConfigError

H, E, K, S, B = 16, 8, 2, 6, 4  # T = S*B = 24 tokens, 48 assignments, expert capacity at cf 1: 6


def make_config(lossfree=None, **overrides):
    from megatron_moe_lossfree.megatron.transformer_config import LossFreeTransformerConfig

    base = dict(num_layers=2, hidden_size=H, num_attention_heads=4, num_moe_experts=E, moe_router_topk=K,
                moe_ffn_hidden_size=32, ffn_hidden_size=32, moe_router_score_function="sigmoid",
                moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, add_bias_linear=False,
                use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
                normalization="RMSNorm", moe_router_dtype="fp32", moe_token_dispatcher_type="alltoall")
    base.update(overrides)
    return LossFreeTransformerConfig(lossfree=lossfree or LossFreeConfig(balancing="none"), **base)


def build_layer(config, *, plugin=True, seed=0):
    """A standalone MoE layer from the layer spec (the plugin's, or Megatron's own TopKRouter/MoELayer)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron_moe_lossfree.megatron.compat import build_mlp
    from megatron_moe_lossfree.megatron.specs import get_lossfree_layer_local_spec

    make_spec = get_lossfree_layer_local_spec if plugin else get_gpt_layer_local_spec
    torch.manual_seed(seed)
    layer = build_mlp(make_spec(num_experts=config.num_moe_experts).submodules.mlp, config=config)
    layer.set_layer_number(1)
    return layer


def skewed_input(seed=1, s=S, b=B):
    """Tokens that all lean towards expert 0 (with ``skew_router``), so capacities bind."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(s, b, H, generator=gen)
    x[..., 0] += 2.0
    return x


def skew_router(layer):
    with torch.no_grad():
        layer.router.weight[0, 0] = 3.0


def router_selection(layer, x_SBH):
    """(gates_TK, experts_TK) recomputed from the router weights: sigmoid, biased top-K, normalised."""
    x_TH = x_SBH.reshape(-1, H).double()
    scores_TE = torch.sigmoid(x_TH @ layer.router.weight.detach().double().t())
    select_TE = scores_TE
    if getattr(layer.router, "expert_bias", None) is not None:
        select_TE = scores_TE + layer.router.expert_bias.double()
    experts_TK = select_TE.topk(K, dim=-1).indices
    gates_TK = scores_TE.gather(1, experts_TK)
    return gates_TK / gates_TK.sum(-1, keepdim=True), experts_TK


def expert_outputs(experts, x_TH):
    """[E_local, T, H]: every local expert applied to every token, without a gate."""
    return torch.stack([mlp(x_TH)[0] for mlp in experts.local_experts])


def dense_moe(layer, x_SBH, keep_TK=None):
    """Dense loop: out[t] = sum_k keep[t,k] * g[t,k] * expert_{e[t,k]}(x[t])."""
    gates_TK, experts_TK = router_selection(layer, x_SBH)
    x_TH = x_SBH.reshape(-1, H)
    all_ETH = expert_outputs(layer.experts, x_TH).double()
    out_TH = torch.zeros_like(x_TH, dtype=torch.float64)
    for t in range(x_TH.shape[0]):
        for k in range(K):
            if keep_TK is None or keep_TK[t, k]:
                out_TH[t] += gates_TK[t, k] * all_ETH[experts_TK[t, k], t]
    return out_TH.view_as(x_SBH)


def keep_by_expert_id(layer, experts_TK):
    """The layer's last keep mask re-indexed to ``experts_TK``'s column order (the layer orders by id)."""
    keep_TE = torch.zeros(experts_TK.shape[0], E, dtype=torch.bool)
    ids = torch.sort(experts_TK, dim=1).values
    keep_TE.scatter_(1, ids, layer.last_keep_TK)
    return keep_TE.gather(1, experts_TK)


# --------------------------------------------------------------------------------------------------
# Drop-free, expert mode, device mode (EP = 1)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_drop_free_layer_equals_dense_loop_over_experts(megatron_world, dispatcher):
    layer = build_layer(make_config(moe_token_dispatcher_type=dispatcher))
    x = torch.randn(S, B, H)
    out, bias = layer(x)
    assert bias is None
    torch.testing.assert_close(out.double(), dense_moe(layer, x), rtol=1e-5, atol=1e-6)
    assert layer.last_keep_TK is None and int(layer.local_assigned) == 0


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_expert_mode_matches_megatron_capacity_dropping(megatron_world, policy):
    cf = 1.0
    ours = build_layer(make_config(LossFreeConfig(balancing="none", drop="expert", capacity_factor=cf,
                                                  drop_policy=policy)))
    theirs = build_layer(make_config(moe_expert_capacity_factor=cf, moe_token_drop_policy=policy), plugin=False)
    skew_router(ours)
    theirs.load_state_dict(ours.state_dict())
    x = skewed_input()
    probs_ours, map_ours = ours.route(x)
    probs_theirs, map_theirs = theirs.route(x)
    capacity = dropping.expert_capacity(S * B, K, E, cf)
    assert capacity == 6
    assert int(ours.local_dropped) > 0  # the skew makes the capacity bind
    assert torch.equal(map_ours.sum(0), map_theirs.sum(0))  # kept per expert, both policies
    assert int(map_ours.sum(0).max()) == capacity
    if policy == "probs":  # distinct gates: the same assignments, the same outputs
        assert torch.equal(map_ours, map_theirs)
        torch.testing.assert_close(probs_ours, probs_theirs)
        torch.testing.assert_close(ours(x)[0], theirs(x)[0], rtol=1e-5, atol=1e-6)
    else:  # ours keeps exactly the earliest tokens of each expert (Megatron: the same number)
        routed_TE = routing.routing_map_from_experts(router_selection(ours, x)[1], E)
        for e in range(E):
            routed = routed_TE[:, e].nonzero().flatten()
            assert torch.equal(map_ours[:, e].nonzero().flatten(), routed[:capacity])


def test_expert_mode_output_equals_dense_loop_with_kept_assignments(megatron_world):
    layer = build_layer(make_config(LossFreeConfig(balancing="none", drop="expert", capacity_factor=1.0)))
    skew_router(layer)
    x = skewed_input()
    out, _ = layer(x)
    gates_TK, experts_TK = router_selection(layer, x)
    keep_TK = dropping.expert_keep_mask(gates_TK, experts_TK, num_experts=E, capacity_factor=1.0)
    assert torch.equal(keep_by_expert_id(layer, experts_TK), keep_TK)
    assert int(layer.local_dropped) == int((~keep_TK).sum()) > 0 and int(layer.local_assigned) == S * B * K
    torch.testing.assert_close(out.double(), dense_moe(layer, x, keep_TK), rtol=1e-5, atol=1e-6)


def test_pad_to_capacity_pads_every_expert_and_changes_no_output(megatron_world):
    cfg = LossFreeConfig(balancing="none", drop="expert", capacity_factor=1.0)
    plain = build_layer(make_config(cfg))
    padded = build_layer(make_config(cfg.replace(pad_to_capacity=True)))
    skew_router(plain)
    padded.load_state_dict(plain.state_dict())
    x = skewed_input()
    out_plain, out_padded = plain(x)[0], padded(x)[0]
    dispatcher = padded.token_dispatcher
    assert dispatcher.drop_and_pad and dispatcher.capacity == 6
    assert dispatcher.num_out_tokens == 6 * E  # static shape: every expert gets exactly its capacity
    assert padded.config.moe_pad_expert_input_to_capacity is False  # the layer's own config is untouched
    torch.testing.assert_close(out_padded, out_plain, rtol=1e-5, atol=1e-6)


def test_device_mode_on_one_device_keeps_the_highest_gates_and_exempt_sequences(megatron_world):
    from megatron_moe_lossfree.megatron import exempt

    cf, fraction, step = 0.5, 0.5, 1
    layer = build_layer(make_config(LossFreeConfig(balancing="none", drop="device", capacity_factor=cf,
                                                   exempt_fraction=fraction, seed=7)))
    sample_ids = torch.arange(100, 100 + B)
    exempt_B = dropping.select_exempt_sequences(sample_ids, seed=7, step=step, fraction=fraction)
    assert 0 < int(exempt_B.sum()) < B  # the case exercises both kinds of sequence
    x = torch.randn(S, B, H)
    exempt.begin_micro_batch(layer, sample_ids, step=step)
    out, _ = layer(x)

    gates_TK, experts_TK = router_selection(layer, x)
    exempt_T = exempt_B.repeat(S)  # t = s*B + b belongs to sequence b
    oracle_TK = dropping.device_keep_mask(gates_TK.float(), experts_TK, num_devices=1, capacity_factor=cf,
                                          exempt=exempt_T, num_experts=E)
    keep_TK = keep_by_expert_id(layer, experts_TK)
    assert torch.equal(keep_TK, oracle_TK)
    budget = dropping.device_budget(S * B, K, 1, cf)
    assert int(keep_TK.sum()) == max(budget, int(exempt_T.sum()) * K)
    assert keep_TK[exempt_T].all()  # no exempt sequence loses a token
    dropped_gates = gates_TK[~keep_TK]
    kept_free_gates = gates_TK[keep_TK & ~exempt_T.unsqueeze(1)]
    assert float(dropped_gates.max()) <= float(kept_free_gates.min())
    torch.testing.assert_close(out.double(), dense_moe(layer, x, keep_TK), rtol=1e-5, atol=1e-6)


def test_fully_dropped_token_gets_only_the_shared_expert(megatron_world):
    from megatron_moe_lossfree.megatron import exempt

    layer = build_layer(make_config(LossFreeConfig(balancing="none", drop="device", capacity_factor=0.25,
                                                   exempt_fraction=0.0),
                                    moe_shared_expert_intermediate_size=32))
    exempt.begin_micro_batch(layer, torch.arange(B), step=0)
    x = torch.randn(S, B, H)
    out, _ = layer(x)
    gone_T = ~layer.last_keep_TK.any(dim=1)
    assert int(gone_T.sum()) > 0
    shared = layer.shared_experts(x).reshape(-1, H)
    torch.testing.assert_close(out.reshape(-1, H)[gone_T], shared[gone_T])


def test_exempt_fraction_one_drops_nothing(megatron_world):
    from megatron_moe_lossfree.megatron import exempt

    layer = build_layer(make_config(LossFreeConfig(balancing="none", drop="device", capacity_factor=0.1,
                                                   exempt_fraction=1.0)))
    exempt.begin_micro_batch(layer, torch.arange(B), step=0)
    x = torch.randn(S, B, H)
    out, _ = layer(x)
    assert layer.last_keep_TK.all() and int(layer.local_dropped) == 0
    torch.testing.assert_close(out.double(), dense_moe(layer, x), rtol=1e-5, atol=1e-6)


def test_context_with_the_wrong_sequence_count_is_refused(megatron_world):
    from megatron_moe_lossfree.megatron import exempt

    layer = build_layer(make_config(LossFreeConfig(balancing="none", drop="device", capacity_factor=0.5)))
    exempt.begin_micro_batch(layer, torch.arange(B + 1), step=0)
    with pytest.raises(RuntimeError, match=r"holds 5 sequences but the layer sees 4 \(24 tokens\)"):
        layer(torch.randn(S, B, H))


@pytest.mark.parametrize("mode,pad", [("expert", False), ("expert", True), ("device", False)])
def test_eval_forward_drops_nothing(megatron_world, mode, pad):
    """Against the dense oracle in every drop mode; with --lossfree-pad-to-capacity evaluation used to
    go through the padding dispatcher and cut every expert at its capacity (off by 6.9e-3)."""
    layer = build_layer(make_config(LossFreeConfig(balancing="none", drop=mode, capacity_factor=0.5 if pad else 0.1,
                                                   exempt_fraction=0.0, pad_to_capacity=pad)))
    skew_router(layer)
    x = skewed_input()
    layer.eval()
    out, _ = layer(x)
    torch.testing.assert_close(out.double(), dense_moe(layer, x), rtol=1e-5, atol=1e-6)
    assert layer.last_keep_TK is None and int(layer.local_assigned) == 0
    layer.train()
    layer(x)
    assert int(layer.local_dropped) > 0  # the same settings do drop in training


def test_drop_counters_count_grad_forwards_once_and_reset(megatron_world):
    layer = build_layer(make_config(LossFreeConfig(balancing="none", drop="expert", capacity_factor=1.0)))
    skew_router(layer)
    x = skewed_input()
    with torch.no_grad():  # a recompute's first pass: drops (same decision) but does not count
        layer(x)
    assert layer.last_keep_TK is not None and int(layer.local_assigned) == 0
    dropped_once = int((~layer.last_keep_TK).sum())
    layer(x)
    layer(x)
    assert layer.local_assigned.dtype == torch.int64
    assert (int(layer.local_dropped), int(layer.local_assigned)) == (2 * dropped_once, 2 * S * B * K)
    layer.reset_drop_counts()
    assert (int(layer.local_dropped), int(layer.local_assigned)) == (0, 0)


# --------------------------------------------------------------------------------------------------
# Loads stay pre-drop (REFERENCE 1 and 9)
# --------------------------------------------------------------------------------------------------


def test_overloaded_expert_keeps_its_full_count_and_the_bias_falls(megatron_world):
    from megatron_moe_lossfree import balancing
    from megatron_moe_lossfree.megatron.balancer import BiasBalancer

    layer = build_layer(make_config(LossFreeConfig(drop="expert", capacity_factor=1.0, update_rate=1e-3)))
    router = layer.router
    router.expert_bias.zero_()
    router.expert_bias[3] = 1.0  # sigmoid scores < 1: expert 3 is every token's first choice
    x = torch.randn(S, B, H)
    layer(x)
    _, experts_TK = router_selection(layer, x)
    keep_TK = keep_by_expert_id(layer, experts_TK)
    capacity = dropping.expert_capacity(S * B, K, E, 1.0)
    counts_E = router.local_tokens_per_expert.clone()
    assert int(counts_E[3]) == S * B > capacity  # pre-drop: every token that chose expert 3
    assert int(routing.count_tokens_per_expert(experts_TK, E, keep_TK)[3]) == capacity  # what survived
    assert int(layer.local_dropped) >= S * B - capacity

    before = router.expert_bias.clone()
    BiasBalancer([layer], router.lossfree, group=None, topk=K).step()
    expected = balancing.update_bias(before, counts_E, rule="sign", rate=1e-3)
    assert torch.equal(router.expert_bias, expected)
    assert float(before[3] - router.expert_bias[3]) == pytest.approx(1e-3, rel=1e-4)  # falls by u


# --------------------------------------------------------------------------------------------------
# Activation recompute and 1F1B: the exempt context travels with its micro-batch
# --------------------------------------------------------------------------------------------------


def gpt_model(lossfree, recompute):
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_moe_lossfree.megatron.specs import get_lossfree_block_spec

    extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
        if recompute else {}
    config = make_config(lossfree, **extra)
    torch.manual_seed(0)
    return GPTModel(config=config, transformer_layer_spec=get_lossfree_block_spec(config), vocab_size=64,
                    max_sequence_length=16, position_embedding_type="rope")


def micro_batch(seed, ids):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (len(ids), 16), generator=gen)
    return tokens, torch.arange(16).expand(len(ids), 16), torch.tensor(ids)


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_recompute_after_a_later_forward_uses_its_own_micro_batch_context(megatron_world):
    """1F1B order: forward m1, forward m2, backward m1. Under full recompute, m1's layers rerun in that
    backward; they must see m1's exempt flags (not m2's, the latest) to repeat m1's dropping."""
    from megatron_moe_lossfree.megatron import exempt
    from megatron_moe_lossfree.megatron.moe_layer import find_lossfree_layers

    cfg = LossFreeConfig(balancing="none", drop="device", capacity_factor=0.9, exempt_fraction=0.5, seed=11)
    first, second = micro_batch(0, [0, 1, 2, 3]), micro_batch(1, [4, 5, 6, 7])
    flags = [dropping.select_exempt_sequences(ids, seed=11, step=0, fraction=0.5) for *_, ids in (first, second)]
    assert not torch.equal(flags[0], flags[1])

    def run(recompute, bind=True):
        model = gpt_model(cfg, recompute)
        scope = exempt.begin_micro_batch(model, first[2], step=0)
        out = model(first[0], first[1], attention_mask=None, labels=first[0])
        out = scope.bind(out) if bind else out
        if recompute:  # the next micro-batch's forward runs before m1's backward
            scope2 = exempt.begin_micro_batch(model, second[2], step=0)
            scope2.bind(model(second[0], second[1], attention_mask=None, labels=second[0]))
        out.float().mean().backward()
        counted = [(int(layer.local_dropped), int(layer.local_assigned)) for layer in find_lossfree_layers(model)]
        return float(out.float().mean()), grads_of(model), counted

    loss_plain, grads_plain, counted_plain = run(recompute=False)
    loss_rec, grads_rec, counted_rec = run(recompute=True)
    assert loss_rec == loss_plain
    # Counted once per token: m1 in its recompute pass only, m2 not yet (its backward has not run).
    assert counted_rec == counted_plain and all(a == 64 * K for _, a in counted_plain)
    assert sum(d for d, _ in counted_plain) > 0
    assert grads_rec.keys() == grads_plain.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_rec[name], grads_plain[name], rtol=1e-5, atol=1e-7, msg=name)
    # Without bind, the recompute would reuse m2's flags: the gradients then differ (the test is sharp).
    _, grads_stale, _ = run(recompute=True, bind=False)
    assert any(not torch.allclose(grads_stale[n], grads_plain[n], rtol=1e-5, atol=1e-7) for n in grads_plain)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def test_validation_errors_name_flag_value_and_fix(megatron_world):
    from megatron_moe_lossfree.megatron.moe_layer import validate_dropping

    device_pad = LossFreeConfig(drop="device", capacity_factor=1.0, pad_to_capacity=True)
    with pytest.raises(LossFreeConfigError, match=r"--lossfree-pad-to-capacity \(True\) is not supported with "
                                                  r"--lossfree-drop device: .* use --lossfree-drop expert"):
        validate_dropping(device_pad, ep_size=2, dispatcher_type="alltoall")
    expert_pad = LossFreeConfig(drop="expert", capacity_factor=1.0, pad_to_capacity=True)
    with pytest.raises(LossFreeConfigError, match=r"--lossfree-pad-to-capacity \(True\) needs "
                                                  r"--moe-token-dispatcher-type alltoall \(got allgather\)"):
        validate_dropping(expert_pad, ep_size=2, dispatcher_type="allgather")
    for field, value, message in [
        ("capacity_factor", 0.0, r"--lossfree-capacity-factor \(0.0\) must be > 0, e.g. 1.0"),
        ("exempt_fraction", 1.5, r"--lossfree-exempt-fraction \(1.5\) must lie in \[0, 1\], e.g. 0.1"),
    ]:
        with pytest.raises(LossFreeConfigError, match=message):
            validate_dropping(LossFreeConfig(drop="expert", capacity_factor=1.0).replace(**{field: value}),
                              ep_size=1, dispatcher_type="alltoall")
    # Every problem in one error.
    with pytest.raises(LossFreeConfigError, match=r"capacity-factor \(-1.0\).*; --lossfree-pad-to-capacity"):
        validate_dropping(device_pad.replace(capacity_factor=-1.0), ep_size=2, dispatcher_type="alltoall")


def test_device_mode_on_one_ep_rank_warns_and_accepts_args(megatron_world):
    from megatron_moe_lossfree.megatron.moe_layer import DroppingWarning, validate_dropping

    args = argparse.Namespace(lossfree=LossFreeConfig(drop="device", capacity_factor=1.0),
                              expert_model_parallel_size=1, moe_token_dispatcher_type="alltoall")
    with pytest.warns(DroppingWarning, match=r"--lossfree-drop device with --expert-model-parallel-size 1: "
                                             r"the single device's budget ceil\(cf\*T\*K\) binds only when "
                                             r"--lossfree-capacity-factor \(1.0\) is below 1"):
        assert validate_dropping(args) is args.lossfree
    args.expert_model_parallel_size = 2
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_dropping(args)


def test_selected_experts_reads_ascending_ids_and_refuses_a_map_without_k_per_token():
    from megatron_moe_lossfree.megatron.moe_layer import selected_experts

    map_TE = torch.tensor([[0, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(selected_experts(map_TE, 2), torch.tensor([[1, 3], [0, 1], [2, 3]]))
    map_TE[1, 0] = False
    with pytest.raises(RuntimeError, match=r"^dropping needs exactly moe_router_topk \(2\) experts per token "
                                           r"before dropping, got between 1 and 2: use the plugin's router$"):
        selected_experts(map_TE, 2)


def test_layer_refuses_device_padding_at_construction(megatron_world):
    with pytest.raises(LossFreeConfigError, match=r"--lossfree-pad-to-capacity \(True\) is not supported"):
        build_layer(make_config(LossFreeConfig(balancing="none", drop="device", capacity_factor=1.0,
                                               pad_to_capacity=True)))


@pytest.mark.parametrize("drop", ["expert", "device"])
def test_the_plugin_s_capacities_refuse_a_padding_mask_by_name(megatron_world, drop):
    layer = build_layer(make_config(LossFreeConfig(drop=drop, capacity_factor=1.0)))
    x = skewed_input()
    padding = torch.zeros(x.shape[:2], dtype=torch.bool)
    padding[-1] = True
    with pytest.raises(LossFreeConfigError) as info:
        layer.route(x, padding_mask=padding)
    assert str(info.value) == (
        f"a padding_mask reached MoE layer 1 with --lossfree-drop {drop}: the plugin's capacities do not leave "
        f"padding out yet; use unpadded batches or --moe-expert-capacity-factor (Megatron's dropping)")
    layer.eval()  # evaluation drops nothing: the mask passes
    layer.route(x, padding_mask=padding)
