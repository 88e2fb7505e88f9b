"""One picture of every ablation run (issue 18, item 5): validation perplexity against MaxVio_global.

One dot per run (seed), the mean of each arm marked and labelled, the floors drawn as vertical lines
(the random router's MaxVio_global, and the best bias found's mean and range over the runs that have one).
``mlf-report --scatter ROOT ...`` draws it from the run directories under ROOT (``find_runs``); the
points and arm means are pure functions, tested on exact values.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_moe_lossfree.errors import LossFreeConfigError

SCATTER_PNG = "scatter.png"
SCATTER_MD = "scatter.md"


@dataclass(frozen=True)
class Point:
    group: str
    """``SUITE/ARM``: where the run lives under its root."""
    seed: Optional[int]
    ppl: float
    maxvio_global: float
    floor_random: Optional[float]
    floor_best_bias: Optional[float]
    """MaxVio_global of the best bias found on the run's final evaluation (ablation/floors.py)."""


def find_runs(root: str) -> list[str]:
    """Finished run directories under ``root`` (those with a DONE marker and metrics.jsonl), sorted.

    ``root`` may itself be a run directory, a suite's directory or a directory of suites.
    """
    from megatron_moe_lossfree.ablation.reuse import DONE

    if not os.path.isdir(root):
        raise LossFreeConfigError(f"--scatter root ({root}) is not a directory: pass the --out of mlf-ablate")
    found = []
    for path, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("ckpt", "report", "tensorboard"))
        if DONE in files and "metrics.jsonl" in files:
            found.append(path)
    return sorted(found)


def _group(run_dir: str, root: str) -> str:
    """``SUITE/ARM`` (or as much of it as lies under root) of ``ROOT/.../SUITE/ARM/seedS``."""
    parts = os.path.relpath(os.path.abspath(run_dir), os.path.abspath(root)).split(os.sep)
    if parts and parts[-1].startswith("seed"):
        parts = parts[:-1]
    parts = [p for p in parts if p != "."]
    return "/".join(parts[-2:]) or os.path.basename(os.path.dirname(os.path.abspath(run_dir)))


def final_validation(run_dir: str) -> dict:
    """The validation row of the highest step in ``RUN_DIR/metrics.jsonl`` (a resumed run's repeated step:
    the last row wins; unreadable lines are skipped), or {} without one. This module reads the file itself:
    ``report`` draws this picture for ``mlf-report --scatter``, so it must not import ``report``."""
    final: dict = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if (isinstance(row, dict) and row.get("kind") == "valid" and isinstance(row.get("step"), int)
                    and row["step"] >= final.get("step", -1)):
                final = row
    return final


