"""``make gpu-check``: the plugin on one GPU in one command, in at most 8 minutes.

    make gpu-check                                   # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --dry-run         # the plan (stages, commands, timeouts); touches no GPU
    python benchmarks/gpu_check.py --stages train-fp8,router-fused   # a subset (after the card), e.g. to rerun

Hardware: one NVIDIA GPU. Transformer Engine (``pip install 'megatron_moe_lossfree[te]'``) for the TE spec,
FP8 and the fused-router comparison; without it those stages are skipped with the reason, and the bf16 run
uses Megatron's local spec.

Stages, each a subprocess with its own timeout; the total stays under 8 minutes, and a stage that fails or
times out is reported while the next one runs:

  card          the GPU: name, memory, compute capability, NVIDIA driver, CUDA, torch, TE, megatron-core
  gpu-tests     pytest -m "gpu or fp8" tests/gpu (all but the next stage's file; the fused Triton router on CUDA among them)
  router-graph  tests/gpu/test_cuda_graph_router.py: the router captured in a CUDA graph (forward and
                backward), replayed over micro-batches; outputs, gradients, counts, bias updates and
                MaxVio_computation-batch against eager, one line each
  train-bf16    50 steps of mlf-pretrain with the plugin (bias balancing), bf16, TE spec (grouped GEMMs)
  train-bf16-native  the same 50 steps with Megatron-Core's own router and expert bias (the plugin off);
                the summary gives the plugin's tokens/s over this one's
  train-fp8     the same 50 steps with FP8 GEMMs (--fp8-format hybrid --fp8-recipe tensorwise); TE's FP8
                context covers the grouped expert GEMMs and the attention/dense linears alike
  router        benchmarks/bench_router.py: LossFreeRouter, unfused and fused (--moe-router-fusion, the plugin's
                Triton kernels), vs Megatron's TopKRouter with expert bias, unfused and (with TE) TE's fused router
  router-fused  the same against Megatron's moe_router_fusion=True (TE's fused top-k)

Every line a stage prints is echoed with the card name in front; a summary table (stage, status, seconds,
figures) ends the run. Exit status 0 when every stage passed or was skipped for a missing optional extra
(Transformer Engine: the stages that need it are named, not verified), 1 otherwise (a failure, a timeout, no
CUDA device, no time left). torch.compile is off in the
stages (TORCHDYNAMO_DISABLE=1), so compile time stays out of the budget. Outputs: runs/gpu_check/.

The orchestrator itself imports neither torch nor CUDA; only the stages do.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_BUDGET_S = 480  # 8 minutes, all stages together
RESERVE_S = 5         # kept for the summary
NO_CUDA_STATUS = 3    # the card stage's exit status when this machine has no CUDA device
OUT = "runs/gpu_check"

# The examples/gpu_fp8_pretrain.sh model (tiny-cpu's layers and experts at GPU width), 50 steps on one GPU.
TRAIN_ARGS = [
    "--preset", "tiny-cpu", "--hidden-size", "512", "--num-attention-heads", "8", "--ffn-hidden-size", "2048",
    "--moe-ffn-hidden-size", "512", "--seq-length", "512", "--micro-batch-size", "8", "--global-batch-size", "8",
    "--train-iters", "50", "--lr-warmup-iters", "5", "--log-interval", "10", "--eval-interval", "50",
    "--eval-iters", "2", "--bf16", "--no-progress",
]

# The router captured in a torch.cuda.CUDAGraph (fwd + bwd) and replayed against eager (its own stage: it
# prints one line per compared quantity).
ROUTER_GRAPH_TEST = "tests/gpu/test_cuda_graph_router.py"

# The same run with Megatron-Core's own router and its built-in expert-bias update (the plugin off): the
# baseline of the plugin's tokens/s.
NATIVE_ARGS = ["--megatron-router", "--moe-router-enable-expert-bias", "--lossfree-balancing", "none"]


@dataclass(frozen=True)
class Stage:
    name: str
    command: tuple[str, ...]
    timeout_s: int
    skip: Optional[str] = None
    """Why the stage does not run on this machine (None: it runs)."""
    out_dir: Optional[str] = None
    """Training stages: the --out directory (emptied before the run, metrics read after it)."""


def plan(python: str, *, have_te: bool) -> list[Stage]:
    """The stages, in order. ``python``: the interpreter the stages run with."""
    te_missing = "needs Transformer Engine: pip install 'megatron_moe_lossfree[te]'"
    pretrain = (python, "-m", "megatron_moe_lossfree", "pretrain", *TRAIN_ARGS)
    te = ("--transformer-impl", "transformer_engine") if have_te else ("--transformer-impl", "local")
    return [
        Stage("card", (python, "benchmarks/gpu_check.py", "--card"), 40),
        Stage("gpu-tests", (python, "-m", "pytest", "-q", "-rs", "-m", "gpu or fp8", "tests/gpu",
                            f"--ignore={ROUTER_GRAPH_TEST}"), 70),
        Stage("router-graph", (python, "-m", "pytest", "-q", "-rs", "-s", "-m", "gpu", ROUTER_GRAPH_TEST), 25),
        Stage("train-bf16", (*pretrain, *te, "--out", f"{OUT}/train-bf16"), 75, out_dir=f"{OUT}/train-bf16"),
        Stage("train-bf16-native", (*pretrain, *te, *NATIVE_ARGS, "--out", f"{OUT}/train-bf16-native"), 75,
              out_dir=f"{OUT}/train-bf16-native"),
        Stage("train-fp8", (*pretrain, "--transformer-impl", "transformer_engine", "--fp8-format", "hybrid",
                            "--fp8-recipe", "tensorwise", "--out", f"{OUT}/train-fp8"), 75,
              skip=None if have_te else te_missing, out_dir=f"{OUT}/train-fp8"),
        Stage("router", (python, "benchmarks/bench_router.py"), 70),
        Stage("router-fused", (python, "benchmarks/bench_router.py", "--megatron-fusion"), 45,
              skip=None if have_te else te_missing),
    ]


# --------------------------------------------------------------------------------------------------
# The card stage (runs in its own process: the only place that asks CUDA about the device)
# --------------------------------------------------------------------------------------------------


def print_card() -> int:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device on this machine: gpu-check needs one NVIDIA GPU")
        return NO_CUDA_STATUS
    props = torch.cuda.get_device_properties(0)
    driver = "unknown (nvidia-smi not found)"
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
        driver = query.stdout.strip().splitlines()[0] if query.returncode == 0 and query.stdout.strip() else driver
    try:
        api = torch._C._cuda_getDriverVersion()
        api = f"{api // 1000}.{api % 1000 // 10}"
    except Exception:  # noqa: BLE001 - a private torch call; the card line says so instead
        api = "unknown"
    try:
        import transformer_engine

        te_version = transformer_engine.__version__
    except ImportError:
        te_version = "not installed"
    from importlib.metadata import version

    print(f"card: {torch.cuda.get_device_name(0)}")
    print(f"memory: {props.total_memory / 2**30:.1f} GiB")
    print(f"compute capability: {props.major}.{props.minor}")
    print(f"NVIDIA driver: {driver} (CUDA driver API {api})")
    print(f"CUDA (torch build): {torch.version.cuda}")
    print(f"torch: {torch.__version__}")
    print(f"Transformer Engine: {te_version}")
    print(f"megatron-core: {version('megatron-core')}")
    return 0


# --------------------------------------------------------------------------------------------------
# Running the stages
# --------------------------------------------------------------------------------------------------


def run_stage(stage: Stage, timeout_s: float, echo) -> tuple[str, float, list[str]]:
    """Run one stage, echoing its lines as they come; returns (status, seconds, lines)."""
    if stage.out_dir:
        shutil.rmtree(os.path.join(ROOT, stage.out_dir), ignore_errors=True)
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONUNBUFFERED="1")
    start = time.time()
    proc = subprocess.Popen(stage.command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            echo(lines[-1])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout_s)
        status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the stage's own process group (torch helpers included)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        status = f"timed out ({timeout_s:.0f} s)"
    reader.join(timeout=5)
    return status, time.time() - start, lines


def figures(stage: Stage, lines: list[str]) -> str:
    """The stage's headline figures for the summary table."""
    if stage.name == "card":
        card = dict(line.split(": ", 1) for line in lines if ": " in line)
        keys = ("memory", "compute capability", "NVIDIA driver", "CUDA (torch build)", "Transformer Engine")
        return ", ".join(f"{k} {card[k]}" for k in keys if k in card)
    if stage.name in ("gpu-tests", "router-graph"):
        summary = [line for line in lines if re.search(r"\d+ (passed|failed|skipped|error|deselected)", line)]
        return summary[-1].strip("= ") if summary else ""
    if stage.out_dir:
        return training_figures(os.path.join(ROOT, stage.out_dir, "metrics.jsonl"))
    ratios = [line for line in lines if line.startswith("router ")]
    return "; ".join(ratios)


