"""MoE layer forward+backward at EP=2 (gloo, 2 processes): Megatron-Core's MoELayer vs LossFreeMoELayer
drop-free, expert-level dropping and V2 device-level dropping (cf 1.0, 10% exempt).

    python benchmarks/bench_moe_layer.py

Both layers use Megatron's alltoall dispatcher and the same weights and tokens. Ratios are against
Megatron's layer; the device-drop target is <= 1.15 x our drop-free layer.
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.multiprocessing as mp

H, FFN, E, K, S, B = 256, 512, 16, 2, 512, 4  # 2048 tokens per rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layer(plugin: bool, drop: str):
    from megatron_moe_lossfree.config import LossFreeConfig
    from megatron_moe_lossfree.megatron.compat import build_mlp
    from megatron_moe_lossfree.megatron.specs import get_lossfree_layer_local_spec
    from megatron_moe_lossfree.megatron.transformer_config import LossFreeTransformerConfig
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    lossfree = LossFreeConfig(drop=drop, capacity_factor=1.0 if drop != "none" else None)
    config = LossFreeTransformerConfig(
        lossfree=lossfree, num_layers=1, hidden_size=H, num_attention_heads=4, num_moe_experts=E, moe_router_topk=K,
        moe_ffn_hidden_size=FFN, ffn_hidden_size=FFN, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=not plugin, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        add_bias_linear=False, use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        moe_router_dtype="fp32", moe_token_dispatcher_type="alltoall", expert_model_parallel_size=2)
    spec = (get_lossfree_layer_local_spec if plugin else get_gpt_layer_local_spec)(num_experts=E)
    torch.manual_seed(0)
    layer = build_mlp(spec.submodules.mlp, config=config)
    layer.set_layer_number(1)
    return layer


def _rank(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      TORCHDYNAMO_DISABLE="1")
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from megatron_moe_lossfree.megatron import compat, cpu_runtime

    cpu_runtime.activate()
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps

    from megatron_moe_lossfree.megatron import exempt

    ps.initialize_model_parallel(expert_model_parallel_size=2)
    compat.seed_model_parallel_rng(1234)
    sys.path.insert(0, os.path.dirname(__file__))
    from common import interleaved

    layers = {"megatron": _layer(False, "none"), "drop-free": _layer(True, "none"),
              "expert-drop": _layer(True, "expert"), "device-drop": _layer(True, "device")}
    reference = layers["megatron"].state_dict()
    for name, layer in layers.items():
        if name != "megatron":
            layer.load_state_dict(reference, strict=False)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(S, B, H, generator=gen, requires_grad=True)
    sample_ids = torch.arange(rank * B, (rank + 1) * B)

    def step(name, layer):
        def run():
            scope = exempt.begin_micro_batch(layer, sample_ids, step=0) if name != "megatron" else None
            out, _ = layer(x)
            if scope is not None:
                out = scope.bind(out)
            out.sum().backward()
        return run

    stats = interleaved({n: step(n, l) for n, l in layers.items()}, warmup=2, repeat=9)
    # the slowest rank decides the step: take the max median across ranks
    medians = torch.tensor([stats[n]["median"] for n in layers] + [stats[n]["min"] for n in layers],
                           dtype=torch.float64)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    if rank == 0:
        values = medians.tolist()
        queue.put({"stats": stats, "medians": dict(zip(layers, values[: len(layers)])),
                   "minima": dict(zip(layers, values[len(layers):]))})
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    from common import fmt, machine, print_table

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    result = queue.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    med, low = result["medians"], result["minima"]
    rows = [[name, fmt(result["stats"][name]), f"{med[name]:.2f}", f"{med[name] / med['megatron']:.3f}",
             f"{med[name] / med['drop-free']:.3f}", f"{low[name] / low['megatron']:.3f}",
             f"{low[name] / low['drop-free']:.3f}"] for name in med]
    print_table(f"MoE layer fwd+bwd at EP=2 (gloo, 2 ranks; {2 * S * B} tokens, H {H}, E {E}, K {K}), ms, "
                f"{machine()}", ["layer", "rank-0 median (min-max)", "median, max over ranks", "vs Megatron (medians)",
                                 "vs our drop-free (medians)", "vs Megatron (minima)", "vs drop-free (minima)"],
                rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
