"""Whole training steps of the tiny-cpu preset: the plugin vs Megatron-Core's built-in expert bias, and the
plugin with its balance metrics logged every step vs not logged.

    python benchmarks/bench_train_step.py [--rounds 40] [--rss-steps 20]

Step time: ONE process builds a trainer per variant (same seed, so the same initial weights and data order;
each ``setup`` after the first reuses Megatron's parallel state) and times single optimizer steps
round-robin over the variants, the order rotating every round, after 3 warm-up steps each. Ratios are the
median over rounds of the ratio within a round. Process-to-process variation on a
shared 2-core machine (measured: +-15% between identical runs) would otherwise swamp a 2-3% effect.
"metrics every step" times ``train_step`` plus what the training loop does on a logging step: the balance
metrics (``step_metrics``: MaxVio batch / computation-batch, loads, biases), the console line, TensorBoard
and the JSONL row. Peak RSS: one fresh ``mlf-pretrain`` process per variant, sampled every 50 ms.
Targets: plugin / built-in step-time ratio <= 1.03; metrics on / off <= 1.02.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

from common import machine, print_table

BUILTIN, PLUGIN, METRICS = "megatron built-in bias", "plugin", "plugin + metrics every step"
FLAGS = {
    BUILTIN: ["--megatron-router", "--moe-router-enable-expert-bias", "--lossfree-balancing", "none"],
    PLUGIN: [],
    METRICS: ["--log-interval", "1"],
}
RESULT_MARK = "BENCH-RESULT "


def peak_rss_mib(flags: list[str], steps: int) -> float:
    """Peak RSS of a fresh ``mlf-pretrain --preset tiny-cpu`` process running ``steps`` steps."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "megatron_moe_lossfree", "pretrain", "--preset", "tiny-cpu", "--train-iters",
               str(steps), "--eval-iters", "0", "--no-progress", "--out", out, *flags]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, TORCHDYNAMO_DISABLE="1"))
        peak, handle = 0, psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, handle.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.05)
        if proc.returncode:
            raise SystemExit(proc.stderr.read()[-2000:])
        return peak / 2**20


def time_steps_in_process(rounds: int, warmup: int = 3) -> dict:
    """{variant: [seconds per step]}; both trainers live in this process."""
    from megatron_moe_lossfree.training.arguments import parse_args
    from megatron_moe_lossfree.training.metrics_log import step_metrics
    from megatron_moe_lossfree.training.pretrain import setup

    out = tempfile.mkdtemp(prefix="bench-train-step-")
    common = ["--preset", "tiny-cpu", "--eval-iters", "0", "--no-progress", "--train-iters", str(rounds + warmup + 1)]
    # Three trainers from the same seed: round r runs optimizer step r of each on the same batch (the
    # built-in and the plugin bias follow the same sign rule), so the step's routing -- which moves the
    # step time by +-15% as experts fill unevenly -- is the same within a round.
    trainers = {name: setup(parse_args([*common, *FLAGS[name], "--out", f"{out}/{i}"]))
                for i, name in enumerate((BUILTIN, PLUGIN, METRICS))}
    tokens = trainers[PLUGIN].args.global_batch_size * trainers[PLUGIN].args.seq_length

    def one_step(name: str) -> float:
        trainer = trainers[name]
        start = time.perf_counter()
        loss = trainer.train_step()
        if name == METRICS:  # what train() does on a logging step, minus the lr lookup
            m = step_metrics(trainer)
            m.update(loss=loss, lr=trainer.optimizer.param_groups[0]["lr"], tokens_per_s=0.0)
            trainer.logger.table_line(trainer.step, trainer.args.train_iters, m)
            trainer.logger.record(trainer.step, "train", m)
        return time.perf_counter() - start

    for name in trainers:
        for _ in range(warmup):
            one_step(name)
    order = [BUILTIN, PLUGIN, METRICS]
    samples = {name: [] for name in order}
    for r in range(rounds):
        for name in order[r % 3:] + order[: r % 3]:
            samples[name].append(one_step(name))
    for trainer in trainers.values():
        trainer.logger.close()
    return {"tokens_per_step": tokens, "samples": samples}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=40, help="timed steps per variant (round-robin)")
    p.add_argument("--rss-steps", type=int, default=20)
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.in_process:
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):  # the console lines of the metrics variant
            result = time_steps_in_process(a.rounds)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return 0

    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--in-process", "--rounds", str(a.rounds)],
                          capture_output=True, text=True, env=dict(os.environ, TORCHDYNAMO_DISABLE="1"))
    marked = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode or not marked:
        raise SystemExit(proc.stderr[-3000:])
    result = json.loads(marked[-1][len(RESULT_MARK):])
    samples, tokens = result["samples"], result["tokens_per_step"]
    median = {name: statistics.median(v) for name, v in samples.items()}

    def paired(name: str, base: str) -> float:
        """Median over rounds of the ratio within the round (the variants ran back to back)."""
        return statistics.median(x / y for x, y in zip(samples[name], samples[base]))

    rss = {name: peak_rss_mib(FLAGS[name], a.rss_steps) for name in samples}
    rows = [[name, f"{1e3 * median[name]:.1f} ({1e3 * min(v):.1f}-{1e3 * max(v):.1f})", f"{tokens / median[name]:.0f}",
             f"{rss[name]:.0f}", f"{paired(name, BUILTIN):.3f}", f"{paired(name, PLUGIN):.3f}"]
            for name, v in samples.items()]
    print_table(f"tiny-cpu training step ({a.rounds} steps per variant, round-robin in one process), {machine()}",
                ["variant", "ms per step, median (min-max)", "tokens/s (median)", "peak RSS MiB",
                 "step-time ratio vs built-in", "step-time ratio vs plugin"], rows)
    print("(ratios: median over rounds of the ratio within each round)")
    print(f"training step ratio plugin / built-in: {paired(PLUGIN, BUILTIN):.3f} (target <= 1.03); "
          f"ratio of medians {median[PLUGIN] / median[BUILTIN]:.3f}")
    print(f"metrics on / off: {paired(METRICS, PLUGIN):.3f} (target <= 1.02); "
          f"ratio of medians {median[METRICS] / median[PLUGIN]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
