"""Megatron-LM's pretrain_gpt.py with aux-loss-free balancing (megatron_moe_lossfree), no Megatron patch.

Exact command: run_cpu.sh (CPU, one process; verified) or run_gpu.sh (GPUs; not yet run) beside this
file; in short
    MEGATRON_LM=/path/to/Megatron-LM torchrun --nproc-per-node N examples/megatron_lm/pretrain_lossfree_gpt.py \
        <pretrain_gpt.py flags> --num-experts 8 --moe-router-topk 2 --lossfree-update-rate 1e-3 ...
Hardware: NVIDIA GPUs (Megatron-LM's normal path), or a CPU with gloo (this script then activates the
plugin's CPU runtime and the Megatron-LM CPU shims below; docs/megatron_lm.md lists each).
Prints: Megatron-LM's usual log (" [...] iteration N/ M | ... lm loss: ..."), then on rank 0
"lossfree: 2 LossFreeRouter(s), 5 bias updates, 1280 tokens counted, ..." and one line per MoE layer
(bias range, last step's tokens per expert).

What it adds to pretrain_gpt.py's ``__main__`` block (the rest - forward_step, datasets - is imported
from it unchanged):
1. ``extra_args_provider=add_lossfree_args``: the ``--lossfree-*`` flags;
2. ``gpt_model_config_from_args``: the plugin's layer spec (unless ``--spec`` is given) and a
   post-wrap hook that installs the BiasBalancer as ``config.finalize_model_grads_func``.
Megatron's router flags keep their meaning (megatron/dropin.py): ``--moe-router-enable-expert-bias`` and
``--moe-router-bias-update-rate`` are mapped onto the plugin's balancer (sign rule, that rate), group-limited
routing onto its node limit; a ``--lossfree-*`` flag that contradicts one of them is refused by name.
"""

import os
import sys
import time

_PROGRAM_START_TIME = time.time()


def _use_megatron_lm_checkout() -> None:
    """Megatron-LM is not pip-installable: its root (pretrain_gpt.py, megatron/training) goes on sys.path
    first, so its megatron.core is used as well (the one it was released with)."""
    root = os.environ.get("MEGATRON_LM")
    if not root or not os.path.isfile(os.path.join(root, "pretrain_gpt.py")):
        sys.exit("error: MEGATRON_LM must point to a Megatron-LM checkout (the folder with pretrain_gpt.py)")
    sys.path.insert(0, os.path.abspath(root))


def _python311_shims() -> None:
    """Megatron-LM main declares Python >= 3.12; on 3.11 its only 3.12-ism met here is typing.override."""
    import typing

    if not hasattr(typing, "override"):
        typing.override = lambda func: func