def _number(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def collect_points(run_dirs: Sequence[str], root: str) -> list[Point]:
    """A Point per run with a final validation PPL and MaxVio_global (others are left out)."""
    from megatron_moe_lossfree.ablation.floors import run_floors
    from megatron_moe_lossfree.ablation.reuse import read_done
    from megatron_moe_lossfree.training.arguments import parse_args

    points = []
    for run_dir in run_dirs:
        final = final_validation(run_dir)
        ppl, maxvio = _number(final.get("ppl")), _number(final.get("maxvio_global"))
        if ppl is None or maxvio is None:
            continue
        marker = read_done(run_dir) or {}
        floors = {}
        if isinstance(marker.get("config_flags"), list):
            try:
                floors = run_floors(parse_args(marker["config_flags"]), run_dir)
            except LossFreeConfigError:
                floors = {}
        points.append(Point(group=_group(run_dir, root), seed=marker.get("seed"), ppl=ppl,
                            maxvio_global=maxvio, floor_random=floors.get("floor_random_global"),
                            floor_best_bias=floors.get("floor_best_bias_global")))
    return points


def arm_means(points: Sequence[Point]) -> dict[str, tuple[float, float, int]]:
    """{group: (mean MaxVio_global, mean PPL, runs)} in the order groups first appear."""
    sums: dict[str, list[float]] = {}
    for p in points:
        acc = sums.setdefault(p.group, [0.0, 0.0, 0])
        acc[0] += p.maxvio_global
        acc[1] += p.ppl
        acc[2] += 1
    return {g: (mv / n, ppl / n, n) for g, (mv, ppl, n) in sums.items()}


def floor_lines(points: Sequence[Point]) -> dict[str, tuple[float, float, float]]:
    """{label: (mean, min, max)} of each floor over the runs that have it."""
    out = {}
    for label, values in (("random router", [p.floor_random for p in points]),
                          ("best bias found", [p.floor_best_bias for p in points])):
        values = [v for v in values if v is not None]
        if values:
            out[label] = (sum(values) / len(values), min(values), max(values))
    return out


def format_points(points: Sequence[Point]) -> str:
    """Markdown: one row per arm (mean MaxVio_global, mean PPL, runs), sorted by PPL, then the floors."""
    lines = ["| arm | runs | MaxVio_global (mean) | val PPL (mean) |", "|---|---:|---:|---:|"]
    means = arm_means(points)
    for group, (maxvio, ppl, n) in sorted(means.items(), key=lambda item: (item[1][1], item[0])):
        lines.append(f"| {group} | {n} | {maxvio:.3f} | {ppl:.3f} |")
    for label, (mean, low, high) in floor_lines(points).items():
        lines.append(f"\nfloor, {label}: MaxVio_global {mean:.4f} (min {low:.4f}, max {high:.4f})")
    return "\n".join(lines) + "\n"


def plot_scatter(points: Sequence[Point], path: str, title: str = "") -> None:
    """Validation PPL (y) against MaxVio_global (x; symmetric-log when it spans a decade): a dot per run,
    a large mark per arm mean, one marker shape per suite, the floors as vertical lines."""
    from matplotlib import rcParams
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.0, 6.5), layout="constrained")  # no pyplot: no global backend state
    ax = fig.subplots()
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^v<>pPXh*"
    suites = list(dict.fromkeys(p.group.split("/")[0] for p in points))
    for i, (group, (maxvio, ppl, _)) in enumerate(arm_means(points).items()):
        color = colors[i % len(colors)]
        marker = markers[suites.index(group.split("/")[0]) % len(markers)]
        own = [p for p in points if p.group == group]
        ax.scatter([p.maxvio_global for p in own], [p.ppl for p in own], s=18, alpha=0.55, color=color,
                   marker=marker)
        ax.scatter([maxvio], [ppl], s=110, color=color, marker=marker, edgecolors="black", linewidths=1.2,
                   label=group)
    for (label, (mean, low, high)), style in zip(floor_lines(points).items(), ("--", ":")):
        ax.axvline(mean, color="0.3", linestyle=style, linewidth=1.5, label=f"floor: {label} ({mean:.3g})")
        if high > low:
            ax.axvspan(low, high, color="0.3", alpha=0.08)
    positive = [p.maxvio_global for p in points if p.maxvio_global > 0]
    if positive and max(positive) / min(positive) > 10:
        # Logarithmic above 0.01, linear below: a floor of 0 (the best bias found's, typically) stays on the axis.
        ax.set_xscale("symlog", linthresh=0.01, linscale=0.5)
        ax.set_xlim(-0.002, 1.5 * max(positive))
    # The figure's title, not the axes': centred on the figure, it is never cut by the legend beside the axes.
    fig.suptitle(title or "Validation perplexity vs MaxVio_global (dots: seeds; large marks: arm means)")
    ax.set(xlabel="MaxVio_global (LFB Eq. 4, mean over MoE layers)", ylabel="validation perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="x-small", ncol=2 if len(suites) > 1 else 1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=120)


def write_scatter(roots: Sequence[str], out_dir: str) -> list[str]:
    """scatter.png and scatter.md in ``out_dir`` from every finished run under ``roots``; returns paths.

    Raises when no run has both a validation PPL and a MaxVio_global (nothing to draw).
    """
    points = []
    for root in roots:
        points += collect_points(find_runs(root), root)
    if not points:
        raise LossFreeConfigError(f"--scatter ({' '.join(roots)}) holds no finished run with a validation "
                                  f"perplexity and MaxVio_global: pass mlf-ablate's --out after runs finished")
    os.makedirs(out_dir, exist_ok=True)
    png, md = os.path.join(out_dir, SCATTER_PNG), os.path.join(out_dir, SCATTER_MD)
    plot_scatter(points, png)
    with open(md, "w") as fh:
        fh.write("# Validation perplexity vs MaxVio_global, every run\n\n" + format_points(points))
    return [png, md]
