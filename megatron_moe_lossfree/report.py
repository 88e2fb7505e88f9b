"""``mlf-report``: plots and a summary table from one or more runs' ``metrics.jsonl`` (``mlf-pretrain``) or
TensorBoard directory (Megatron-LM with the plugin, ``--tensorboard-dir``: ``tensorboard_run.py``).

    mlf-report runs/lossfree runs/auxloss --out report/ --smooth 100
    mlf-report --scatter runs/ablate/small --out docs/ablations/

CPU only, a few seconds. Writes to ``--out`` (default: ``RUN_DIR/report`` of the first run):
maxvio_batch.png, load_heatmap.png, bias.png, loss.png and summary.md; prints the table to stdout.
With ``--scatter`` the arguments are mlf-ablate output directories instead, and it draws scatter.png
(validation perplexity against MaxVio_global of every finished run under them, arm means marked, the
floors as lines) and scatter.md (default ``--out``: the first directory); see ``ablation/scatter.py``.

Reading and aggregation (``load_run``, ``moving_average``, ``tail``, ``summarize``, ``tail_loads``)
are pure and tested on exact values; plotting (``write_report``) only draws what they return.
Definitions: REFERENCE.md section 2 (MaxVio, LFB eq. 4; the paper smooths MaxVio_batch over 100 steps).

Shape suffixes: L MoE layers, E experts, N logged rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from megatron_moe_lossfree.errors import LossFreeConfigError

TAIL_FRACTION = 0.1  # "last 10%" of logged rows, for the summary and the load heatmap


@dataclass
class RunData:
    """One run's rows by kind, each sorted by step (a resumed run's repeated steps: last row wins)."""

    label: str
    path: str
    train: list[dict] = field(default_factory=list)
    valid: list[dict] = field(default_factory=list)
    bad_lines: int = 0  # lines that were not JSON objects (e.g. the last line of a killed run)


# ----------------------------------------------------------------------------- reading


def load_run(path: str, label: Optional[str] = None) -> RunData:
    """Read ``path/metrics.jsonl``, or else the TensorBoard events in ``path`` (a Megatron-LM run); rows of
    kinds other than train/valid are ignored."""
    if not os.path.isdir(path):
        raise LossFreeConfigError(
            f"RUN_DIR ({path}) is not a directory: pass the output directory of a training run")
    jsonl = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(jsonl):
        from megatron_moe_lossfree.tensorboard_run import load_tensorboard_rows

        tensorboard = load_tensorboard_rows(path)  # a Megatron-LM run's --tensorboard-dir
        if tensorboard is None:
            raise LossFreeConfigError(
                f"RUN_DIR ({path}) has no metrics.jsonl and no TensorBoard events: pass the directory a training "
                f"run logged to (mlf-pretrain's --out, or Megatron-LM's --tensorboard-dir)")
        train, valid = tensorboard
        return RunData(label=label or os.path.basename(os.path.normpath(path)), path=path, train=train, valid=valid)
    rows: dict[str, dict[int, dict]] = {"train": {}, "valid": {}}
    bad = 0
    with open(jsonl) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                bad += 1
                continue
            if row.get("kind") in rows:
                rows[row["kind"]][row["step"]] = row
    run = RunData(label=label or os.path.basename(os.path.normpath(path)), path=path,
                  train=[rows["train"][s] for s in sorted(rows["train"])],
                  valid=[rows["valid"][s] for s in sorted(rows["valid"])], bad_lines=bad)
    if not run.train and not run.valid:
        raise LossFreeConfigError(
            f"RUN_DIR ({path}) has no train or valid rows in metrics.jsonl: "
            f"let the run reach its first --log-interval step")
    return run


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps_N, values_N) of the rows where ``key`` holds a finite number."""
    pairs = [(r["step"], float(r[key])) for r in rows
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    steps, values = zip(*pairs) if pairs else ((), ())
    return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)


def moving_average(values: Sequence[float], window: int,
                   steps: Optional[Sequence[int]] = None) -> np.ndarray:
    """Trailing mean: out[i] averages the points in the last ``window`` steps up to and including i.

    Without ``steps`` each point is one step (out[i] = mean(values[max(0, i-window+1) : i+1])); with
    ``steps`` the window is in training steps, so a run logged every 10 steps averages 10 points
    for window 100. The first points average what is available (min(window, points so far)).
    """
    if not isinstance(window, int) or window < 1:
        raise LossFreeConfigError(f"--smooth ({window}) must be an integer >= 1: pass e.g. 100")
    values_N = np.asarray(values, dtype=np.float64)
    steps_N = np.arange(len(values_N)) if steps is None else np.asarray(steps, dtype=np.int64)
    cumsum = np.concatenate([[0.0], np.cumsum(values_N)])
    first = np.searchsorted(steps_N, steps_N - window, side="right")  # first index inside the window
    last = np.arange(1, len(values_N) + 1)
    return (cumsum[last] - cumsum[first]) / (last - first)


