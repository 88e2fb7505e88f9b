"""The paper-shaped table of an ablation: each arm's published numbers beside ours (mean and seed spread).

Pure functions over per-run metric dicts (``run_metrics`` reads them from a run directory through
``megatron_moe_lossfree.report``); the plots and summary.md come from ``report.write_report``.

A difference between two arms is called ("lower" / "higher") only when their seed ranges [min, max]
do not overlap; otherwise the cell says "≈" (within the spread). One seed has no spread: nothing is called.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_moe_lossfree.ablation.suites import Scale, Suite
from megatron_moe_lossfree.report import RunData, summarize, tail

METRICS: dict[str, tuple[str, str, float]] = {
    # key: (column label, format, multiplier)
    "final_loss": ("val loss", ".3f", 1.0),
    "final_ppl": ("val PPL", ".1f", 1.0),
    "maxvio_global": ("MaxVio_global", ".3f", 1.0),
    "maxvio_batch_tail": ("MaxVio_batch (last 10%)", ".3f", 1.0),
    "maxvio_compute_tail": ("MaxVio_compute (last 10%)", ".3f", 1.0),
    "drop_tail": ("drop % (last 10%)", ".2f", 100.0),
}


def _finite(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def run_metrics(run: RunData) -> dict:
    """Every METRICS key for one run (None where the run did not log it), plus ``steps``."""
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
    }


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


def format_paper_table(suite: Suite, scale: Scale, results: dict[str, list[dict]], *, steps: int,
                       seeds: Sequence[int], command: Optional[str] = None) -> str:
    """Markdown: title, what "ours" means, the table (paper columns, then ours), the notes.

    ``results`` maps an arm name to the metric dicts of its finished seeds (missing arm: "not run").
    """
    spreads = {arm.name: {key: spread([r.get(key) for r in results.get(arm.name, [])]) for key in METRICS}
               for arm in suite.arms}
    seed_text = ", ".join(str(s) for s in seeds)
    lines = [f"## {suite.name}: {suite.title}", ""]
    if command:
        lines.append(f"- command: `{command}`")
    lines += [
        f"- scale: {scale.name} (preset {scale.preset}{', shrunk as the notes say' if scale.flags else ''}), "
        f"{steps} steps, {len(seeds)} seed(s) per arm "
        f"({seed_text})",
        "- ours: mean [min, max] over seeds; the last column calls a difference from the compared arm "
        "(\"lower\"/\"higher\") only when the seed ranges do not overlap, \"≈\" when they do"
        + (", n/a with one seed" if len(seeds) < 2 else ""),
        f"- paper: {suite.source}",
        "",
    ]
    ours = [METRICS[key][0] for key in suite.metrics]
    lines.append("| " + " | ".join(["arm", "flags", *suite.paper_columns, *ours, "vs compared arm"]) + " |")
    lines.append("|" + "---|" * (2 + len(suite.paper_columns)) + "---:|" * len(ours) + "---|")
    for arm in suite.arms:
        done = results.get(arm.name, [])
        if done:
            cells = [format_spread(spreads[arm.name][key], METRICS[key][1], METRICS[key][2])
                     for key in suite.metrics]
            if len(done) < len(seeds):
                cells[0] += f" (n={len(done)})"
        else:
            cells = ["not run"] * len(suite.metrics)
        versus = arm.versus or suite.baseline
        if arm.name == versus:
            verdict = "baseline"
        else:
            verdict = f"vs {versus}: " + ", ".join(
                f"{METRICS[key][0]} {judge(spreads[arm.name][key], spreads[versus][key])}" for key in suite.compare)
        paper = list(arm.paper) + ["n/a"] * (len(suite.paper_columns) - len(arm.paper))
        lines.append("| " + " | ".join([arm.name, f"`{' '.join(arm.flags)}`", *paper, *cells, verdict]) + " |")
    notes = list(suite.notes) + list(scale.notes)
    if notes:
        lines += ["", "Notes:"] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"
