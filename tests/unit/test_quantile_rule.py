"""The quantile rule inside the plugin (``--lossfree-update-rule quantile``): the router's per-micro-batch
observation, the balancer's step, and the cases beyond Megatron-Core and torchtitan (padding, node-limited
routing, softmax gates, T*K/E not an integer, the V3 freeze). The pure maths is tests/unit/test_quantile.py;
Megatron 0.19.2's own QB is matched bitwise in tests/distributed/test_dropin_equivalence.py (lane 2)."""

import pytest
import torch

from megatron_moe_lossfree import quantile, routing
from megatron_moe_lossfree.config import LossFreeConfig
from megatron_moe_lossfree.megatron.balancer import BiasBalancer
from tests.unit.test_router import E, H, K, make_router

QB = LossFreeConfig(update_rule="quantile")


def logits_of(router, x_SBH):
    return (x_SBH.reshape(-1, H) @ router.weight.detach().t()).float()


def one_step(routers, micro_batches, lossfree, **kwargs):
    balancer = BiasBalancer(torch.nn.ModuleList(routers), lossfree, topk=K, **kwargs)
    for x in micro_batches:
        for router in routers:
            router(x)
    balancer.step()
    return balancer


def test_exact_step_averages_the_micro_batch_solutions_then_centres(megatron_world):
    router = make_router(megatron_world, lossfree=QB)
    router.expert_bias.copy_(torch.linspace(-0.3, 0.3, E))
    start = router.expert_bias.clone()
    xs = [torch.randn(4, 2, H) for _ in range(3)]  # T = 8 per micro-batch, T*K/E = 2
    solved = [quantile.qb_exact_solve_E(logits_of(router, x), start, K) for x in xs]
    one_step([router], xs, QB)
    assert torch.equal(router.expert_bias, quantile.qb_finish_step(start, solved, ema=0.0))
    assert abs(float(router.expert_bias.sum())) < 1e-6  # centred
    assert int(router.qb_observed) == 0 and not router.qb_solution_sum.any()  # reset for the next step


def test_ema_keeps_that_share_of_the_old_bias(megatron_world):
    cfg = QB.replace(quantile_ema=0.75)
    router = make_router(megatron_world, lossfree=cfg)
    start = torch.linspace(-0.2, 0.2, E)
    router.expert_bias.copy_(start)
    x = torch.randn(4, 2, H)
    solution = quantile.qb_exact_solve_E(logits_of(router, x), start, K)
    one_step([router], [x], cfg)
    assert torch.equal(router.expert_bias, quantile.qb_blend_center(start, solution, 0.75))


def test_histogram_step_is_within_one_bin_of_the_exact_step(megatron_world):
    """The histogram estimator's solution lies within one bin width of the exact quantile of the same tokens
    (``qb_histogram_quantile_E``, "rank": every entry sits in its true bin), on biases 80 bins wide; the
    step's bias is that solution, centred. A target of 1.5x the balanced count misses by more than a bin."""
    torch.manual_seed(3)
    cfg = QB.replace(quantile_space="scores", quantile_estimator="histogram", quantile_bins=500)
    router = make_router(megatron_world, lossfree=cfg)
    start = torch.linspace(-0.25, 0.25, E)
    router.expert_bias.copy_(start)
    xs = [torch.randn(16, 4, H) for _ in range(2)]  # 2 micro-batches of 64 tokens: T*K/E = 32
    histogram = torch.zeros(E, 500, dtype=torch.int64)
    for x in xs:
        router(x)
    histogram.copy_(router.qb_histogram)
    scores_TE = torch.sigmoid(torch.cat([logits_of(router, x) for x in xs]))
    width = float(quantile.qb_histogram_range(start, 500)[1])  # (0.5 + 2) / 500 = 0.005
    exact_E = quantile.qb_exact_solve_E(scores_TE, start, K).double()
    solved_E = quantile.qb_histogram_quantile_E(histogram, start, K, num_tokens=int(router.qb_observed))
    assert (exact_E - start.double()).abs().max() > 10 * width  # the solutions are far from the start in bins
    assert (solved_E - exact_E).abs().max() < width
    wrong_E = quantile.qb_histogram_quantile_E(histogram, start, K, num_tokens=1.5 * int(router.qb_observed))
    assert (wrong_E - exact_E).abs().max() > width  # the one-bin check above fails for a wrong target
    BiasBalancer(torch.nn.ModuleList([router]), cfg, topk=K).step()
    assert torch.equal(router.expert_bias, quantile.qb_blend_center(start, solved_E.float(), 0.0))


def test_padding_leaves_the_quantile(megatron_world):
    router = make_router(megatron_world, lossfree=QB)
    x = torch.randn(6, 3, H)  # T = 18 (T*K/E = 4.5: interpolated, never asserted)
    padding = torch.zeros(6, 3, dtype=torch.bool)
    padding[4:] = True
    valid_T = ~padding.reshape(-1)
    expected = quantile.qb_exact_solve_E(logits_of(router, x), torch.zeros(E), K, valid_T=valid_T)
    router(x, padding_mask=padding)
    assert torch.equal(router.qb_solution_sum, expected.float())
    # the valid tokens alone give the same quantile
    assert torch.equal(expected, quantile.qb_exact_solve_E(logits_of(router, x)[valid_T], torch.zeros(E), K))