def tail(rows: list[dict], fraction: float = TAIL_FRACTION) -> list[dict]:
    """The last ceil(fraction * N) rows (at least one when there are any)."""
    return rows[len(rows) - math.ceil(fraction * len(rows)):] if rows else []


def _mean(values: list[float]) -> Optional[float]:
    values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def summarize(run: RunData) -> dict:
    """The summary row: final validation PPL, MaxVio_global, tail MaxVio_batch and drop %, steps.

    Missing values are None (a run without dropping logs no drop_fraction: that is 0.0).
    """
    last_valid = run.valid[-1] if run.valid else {}
    batch_rows = tail([r for r in run.train if "maxvio_batch" in r])
    drop_rows = tail([r for r in run.train if "drop_fraction" in r])
    drop = _mean([r["drop_fraction"] for r in drop_rows])
    return {
        "label": run.label,
        "steps": max([r["step"] for r in run.train + run.valid], default=0),
        "final_ppl": _mean([last_valid.get("ppl")]),
        "maxvio_global": _mean([last_valid.get("maxvio_global")]),
        "maxvio_batch_tail": _mean([r["maxvio_batch"] for r in batch_rows]),
        "drop_tail": 0.0 if drop is None else drop,
    }


def format_summary(summaries: list[dict]) -> str:
    """Markdown table, one row per run."""
    def num(value, spec):
        return "n/a" if value is None else format(value, spec)

    lines = ["| run | steps | final val PPL | MaxVio_global | MaxVio_batch (last 10%) | drop % (last 10%) |",
             "|---|---:|---:|---:|---:|---:|"]
    for s in summaries:
        lines.append(f"| {s['label']} | {s['steps']} | {num(s['final_ppl'], '.2f')} | "
                     f"{num(s['maxvio_global'], '.4f')} | {num(s['maxvio_batch_tail'], '.4f')} | "
                     f"{100 * s['drop_tail']:.2f}% |")
    return "\n".join(lines) + "\n"


def tail_loads(run: RunData) -> Optional[np.ndarray]:
    """loads_LE: the mean of loads_layers over the last 10% of rows that logged them, divided by each
    layer's mean load (1.0 = perfect balance; a layer's max entry - 1 is its MaxVio, LFB eq. 4).

    Layers with fewer experts are padded with NaN; None when no row logged loads.
    """
    rows = tail([r for r in run.train if r.get("loads_layers")])
    if not rows:
        return None
    num_layers = max(len(r["loads_layers"]) for r in rows)
    num_experts = max(len(layer) for r in rows for layer in r["loads_layers"])
    sum_LE = np.zeros((num_layers, num_experts))
    seen_LE = np.zeros((num_layers, num_experts))
    for r in rows:
        for i, layer in enumerate(r["loads_layers"]):
            sum_LE[i, : len(layer)] += layer
            seen_LE[i, : len(layer)] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        loads_LE = np.where(seen_LE > 0, sum_LE / seen_LE, np.nan)
        mean_L = np.nanmean(loads_LE, axis=1, keepdims=True)
        return np.where(mean_L > 0, loads_LE / mean_L, np.nan)


