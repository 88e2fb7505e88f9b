"""CUDA graphs over the router, the CPU side: the training forward and backward read nothing on the host and
leave the router's Python state untouched, so a captured graph replays exactly what eager runs do.

Every host read a capture would fail on (``Tensor.item``, ``tolist``, ``__bool__``, ``__int__``,
``__float__``, ``__index__``, ``numpy``, ``.cpu()``) and every op whose output size depends on the data
(``nonzero``, ``bincount``, boolean-mask indexing, ...) raises while micro-batches run forward and backward;
the module's attributes and buffers (identity, address, shape, dtype) are compared before and after; the
static per-micro-batch counts then give the balancer exactly the eager counts. The GPU half (a real
``torch.cuda.CUDAGraph`` capture and replay) is tests/gpu/test_cuda_graph_router.py.
"""

import contextlib
import copy

import pytest
import torch

from megatron_moe_lossfree.config import LossFreeConfig
from tests.unit.test_router import E, H, K, make_router

HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")


# Ops whose output size depends on the data: on CUDA they wait for the device to learn it (a capture fails).
DATA_SIZED_OPS = {"nonzero", "argwhere", "bincount", "masked_select", "unique", "unique_consecutive",
                  "repeat_interleave", "masked_scatter"}


class DataSizedOpsRaise(torch.overrides.TorchFunctionMode):
    """Raise on data-sized ops and on indexing with a boolean mask (its size is the mask's count)."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in DATA_SIZED_OPS and not (name == "repeat_interleave" and (kwargs or {}).get("output_size")):
            raise AssertionError(f"data-sized op {name} inside the router's forward or backward")
        if name in ("__getitem__", "index_select") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                raise AssertionError("boolean-mask indexing inside the router's forward or backward")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads_raise():
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"host read Tensor.{name} inside the router's forward or backward")
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, refuse(name))
    try:
        with DataSizedOpsRaise():
            yield
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def python_state(module: torch.nn.Module) -> dict:
    """Every attribute by identity (containers also by their members' identities), and every buffer by
    identity, address, shape and dtype: what a replayed graph could not reproduce if it changed."""
    state = {}
    for name, value in vars(module).items():
        if name in ("_buffers", "_parameters", "_modules"):
            continue
        members = None
        if isinstance(value, dict):
            members = [(k, id(v)) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            members = [id(v) for v in value]
        state[name] = (id(value), members, copy.copy(value) if isinstance(value, (bool, int, float, str)) else None)
    for name, buffer in module._buffers.items():
        state["buffer " + name] = None if buffer is None else (id(buffer), buffer.data_ptr(), tuple(buffer.shape),
                                                                buffer.dtype)
    for name, param in module._parameters.items():
        state["param " + name] = (id(param), param.data_ptr())
    return state


CASES = {
    "sign bias (Megatron's flags)": dict(lossfree=None, moe_router_enable_expert_bias=True),
    "Megatron's aux, seq-aux and z losses": dict(moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"],
                                                 moe_aux_loss_coeff=[1e-2, 1e-3], moe_z_loss_coeff=1e-3),
    "plugin's V3 and V2 losses": dict(lossfree=LossFreeConfig(seq_aux_loss_coeff=1e-3, device_loss_coeff=1e-2,
                                                              comm_loss_coeff=1e-2, route_max_groups=1)),
    "group-limited (node) routing": dict(moe_router_num_groups=4, moe_router_group_topk=2,
                                         moe_router_enable_expert_bias=True, lossfree=None),
    "quantile, exact": dict(lossfree=LossFreeConfig(update_rule="quantile")),
    "quantile, histogram": dict(lossfree=LossFreeConfig(update_rule="quantile", quantile_estimator="histogram",
                                                        quantile_space="scores")),
    "softmax with bias": dict(moe_router_score_function="softmax", lossfree=LossFreeConfig()),
}


def build(megatron_world, overrides):
    from megatron_moe_lossfree.megatron.dropin import MEGATRON_ONLY

    overrides = dict(overrides)
    if overrides.get("lossfree", 0) is None:
        overrides["lossfree"] = MEGATRON_ONLY
    router = make_router(megatron_world, **overrides)
    if router.expert_bias is not None:
        router.expert_bias.copy_(torch.linspace(-0.05, 0.05, E))
    return router


def expected_experts(router, x_SBH):
    """Eager reference selection: the router's own select on the same scores (no counting)."""
    with torch.no_grad():
        logits = x_SBH.reshape(-1, H) @ router.weight.t()
        from megatron_moe_lossfree import routing

        scores = routing.compute_scores(logits, router.score_function)
        select = logits if router.selects_on_logits() else scores
        return router.select(select)


@pytest.mark.parametrize("name", list(CASES))
def test_training_forward_and_backward_read_nothing_on_the_host(megatron_world, name):
    from megatron_moe_lossfree.megatron.balancer import BiasBalancer

    router = build(megatron_world, CASES[name])
    balancer = BiasBalancer([router], router.lossfree, topk=K)
    torch.manual_seed(1)
    micro_batches = [torch.randn(5, 3, H) for _ in range(3)]
    references = [torch.bincount(expected_experts(router, x).flatten(), minlength=E) for x in micro_batches]
    before = python_state(router)
    with host_reads_raise():
        for x in micro_batches:
            probs_TE, _ = router(x.requires_grad_(True))
            probs_TE.sum().backward()
    assert python_state(router) == before
    assert router.weight.grad is not None and (router.expert_bias is None or router.expert_bias.grad is None)
    assert int(router.micro_batch_index) == 3
    expected_ME = torch.stack(references)
    assert torch.equal(router.local_tokens_per_expert, expected_ME.sum(0))
    if router.quantile:
        assert int(router.qb_observed) == (3 if router.lossfree.quantile_estimator == "exact" else 3 * 15)
    balancer.step()
    assert torch.equal(balancer.last_micro_batch_counts[0], expected_ME)
    assert int(router.micro_batch_index) == 0 and int(router.micro_batch_counts_ME.abs().sum()) == 0
    assert python_state(router) == before  # the balancer's step also keeps every buffer in place


def test_more_micro_batches_than_room_warns_and_grows(megatron_world):
    from megatron_moe_lossfree.megatron.balancer import BiasBalancer

    router = build(megatron_world, dict(lossfree=LossFreeConfig()))
    balancer = BiasBalancer([router], router.lossfree, topk=K)
    assert router.micro_batch_capacity() == 8  # no Megatron-LM calculator here: the default room
    balancer.reserve_micro_batches(2)  # never shrinks
    assert router.micro_batch_capacity() == 8
    x = torch.randn(2, 2, H)
    for _ in range(9):
        router(x)[0].sum().backward()
    with pytest.warns(RuntimeWarning, match="step 1 ran 9 micro-batches, more than the routers had room for"):
        balancer.step()
    assert balancer.last_micro_batch_counts == [None] and router.micro_batch_capacity() == 9
    assert int(balancer.last_counts[0].sum()) == 9 * 4 * K  # the bias still saw every token
    for _ in range(9):
        router(x)[0].sum().backward()
    balancer.step()
    assert balancer.last_micro_batch_counts[0].shape == (9, E)
    assert int(balancer.last_micro_batch_counts[0].sum()) == 9 * 4 * K


def test_graph_warmup_runs_count_nothing(megatron_world, monkeypatch):
    """The warm-up runs of a capture (placeholder inputs) leave counts alone; the balance losses still attach."""
    from megatron_moe_lossfree.megatron import compat

    router = build(megatron_world, dict(lossfree=LossFreeConfig(seq_aux_loss_coeff=1e-3)))
    monkeypatch.setattr(compat, "is_graph_warmup", lambda: True)
    router(torch.randn(3, 2, H))[0].sum().backward()
    assert int(router.local_tokens_per_expert.sum()) == 0 and int(router.micro_batch_index) == 0
    assert float(router.last_aux_losses["seq_aux_loss"]) > 0