def test_node_limited_routing_takes_the_quantile_over_reachable_experts(megatron_world):
    cfg = QB.replace(route_limit="node", route_groups=4, route_max_groups=2)
    router = make_router(megatron_world, lossfree=cfg)
    router.expert_bias.copy_(torch.linspace(-0.5, 0.5, E))
    x = torch.randn(8, 2, H)
    values_TE = logits_of(router, x)
    masked = routing.mask_unselected_groups(values_TE + router.expert_bias, K, 4, 2, routing.group_score_node)
    reachable_TE = torch.isfinite(masked)
    assert not reachable_TE.all()  # the limit bites
    router(x)
    expected = quantile.qb_exact_solve_E(values_TE, router.expert_bias, K, reachable_TE=reachable_TE)
    assert torch.equal(router.qb_solution_sum, expected.float())
    assert not torch.equal(expected, quantile.qb_exact_solve_E(values_TE, router.expert_bias, K))


def test_softmax_gates_with_the_quantile_bias_in_score_space(megatron_world):
    cfg = QB.replace(quantile_space="scores")
    router = make_router(megatron_world, lossfree=cfg, moe_router_score_function="softmax")
    router.expert_bias.copy_(torch.linspace(-0.05, 0.05, E))
    x = torch.randn(4, 2, H)
    probs_TE, map_TE = router(x)
    scores_TE = torch.softmax(logits_of(router, x), dim=-1)
    chosen = (scores_TE + router.expert_bias).topk(K, dim=-1).indices
    assert torch.equal(map_TE, torch.zeros_like(map_TE).scatter(1, chosen, True))
    gates = scores_TE.gather(1, chosen)
    torch.testing.assert_close(probs_TE.gather(1, chosen), gates / gates.sum(-1, keepdim=True))


def test_v3_freeze_stops_the_quantile_rule(megatron_world):
    cfg = QB.replace(rate_schedule="v3", freeze_bias_after_tokens=8)
    router = make_router(megatron_world, lossfree=cfg)
    balancer = BiasBalancer(torch.nn.ModuleList([router]), cfg, topk=K)
    router(torch.randn(4, 2, H))  # 8 tokens: this step still updates
    balancer.step()
    moved = router.expert_bias.clone()
    assert moved.abs().sum() > 0
    router(torch.randn(4, 2, H))
    balancer.step()
    assert torch.equal(router.expert_bias, moved)


def test_the_step_is_one_collective_for_every_layer_and_statistic(megatron_world, monkeypatch):
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, group=None, **kw: calls.append((tensor.dtype, tensor.numel())))
    for estimator, dtype, per_layer in (("exact", torch.float64, E + 1), ("histogram", torch.int64, E * 10 + 1)):
        cfg = QB.replace(quantile_estimator=estimator, quantile_bins=10)
        routers = [make_router(megatron_world, layer_number=n, lossfree=cfg) for n in (1, 2, 3)]
        calls.clear()
        one_step(routers, [torch.randn(4, 2, H)], cfg, group=object())
        # counts (3 layers x E), non-finite flags (3), and the quantile statistics of every layer
        assert calls == [(dtype, 3 * E + 3 + 3 * per_layer)]


def test_device_limited_routing_also_enters_the_quantile(megatron_world):
    cfg = QB.replace(route_limit="device", route_groups=4, route_max_groups=2)
    router = make_router(megatron_world, lossfree=cfg)
    router.expert_bias.copy_(torch.linspace(0.5, -0.5, E))
    x = torch.randn(8, 2, H)
    values_TE = logits_of(router, x)
    masked = routing.mask_unselected_groups(values_TE + router.expert_bias, K, 4, 2, routing.group_score_device)
    router(x)
    expected = quantile.qb_exact_solve_E(values_TE, router.expert_bias, K, reachable_TE=torch.isfinite(masked))
    assert torch.equal(router.qb_solution_sum, expected.float())


def test_v2_device_dropping_with_the_quantile_rule_counts_before_dropping(megatron_world):
    """QB with V2 device-level dropping and exempt sequences (Megatron and torchtitan refuse dropping with
    QB): the quantile and the loads see every assignment, the capacity then drops some."""
    from megatron_moe_lossfree.megatron import exempt
    from tests.unit.test_moe_dropping import build_layer, make_config, skew_router, skewed_input

    cfg = QB.replace(drop="device", capacity_factor=0.5, exempt_fraction=0.25)
    layer = build_layer(make_config(cfg))
    skew_router(layer)
    x = skewed_input()  # S 6 x B 4: 24 tokens, 48 assignments, budget ceil(0.5 * 48) = 24
    exempt.begin_micro_batch(layer, torch.arange(4), step=0)
    layer(x)
    assert bool(layer.exempt_context.exempt_B.any())  # some sequences are exempt
    assert int(layer.router.local_tokens_per_expert.sum()) == 48
    assert int(layer.local_dropped) > 0
    values_TE = (x.reshape(-1, x.shape[-1]) @ layer.router.weight.detach().t()).float()
    expected = quantile.qb_exact_solve_E(values_TE, torch.zeros(values_TE.shape[1]), K)
    assert torch.equal(layer.router.qb_solution_sum, expected.float())
    BiasBalancer(torch.nn.ModuleList([layer]), cfg, topk=K).step()
    assert layer.router.expert_bias.abs().sum() > 0
