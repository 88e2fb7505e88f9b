"""LossFreeRouter and BiasBalancer inside Megatron-Core (one gloo rank, CPU)."""

import pytest
import torch

from megatron_moe_lossfree.config import LossFreeConfig

H, E, K = 16, 8, 2


def make_config(**overrides):
    from megatron_moe_lossfree.megatron.transformer_config import LossFreeTransformerConfig

    lossfree = overrides.pop("lossfree", LossFreeConfig())
    base = dict(num_layers=2, hidden_size=H, num_attention_heads=4, num_moe_experts=E, moe_router_topk=K,
                moe_ffn_hidden_size=32, ffn_hidden_size=32, moe_router_score_function="sigmoid",
                moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, add_bias_linear=False,
                use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm",
                moe_router_dtype="fp32")
    base.update(overrides)
    return LossFreeTransformerConfig(lossfree=lossfree, **base)


def make_router(megatron_world, layer_number=1, **overrides):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_moe_lossfree.megatron.router import LossFreeRouter

    router = LossFreeRouter(config=make_config(**overrides), pg_collection=get_default_pg_collection())
    router.set_layer_number(layer_number)
    return router


def dense_reference(x_TH, weight_EH, bias_E, topk, score="sigmoid"):
    """Per-token loop: scores, biased ranking, unbiased normalised gates."""
    gates, experts = [], []
    for x in x_TH:
        logits = weight_EH.double() @ x.double()
        s = torch.sigmoid(logits) if score == "sigmoid" else torch.softmax(logits, -1)
        order = sorted(range(len(s)), key=lambda i: -(float(s[i]) + float(bias_E[i])))[:topk]
        g = torch.stack([s[i] for i in order])
        gates.append(g / g.sum())
        experts.append(order)
    return torch.stack(gates), torch.tensor(experts)


def test_selection_and_counts_match_dense_reference(megatron_world):
    torch.manual_seed(0)
    router = make_router(megatron_world)
    router.expert_bias.copy_(torch.linspace(-0.05, 0.05, E))
    x = torch.randn(6, 3, H)  # [S, B, H]
    probs_TE, map_TE = router(x)[:2]
    ref_gates, ref_experts = dense_reference(x.view(-1, H), router.weight, router.expert_bias, K)
    got = sorted(tuple(sorted(row.nonzero().flatten().tolist())) for row in map_TE)
    assert got == sorted(tuple(sorted(r)) for r in ref_experts.tolist())
    for t in range(18):
        torch.testing.assert_close(probs_TE[t, ref_experts[t]].double(), ref_gates[t], rtol=1e-5, atol=1e-6)
    expected_counts = torch.bincount(ref_experts.flatten(), minlength=E)
    assert router.local_tokens_per_expert.dtype == torch.int64
    assert torch.equal(router.local_tokens_per_expert, expected_counts)
    assert int(router.local_tokens_per_expert.sum()) == 18 * K


def test_eval_and_no_grad_forwards_do_not_count(megatron_world):
    router = make_router(megatron_world)
    x = torch.randn(4, 2, H)
    router.eval()
    router(x)
    assert int(router.local_tokens_per_expert.sum()) == 0
    router.train()
    with torch.no_grad():
        router(x)
    assert int(router.local_tokens_per_expert.sum()) == 0
    router(x)
    assert int(router.local_tokens_per_expert.sum()) == 8 * K


def test_bias_never_gets_a_gradient_and_gates_are_unbiased(megatron_world):
    router = make_router(megatron_world)
    router.expert_bias.fill_(0.0)
    router.expert_bias[3] = 10.0  # forces expert 3 into every selection
    x = torch.randn(5, 2, H, requires_grad=True)
    probs_TE, map_TE = router(x)[:2]
    assert map_TE[:, 3].all()
    probs_TE.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert not router.expert_bias.requires_grad
    scores = torch.sigmoid(x.detach().view(-1, H) @ router.weight.detach().t())
    sel = map_TE.float() * scores
    torch.testing.assert_close(probs_TE.detach(), sel / sel.sum(-1, keepdim=True))


def test_softmax_with_bias_is_allowed(megatron_world):
    router = make_router(megatron_world, moe_router_score_function="softmax")
    router.expert_bias.zero_()
    router.expert_bias[5] = 5.0
    probs_TE, map_TE = router(torch.randn(3, 2, H))[:2]
    assert map_TE[:, 5].all()
    torch.testing.assert_close(probs_TE.sum(-1), torch.ones(6))