class _TritonFreePlaceholders:
    """Without triton (CPU torch), Megatron-LM's imports still reach the Mamba/GDP kernels (through
    ``megatron.training.models.hybrid``), which import triton unguarded. Those modules, and only those,
    become placeholders whose functions raise when called; a GPT model never calls them. triton itself
    stays absent, so every ``try: import triton`` elsewhere still takes its no-triton branch."""

    PREFIXES = ("megatron.core.ssm.ops", "megatron.core.transformer.moe.ops.paged_stash")

    def find_spec(self, name, path=None, target=None):
        import importlib.machinery

        if name.startswith(self.PREFIXES):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        import types

        class Placeholder(types.ModuleType):
            def __getattr__(self, attr):
                if attr.startswith("__"):
                    raise AttributeError(attr)
                if attr.isupper():  # constants (block and chunk sizes) read at import time
                    return 64

                def needs_triton(*args, **kwargs):
                    raise RuntimeError(f"{self.__name__}.{attr} needs triton, which is not installed")

                return needs_triton

        module = Placeholder(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        return None


def _triton_free_imports() -> None:
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        sys.meta_path.insert(0, _TritonFreePlaceholders())


def _dataset_helpers_for_this_python() -> None:
    """Megatron-LM compiles its dataset helpers with ``make``, whose Makefile asks ``python3`` on PATH
    for the include paths and the file suffix; when that is another interpreter than the one running
    (a venv), the module is built for the wrong Python. Pass this interpreter's values to make."""
    import subprocess
    import sysconfig

    import megatron.core.datasets.utils as dataset_utils

    folder = os.path.dirname(os.path.abspath(dataset_utils.__file__))

    def compile_helpers():
        includes = subprocess.run([sys.executable, "-m", "pybind11", "--includes"], check=True,
                                  capture_output=True, text=True).stdout.strip()
        command = ["make", "-C", folder, f"LIBEXT={sysconfig.get_config_var('EXT_SUFFIX')}",
                   f"CPPFLAGS={includes}"]
        if subprocess.run(command).returncode != 0:
            sys.exit("error: could not compile Megatron's dataset helpers (pip install pybind11)")

    dataset_utils.compile_helpers = compile_helpers


def _cpu_shims() -> None:
    """Without CUDA: the plugin's CPU runtime, plus what Megatron-LM's training loop needs beyond it."""
    import torch

    from megatron_moe_lossfree.megatron import cpu_runtime

    if not cpu_runtime.activate():
        return
    cuda = torch.cuda
    cuda.set_device = lambda *a, **k: None
    cuda.device_count = lambda: 1
    cuda.max_memory_allocated = cuda.memory_allocated = cuda.memory_reserved = lambda *a, **k: 0
    cuda.max_memory_reserved = cuda.reset_peak_memory_stats = lambda *a, **k: 0
    # The rerun state machine saves/restores the CUDA RNG state around every step.
    cuda.get_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    cuda.set_rng_state = lambda *a, **k: None
    # pretrain() calls initialize_megatron() without its allow_no_cuda switch.
    import functools

    import megatron.training.training as training

    training.initialize_megatron = functools.partial(training.initialize_megatron, allow_no_cuda=True)
    _mtp_without_te()


def _mtp_without_te() -> None:
    """Megatron-LM main (d98e8a64) builds every MTP layer through ``is_inference_column_parallel_linear``,
    an ``isinstance`` against TE-derived classes that are None without Transformer Engine (a TypeError, with
    or without the plugin); without TE no such layer exists, so the answer is False."""
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:
        return
    import megatron.core.transformer.multi_token_prediction as mtp

    if hasattr(mtp, "is_inference_column_parallel_linear"):
        mtp.is_inference_column_parallel_linear = lambda module: False


def prepare_process() -> None:
    """Everything before Megatron-LM's own code runs: its path, then the shims (CPU ones only without CUDA)."""
    _use_megatron_lm_checkout()
    _python311_shims()
    _triton_free_imports()
    _cpu_shims()
    _dataset_helpers_for_this_python()


class _RecordChunks:
    """A ``post_wrap_hooks`` entry that keeps the wrapped model chunks (for the router summary)."""

    def __init__(self):
        self.chunks = []

    def __call__(self, model_chunks):
        self.chunks = list(model_chunks)
        return model_chunks


def record_model_configs() -> list:
    """Collect the GPTModelConfig that stock pretrain_gpt.py builds (for the summary afterwards), each with
    a ``_RecordChunks`` post-wrap hook, so that ``print_router_biases`` can read the routers."""
    from megatron.training.models.gpt import GPTModelBuilder

    recorded = []
    original_init = GPTModelBuilder.__init__

    def init(self, model_config):
        recorded.append(model_config)
        model_config.post_wrap_hooks.append(_RecordChunks())
        original_init(self, model_config)

    GPTModelBuilder.__init__ = init
    return recorded


def print_router_biases(model_config) -> None:
    """Every rank: the expert_bias of each router it holds, Megatron's TopKRouter or the plugin's
    LossFreeRouter alike (so a run without the plugin can be compared with one with it)."""
    chunks = [c for h in model_config.post_wrap_hooks if isinstance(h, _RecordChunks) for c in h.chunks]
    rank = int(os.environ.get("RANK", "0"))
    for chunk in chunks:
        for name, module in chunk.named_modules():
            bias_E = getattr(module, "expert_bias", None)
            if name.endswith("router") and bias_E is not None:
                layer = getattr(module, "layer_number", "?")
                values = " ".join(f"{v:+.9f}" for v in bias_E.tolist())
                print(f"router: rank {rank} layer {layer} {type(module).__name__} expert_bias [{values}]", flush=True)


def main() -> None:
    prepare_process()

    import pretrain_gpt
    from megatron.core.enums import ModelType
    from megatron.training import inprocess_restart, pretrain, set_startup_timestamps
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from megatron_moe_lossfree.megatron.args import add_lossfree_args
    from megatron_moe_lossfree.megatron.megatron_lm import gpt_model_config_from_args

    set_startup_timestamps(program_start=_PROGRAM_START_TIME, main_entry=time.time())
    provider = pretrain_gpt.train_valid_test_datasets_provider
    provider.is_distributed = True  # as pretrain_gpt.py's __main__ does
    run, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    args = parse_and_validate_args(extra_args_provider=add_lossfree_args,
                                   args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    model_config = gpt_model_config_from_args(args)
    run(pretrain_cfg_container_from_args(args, model_config), provider, ModelType.encoder_or_decoder,
        pretrain_gpt.forward_step, store=store, get_embedding_ranks=pretrain_gpt.get_embedding_ranks)
    print_balancer_summary(model_config)


def print_balancer_summary(model_config) -> None:
    """After training, rank 0 prints what the plugin did: routers found, bias updates, bias ranges."""
    from megatron_moe_lossfree.megatron.megatron_lm import InstallBalancerHook

    if int(os.environ.get("RANK", "0")) != 0:
        return
    hooks = [h for h in model_config.post_wrap_hooks if isinstance(h, InstallBalancerHook)]
    balancer = hooks[0].balancer if hooks else None
    if balancer is None:
        print("lossfree: no BiasBalancer was installed", flush=True)
        return
    lossfree = balancer.lossfree  # the effective options (Megatron's flags mapped, dropin.py)
    if lossfree.balancing == "bias":
        what = (f"{balancer.steps} bias updates, {balancer.tokens_seen} tokens counted, "
                f"rule {lossfree.update_rule}, u {lossfree.update_rate:g}")
    else:  # e.g. stock pretrain_gpt.py + --spec without --moe-router-enable-expert-bias: no bias
        what = f"{balancer.steps} steps, {balancer.tokens_seen} tokens counted, balancing {lossfree.balancing}"
    print(f"lossfree: {len(balancer.routers)} LossFreeRouter(s), {what}", flush=True)
    for router, counts_E in zip(balancer.routers, balancer.last_counts or [None] * len(balancer.routers)):
        bias_E = router.expert_bias
        line = f"lossfree: {router.layer_name()}:"
        if bias_E is not None:
            line += f" expert_bias min {bias_E.min().item():+.4f} max {bias_E.max().item():+.4f}"
        if counts_E is not None:
            line += f"{' |' if bias_E is not None else ''} last step tokens per expert {counts_E.tolist()}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
