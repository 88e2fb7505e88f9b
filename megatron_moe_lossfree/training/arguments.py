"""Arguments of ``mlf-pretrain``: Megatron-LM's names, ``--preset``, and the ``--lossfree-*`` flags.

Validation runs once, after presets and flags are merged, and reports every violation in one
``LossFreeConfigError`` (flag, value, fix) before any process group or model exists.
"""

from __future__ import annotations

import argparse
import math
from typing import Optional, Sequence

from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.megatron.args import add_lossfree_args, lossfree_config_from_args
from megatron_moe_lossfree.training.presets import preset_defaults


class _Parser(argparse.ArgumentParser):
    """argparse that raises LossFreeConfigError (one line, no usage dump) instead of exiting."""

    def error(self, message):
        raise LossFreeConfigError(f"{message}: see mlf-pretrain --help")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mlf-pretrain", description="Pretrain a GPT-MoE with Megatron-Core and "
                "aux-loss-free balancing (megatron_moe_lossfree).")
    p.add_argument("--preset", default=None, help="comma-separated presets: tiny-cpu, paper-1b, paper-3b, "
                   "v2-router, v3-router (flags given explicitly win)")
    g = p.add_argument_group("model")
    for name, kind, default in [
        ("num-layers", int, 4), ("hidden-size", int, 128), ("num-attention-heads", int, 4),
        ("ffn-hidden-size", int, None), ("moe-ffn-hidden-size", int, None), ("num-experts", int, 16),
        ("moe-router-topk", int, 2), ("moe-shared-expert-intermediate-size", int, None),
        ("moe-first-dense-layers", int, 0), ("seq-length", int, 128), ("max-position-embeddings", int, None),
        ("vocab-size", int, 4096), ("init-method-std", float, 0.02),
        ("moe-router-topk-scaling-factor", float, None),
    ]:
        g.add_argument(f"--{name}", type=kind, default=default)
    g.add_argument("--moe-router-score-function", default="sigmoid", metavar="{sigmoid,softmax}")
    g.add_argument("--moe-token-dispatcher-type", default="alltoall", metavar="{alltoall,allgather}")
    g.add_argument("--megatron-router", action="store_true",
                   help="build Megatron-Core's own TopKRouter and MoELayer (the plugin off: the built-in baseline)")
    # Megatron's router/MoE flags keep Megatron's meaning (megatron/dropin.py: honoured, mapped or refused).
    g.add_argument("--moe-router-enable-expert-bias", action="store_true",
                   help="Megatron's expert bias (sign rule); with the plugin's router it drives the plugin's balancer")
    g.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3)
    g.add_argument("--moe-router-load-balancing-type", nargs="+", default=["none"],
                   metavar="{aux_loss,seq_aux_loss,global_aux_loss,quantile_balancing,none}")
    g.add_argument("--moe-aux-loss-coeff", type=float, nargs="+", default=[0.0])
    g.add_argument("--moe-router-quantile-balancing-ema", type=float, default=0.0,
                   help="megatron-core >= 0.19: EMA of Megatron's quantile_balancing")
    g.add_argument("--moe-z-loss-coeff", type=float, default=None)
    g.add_argument("--moe-router-pre-softmax", action="store_true")
    g.add_argument("--moe-router-num-groups", type=int, default=None)
    g.add_argument("--moe-router-group-topk", type=int, default=None)
    g.add_argument("--moe-router-dtype", default=None, metavar="{fp32,fp64}",
                   help="Megatron's: the router GEMM and scores in this dtype (default: unset, as in Megatron-LM: the "
                        "model's dtype)")
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None)
    g.add_argument("--moe-token-drop-policy", default="probs", metavar="{probs,position}")
    g.add_argument("--moe-pad-expert-input-to-capacity", action="store_true")
    g.add_argument("--moe-router-force-load-balancing", action="store_true",
                   help="Megatron's benchmark mode: random router logits (honoured: Megatron's forward is inherited)")
    g.add_argument("--moe-input-jitter-eps", type=float, default=None,
                   help="Megatron's multiplicative input jitter of the router, uniform in [1 - eps, 1 + eps]")
    g.add_argument("--moe-router-force-biased", type=float, default=None,
                   help="megatron-core >= 0.19: Megatron's random expert bias of this std on the router logits")
    g.add_argument("--moe-enable-routing-replay", action="store_true",
                   help="Megatron's RouterReplay on every router (record / replay the selection)")
    g.add_argument("--mtp-num-layers", type=int, default=None,
                   help="Megatron's multi-token prediction: MTP layers after the decoder (on the last pipeline "
                        "stage); their MoE layers carry the plugin's router and balancer")
    g.add_argument("--mtp-loss-scaling-factor", type=float, default=0.1, help="Megatron's MTP loss weight")
    g.add_argument("--mtp-use-repeated-layer", action="store_true",
                   help="megatron-core >= 0.19: one MTP layer applied --mtp-num-layers times")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--transformer-impl", default="local", metavar="{local,transformer_engine}",
                   help="local: Megatron's local spec (CPU and GPU); transformer_engine: TE spec with grouped "
                        "expert GEMMs (GPU, needs the [te] extra)")
    g.add_argument("--fp8-format", default=None, metavar="{e4m3,hybrid}", help="FP8 GEMMs through TE (GPU)")
    g.add_argument("--fp8-recipe", default="delayed", metavar="{delayed,tensorwise,blockwise,mxfp8}")
    g.add_argument("--recompute-activations", action="store_true",
                   help="full activation recompute of every layer (Megatron's recompute_granularity=full)")
    t = p.add_argument_group("training")
    for name, kind, default in [
        ("micro-batch-size", int, 4), ("global-batch-size", int, 8), ("train-iters", int, 100),
        ("lr", float, 1e-3), ("min-lr", float, 0.0), ("lr-warmup-iters", int, 0), ("weight-decay", float, 0.1),
        ("clip-grad", float, 1.0), ("adam-beta1", float, 0.9), ("adam-beta2", float, 0.95), ("seed", int, 1234),
    ]:
        t.add_argument(f"--{name}", type=kind, default=default)
    t.add_argument("--lr-decay-style", default="cosine", metavar="{constant,linear,cosine}")
    par = p.add_argument_group("parallelism")
    for name in ("tensor-model-parallel-size", "pipeline-model-parallel-size", "expert-model-parallel-size"):
        par.add_argument(f"--{name}", type=int, default=1)
    par.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    par.add_argument("--sequence-parallel", action="store_true")
    d = p.add_argument_group("data")
    d.add_argument("--data-path", nargs="+", default=None,
                   help="Megatron indexed-dataset prefixes (P or W1 P1 W2 P2); default: the embedded corpus")
    d.add_argument("--tokenizer-model", default=None, help="tokenizer.json matching --data-path")
    d.add_argument("--split", default="98,2,0", help="train,valid,test weights (Megatron-LM syntax)")
    d.add_argument("--data-cache-dir", default="~/.cache/megatron_moe_lossfree")
    o = p.add_argument_group("logging and checkpoints")
    for name, default in [("log-interval", 10), ("eval-interval", 50), ("eval-iters", 4), ("save-interval", None)]:
        o.add_argument(f"--{name}", type=int, default=default)
    o.add_argument("--final-eval-iters", type=int, default=None,
                   help="global batches of the evaluation after the last step (default: --eval-iters); "
                        "MaxVio_global and the ablations' floors are read off it, so it wants more tokens "
                        "than the periodic evaluations")
    o.add_argument("--save", default=None)
    o.add_argument("--load", default=None)
    o.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="refuse to start when --load holds no checkpoint (default, as in Megatron-LM: start "
                        "from step 0 and say so)")
    o.add_argument("--out", default="runs/demo", help="run directory: TensorBoard events, metrics.jsonl")
    o.add_argument("--tensorboard-dir", default=None, help="default: OUT/tensorboard")
    # Megatron-LM's W&B flags, with its meaning: the same scalars as TensorBoard, from the logging rank.
    o.add_argument("--wandb-project", default="",
                   help="Weights & Biases project: log the TensorBoard scalars there too (needs the wandb extra: "
                        "pip install 'megatron_moe_lossfree[wandb]'; WANDB_MODE=offline writes the run to disk only)")
    o.add_argument("--wandb-exp-name", default="", help="W&B run name (required with --wandb-project, as in Megatron-LM)")
    o.add_argument("--wandb-save-dir", default="",
                   help="folder W&B writes its run directory under (default: OUT/wandb; Megatron-LM: SAVE/wandb)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    add_lossfree_args(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse, apply presets under explicit flags, then validate everything once."""
    parser = build_parser()
    first = parser.parse_args(argv)
    if first.preset:
        defaults = {}
        for name in first.preset.split(","):
            defaults.update(preset_defaults(name.strip()))
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    finalize_args(args)
    return args


def final_eval_iters(args: argparse.Namespace) -> int:
    """Global batches of the evaluation after the last step: ``--final-eval-iters``, else ``--eval-iters``;
    0 without evaluation (``--eval-iters 0``). Arguments parsed before the flag existed read ``--eval-iters``."""
    if not args.eval_iters:
        return 0
    final = getattr(args, "final_eval_iters", None)
    return args.eval_iters if final is None else final


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill derived values (said in the help) and validate; raises one error listing every problem."""
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.moe_ffn_hidden_size is None:
        args.moe_ffn_hidden_size = args.ffn_hidden_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    problems = list(_violations(args))
    if not problems:
        from megatron_moe_lossfree.megatron.te import check_te_request

        try:
            check_te_request(args.transformer_impl, args.fp8_format, args.fp8_recipe)
        except LossFreeConfigError as err:
            problems.append(str(err))
    try:
        args.lossfree = lossfree_config_from_args(args)
        if not args.megatron_router and not problems:
            from megatron_moe_lossfree.megatron.dropin import resolve_lossfree
            from megatron_moe_lossfree.training.model import megatron_router_fields

            resolve_lossfree(argparse.Namespace(**megatron_router_fields(args)), args.lossfree)
    except LossFreeConfigError as err:
        problems.append(str(err))
    if problems:
        raise LossFreeConfigError("; ".join(problems))
    return args


def _violations(a: argparse.Namespace):
    for name in ("num_layers", "hidden_size", "num_attention_heads", "num_experts", "moe_router_topk",
                 "seq_length", "vocab_size", "micro_batch_size", "global_batch_size", "train_iters",
                 "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                 "log_interval", "eval_interval"):
        if getattr(a, name) < 1:
            yield f"--{name.replace('_', '-')} ({getattr(a, name)}) must be >= 1"
    for name in ("lr", "min_lr", "weight_decay", "clip_grad", "init_method_std"):
        value = getattr(a, name)
        if not math.isfinite(value) or value < 0:
            yield f"--{name.replace('_', '-')} ({value}) must be a finite number >= 0"
    if a.lr_warmup_iters < 0 or a.lr_warmup_iters >= a.train_iters >= 1:
        yield (f"--lr-warmup-iters ({a.lr_warmup_iters}) must lie in [0, --train-iters ({a.train_iters})): "
               f"shorten the warmup or train longer")
    if a.eval_iters < 0:
        yield f"--eval-iters ({a.eval_iters}) must be >= 0 (0 skips evaluation)"
    if a.final_eval_iters is not None and a.final_eval_iters < 1 and a.eval_iters > 0:
        yield (f"--final-eval-iters ({a.final_eval_iters}) must be >= 1: leave it unset for --eval-iters "
               f"({a.eval_iters}), or pass --eval-iters 0 to skip evaluation")
    if a.moe_router_score_function not in ("sigmoid", "softmax"):
        yield f"--moe-router-score-function ({a.moe_router_score_function}) must be sigmoid or softmax"
    if a.moe_token_dispatcher_type not in ("alltoall", "allgather"):
        yield f"--moe-token-dispatcher-type ({a.moe_token_dispatcher_type}) must be alltoall or allgather"
    if a.lr_decay_style not in ("constant", "linear", "cosine"):
        yield f"--lr-decay-style ({a.lr_decay_style}) must be constant, linear or cosine"
    if a.moe_router_topk > a.num_experts >= 1:
        yield f"--moe-router-topk ({a.moe_router_topk}) must be <= --num-experts ({a.num_experts})"
    if not 0 <= a.moe_first_dense_layers < a.num_layers:
        yield (f"--moe-first-dense-layers ({a.moe_first_dense_layers}) must lie in [0, --num-layers "
               f"({a.num_layers})): at least one layer must be MoE")
    tp, pp, ep = a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.expert_model_parallel_size
    if a.num_experts >= 1 and ep >= 1 and a.num_experts % ep:
        yield (f"--num-experts ({a.num_experts}) must be divisible by --expert-model-parallel-size ({ep}): "
               f"use an EP size that divides {a.num_experts}")
    if tp >= 1 and a.num_attention_heads % tp:
        yield (f"--num-attention-heads ({a.num_attention_heads}) must be divisible by "
               f"--tensor-model-parallel-size ({tp})")
    if tp > 1 and not a.sequence_parallel:
        yield (f"--tensor-model-parallel-size ({tp}) with MoE needs --sequence-parallel: Megatron-Core "
               f"requires sequence parallelism for MoE under tensor parallelism")
    if a.sequence_parallel and tp >= 1 and a.seq_length % tp:
        yield f"--seq-length ({a.seq_length}) must be divisible by --tensor-model-parallel-size ({tp}) under SP"
    if pp >= 1 and a.num_layers % pp:
        yield f"--num-layers ({a.num_layers}) must be divisible by --pipeline-model-parallel-size ({pp})"
    if a.micro_batch_size >= 1 and a.global_batch_size % a.micro_batch_size:
        yield (f"--global-batch-size ({a.global_batch_size}) must be divisible by --micro-batch-size "
               f"({a.micro_batch_size}) times the data-parallel size")
    if a.megatron_router and a.lossfree_balancing != "none":
        yield ("--megatron-router (Megatron's own router, no plugin bias) and --lossfree-balancing bias "
               "disagree: add --lossfree-balancing none (and --moe-router-enable-expert-bias for Megatron's bias)")
    from megatron_moe_lossfree.megatron.compat import megatron_core_version

    if megatron_core_version().release < (0, 19) and (
            a.moe_router_quantile_balancing_ema or (a.megatron_router and "quantile_balancing" in
                                                    a.moe_router_load_balancing_type)):
        yield (f"Megatron's quantile balancing (--moe-router-load-balancing-type quantile_balancing with "
               f"--megatron-router, or --moe-router-quantile-balancing-ema) needs megatron-core >= 0.19 (installed: "
               f"{megatron_core_version()}): use the plugin's --lossfree-update-rule quantile")
    if megatron_core_version().release < (0, 19) and a.moe_router_force_biased is not None:
        yield (f"--moe-router-force-biased ({a.moe_router_force_biased:g}) needs megatron-core >= 0.19 (installed: "
               f"{megatron_core_version()}): drop it")
    if len(a.moe_aux_loss_coeff) not in (1, len(a.moe_router_load_balancing_type)):
        yield (f"--moe-aux-loss-coeff ({' '.join(map(str, a.moe_aux_loss_coeff))}) needs one value or one per "
               f"--moe-router-load-balancing-type ({' '.join(a.moe_router_load_balancing_type)})")
    yield from _route_limit_violations(a)
    yield from _wandb_violations(a)
    if a.transformer_impl not in ("local", "transformer_engine"):
        yield f"--transformer-impl ({a.transformer_impl}) must be local or transformer_engine"
    if a.seq_length > a.max_position_embeddings:
        yield (f"--seq-length ({a.seq_length}) must be <= --max-position-embeddings "
               f"({a.max_position_embeddings})")
    if (a.tokenizer_model is None) != (a.data_path is None):
        yield ("--data-path and --tokenizer-model go together: give both (your dataset and the tokenizer "
               "it was built with), or neither for the embedded corpus")


def _wandb_violations(a: argparse.Namespace):
    if not a.wandb_project:
        for name in ("wandb_exp_name", "wandb_save_dir"):
            if getattr(a, name):
                yield f"--{name.replace('_', '-')} ({getattr(a, name)}) has no effect without --wandb-project: add it"
        return
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        yield (f"--wandb-project ({a.wandb_project}) needs the wandb package, which is not installed: "
               f"pip install 'megatron_moe_lossfree[wandb]'")
    if not a.wandb_exp_name:
        yield f"--wandb-project ({a.wandb_project}) needs --wandb-exp-name (the run's name, as in Megatron-LM)"


def _route_limit_violations(a: argparse.Namespace):
    """Device-/node-limited routing layouts (REFERENCE 6), checked before any process starts."""
    limit = a.lossfree_route_limit
    if limit not in ("device", "node") or a.lossfree_route_max_groups is None:
        return
    groups = a.lossfree_route_groups or (a.expert_model_parallel_size if limit == "device" else None)
    if groups is None or groups < 1:
        return
    m, e, k = a.lossfree_route_max_groups, a.num_experts, a.moe_router_topk
    source = "--lossfree-route-groups" if a.lossfree_route_groups else "the EP size (--expert-model-parallel-size)"
    if e % groups:
        yield (f"--num-experts ({e}) must be divisible by the {limit} groups ({groups}, from {source}): "
               f"choose a group count that divides {e}")
    if m > groups:
        yield (f"--lossfree-route-max-groups ({m}) must be <= the {limit} groups ({groups}, from {source}): "
               f"lower M or raise the group count")
    elif e % groups == 0 and m * (e // groups) < k:
        yield (f"--lossfree-route-max-groups ({m}) x experts per group ({e // groups}) must be >= "
               f"--moe-router-topk ({k}): too few experts reachable; raise M")
    if limit == "node" and k % m:
        yield (f"--moe-router-topk ({k}) must be divisible by --lossfree-route-max-groups ({m}) for the node "
               f"rule (node score = sum of the top K/M affinities): pick M dividing {k}")
