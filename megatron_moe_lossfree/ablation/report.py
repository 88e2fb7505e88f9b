"""The paper-shaped table of an ablation: each arm's published numbers beside ours, the floors, and the
paired difference from the compared arm.

Pure functions over per-run metric dicts (``run_metrics`` reads them from a run directory through
``megatron_moe_lossfree.report``; ``ablation.floors.run_floors`` adds the floors); the plots and
summary.md come from ``report.write_report``.

Statistics (issue 18, item 2). Every arm runs with the same seeds (same initialisation, same data
order), so arms are compared seed by seed: the paired difference d_s = arm_s - compared_s, reported as
mean [min, max] over the seeds both have. A difference is called ("lower" / "higher") only when every
seed agrees on its sign (with at least two seeds); otherwise the cell says "≈". Without seed pairs
(results without a ``seed``) it is called only when the seed ranges [min, max] do not overlap, which
implies the same sign for every pair. One seed: nothing is called.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_moe_lossfree.ablation.suites import Scale, Suite
from megatron_moe_lossfree.report import RunData, summarize, tail

SETTLE_BELOW = 0.5
"""The MaxVio_batch a run must stay below for ``settle_step`` (issue 17: steps until it stays below 0.5)."""

METRICS: dict[str, tuple[str, str, float]] = {
    # key: (column label, format, multiplier)
    "final_loss": ("val loss", ".3f", 1.0),
    "final_ppl": ("val PPL", ".2f", 1.0),
    "maxvio_global": ("MaxVio_global", ".3f", 1.0),
    "maxvio_batch_tail": ("MaxVio_batch (last 10%)", ".3f", 1.0),
    "maxvio_compute_tail": ("MaxVio_compute (last 10%)", ".3f", 1.0),
    "drop_tail": ("drop % (last 10%)", ".2f", 100.0),
    "settle_batch": (f"steps until MaxVio_batch < {SETTLE_BELOW} for good", ".0f", 1.0),
    "bias_jitter_tail": ("bias change per log row, mean abs (last 10%)", ".4f", 1.0),
}

FLOORS: dict[str, tuple[str, str, str]] = {
    # key: (column label, format, the METRICS key whose floor it is)
    "floor_random_global": ("MaxVio_global floor: random", ".3f", "maxvio_global"),
    # not a proven floor: the best single bias a search found on the final evaluation (ablation/floors.py)
    "floor_best_bias_global": ("MaxVio_global: best bias found", ".3f", "maxvio_global"),
    "floor_random_batch": ("MaxVio_batch floor: random", ".3f", "maxvio_batch_tail"),
    "floor_random_compute": ("MaxVio_compute floor: random", ".3f", "maxvio_compute_tail"),
}


MULTIPLES: dict[str, tuple[str, str]] = {
    # key: (the FLOORS key it divides by, its label in the multiples column)
    "maxvio_global_x_random": ("floor_random_global", "random floor"),
    "maxvio_global_x_best_bias": ("floor_best_bias_global", "best bias found"),
}
"""Each run's MaxVio_global as a multiple of its floors (issue 26): how far from each floor an arm sits."""


def add_multiples(row: dict) -> dict:
    """``row`` with the MULTIPLES keys: its MaxVio_global over each of its floors (None where one is missing)."""
    value = _finite(row.get("maxvio_global"))
    out = dict(row)
    for key, (floor_key, _) in MULTIPLES.items():
        floor = _finite(row.get(floor_key))
        out[key] = value / floor if value is not None and floor else None
    return out


def format_multiples(spreads: dict) -> str:
    """``24x / 61x``: the means of MaxVio_global over the random floor and the best bias found, n/a where absent."""
    return " / ".join(f"{spreads[key].mean:.0f}x" if spreads.get(key) is not None else "n/a" for key in MULTIPLES)


def ratio_line(suite: Suite, results: dict[str, list[dict]]) -> Optional[str]:
    """The suite's ``ratio`` line: MaxVio_global of one arm over another's, seed by seed, beside the paper."""
    if suite.ratio is None:
        return None
    top, bottom, paper = suite.ratio

    a, b = (_by_seed(results.get(arm, []), "maxvio_global") for arm in (top, bottom))
    ratios = [a[s] / b[s] for s in sorted(a.keys() & b.keys()) if b[s]]
    ours = format_spread(spread(ratios), ".1f") + "x" if ratios else "n/a"
    return f"- MaxVio_global of {top} / {bottom}, seed by seed: ours {ours}; paper {paper}"