@pytest.mark.parametrize("rule,name", [("sign", "expert_bias"), ("quantile", "qb_solution_sum")])
def test_fp32_state_stays_fp32_and_exact_under_half_casts(megatron_world, rule, name):
    """Float16Module's bf16 cast keeps the bias (and the quantile rule's solution sums) fp32 and exact."""
    router = make_router(megatron_world, lossfree=LossFreeConfig(update_rule=rule))
    values = torch.tensor([0.0011, -0.0023, 0.0007, 0.0, 0.0031, -0.0001, 0.0019, -0.0042])
    getattr(router, name).copy_(values)
    router.bfloat16()
    assert getattr(router, name).dtype == torch.float32
    assert torch.equal(getattr(router, name), values)
    assert router.weight.dtype == torch.bfloat16
    assert router.local_tokens_per_expert.dtype == torch.int64
    if rule == "quantile":
        assert router.qb_observed.dtype == torch.int64


def test_buffers_live_where_megatron_puts_its_own(megatron_world, monkeypatch):
    """Without CUDA the buffers follow the weight (the host); with CUDA they go to the current GPU, where
    Megatron registers its router buffers, and a stage with no router still gets that device."""
    from megatron_moe_lossfree.megatron.router import buffer_device

    router = make_router(megatron_world)
    assert router.expert_bias.device == router.weight.device == buffer_device(router.weight)
    assert buffer_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert buffer_device(router.weight) == buffer_device() == 3


def test_multiplicative_bias_starts_at_one(megatron_world):
    router = make_router(megatron_world, lossfree=LossFreeConfig(bias_kind="multiplicative",
                                                                 update_rule="multiplicative"))
    assert torch.equal(router.expert_bias, torch.ones(E))


def test_nonfinite_logits_name_the_layer_and_step(megatron_world):
    from megatron_moe_lossfree.megatron.balancer import BiasBalancer
    from megatron_moe_lossfree.megatron.router import NonFiniteRouterError

    good, bad = make_router(megatron_world, layer_number=2), make_router(megatron_world, layer_number=3)
    balancer = BiasBalancer([torch.nn.ModuleList([good, bad])], LossFreeConfig(), group=None, topk=K)
    balancer.steps = 16
    good(torch.randn(2, 2, H))
    x = torch.randn(2, 2, H)
    x[1, 0, 0] = float("nan")
    bad(x)  # no host sync in the forward: the check runs once per step
    with pytest.raises(NonFiniteRouterError, match=r"^router logits of layer 3 at step 17 contain NaN or inf"):
        balancer.step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "inf and -inf"])
def test_any_single_nonfinite_logit_is_flagged(megatron_world, bad):
    router = make_router(megatron_world)
    logits = torch.randn(8, E) * 30
    router.note_nonfinite(logits)
    assert int(router.nonfinite_logits) == 0
    if bad == "inf and -inf":  # a sum would cancel to NaN, never to a finite value
        logits[3, 1], logits[5, 2] = float("inf"), -float("inf")
    else:
        logits[3, 1] = bad
    router.note_nonfinite(logits)
    assert int(router.nonfinite_logits) == 1
    router.note_nonfinite(logits.bfloat16())
    assert int(router.nonfinite_logits) == 2


def test_balancer_updates_each_layer_once_with_exact_values(megatron_world):
    from megatron_moe_lossfree.megatron.balancer import BiasBalancer

    small = make_router(megatron_world, layer_number=1, num_moe_experts=4)
    large = make_router(megatron_world, layer_number=2)
    model = torch.nn.ModuleList([small, large])
    calls = []
    balancer = BiasBalancer([model], LossFreeConfig(update_rate=1e-3), group=None, topk=K,
                            original_finalize=lambda *a, **k: calls.append(a))
    small.local_tokens_per_expert.copy_(torch.tensor([6, 2, 4, 4]))
    large.local_tokens_per_expert.copy_(torch.tensor([1, 1, 1, 1, 1, 1, 1, 9]))
    balancer([model], None)
    assert len(calls) == 1  # Megatron's own finalize ran first, once
    assert torch.equal(small.expert_bias, torch.tensor([-1e-3, 1e-3, 0.0, 0.0]))
    u = torch.tensor(1e-3)
    assert torch.equal(large.expert_bias, torch.stack([u] * 7 + [-u]))
    assert int(small.local_tokens_per_expert.abs().sum()) == 0 and int(large.local_tokens_per_expert.sum()) == 0
    assert balancer.tokens_seen == 16 // K
    # A step with no tokens leaves the bias alone (sign(0) = 0).
    balancer([model], None)
    assert torch.equal(small.expert_bias, torch.tensor([-1e-3, 1e-3, 0.0, 0.0]))


def test_v3_schedule_freezes_after_token_budget(megatron_world):
    from megatron_moe_lossfree.megatron.balancer import BiasBalancer

    router = make_router(megatron_world, num_moe_experts=4)
    cfg = LossFreeConfig(update_rate=1e-3, rate_schedule="v3", freeze_bias_after_tokens=8)
    balancer = BiasBalancer([router], cfg, group=None, topk=K)
    for _ in range(3):  # 8 tokens per step: step 1 updates, steps 2 and 3 are frozen
        router.local_tokens_per_expert.copy_(torch.tensor([10, 2, 2, 2]))
        balancer.step()
    assert torch.equal(router.expert_bias, torch.tensor([-1e-3, 1e-3, 1e-3, 1e-3]))
    assert balancer.tokens_seen == 24


