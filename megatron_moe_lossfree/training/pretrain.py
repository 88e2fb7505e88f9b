"""``mlf-pretrain``: GPT-MoE pretraining on Megatron-Core with aux-loss-free balancing.

One process (CPU demo, tiny-cpu preset, embedded corpus)::

    mlf-pretrain --preset tiny-cpu

One node, several processes (gloo on CPU, NCCL on GPUs)::

    torchrun --nproc-per-node 4 -m megatron_moe_lossfree pretrain --preset tiny-cpu \\
        --tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 2

Many nodes: the same under ``torchrun --nnodes N --node-rank R --rdzv-endpoint HOST:PORT`` or srun.
Prints a progress bar, a table line every ``--log-interval`` steps (step, loss, lr, tokens/s,
MaxVio_batch), validation loss/perplexity every ``--eval-interval`` steps and a final summary; writes
TensorBoard events and ``metrics.jsonl`` under ``--out``, and with ``--wandb-project`` the same scalars to
Weights & Biases (``WANDB_MODE=offline``: a run directory under ``--wandb-save-dir`` only).
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.training.arguments import final_eval_iters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """torchrun's env:// rendezvous, or a one-process group on a free local port."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    bind = {}
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        bind = {"device_id": torch.device("cuda", local_rank)}  # NCCL then never guesses the rank's GPU
    if "RANK" in os.environ:
        dist.init_process_group(backend, **bind)
    else:  # one process: a private rendezvous, without leaking RANK/MASTER_PORT to child processes
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                **bind)


def check_world(args: argparse.Namespace, world: int) -> None:
    """Layout checks that need the world size; one error listing every problem."""
    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
    etp = args.expert_tensor_parallel_size or tp
    problems = []
    if world % (tp * pp):
        problems.append(f"world size ({world}) must be divisible by --tensor-model-parallel-size x "
                        f"--pipeline-model-parallel-size ({tp} x {pp}): launch a multiple of {tp * pp} processes")
    elif world % (ep * etp * pp):
        problems.append(f"world size ({world}) must be divisible by --expert-model-parallel-size x expert TP x "
                        f"PP ({ep} x {etp} x {pp}): launch a multiple of {ep * etp * pp} processes")
    else:
        dp = world // (tp * pp)
        if args.global_batch_size % (args.micro_batch_size * dp):
            problems.append(f"--global-batch-size ({args.global_batch_size}) must be divisible by "
                            f"--micro-batch-size x data-parallel size ({args.micro_batch_size} x {dp})")
    if args.bf16 and not torch.cuda.is_available():
        problems.append("--bf16 needs a CUDA GPU: Megatron's mixed-precision optimizer checks CUDA tensor "
                        "types; drop --bf16 on CPU")
    if problems:
        raise LossFreeConfigError("; ".join(problems))