def _by_seed(rows: Sequence[dict], key: str) -> dict:
    """{seed: finite value of ``key``} of per-run dicts (runs without a seed or the value left out)."""
    return {r["seed"]: _finite(r.get(key)) for r in rows if "seed" in r and _finite(r.get(key)) is not None}


def _finite(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def tail_gain(valid: Sequence[dict], fraction: float = 0.2) -> Optional[float]:
    """Relative improvement of the validation loss over the last ``fraction`` of the steps:
    (loss at the last evaluation at or before step (1 - fraction) * S - final loss) / that loss, S the
    final evaluation's step (issue 18: the loss has flattened when this is below 3%). None with fewer
    than two evaluations."""
    rows = [r for r in valid if _finite(r.get("loss")) is not None]
    if len(rows) < 2:
        return None
    final = rows[-1]
    earlier = [r for r in rows[:-1] if r["step"] <= (1 - fraction) * final["step"]]
    if not earlier:
        return None
    return (earlier[-1]["loss"] - final["loss"]) / earlier[-1]["loss"]


def train_tail_gain(train: Sequence[dict], fraction: float = 0.2) -> Optional[float]:
    """Relative improvement of the training loss over the last ``fraction`` of the steps: the mean loss
    of the logged steps in ((1 - 2f) S, (1 - f) S] against those in ((1 - f) S, S], S the last step.
    Below one epoch every training batch is unseen text, so this is a held-out measure over far more
    tokens than an evaluation (at small scale 160 x 4,096 tokens per window against 16,384 per
    evaluation, and each evaluation scores other samples). None without rows in both windows."""
    rows = [r for r in train if _finite(r.get("loss")) is not None]
    if not rows:
        return None
    last = rows[-1]["step"]
    before = [r["loss"] for r in rows if (1 - 2 * fraction) * last < r["step"] <= (1 - fraction) * last]
    after = [r["loss"] for r in rows if (1 - fraction) * last < r["step"]]
    if not before or not after:
        return None
    earlier, final = sum(before) / len(before), sum(after) / len(after)
    return (earlier - final) / earlier


def settle_step(train: Sequence[dict], key: str = "maxvio_batch", below: float = SETTLE_BELOW) -> Optional[int]:
    """The first logged step from which every logged ``key`` stays below ``below`` to the end of the run
    (resolution: the log interval); None when the last logged value is not below it."""
    rows = [r for r in train if _finite(r.get(key)) is not None]
    settled = None
    for row in rows:
        if row[key] < below:
            settled = row["step"] if settled is None else settled
        else:
            settled = None
    return settled


def bias_jitter(train: Sequence[dict]) -> Optional[float]:
    """How far the bias moves between consecutive log rows over the last 10% of them: the mean over
    expert, layer and pair of |b(row) - b(previous row)|. A rule that replaces the bias each step
    (quantile balancing without EMA) shows its step-to-step noise here; the sign rule moves at most
    u per step. None without two logged biases."""
    rows = [r for r in train if isinstance(r.get("bias_layers"), list) and r["bias_layers"]]
    rows = rows[-max(2, len(tail(rows))):] if len(rows) >= 2 else []
    diffs = [abs(a - b) for prev, row in zip(rows, rows[1:])
             for layer_a, layer_b in zip(row["bias_layers"], prev["bias_layers"]) if layer_a and layer_b
             for a, b in zip(layer_a, layer_b)]
    return sum(diffs) / len(diffs) if diffs else None


def run_metrics(run: RunData) -> dict:
    """Every METRICS key for one run (None where the run did not log it), plus ``steps`` and
    ``val_loss_tail_gain`` (``tail_gain``) and ``train_loss_tail_gain`` (``train_tail_gain``)."""
    summary = summarize(run)
    last_valid = run.valid[-1] if run.valid else {}
    compute = [_finite(r["maxvio_compute"]) for r in tail([r for r in run.train if "maxvio_compute" in r])]
    compute = [v for v in compute if v is not None]
    return {
        "steps": summary["steps"],
        "final_loss": _finite(last_valid.get("loss")),
        "final_ppl": summary["final_ppl"],
        "maxvio_global": summary["maxvio_global"],
        "maxvio_batch_tail": summary["maxvio_batch_tail"],
        "maxvio_compute_tail": sum(compute) / len(compute) if compute else None,
        "drop_tail": summary["drop_tail"],
        "val_loss_tail_gain": tail_gain(run.valid),
        "train_loss_tail_gain": train_tail_gain(run.train),
        "settle_batch": settle_step(run.train),
        "bias_jitter_tail": bias_jitter(run.train),
    }


# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Spread:
    mean: float
    low: float
    high: float
    n: int


def spread(values: Sequence[Optional[float]]) -> Optional[Spread]:
    """Mean, min and max of the values that exist; None when none does."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return Spread(sum(present) / len(present), min(present), max(present), len(present))


def format_spread(s: Optional[Spread], spec: str, multiplier: float = 1.0) -> str:
    """``mean [min, max]`` (just ``mean`` for one value), or n/a."""
    if s is None:
        return "n/a"
    text = format(s.mean * multiplier, spec)
    if s.n > 1:
        text += f" [{format(s.low * multiplier, spec)}, {format(s.high * multiplier, spec)}]"
    return text


def judge(ours: Optional[Spread], ref: Optional[Spread]) -> str:
    """"lower"/"higher" when the ranges do not overlap, "≈" when they do, "n/a" without two seeds each."""
    if ours is None or ref is None or ours.n < 2 or ref.n < 2:
        return "n/a"
    if ours.high < ref.low:
        return "lower"
    if ours.low > ref.high:
        return "higher"
    return "≈"


@dataclass(frozen=True)
class Paired:
    """Paired difference arm - compared arm over the seeds both ran."""

    mean: float
    low: float
    high: float
    n: int
    verdict: str
    """"lower" / "higher" when every seed agrees on the sign (n >= 2), "≈" otherwise, "n/a" for n < 2."""


def paired(ours: Sequence[dict], ref: Sequence[dict], key: str) -> Optional[Paired]:
    """The paired difference of metric ``key`` between two arms' per-run dicts (matched on ``seed``);
    None when no seed has the metric in both."""
    a, b = _by_seed(ours, key), _by_seed(ref, key)
    seeds = sorted(a.keys() & b.keys())
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    if len(diffs) < 2:
        verdict = "n/a"
    elif all(d < 0 for d in diffs):
        verdict = "lower"
    elif all(d > 0 for d in diffs):
        verdict = "higher"
    else:
        verdict = "≈"
    return Paired(sum(diffs) / len(diffs), min(diffs), max(diffs), len(diffs), verdict)


def format_paired(label: str, diff: Optional[Paired], unpaired: str, spec: str, multiplier: float = 1.0) -> str:
    """``label +mean [+min, +max] verdict``; without seed pairs ``label verdict`` of the range rule."""
    if diff is None:
        return f"{label} {unpaired}"
    text = f"{label} {format(diff.mean * multiplier, '+' + spec)}"
    if diff.n > 1:
        text += f" [{format(diff.low * multiplier, '+' + spec)}, {format(diff.high * multiplier, '+' + spec)}]"
    return f"{text} {diff.verdict}"


def format_floor(s: Optional[Spread], spec: str) -> str:
    """A floor cell: one value when every seed gives the same (the random floor), else mean [min, max]."""
    if s is not None and s.low == s.high:
        return format(s.mean, spec)
    return format_spread(s, spec)


def format_wall(rows: Sequence[dict]) -> Optional[str]:
    """The wall-time line of a table from the runs' DONE markers (None when no run recorded one)."""
    walls = [r["wall_s"] for r in rows if isinstance(r.get("wall_s"), (int, float))]
    if not walls:
        return None
    loads = [x for r in rows for x in (r.get("load_avg_1min") or []) if isinstance(x, (int, float))]
    shared = sum(bool(r.get("shared")) for r in rows)
    per_run = f"{min(walls):.0f}" if len(walls) == 1 else f"{min(walls):.0f}-{max(walls):.0f}"
    text = (f"{len(walls)} run(s), {sum(walls) / 60:.1f} min in total, {per_run} s per run"
            + (f" ({shared} of them run for another suite and reused here)" if shared else ""))
    if loads:
        text += f"; 1-minute load average {min(loads):.1f}-{max(loads):.1f} at their starts and ends"
    return text


def flattening_line(results: dict[str, list[dict]]) -> Optional[str]:
    """How much the loss still improved over the last 20% of steps, over every finished run of the table
    (issue 18's limit: below 3%), or None when no run logged enough."""
    rows = [r for runs in results.values() for r in runs]
    parts = []
    for key, what in (("train_loss_tail_gain", "training loss (window means)"),
                      ("val_loss_tail_gain", "validation loss (one evaluation each)")):
        s = spread([r.get(key) for r in rows])
        if s is not None:
            parts.append(f"{what} {format_spread(s, '.1f', 100.0)}%")
    if not parts:
        return None
    return "- flattening: improvement over the last 20% of steps, every run of this table: " + "; ".join(parts)


def suite_floors(suite: Suite) -> list[str]:
    """The FLOORS keys of a suite's balance columns (the floors of the MaxVio metrics it reports)."""
    return [key for key, (_, _, metric) in FLOORS.items() if metric in suite.metrics]


def format_paper_table(suite: Suite, scale: Scale, results: dict[str, list[dict]], *, steps: int,
                       seeds: Sequence[int], command: Optional[str] = None, wall: Optional[str] = None) -> str:
    """Markdown: title, how to read it, the table (paper columns, ours, floors, paired difference), notes.

    ``results`` maps an arm name to the metric dicts of its finished seeds (each with its ``seed``;
    missing arm: "not run"); the floor keys (FLOORS) are read from the same dicts.
    """
    floor_keys = suite_floors(suite)
    results = {arm: [add_multiples(r) for r in rows] for arm, rows in results.items()}
    multiples = "floor_random_global" in floor_keys
    spreads = {arm.name: {key: spread([r.get(key) for r in results.get(arm.name, [])])
                          for key in [*METRICS, *FLOORS, *MULTIPLES]} for arm in suite.arms}
    seed_text = ", ".join(str(s) for s in seeds)
    lines = [f"## {suite.name}: {suite.title}", ""]
    if command:
        lines.append(f"- command: `{command}`")
    if wall:
        lines.append(f"- wall time: {wall}")
    lines += [
        f"- scale: {scale.name} (preset {scale.preset}"
        f"{', with the overrides the notes describe' if scale.flags else ''}), "
        f"{steps} steps, {len(seeds)} seed(s) per arm ({seed_text}), the same seeds for every arm",
        "- ours: mean [min, max] over seeds. Last column: the paired difference arm - compared arm, seed by "
        "seed, mean [min, max]; \"lower\"/\"higher\" only when every seed agrees on its sign, \"≈\" otherwise"
        + (", n/a with one seed" if len(seeds) < 2 else ""),
    ]
    if floor_keys:
        lines.append("- floors: random = the MaxVio of a router choosing K experts uniformly at random over the "
                     "same tokens (seeded Monte-Carlo, ablation/floors.py); best bias found = the lowest MaxVio_global "
                     "a search (200 quantile steps from the run's bias) found for one bias on the final evaluation's "
                     "own scores, reachable but not a proven minimum (valid_routing.pt; n/a for a run without one)")
    flattening = flattening_line(results)
    if flattening:
        lines.append(flattening)
    lines += [f"- paper: {suite.source}", ""]
    ours = [METRICS[key][0] for key in suite.metrics]
    floor_labels = [FLOORS[key][0] for key in floor_keys]
    if multiples:
        floor_labels.append("MaxVio_global ÷ " + " / ".join(label for _, label in MULTIPLES.values()))
    lines.append("| " + " | ".join(["arm", "flags", *suite.paper_columns, *ours, *floor_labels,
                                    "paired difference vs compared arm"]) + " |")
    lines.append("|" + "---|" * (2 + len(suite.paper_columns)) + "---:|" * (len(ours) + len(floor_labels)) + "---|")
    for arm in suite.arms:
        done = results.get(arm.name, [])
        if done:
            cells = [format_spread(spreads[arm.name][key], METRICS[key][1], METRICS[key][2])
                     for key in suite.metrics]
            cells += [format_floor(spreads[arm.name][key], FLOORS[key][1]) for key in floor_keys]
            if multiples:
                cells.append(format_multiples(spreads[arm.name]))
            if len(done) < len(seeds):
                cells[0] += f" (n={len(done)})"
        else:
            cells = ["not run"] * (len(suite.metrics) + len(floor_labels))
        versus = arm.versus or suite.baseline
        if arm.name == versus:
            verdict = "baseline"
        else:
            verdict = f"vs {versus}: " + "; ".join(
                format_paired(METRICS[key][0], paired(done, results.get(versus, []), key),
                              judge(spreads[arm.name][key], spreads[versus][key]), METRICS[key][1], METRICS[key][2])
                for key in suite.compare)
        paper = list(arm.paper) + ["n/a"] * (len(suite.paper_columns) - len(arm.paper))
        lines.append("| " + " | ".join([arm.name, f"`{' '.join(arm.flags)}`", *paper, *cells, verdict]) + " |")
    ratio = ratio_line(suite, results)
    if ratio:
        lines += ["", ratio]
    notes = list(suite.notes) + list(scale.notes)
    if notes:
        lines += ["", "Notes:"] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"