def training_figures(path: str) -> str:
    if not os.path.isfile(path):
        return "no metrics.jsonl"
    with open(path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    train = [r for r in rows if r.get("kind") == "train"]
    valid = [r for r in rows if r.get("kind") == "valid"]
    if not train:
        return "no training step logged"
    first, last = train[0], train[-1]
    text = (f"step {last['step']}: loss {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f}, "
            f"tokens/s {last.get('tokens_per_s', float('nan')):.0f}")
    if last.get("maxvio_batch") is not None:
        text += f", MaxVio_batch {last['maxvio_batch']:.3f}"
    if valid:
        text += f", val ppl {valid[-1]['ppl']:.2f}"
    return text


def mean_tokens_per_s(path: str) -> Optional[float]:
    """Mean tokens/s of a training stage's logged windows after the first (the first holds the warm-up)."""
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    values = [r["tokens_per_s"] for r in rows if r.get("kind") == "train" and r.get("tokens_per_s")][1:]
    return sum(values) / len(values) if values else None


def print_summary(card: str, results: list[tuple[str, str, float, str]]) -> None:
    print(f"\n### gpu-check on {card}\n")
    print("| stage | status | seconds | figures |")
    print("|---|---|---|---|")
    for name, status, seconds, text in results:
        print(f"| {name} | {status} | {seconds:.0f} | {text} |")
    plugin, native = (mean_tokens_per_s(os.path.join(ROOT, OUT, name, "metrics.jsonl"))
                      for name in ("train-bf16", "train-bf16-native"))
    if plugin and native:
        print(f"\nplugin / Megatron-native training tokens/s on {card}: {plugin / native:.3f} "
              f"({plugin:.0f} vs {native:.0f}; mean of the logged windows after the first)")
    print(flush=True)


def run_all(stages: list[Stage]) -> int:
    start = time.time()
    card, no_cuda = "unknown GPU", False
    results = []
    for stage in stages:
        remaining = TOTAL_BUDGET_S - RESERVE_S - (time.time() - start)
        skip = stage.skip or ("no CUDA device (see the card stage)" if no_cuda else None)
        if skip is None and remaining < 10:
            skip = "no time left in the 8-minute budget"
        if skip:
            print(f"[{card}] {stage.name}: skipped: {skip}", flush=True)
            results.append((stage.name, f"skipped: {skip}", 0.0, ""))
            continue
        timeout_s = min(stage.timeout_s, remaining)
        print(f"[{card}] == {stage.name} (timeout {timeout_s:.0f} s): {shlex.join(stage.command)}", flush=True)
        buffered = stage.name == "card"  # its lines are echoed once the card's name is known
        status, seconds, lines = run_stage(
            stage, timeout_s, echo=(lambda line: None) if buffered else
            (lambda line, name=stage.name: print(f"[{card}] {name}: {line}", flush=True)))
        if stage.name == "card":
            no_cuda = status == f"failed (exit {NO_CUDA_STATUS})"
            status = "failed: no CUDA device" if no_cuda else status
            named = [line.split(": ", 1)[1] for line in lines if line.startswith("card: ")]
            card = named[0] if named else card
            for line in lines:
                print(f"[{card}] card: {line}", flush=True)
        results.append((stage.name, status, seconds, figures(stage, lines)))
    print_summary(card, results)
    print(f"gpu-check wall time: {time.time() - start:.0f} s (budget {TOTAL_BUDGET_S} s)")
    optional = {f"skipped: {stage.skip}" for stage in stages if stage.skip}  # a missing extra, named in the plan
    unverified = [name for name, status, _, _ in results if status in optional]
    if unverified:
        print(f"not verified on this machine (optional extra missing): {', '.join(unverified)}")
    return 0 if all(status == "passed" or status in optional for _, status, _, _ in results) else 1


def print_plan(stages: list[Stage]) -> None:
    print(f"gpu-check plan: {len(stages)} stages, total budget {TOTAL_BUDGET_S} s "
          f"(stage timeouts sum to {sum(s.timeout_s for s in stages)} s); run from {ROOT}")
    for stage in stages:
        note = f"  [skipped here: {stage.skip}]" if stage.skip else ""
        print(f"{stage.name} (timeout {stage.timeout_s} s): {shlex.join(stage.command)}{note}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The plugin on one GPU in one command (at most 8 minutes).")
    p.add_argument("--dry-run", action="store_true", help="print the plan (stages, commands, timeouts) and exit")
    p.add_argument("--stages", default=None, help="comma-separated subset of the stages, in plan order")
    p.add_argument("--card", action="store_true", help=argparse.SUPPRESS)  # the card stage itself
    a = p.parse_args(argv)
    if a.card:
        return print_card()
    stages = plan(sys.executable, have_te=importlib.util.find_spec("transformer_engine") is not None)
    if a.stages:
        wanted = a.stages.split(",")
        unknown = [name for name in wanted if name not in {s.name for s in stages}]
        if unknown:
            print(f"error: --stages ({a.stages}) names unknown stages {', '.join(unknown)}: use some of "
                  f"{', '.join(s.name for s in stages)}", file=sys.stderr)
            return 2
        stages = [s for s in stages if s.name in wanted or s.name == "card"]  # the card always comes first
    if a.dry_run:
        print_plan(stages)
        return 0
    return run_all(stages)


if __name__ == "__main__":
    sys.exit(main())
