"""Multi-token prediction with the plugin's spec, one process: the MTP layers' MoE routers are the plugin's,
are named and logged as MTP layers, count every token once per forward, and join the balancer's one
update. Equivalence with Megatron-native MTP (one process, PP = 2): tests/distributed/test_mtp_equivalence.py."""

import torch

from megatron_moe_lossfree.config import LossFreeConfig
from megatron_moe_lossfree.megatron.compat import megatron_core_version
from tests.unit.test_router import K, make_config


def mtp_model(config):
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_moe_lossfree.megatron.specs import get_lossfree_block_spec, get_lossfree_mtp_block_spec

    torch.manual_seed(0)
    block = get_lossfree_block_spec(config)
    return GPTModel(config=config, transformer_layer_spec=block, vocab_size=64, max_sequence_length=16,
                    position_embedding_type="rope", mtp_block_spec=get_lossfree_mtp_block_spec(config, block))


def test_mtp_routers_are_the_plugins_and_join_the_one_update(megatron_world):
    from megatron_moe_lossfree.megatron.balancer import BiasBalancer, find_routers
    from megatron_moe_lossfree.megatron.router import LossFreeRouter

    config = make_config(mtp_num_layers=2, lossfree=LossFreeConfig(update_rate=1e-2, seq_aux_loss_coeff=1e-3))
    model = mtp_model(config)
    routers = find_routers([model])
    assert len(routers) == 4 and all(isinstance(r, LossFreeRouter) for r in routers)
    assert [r.layer_name() for r in routers] == ["layer 1", "layer 2", "MTP layer 1", "MTP layer 2"]
    assert [r.metric_layer_number() for r in routers] == [1, 2, 3, 4]
    inner = "transformer_layer" if megatron_core_version().release < (0, 19) else "mtp_model_layer"
    assert f"mtp.layers.1.{inner}.mlp.router.expert_bias" in model.state_dict()
    balancer = BiasBalancer([model], routers[0].lossfree, topk=K)
    tokens = torch.randint(0, 64, (2, 16))
    position = torch.arange(16).expand(2, 16)
    # Megatron's loss trackers are process-global: an earlier test sized their entries for fewer layers.
    clear_megatrons_loss_trackers()
    model(tokens, position, attention_mask=None, labels=tokens, loss_mask=torch.ones(2, 16)).float().mean().backward()
    assert [int(r.local_tokens_per_expert.sum()) for r in routers] == [2 * 16 * K] * 4
    assert all(float(r.last_aux_losses["seq_aux_loss"]) > 0 for r in routers)  # MTP losses attached too
    balancer.step()
    # one collective, one update: every MTP bias moved by exactly +-u (sign rule) from 0
    u = float(torch.tensor(1e-2))  # the rate as the fp32 bias holds it
    for router in routers:
        assert set(router.expert_bias.abs().tolist()) <= {0.0, u} and router.expert_bias.abs().sum() > 0
    assert [c.shape for c in balancer.last_micro_batch_counts] == [(1, 8)] * 4


def test_mtp_metrics_are_logged_apart(megatron_world):
    from types import SimpleNamespace

    from megatron_moe_lossfree.megatron.balancer import BiasBalancer, find_routers
    from megatron_moe_lossfree.training.metrics_log import step_metrics

    config = make_config(mtp_num_layers=1)
    model = mtp_model(config)
    balancer = BiasBalancer([model], find_routers([model])[0].lossfree, topk=K)
    tokens = torch.randint(0, 64, (2, 16))
    model(tokens, torch.arange(16).expand(2, 16), attention_mask=None, labels=tokens).float().mean().backward()
    balancer.step()
    m = step_metrics(SimpleNamespace(balancer=balancer, config=config, model=model))
    assert len(m["maxvio_batch_layers"]) == 2 and len(m["mtp_maxvio_batch_layers"]) == 1
    assert m["mtp_loads_layers"] == [balancer.last_counts[2].tolist()]
    assert len(m["mtp_bias_layers"]) == 1 and "mtp_maxvio_compute" in m


def clear_megatrons_loss_trackers() -> None:
    """Megatron's MoE and MTP loss trackers are process-global and sized by the first model that logs."""
    from megatron.core.transformer import multi_token_prediction
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "get_moe_metrics_tracker"):  # 0.19
        moe_utils.get_moe_metrics_tracker().metrics.clear()
    else:
        moe_utils.get_moe_layer_wise_logging_tracker().clear()
    helper = getattr(multi_token_prediction, "MTPLossLoggingHelper", None)
    if helper is not None and isinstance(getattr(helper, "tracker", None), dict):
        helper.tracker.clear()
