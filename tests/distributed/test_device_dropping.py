"""Device-level dropping (V2 section 2.2.4, REFERENCE 7) and drop-free dispatch at EP = 2 and EP = 4.

One launch of 4 gloo ranks runs every case (EP = 4: one group of 4; EP = 2: two groups of 2), both of
Megatron's dispatchers. Each rank routes its own tokens through a LossFreeMoELayer whose experts hold
slices of ONE global set of expert weights; the rank returns its routing, keep mask and the layer's
output next to a dense loop over all experts. The parent then checks, per EP group:
- drop-free: layer output == dense loop with the router's gates, token for token;
- device mode: every device within budget ceil(cf*T*K/D) (T = the group's tokens) except for exempt
  assignments; every dropped assignment's gate <= every kept non-exempt gate on its device; no exempt
  sequence loses a token; the keep masks equal ONE process's ``device_keep_mask`` on the group's whole
  batch; the output equals the dense loop over the kept assignments;
- evaluation: nothing dropped.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_moe_lossfree import dropping
from tests.distributed import harness
from tests.distributed.harness import Case

pytestmark = pytest.mark.distributed

H, E, K, S, B, FFN = 16, 8, 2, 4, 2, 32  # 8 tokens per rank
CF, FRACTION, SEED, STEP = 1.0, 0.25, 5, 2
WORLD = 4
LAYOUTS = [(ep, dispatcher) for ep in (2, 4) for dispatcher in ("alltoall", "allgather")]


# --------------------------------------------------------------------------------------------------
# Rank side (module-level: the harness pickles these by name)
# --------------------------------------------------------------------------------------------------


def _global_weights():
    """Router [E, H] and every expert's fc1 [E, FFN, H] / fc2 [E, H, FFN], the same on every rank."""
    gen = torch.Generator().manual_seed(1234)
    router = torch.randn(E, H, generator=gen) * 0.5
    router[0, 0] = 3.0  # with _inputs' offset: expert 0 (device 0) is the popular one, so budgets bind
    return router, torch.randn(E, FFN, H, generator=gen) * 0.2, torch.randn(E, H, FFN, generator=gen) * 0.2