@dataclass
class Trainer:
    """Everything the loop touches; built by ``setup``."""

    args: argparse.Namespace
    config: object
    model: object
    optimizer: object
    scheduler: object
    train_data: object
    valid_data: object
    balancer: Optional[object]
    logger: object
    step: int = 0
    history: list = field(default_factory=list)
    mtp_losses: Optional[list] = None
    """Megatron's MTP loss of each depth at the last step (the last pipeline stage; None without MTP)."""
    final_valid_data: object = None
    """The final evaluation's micro-batches: the validation split from its first sample (so its tokens are
    distinct while they fit one epoch of the split, and the same after any resume)."""
    drop_carry: tuple = (0, 0)
    """(dropped, assigned) of the current log window taken out of the layers by a checkpoint save, or
    loaded from one: the next logged drop fraction covers the whole window (metrics_log.drop_window)."""

    # -- one micro-batch ------------------------------------------------------------------------------
    def forward_step(self, data_iterator, model):
        from megatron_moe_lossfree.megatron import exempt

        batch = next(data_iterator)
        if torch.cuda.is_available():  # Megatron-LM's get_batch: the micro-batch goes to this rank's GPU
            batch = {key: value if key == "sample_ids" else value.cuda(non_blocking=True)
                     for key, value in batch.items()}
        # V2 exempt sequences travel with this micro-batch, also into its recompute (exempt.py).
        scope = exempt.begin_micro_batch(model, batch["sample_ids"], step=self.step)
        # Megatron's MTP loss (inside GPTModel) takes the loss mask, as Megatron-LM's pretrain_gpt passes it.
        mtp = {"loss_mask": batch["loss_mask"]} if self.config.mtp_num_layers else {}
        output = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"], **mtp)
        output = scope.bind(output)
        loss_mask = batch["loss_mask"].float()

        def loss_func(output_tensor):
            loss = (output_tensor.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1)
            return loss, {"lm loss": loss.detach().clone()}

        return output, loss_func

    def run_schedule(self, data, *, forward_only: bool) -> Optional[float]:
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        a = self.args
        num_micro = a.global_batch_size // (a.micro_batch_size * ps.get_data_parallel_world_size())
        if self.balancer is not None and not forward_only:
            self.balancer.reserve_micro_batches(num_micro)  # a no-op once the routers have room
        losses = get_forward_backward_func()(
            forward_step_func=self.forward_step, data_iterator=data, model=[self.model],
            num_microbatches=num_micro, seq_length=a.seq_length, micro_batch_size=a.micro_batch_size,
            forward_only=forward_only)
        return self.average_loss(losses)

    def average_loss(self, losses) -> Optional[float]:
        """Mean over micro-batches and DP ranks; on the last pipeline stage (None elsewhere)."""
        from megatron.core import parallel_state as ps

        if not ps.is_pipeline_last_stage():
            return None
        value = torch.stack([entry["lm loss"] for entry in losses]).mean().reshape(1)
        dist.all_reduce(value, group=ps.get_data_parallel_group())
        return float(value) / ps.get_data_parallel_world_size()

    # -- one optimizer step ---------------------------------------------------------------------------
    def train_step(self) -> Optional[float]:
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = self.run_schedule(self.train_data, forward_only=False)
        if self.config.mtp_num_layers:
            from megatron.core import parallel_state as ps

            from megatron_moe_lossfree.megatron.compat import take_mtp_losses

            a = self.args
            self.mtp_losses = take_mtp_losses(a.global_batch_size // (a.micro_batch_size
                                                                      * ps.get_data_parallel_world_size()))
        self.optimizer.step()
        self.scheduler.step(increment=self.args.global_batch_size)
        self.step += 1
        return loss

    def evaluate(self, iters: Optional[int] = None, data=None) -> Optional[float]:
        """Mean validation loss over ``iters`` global batches (default ``--eval-iters``) of ``data``
        (default: the periodic evaluations' stream)."""
        from megatron_moe_lossfree.training.metrics_log import reset_eval_counts

        reset_eval_counts(self)
        self.model.eval()
        with torch.no_grad():
            losses = [self.run_schedule(self.valid_data if data is None else data, forward_only=True)
                      for _ in range(self.args.eval_iters if iters is None else iters)]
        self.model.train()
        if losses and losses[0] is not None:
            return sum(losses) / len(losses)
        return None


def _is_logging_rank() -> bool:
    return dist.get_rank() == dist.get_world_size() - 1  # on the last pipeline stage, like Megatron-LM