def bias_series(run: RunData, layer: int) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(steps_N, bias_NE of MoE layer ``layer`` (0-based), min_N, max_N over all layers), or None."""
    rows = [r for r in run.train if r.get("bias_layers")]
    if not rows:
        return None
    num_layers = len(rows[-1]["bias_layers"])
    if not 0 <= layer < num_layers:
        raise LossFreeConfigError(
            f"--bias-layer ({layer + 1}) must be between 1 and the number of MoE layers of run "
            f"{run.label} ({num_layers}): pick one of its MoE layers")
    rows = [r for r in rows if len(r["bias_layers"]) > layer]
    width = max(len(r["bias_layers"][layer]) for r in rows)
    bias_NE = np.full((len(rows), width), np.nan)
    for n, r in enumerate(rows):
        bias_NE[n, : len(r["bias_layers"][layer])] = r["bias_layers"][layer]
    low = np.array([min(min(b) for b in r["bias_layers"] if b) for r in rows])
    high = np.array([max(max(b) for b in r["bias_layers"] if b) for r in rows])
    return np.array([r["step"] for r in rows]), bias_NE, low, high


# ----------------------------------------------------------------------------- plotting


def _figure(num_panels: int = 1, width: float = 7.0, height: float = 4.0):
    # Figure without pyplot: the Agg canvas, no global backend state, safe in tests and headless jobs.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * min(num_panels, 3), height * math.ceil(num_panels / 3)),
                 layout="constrained")
    axes = fig.subplots(math.ceil(num_panels / 3), min(num_panels, 3), squeeze=False).ravel()
    for ax in axes[num_panels:]:
        ax.set_visible(False)
    return fig, axes[:num_panels]


def plot_maxvio(runs: list[RunData], path: str, smooth: int) -> list[str]:
    curves = [(run.label, *series(run.train, "maxvio_batch")) for run in runs]
    notes = [f"maxvio_batch.png: run {label} logged no maxvio_batch"
             for label, steps, _ in curves if not len(steps)]
    if not any(len(steps) for _, steps, _ in curves):
        return ["maxvio_batch.png skipped: no run logged maxvio_batch"]
    fig, (ax,) = _figure()
    for color, (label, steps, values) in zip(_colors(len(curves)), curves):  # a run keeps its colour in every plot
        if len(steps):
            ax.plot(steps, moving_average(values, smooth, steps), color=color, label=label)
    ax.set(title=f"MaxVio_batch (mean over MoE layers), trailing mean over {smooth} steps",
           xlabel="training step", ylabel=f"MaxVio_batch, {smooth}-step moving average")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    fig.savefig(path, dpi=120)
    return notes


def plot_load_heatmap(runs: list[RunData], path: str) -> list[str]:
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator

    tables = [(run.label, tail_loads(run)) for run in runs]
    notes = [f"load_heatmap.png: run {label} logged no loads_layers" for label, t in tables if t is None]
    tables = [(label, t) for label, t in tables if t is not None]
    if not tables:
        return ["load_heatmap.png skipped: no run logged loads_layers"]
    # One colour scale for all runs, white at 1.0 (balanced) however large the worst overload is.
    norm = TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=max(2.0, max(float(np.nanmax(t)) for _, t in tables)))
    fig, axes = _figure(len(tables), width=5.5, height=4.5)
    for ax, (label, loads_LE) in zip(axes, tables):
        num_layers, num_experts = loads_LE.shape
        image = ax.imshow(loads_LE, aspect="auto", cmap="coolwarm", norm=norm, interpolation="nearest",
                          extent=(-0.5, num_experts - 0.5, num_layers + 0.5, 0.5))
        ax.set(title=f"{label}: load / mean load (last 10% of logged steps)",
               xlabel="expert id", ylabel="MoE layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(image, ax=ax, label="load / mean load (1.0 = balanced)")
    fig.savefig(path, dpi=120)
    return notes


def plot_bias(runs: list[RunData], path: str, layer: int) -> list[str]:
    data = [(run.label, bias_series(run, layer)) for run in runs]
    notes = [f"bias.png: run {label} logged no bias_layers" for label, d in data if d is None]
    data = [(label, d) for label, d in data if d is not None]
    if not data:
        return ["bias.png skipped: no run logged bias_layers"]
    fig, axes = _figure(len(data), width=6.0)
    for ax, (label, (steps, bias_NE, low, high)) in zip(axes, data):
        ax.fill_between(steps, low, high, color="0.85", label="min/max over all layers")
        lines = ax.plot(steps, bias_NE, linewidth=0.8)
        if len(lines) <= 8:  # a legend entry per expert only while it stays readable
            for expert, line in enumerate(lines):
                line.set_label(f"expert {expert}")
        ax.set(title=f"{label}: expert bias, MoE layer {layer + 1} ({bias_NE.shape[1]} experts)",
               xlabel="training step", ylabel="expert bias")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
    fig.savefig(path, dpi=120)
    return notes


def plot_loss(runs: list[RunData], path: str, smooth: int) -> list[str]:
    window = max(1, smooth // 10)  # light smoothing: the curve shape stays visible
    fig, (ax,) = _figure()
    drawn = False
    for color, run in zip(_colors(len(runs)), runs):
        steps, loss = series(run.train, "loss")
        if len(steps):
            ax.plot(steps, moving_average(loss, window, steps), color=color, label=run.label)
            drawn = True
        v_steps, v_loss = series(run.valid, "loss")
        if len(v_steps):
            # Unlabelled: the title says the points are validation, the legend names the runs once each.
            ax.plot(v_steps, v_loss, "o", color=color, markeredgecolor="black")
            drawn = True
    if not drawn:
        return ["loss.png skipped: no run logged a loss"]
    ax.set(title=f"Loss: train ({window}-step moving average) and validation (points)",
           xlabel="training step", ylabel="cross-entropy loss")
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    fig.savefig(path, dpi=120)
    return []


def _legend(fig, ax, inside_max: int = 6, rows_per_column: int = 16) -> None:
    """A legend inside the axes for a few runs; beside them, in columns of ``rows_per_column``, for a
    suite's many runs (18 runs inside the axes hid the curves)."""
    entries = len(ax.get_legend_handles_labels()[1])
    if entries <= inside_max:
        ax.legend()
    else:
        ncols = math.ceil(entries / rows_per_column)
        width, height = fig.get_size_inches()
        fig.set_size_inches(width + 2.6 * ncols, height)  # the axes keep their width beside the legend
        fig.legend(loc="outside right upper", fontsize="small", ncols=ncols)


