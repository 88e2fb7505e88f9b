"""Shared benchmark helpers: a one-rank Megatron world on CPU, timing with warmup and repeats, tables."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def megatron_world():
    """One gloo rank with Megatron's parallel state (what the CPU tests use)."""
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_moe_lossfree.megatron import compat, cpu_runtime
    from megatron_moe_lossfree.training.pretrain import init_distributed

    cpu_runtime.activate()
    init_distributed()
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
    compat.seed_model_parallel_rng(1234)


def timeit(fn: Callable[[], object], *, warmup: int = 2, repeat: int = 7) -> dict:
    """Median and spread (min..max) in milliseconds of ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 2, repeat: int = 7) -> dict:
    """Time several candidates round-robin (so drift in machine load hits all of them alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median": statistics.median(v), "min": min(v), "max": max(v), "samples": v}
            for name, v in samples.items()}


def paired_ratio(stats: dict, name: str, base: str) -> float:
    """Median over rounds of ``name``'s time / ``base``'s time in the same round of ``interleaved``: the two
    ran back to back, so a change in machine load between rounds cancels out."""
    return statistics.median(x / y for x, y in zip(stats[name]["samples"], stats[base]["samples"]))


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return f"{platform.processor() or platform.machine()}, {device}, torch {torch.__version__}"


def fmt(stats: dict) -> str:
    return f"{stats['median']:.2f} ({stats['min']:.2f}-{stats['max']:.2f})"


def print_table(title: str, header: list[str], rows: list[list]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text