def setup(args: argparse.Namespace) -> Trainer:
    from megatron_moe_lossfree.megatron import cpu_runtime

    cpu_runtime.activate()
    init_distributed()
    check_world(args, dist.get_world_size())
    from megatron_moe_lossfree.megatron.moe_layer import validate_dropping

    validate_dropping(args)  # before building anything: names flag, value and fix; warns on EP = 1 device

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_moe_lossfree.megatron import compat
    from megatron_moe_lossfree.megatron.balancer import install_bias_balancer
    from megatron_moe_lossfree.training import data as data_mod
    from megatron_moe_lossfree.training.checkpoint import check_load_dir, load_checkpoint
    from megatron_moe_lossfree.training.logger import RunLogger
    from megatron_moe_lossfree.training.model import build_model, transformer_config_from_args

    # Data and tokenizer are checked before Megatron's parallel state exists: bad files fail first.
    prefixes, weights, tokenizer = prepare_data(args, data_mod)
    if tokenizer.vocab_size > args.vocab_size:
        raise LossFreeConfigError(
            f"--vocab-size ({args.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}): set --vocab-size {tokenizer.vocab_size} or more")
    data_mod.check_split(prefixes, args.split)

    init_model_parallel(args)
    compat.seed_model_parallel_rng(args.seed)
    torch.manual_seed(args.seed)
    gb, evals = args.global_batch_size, args.train_iters // args.eval_interval + 1
    # Megatron's builder writes its index cache on rank 0 first, then the other ranks read it.
    train_ds, valid_ds, _ = data_mod.build_gpt_datasets(
        prefixes, weights, tokenizer, seq_length=args.seq_length, seed=args.seed, split=args.split,
        num_samples=[args.train_iters * gb, max(1, (evals * args.eval_iters + final_eval_iters(args)) * gb), None],
        cache_dir=os.path.join(os.path.expanduser(args.data_cache_dir), "index-cache"))
    if valid_ds is None and args.eval_iters > 0:
        raise LossFreeConfigError(f"--split ({args.split}) leaves no validation data: give the valid "
                                  f"split a share, e.g. 98,2,0, or pass --eval-iters 0")

    config = transformer_config_from_args(args)
    model = build_model(args, config, vocab_size=args.vocab_size)
    config.finalize_model_grads_func = finalize_model_grads
    balancer = None
    if not args.megatron_router:
        balancer = install_bias_balancer(config, [model], args.lossfree)

    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, clip_grad=args.clip_grad, bf16=args.bf16,
        params_dtype=config.params_dtype, use_distributed_optimizer=False), [model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters * gb,
        lr_decay_steps=args.train_iters * gb, lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=args.train_iters * gb, wd_incr_style="constant")

    step, drop_carry = 0, (0, 0)
    if args.load and check_load_dir(args.load, exit_on_missing=args.exit_on_missing_checkpoint):
        common = load_checkpoint(args.load, model, optimizer, scheduler)
        if common is not None:
            step = int(common["iteration"])
            plugin = common.get("lossfree") or {}
            if balancer is not None and plugin.get("balancer"):
                balancer.load_state_dict(plugin["balancer"])
            drop_carry = tuple(int(x) for x in plugin.get("drop_window") or (0, 0))

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    batches = dict(global_batch_size=gb, micro_batch_size=args.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
    train_data = data_mod.iterate_micro_batches(train_ds, start_step=step, **batches)
    # Each evaluation reads the next --eval-iters batches; a resumed job skips those its evaluations
    # already read (Megatron-LM's consumed_valid_samples), so it scores the same samples as an
    # uninterrupted one.
    evals_done = step // args.eval_interval if args.eval_interval else 0
    valid_data = (data_mod.iterate_micro_batches(valid_ds, start_step=evals_done * args.eval_iters, **batches)
                  if valid_ds else None)
    final_valid_data = data_mod.iterate_micro_batches(valid_ds, start_step=0, **batches) if valid_ds else None
    logger = RunLogger(args.out, enabled=_is_logging_rank(), total_steps=args.train_iters, start_step=step,
                       tensorboard_dir=args.tensorboard_dir, progress=not args.no_progress,
                       wandb=wandb_settings(args))
    return Trainer(args=args, config=config, model=model, optimizer=optimizer, scheduler=scheduler,
                   train_data=train_data, valid_data=valid_data, final_valid_data=final_valid_data,
                   balancer=balancer, logger=logger, step=step,
                   drop_carry=drop_carry)


def wandb_settings(args: argparse.Namespace) -> Optional[dict]:
    """``wandb.init`` keywords for ``--wandb-project`` (None without it), with Megatron-LM's meaning: the run
    is named ``--wandb-exp-name``, lives under ``--wandb-save-dir`` (default OUT/wandb) and keeps the
    arguments as its config."""
    if not args.wandb_project:
        return None
    from dataclasses import asdict

    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    config["lossfree"] = asdict(args.lossfree)
    return {"project": args.wandb_project, "name": args.wandb_exp_name, "config": config,
            "dir": args.wandb_save_dir or os.path.join(args.out, "wandb")}


def init_model_parallel(args: argparse.Namespace) -> None:
    """Megatron's parallel state for ``args``; a second ``setup`` in one process (a notebook, the
    training-step benchmark) reuses it when the layout is the same, and refuses a different one."""
    from megatron.core import parallel_state as ps

    sizes = dict(tensor_model_parallel_size=args.tensor_model_parallel_size,
                 pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                 expert_model_parallel_size=args.expert_model_parallel_size,
                 expert_tensor_parallel_size=args.expert_tensor_parallel_size or args.tensor_model_parallel_size)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(**sizes)
        return
    current = dict(tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
                   pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
                   expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
                   expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size())
    if current != sizes:
        differ = ", ".join(f"--{k.replace('_', '-')} {sizes[k]} (initialized: {current[k]})"
                           for k in sizes if sizes[k] != current[k])
        raise LossFreeConfigError(f"Megatron's parallel state is already initialized with another layout: "
                                  f"{differ}; call megatron.core.parallel_state.destroy_model_parallel() "
                                  f"first or use the same layout")


def prepare_data(args, data_mod):
    """(prefixes, weights, tokenizer): ``--data-path`` as given, or the embedded corpus (built by rank 0)."""
    if args.data_path is None:
        cache = os.path.expanduser(args.data_cache_dir)
        if dist.get_rank() == 0:
            data_mod.embedded_dataset(cache, args.vocab_size)
        dist.barrier()
        prefix, tokenizer_path = data_mod.embedded_dataset(cache, args.vocab_size)
        prefixes, weights = [prefix], None
    else:
        prefixes, weights = data_mod.parse_data_path(args.data_path)
        tokenizer_path = args.tokenizer_model
    tokenizer = data_mod.Tokenizer(tokenizer_path)
    for prefix in prefixes:
        data_mod.check_indexed_dataset(prefix, min(tokenizer.vocab_size, args.vocab_size))
    return prefixes, weights, tokenizer


def train(trainer: Trainer) -> dict:
    """The loop: steps, periodic table lines and evaluations, checkpoints, final summary."""
    from megatron_moe_lossfree.training.checkpoint import save_checkpoint
    from megatron_moe_lossfree.training.metrics_log import eval_metrics, record_valid_routing, step_loads, step_metrics

    a, log = trainer.args, trainer.logger
    tokens_per_step = a.global_batch_size * a.seq_length
    summary = {"first_loss": None, "last_loss": None, "val_loss": None, "val_ppl": None}
    window_start, window_steps = time.time(), 0
    while trainer.step < a.train_iters:
        loss = trainer.train_step()
        window_steps += 1
        log.advance()
        if a.lossfree.dump_loads:
            log.record_loads(trainer.step, step_loads(trainer))
        if summary["first_loss"] is None:
            summary["first_loss"] = loss
        summary["last_loss"] = loss
        if trainer.step % a.log_interval == 0 or trainer.step == a.train_iters:
            elapsed = time.time() - window_start
            m = step_metrics(trainer)
            if trainer.mtp_losses:
                m.update(mtp_loss=sum(trainer.mtp_losses) / len(trainer.mtp_losses), mtp_loss_layers=trainer.mtp_losses)
            m.update(loss=loss if loss is not None else float("nan"),
                     lr=trainer.optimizer.param_groups[0]["lr"],
                     tokens_per_s=tokens_per_step * window_steps / max(elapsed, 1e-9))
            log.table_line(trainer.step, a.train_iters, m)
            log.record(trainer.step, "train", m)
            window_start, window_steps = time.time(), 0
        if a.eval_iters > 0 and (trainer.step % a.eval_interval == 0 or trainer.step == a.train_iters):
            final = trainer.step == a.train_iters
            if final:
                record_valid_routing(trainer)  # the ablations' best-bias search reads the final evaluation
            val = (trainer.evaluate(final_eval_iters(a), trainer.final_valid_data) if final
                   else trainer.evaluate())
            balance = eval_metrics(trainer)
            if final:
                write_valid_routing(trainer)
            if val is not None:
                ppl = math.exp(min(val, 50.0))
                summary.update(val_loss=val, val_ppl=ppl, maxvio_global=balance.get("maxvio_global"))
                text = f"validation at step {trainer.step}: loss {val:.4f} | perplexity {ppl:.2f}"
                if balance:
                    text += f" | MaxVio_global {balance['maxvio_global']:.3f}"
                log.print(text)
                log.record(trainer.step, "valid", {"loss": val, "ppl": ppl, **balance})
        if a.save and a.save_interval and trainer.step % a.save_interval == 0:
            save_checkpoint(a.save, trainer.step, trainer.model, trainer.optimizer, trainer.scheduler,
                            plugin_state(trainer))
    if a.save and (not a.save_interval or trainer.step % a.save_interval):
        save_checkpoint(a.save, trainer.step, trainer.model, trainer.optimizer, trainer.scheduler,
                        plugin_state(trainer))
    return summary


def write_valid_routing(trainer: Trainer) -> None:
    """``OUT/valid_routing.pt`` of the evaluation that just ran (a collective; the logging rank writes)."""
    from megatron_moe_lossfree.training.metrics_log import VALID_ROUTING, collect_valid_routing

    dump = collect_valid_routing(trainer, trainer.step)
    if dump is not None and trainer.args.out and _is_logging_rank():
        os.makedirs(trainer.args.out, exist_ok=True)
        torch.save(dump, os.path.join(trainer.args.out, VALID_ROUTING))


def plugin_state(trainer: Trainer) -> dict:
    """The plugin's part of a checkpoint (a collective when dropping is on: call it on every rank).

    - ``balancer``: tokens seen and steps (the V3 freeze point survives a resume); the biases themselves
      are model buffers, saved with the weights;
    - ``drop_window``: global (dropped, assigned) of the unfinished log window, so the first drop
      fraction logged after a resume covers the same steps as in an uninterrupted run.
    Exempt sequences need no state: they are a pure function of (seed, step, sample id).
    """
    from megatron_moe_lossfree.training.metrics_log import drop_window, dropping_enabled

    state = {"balancer": trainer.balancer.state_dict() if trainer.balancer is not None else None}
    if dropping_enabled(trainer):
        trainer.drop_carry = drop_window(trainer)
        state["drop_window"] = list(trainer.drop_carry)
    return state


def pretrain(args: argparse.Namespace) -> dict:
    trainer = setup(args)
    try:
        summary = train(trainer)
    finally:
        trainer.logger.close()
    if trainer.logger.enabled:
        trainer.logger.print(
            f"done: {trainer.step} steps | first loss {summary['first_loss']:.4f} -> last loss "
            f"{summary['last_loss']:.4f}" + (f" | final validation perplexity {summary['val_ppl']:.2f}"
                                             if summary["val_ppl"] is not None else "")
            + f" | outputs in {args.out}")
    return summary