def _colors(count: int = 0):
    """The default colour cycle; tab20's 20 colours when more runs than the cycle's 10 share a plot
    (a run keeps its colour in every plot of one report)."""
    from matplotlib import colormaps, rcParams

    cycle = rcParams["axes.prop_cycle"].by_key()["color"]
    if count > len(cycle):
        cycle = list(colormaps["tab20"].colors)
    while True:
        yield from cycle


def write_report(runs: list[RunData], out_dir: str, *, smooth: int = 100, bias_layer: int = 1) -> dict:
    """All PNGs plus summary.md in ``out_dir``; returns {"table": str, "files": [...], "notes": [...]}.

    ``bias_layer`` is 1-based among the MoE layers (TensorBoard's moe_layer_NN).
    """
    if not isinstance(smooth, int) or smooth < 1:
        raise LossFreeConfigError(f"--smooth ({smooth}) must be an integer >= 1: pass e.g. 100")
    os.makedirs(out_dir, exist_ok=True)
    plots = {
        "maxvio_batch.png": lambda p: plot_maxvio(runs, p, smooth),
        "load_heatmap.png": lambda p: plot_load_heatmap(runs, p),
        "bias.png": lambda p: plot_bias(runs, p, bias_layer - 1),
        "loss.png": lambda p: plot_loss(runs, p, smooth),
    }
    files, notes = [], []
    for name, plot in plots.items():
        path = os.path.join(out_dir, name)
        plot_notes = plot(path)
        notes += plot_notes
        if not any(n.startswith(f"{name} skipped") for n in plot_notes):
            files.append(path)
    notes += [f"{run.label}: skipped {run.bad_lines} unreadable line(s) of metrics.jsonl"
              for run in runs if run.bad_lines]
    table = format_summary([summarize(run) for run in runs])
    summary_path = os.path.join(out_dir, "summary.md")
    with open(summary_path, "w") as f:
        f.write("# Run summary\n\n" + table + "".join(f"\n- {n}" for n in notes) + ("\n" if notes else ""))
    return {"table": table, "files": files + [summary_path], "notes": notes}


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mlf-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories with metrics.jsonl, or Megatron-LM --tensorboard-dir folders")
    parser.add_argument("--out", help="output directory (default: FIRST_RUN_DIR/report)")
    parser.add_argument("--labels", nargs="+", help="one legend label per RUN_DIR (default: basenames)")
    parser.add_argument("--smooth", type=int, default=100,
                        help="MaxVio_batch moving-average window in steps (default 100, as LFB)")
    parser.add_argument("--bias-layer", type=int, default=1,
                        help="MoE layer (1-based) whose per-expert biases are drawn (default 1)")
    parser.add_argument("--scatter", action="store_true",
                        help="RUN_DIRs are mlf-ablate --out directories: draw scatter.png (validation PPL vs "
                             "MaxVio_global of every finished run under them, with the floors) and scatter.md")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for bad input")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str]) -> dict:
    args = parse_args(argv)
    if args.scatter:
        from megatron_moe_lossfree.ablation.scatter import write_scatter

        files = write_scatter(args.run_dirs, args.out or args.run_dirs[0])
        print(f"wrote {', '.join(files)}")
        return {"files": files}
    if args.labels is not None and len(args.labels) != len(args.run_dirs):
        raise LossFreeConfigError(
            f"--labels ({len(args.labels)} given) must have one label per RUN_DIR "
            f"({len(args.run_dirs)}): pass as many labels as run directories")
    labels = args.labels or [None] * len(args.run_dirs)
    runs = [load_run(path, label) for path, label in zip(args.run_dirs, labels)]
    out_dir = args.out or os.path.join(args.run_dirs[0], "report")
    result = write_report(runs, out_dir, smooth=args.smooth, bias_layer=args.bias_layer)
    print(result["table"], end="")
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"wrote {', '.join(result['files'])}")
    return result