def _inputs(rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(S, B, H, generator=gen)
    x[..., 0] += 2.0
    return x


def sample_ids(rank: int) -> torch.Tensor:
    return torch.arange(rank * B, (rank + 1) * B) + 1000  # global sample indices of this rank's sequences


def _build_layer(ep: int, dispatcher: str, drop: str, **loss_coeffs):
    from megatron.core import parallel_state as ps
    from megatron_moe_lossfree.megatron.compat import build_mlp

    from megatron_moe_lossfree.config import LossFreeConfig
    from megatron_moe_lossfree.megatron import compat, cpu_runtime
    from megatron_moe_lossfree.megatron.specs import get_lossfree_layer_local_spec
    from megatron_moe_lossfree.megatron.transformer_config import LossFreeTransformerConfig

    cpu_runtime.activate()
    ps.initialize_model_parallel(expert_model_parallel_size=ep)
    compat.seed_model_parallel_rng(1234)
    lossfree = LossFreeConfig(balancing="none", drop=drop, capacity_factor=CF if drop != "none" else None,
                              exempt_fraction=FRACTION, seed=SEED, **loss_coeffs)
    config = LossFreeTransformerConfig(
        lossfree=lossfree, num_layers=1, hidden_size=H, num_attention_heads=4, num_moe_experts=E,
        moe_router_topk=K, moe_ffn_hidden_size=FFN, ffn_hidden_size=FFN, moe_router_score_function="sigmoid",
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, add_bias_linear=False,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm",
        moe_router_dtype="fp32", moe_token_dispatcher_type=dispatcher, expert_model_parallel_size=ep)
    layer = build_mlp(get_lossfree_layer_local_spec(num_experts=E).submodules.mlp, config=config)
    layer.set_layer_number(1)
    layer.router.keep_selection = True  # the test reads last_selection
    router_w, fc1, fc2 = _global_weights()
    with torch.no_grad():
        layer.router.weight.copy_(router_w)
        for local, global_id in enumerate(layer.local_expert_indices):
            layer.experts.local_experts[local].linear_fc1.weight.copy_(fc1[global_id])
            layer.experts.local_experts[local].linear_fc2.weight.copy_(fc2[global_id])
    return layer


def _dense(x_TH, gates_TK, experts_TK, keep_TK):
    """out[t] = sum_k keep * g * fc2_e(gelu(fc1_e x_t)) over ALL experts' weights (float64)."""
    _, fc1, fc2 = _global_weights()
    out = torch.zeros(x_TH.shape, dtype=torch.float64)
    for t in range(x_TH.shape[0]):
        for k in range(K):
            if keep_TK[t, k]:
                e = int(experts_TK[t, k])
                y = fc2[e].double() @ F.gelu(fc1[e].double() @ x_TH[t].double())
                out[t] += float(gates_TK[t, k]) * y
    return out


def _keep_in_router_order(layer, experts_TK):
    """The layer's keep mask (columns by ascending expert id) in the router's column order."""
    keep_TE = torch.zeros(experts_TK.shape[0], E, dtype=torch.bool)
    keep_TE.scatter_(1, torch.sort(experts_TK, dim=1).values, layer.last_keep_TK)
    return keep_TE.gather(1, experts_TK)


def run_layer_case(ep: int, dispatcher: str, drop: str) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_moe_lossfree.megatron import exempt

    rank = dist.get_rank()
    layer = _build_layer(ep, dispatcher, drop)
    x = _inputs(rank)
    exempt.begin_micro_batch(layer, sample_ids(rank), step=STEP)
    out, _ = layer(x)
    gates_TK, experts_TK = layer.router.last_selection
    if drop == "none":
        keep_TK = torch.ones_like(experts_TK, dtype=torch.bool)
    else:
        keep_TK = _keep_in_router_order(layer, experts_TK)
    dense = _dense(x.view(-1, H), gates_TK, experts_TK, keep_TK)
    result = dict(ep_group=dist.get_process_group_ranks(ps.get_expert_model_parallel_group()),
                  ep_rank=ps.get_expert_model_parallel_rank(), gates=gates_TK.clone(), experts=experts_TK.clone(),
                  keep=keep_TK, max_diff=float((out.view(-1, H).double() - dense).abs().max()),
                  counted=(int(layer.local_dropped), int(layer.local_assigned)))
    layer.eval()
    eval_out, _ = layer(x)
    all_kept = torch.ones_like(experts_TK, dtype=torch.bool)
    result["eval_max_diff"] = float((eval_out.view(-1, H).double()
                                     - _dense(x.view(-1, H), gates_TK, experts_TK, all_kept)).abs().max())
    return result


def run_loss_case(ep: int) -> dict:
    """The V2 device and communication losses on an EP layout: the router counts devices from it."""
    layer = _build_layer(ep, "alltoall", "none", device_loss_coeff=0.05, comm_loss_coeff=0.02)
    x = _inputs(0)
    layer(x)
    router = layer.router
    scores_TE = torch.sigmoid(x.view(-1, H) @ router.weight.detach().t())
    return dict(ep_size=router.ep_size, scores=scores_TE, experts=router.last_selection[1].clone(),
                losses={k: float(v) for k, v in router.last_aux_losses.items()})


def run_consistency_case() -> dict:
    """--lossfree-check-consistency: a bias that diverged on one rank is named with its layer and rank."""
    import torch.distributed as dist

    from megatron_moe_lossfree.config import LossFreeConfig
    from megatron_moe_lossfree.megatron.balancer import BiasBalancer, BiasInconsistencyError

    layer = _build_layer(2, "alltoall", "none")
    router = layer.router
    router.register_buffer("expert_bias", torch.zeros(E))
    balancer = BiasBalancer([layer], LossFreeConfig(check_consistency=1), group=dist.group.WORLD, topk=K)
    balancer.check_consistency()  # all equal: passes silently
    if dist.get_rank() == 2:
        with torch.no_grad():
            router.expert_bias[3] += 1e-7  # one ulp-scale drift on one rank
    try:
        balancer.check_consistency()
    except BiasInconsistencyError as err:
        return {"error": str(err)}
    return {"error": None}


# --------------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------------


def _name(ep, dispatcher, drop):
    return f"ep{ep}_{dispatcher}_{drop}"


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    cases = [Case(_name(ep, d, drop), run_layer_case, dict(ep=ep, dispatcher=d, drop=drop))
             for ep, d in LAYOUTS for drop in ("none", "device")]
    cases += [Case(f"losses_ep{ep}", run_loss_case, dict(ep=ep)) for ep in (2, 4)]
    cases += [Case("consistency", run_consistency_case, {})]
    return harness.launch_cases(cases, WORLD, timeout_s=300, workdir=str(tmp_path_factory.mktemp("dropping")))


def _groups(per_rank: list) -> list[list[dict]]:
    """Rank results grouped by EP group, each in EP-rank order (the order of the gathered view)."""
    groups = {}
    for result in per_rank:
        groups.setdefault(tuple(result["ep_group"]), []).append(result)
    return [sorted(g, key=lambda r: r["ep_rank"]) for g in groups.values()]


def _exempt_T(global_rank: int) -> torch.Tensor:
    flags = dropping.select_exempt_sequences(sample_ids(global_rank), seed=SEED, step=STEP, fraction=FRACTION)
    return flags.repeat(S)  # t = s*B + b


@pytest.mark.parametrize("ep,dispatcher", LAYOUTS)
def test_drop_free_output_equals_dense_loop(launch, ep, dispatcher):
    per_rank = launch.results[_name(ep, dispatcher, "none")]
    assert len(_groups(per_rank)) == WORLD // ep and all(len(g) == ep for g in _groups(per_rank))
    for result in per_rank:
        assert result["max_diff"] < 1e-5
        assert result["counted"] == (0, 0)


@pytest.mark.parametrize("ep,dispatcher", LAYOUTS)
def test_device_dropping_equals_the_single_process_oracle(launch, ep, dispatcher):
    per_rank = launch.results[_name(ep, dispatcher, "device")]
    any_drop = False
    for group in _groups(per_rank):
        gates = torch.cat([r["gates"] for r in group])
        experts = torch.cat([r["experts"] for r in group])
        keep = torch.cat([r["keep"] for r in group])
        exempt_T = torch.cat([_exempt_T(rank) for rank in group[0]["ep_group"]])
        oracle = dropping.device_keep_mask(gates, experts, num_devices=ep, capacity_factor=CF, exempt=exempt_T,
                                           num_experts=E)
        assert torch.equal(keep, oracle)
        any_drop |= not bool(keep.all())
        for result in group:  # each rank counted exactly its own assignments
            assert result["counted"] == (int((~result["keep"]).sum()), S * B * K)
            assert result["max_diff"] < 1e-5  # dispatch of the kept assignments only
    assert any_drop  # the skewed router makes device 0 overflow: the case is not vacuous


@pytest.mark.parametrize("ep,dispatcher", LAYOUTS)
def test_device_budget_lowest_gates_and_exempt_sequences(launch, ep, dispatcher):
    per_rank = launch.results[_name(ep, dispatcher, "device")]
    exempt_on_full_device = False
    for group in _groups(per_rank):
        gates = torch.cat([r["gates"] for r in group])
        experts = torch.cat([r["experts"] for r in group])
        keep = torch.cat([r["keep"] for r in group])
        exempt_TK = torch.cat([_exempt_T(rank) for rank in group[0]["ep_group"]]).unsqueeze(1).expand_as(keep)
        budget = dropping.device_budget(gates.shape[0], K, ep, CF)
        device = experts // (E // ep)
        assert keep[exempt_TK].all()  # no exempt sequence loses a token
        for d in range(ep):
            on_d = device == d
            kept_free = keep & on_d & ~exempt_TK
            dropped = ~keep & on_d
            assert int((keep & on_d).sum()) <= max(budget, int((exempt_TK & on_d).sum()))
            if dropped.any():
                assert int((keep & on_d).sum()) == max(budget, int((exempt_TK & on_d).sum()))  # drops stop at budget
                if kept_free.any():
                    assert float(gates[dropped].max()) <= float(gates[kept_free].min())
                exempt_on_full_device |= bool((exempt_TK & on_d).any())
    assert exempt_on_full_device  # an exempt assignment was kept on a device that had to drop


@pytest.mark.parametrize("ep,dispatcher", LAYOUTS)
def test_eval_forward_drops_nothing(launch, ep, dispatcher):
    for result in launch.results[_name(ep, dispatcher, "device")]:
        assert result["eval_max_diff"] < 1e-5


@pytest.mark.parametrize("ep", [2, 4])
def test_device_and_comm_losses_count_devices_from_the_ep_layout(launch, ep):
    from megatron_moe_lossfree import balancing

    for result in launch.results[f"losses_ep{ep}"]:
        assert result["ep_size"] == ep
        # Megatron flattens [S, B] as t = s*B + b; the losses see sequence-major tokens.
        scores = result["scores"].view(S, B, E).transpose(0, 1).reshape(-1, E)
        experts = result["experts"].view(S, B, K).transpose(0, 1).reshape(-1, K)
        expected_dev = balancing.device_balance_loss(scores, experts, alpha=0.05, num_devices=ep, num_sequences=B)
        expected_comm = balancing.comm_balance_loss(scores, experts, alpha=0.02, num_devices=ep, max_devices=ep,
                                                    num_sequences=B)
        assert result["losses"]["device_loss"] == pytest.approx(float(expected_dev), rel=1e-5)
        assert result["losses"]["comm_loss"] == pytest.approx(float(expected_comm), rel=1e-5)
        # With one device the comm loss degenerates to a constant: the EP layout really changed it.
        one_device = balancing.comm_balance_loss(scores, experts, alpha=0.02, num_devices=1, max_devices=1,
                                                 num_sequences=B)
        assert result["losses"]["comm_loss"] != pytest.approx(float(one_device), rel=1e-3)


def test_consistency_check_names_the_layer_and_the_diverged_rank(launch):
    errors = [r["error"] for r in launch.results["consistency"]]
    assert errors == ["expert_bias of layer 1 differs across ranks at step 0: ranks [2] disagree with rank 0; "
                      "the count all-reduce group is misconfigured or a rank loaded another checkpoint"] * WORLD