def gpt_model(config):
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_moe_lossfree.megatron.specs import get_lossfree_block_spec

    torch.manual_seed(0)
    return GPTModel(config=config, transformer_layer_spec=get_lossfree_block_spec(config), vocab_size=64,
                    max_sequence_length=16, position_embedding_type="rope")


def routers_of(model):
    from megatron_moe_lossfree.megatron.balancer import find_routers

    return find_routers([model])


def test_checkpoint_key_is_megatrons_and_recompute_counts_each_token_once(megatron_world):
    tokens = torch.randint(0, 64, (2, 16))
    position = torch.arange(16).expand(2, 16)
    counts = {}
    for recompute in (False, True):
        extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
            if recompute else {}
        model = gpt_model(make_config(**extra))
        assert "decoder.layers.0.mlp.router.expert_bias" in model.state_dict()
        loss = model(tokens, position, attention_mask=None, labels=tokens).float().mean()
        loss.backward()
        counts[recompute] = [r.local_tokens_per_expert.clone() for r in routers_of(model)]
    for plain, recomputed in zip(counts[False], counts[True]):
        assert int(plain.sum()) == 2 * 16 * K
        assert torch.equal(plain, recomputed)


def test_balance_losses_reach_router_weights_not_bias_and_are_logged(megatron_world):
    from megatron_moe_lossfree import balancing

    cfg = LossFreeConfig(aux_loss_coeff=1e-2, seq_aux_loss_coeff=1e-3, device_loss_coeff=5e-2, comm_loss_coeff=2e-2,
                         route_max_groups=1)
    router = make_router(megatron_world, lossfree=cfg)
    S, B = 4, 3
    x = torch.randn(S, B, H)
    probs_TE, _ = router(x)[:2]
    (probs_TE * 0).sum().backward()  # only the balance losses contribute gradient
    assert set(router.last_aux_losses) == {"aux_loss", "seq_aux_loss", "device_loss", "comm_loss"}
    assert router.expert_bias.grad is None
    # The same losses computed directly on sequence-major tokens give the same gradient.
    weight = router.weight.detach().clone().requires_grad_(True)
    scores = torch.sigmoid(x.view(-1, H) @ weight.t())
    scores_NE = scores.view(S, B, E).transpose(0, 1).reshape(-1, E)
    biased = scores_NE.detach() + router.expert_bias
    experts = biased.topk(K, dim=-1).indices
    total = (balancing.aux_loss(scores_NE, experts, alpha=1e-2, num_sequences=B)
             + balancing.sequence_aux_loss(scores_NE, balancing.unbiased_topk(scores_NE, K), alpha=1e-3,
                                           num_sequences=B)
             + balancing.device_balance_loss(scores_NE, experts, alpha=5e-2, num_devices=1, num_sequences=B)
             + balancing.comm_balance_loss(scores_NE, experts, alpha=2e-2, num_devices=1, max_devices=1,
                                           num_sequences=B))
    total.backward()
    torch.testing.assert_close(router.weight.grad, weight.grad, rtol=1e-5, atol=1e-8)
    logged = sum(float(v) for v in router.last_aux_losses.values())
    assert logged == pytest.approx(float(total), rel=1e-6)


def test_losses_are_off_in_eval(megatron_world):
    router = make_router(megatron_world, lossfree=LossFreeConfig(aux_loss_coeff=1e-2))
    router.eval()
    router(torch.randn(2, 2, H))
    assert {name: float(v) for name, v in router.last_aux_losses.items()} == {"aux_loss": 0.0}  # never written
    assert int(router.eval_tokens_per_expert.sum()) == 4 * K and int(router.local_tokens_per_expert.sum()) == 0


def test_large_bias_warns_once_per_layer(megatron_world):
    from megatron_moe_lossfree.megatron.balancer import BiasBalancer

    router = make_router(megatron_world, layer_number=5, num_moe_experts=4)
    balancer = BiasBalancer([router], LossFreeConfig(update_rate=0.3, bias_warn_bound=0.5), group=None, topk=K)
    with pytest.warns(RuntimeWarning, match=r"expert_bias of layer 5 reached \|b - 0\| = 0.6 > "
                                            r"--lossfree-bias-warn-bound \(0.5\) at step 2"):
        for _ in range(3):
            router.local_tokens_per_expert.copy_(torch.tensor([10, 2, 2, 2]))
            balancer.step()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        router.local_tokens_per_expert.copy_(torch.tensor([10, 2, 2, 2]))
        balancer.step()  # no second warning for the same layer
