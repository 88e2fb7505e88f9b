"""Whole training steps of the tiny-cpu preset: plugin vs Megatron-Core's built-in expert bias, and the
plugin with metrics every step vs once.

    python benchmarks/bench_train_step.py [--steps 40] [--repeat 2]

Each variant is a fresh ``mlf-pretrain`` process (alternated, ``--repeat`` times); tokens/s is the median of
the logged windows after the first (warm-up) one; peak RSS is sampled every 50 ms. Targets: plugin /
built-in step-time ratio <= 1.03; metrics on / off <= 1.02.
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

VARIANTS = {
    "megatron built-in bias": ["--moe-router-enable-expert-bias", "--lossfree-balancing", "none",
                               "--log-interval", "10"],
    "plugin (metrics every 10 steps)": ["--log-interval", "10"],
    "plugin (metrics every step)": ["--log-interval", "1"],
}


def run(flags: list[str], steps: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "megatron_moe_lossfree", "pretrain", "--preset", "tiny-cpu", "--train-iters",
               str(steps), "--eval-iters", "0", "--no-progress", "--out", out, *flags]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, TORCHDYNAMO_DISABLE="1"))
        peak = 0
        handle = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, handle.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.05)
        if proc.returncode:
            raise SystemExit(proc.stderr.read()[-2000:])
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        # tokens/s over the steps after warm-up: total tokens / total time from the logged windows
        train = [r for r in rows if r["kind"] == "train"]
        tokens = [r["tokens_per_s"] for r in train]
        interval = train[1]["step"] - train[0]["step"] if len(train) > 1 else 1
        weights = [interval] * len(tokens)
        skip = max(1, 10 // interval)  # drop the first 10 steps (warm-up)
        speed = sum(weights[skip:]) / sum(w / t for w, t in zip(weights[skip:], tokens[skip:]))
        return speed, peak / 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args(argv)
    results = {name: [] for name in VARIANTS}
    for _ in range(a.repeat):
        for name, flags in VARIANTS.items():
            results[name].append(run(flags, a.steps))
    base = statistics.median(s for s, _ in results["megatron built-in bias"])
    metrics_off = statistics.median(s for s, _ in results["plugin (metrics every 10 steps)"])
    rows = []
    for name, runs in results.items():
        speed = statistics.median(s for s, _ in runs)
        rss = max(m for _, m in runs)
        rows.append([name, f"{speed:.0f}", f"{min(s for s, _ in runs):.0f}-{max(s for s, _ in runs):.0f}",
                     f"{rss:.0f}", f"{base / speed:.3f}", f"{metrics_off / speed:.3f}"])
    print_table(f"tiny-cpu training step ({a.steps} steps x {a.repeat} runs each), {machine()}",
                ["variant", "tokens/s (median)", "spread", "peak RSS MiB", "step-time ratio vs built-in",
                 "step-time ratio vs metrics every 10"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
