"""report.py / mlf-report: exact summary numbers from two synthetic runs, smoothing, PNGs, errors.

Run A ("lossfree"): logged every step 1..200, 2 MoE layers x 4 experts, loads and biases, no dropping.
Run B ("auxloss"): logged every 10 steps, drop_fraction, no biases, no MaxVio_global.
Both runs change their values exactly at the last-10% boundary, so an off-by-one tail shows.
"""

import json
import math
import os
import re

import numpy as np
import pytest

from megatron_moe_lossfree.cli import report_main
from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.report import (
    format_summary,
    load_run,
    moving_average,
    summarize,
    tail_loads,
    write_report,
)

PNGS = ["maxvio_batch.png", "load_heatmap.png", "bias.png", "loss.png"]


def write_rows(run_dir, rows, trailer=""):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write(trailer)


def lossfree_rows():
    rows = []
    for step in range(1, 201):
        in_tail = step > 180  # the last 10% of 200 rows
        wiggle = 0.125 * (-1) ** step  # cancels over the 20 tail rows
        maxvio = 0.25 + wiggle + (0.0 if in_tail else 2.0 * math.exp(-step / 30))
        if in_tail:
            loads = [[20, 10, 5, 5], [10, 10, 10, 10] if step % 2 else [12, 8, 10, 10]]
        else:
            loads = [[100, 0, 0, 0], [0, 0, 0, 100]]
        bias = [[1e-3 * min(step, 150) * (e - 1.5) * (layer + 1) for e in range(4)] for layer in range(2)]
        loss = 6.0 * math.exp(-step / 80) + 3.0 + 0.05 * wiggle
        rows.append({"kind": "train", "step": step, "loss": loss, "lr": 1e-3, "tokens_per_s": 1e4,
                     "maxvio_batch": maxvio, "maxvio_batch_layers": [maxvio, maxvio],
                     "loads_layers": loads, "bias_layers": bias})
        if step % 100 == 0:
            ppl, maxvio_global = (20.0, 0.5) if step == 100 else (12.5, 0.0625)
            rows.append({"kind": "valid", "step": step, "loss": math.log(ppl), "ppl": ppl,
                         "maxvio_global": maxvio_global, "maxvio_global_layers": [maxvio_global] * 2})
    rows.insert(3, {"kind": "checkpoint", "step": 3})  # other kinds are ignored
    return rows


def auxloss_rows():
    rows = []
    for step in range(10, 201, 10):
        in_tail = step >= 190  # ceil(10% of 20 rows) = 2 rows
        rows.append({"kind": "train", "step": step, "loss": 6.5 * math.exp(-step / 90) + 3.2, "lr": 1e-3,
                     "tokens_per_s": 1e4, "maxvio_batch": 0.75 if in_tail else 1.5,
                     "maxvio_batch_layers": [0.75, 0.75],
                     "drop_fraction": {190: 0.5, 200: 0.25}.get(step, 0.9),
                     "loads_layers": [[15, 5, 10, 10], [10, 10, 10, 10]] if in_tail else [[40, 0, 0, 0]] * 2})
    rows.append({"kind": "valid", "step": 200, "loss": math.log(16.0), "ppl": 16.0})
    return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    a, b = str(root / "lossfree"), str(root / "auxloss")
    write_rows(a, lossfree_rows())
    write_rows(b, auxloss_rows())
    return a, b


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("report"))
    result = write_report([load_run(p) for p in runs], out, smooth=100)
    return out, result


def test_moving_average_exact():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert moving_average(values, 2).tolist() == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert moving_average(values, 1).tolist() == values
    # A window longer than the data averages what is there: the running mean.
    assert moving_average(values, 100).tolist() == [1.0, 1.5, 2.0, 2.5, 3.0]
    # With steps the window is in steps: logged every 10 steps, window 20 holds 2 points.
    assert moving_average(values, 20, steps=[10, 20, 30, 40, 50]).tolist() == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert moving_average(values, 25, steps=[10, 20, 30, 40, 50]).tolist() == [1.0, 1.5, 2.0, 3.0, 4.0]
    with pytest.raises(LossFreeConfigError, match=re.escape("--smooth (0) must be an integer >= 1")):
        moving_average(values, 0)


def test_summary_exact(runs):
    a, b = (summarize(load_run(p)) for p in runs)
    assert a == {"label": "lossfree", "steps": 200, "final_ppl": 12.5, "maxvio_global": 0.0625,
                 "maxvio_batch_tail": 0.25, "drop_tail": 0.0}
    assert b == {"label": "auxloss", "steps": 200, "final_ppl": 16.0, "maxvio_global": None,
                 "maxvio_batch_tail": 0.75, "drop_tail": 0.375}
    assert format_summary([a, b]).splitlines()[2:] == [
        "| lossfree | 200 | 12.50 | 0.0625 | 0.2500 | 0.00% |",
        "| auxloss | 200 | 16.00 | n/a | 0.7500 | 37.50% |",
    ]


def test_tail_loads_normalised_by_mean(runs):
    a, b = (tail_loads(load_run(p)) for p in runs)
    # A tail: layer 1 constant [20,10,5,5] (mean 10); layer 2 alternates -> mean [11,9,10,10].
    np.testing.assert_allclose(a, [[2.0, 1.0, 0.5, 0.5], [1.1, 0.9, 1.0, 1.0]], rtol=1e-12)
    np.testing.assert_allclose(b, [[1.5, 0.5, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]], rtol=1e-12)


def test_resumed_and_truncated_log(tmp_path):
    rows = [{"kind": "train", "step": s, "loss": 5.0, "maxvio_batch": 9.0} for s in (1, 2, 3)]
    # A resume from step 2 rewrites step 3; the killed run's last line is cut short.
    rows += [{"kind": "train", "step": 3, "loss": 4.0, "maxvio_batch": 1.0}]
    write_rows(str(tmp_path / "r"), rows, trailer='{"kind": "train", "ste')
    run = load_run(str(tmp_path / "r"), label="resumed")
    assert [r["step"] for r in run.train] == [1, 2, 3]
    assert run.bad_lines == 1
    s = summarize(run)
    assert (s["label"], s["maxvio_batch_tail"], s["final_ppl"], s["steps"]) == ("resumed", 1.0, None, 3)
    # No loads or biases logged: those plots are skipped with a note, the rest are written.
    result = write_report([run], str(tmp_path / "out"), smooth=2)
    written = sorted(os.path.basename(f) for f in result["files"])
    assert written == ["loss.png", "maxvio_batch.png", "summary.md"]
    assert result["notes"] == ["load_heatmap.png skipped: no run logged loads_layers",
                               "bias.png skipped: no run logged bias_layers",
                               "resumed: skipped 1 unreadable line(s) of metrics.jsonl"]


def test_pngs_written_and_valid(report):
    out, result = report
    for name in PNGS:
        path = os.path.join(out, name)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
        assert os.path.getsize(path) > 10_000, name
    assert result["notes"] == ["bias.png: run auxloss logged no bias_layers"]
    with open(os.path.join(out, "summary.md")) as f:
        assert "| lossfree | 200 | 12.50 | 0.0625 | 0.2500 | 0.00% |" in f.read()


def test_cli_default_out_and_stdout(runs, capsys):
    a, b = runs
    assert report_main([a, b, "--labels", "LFB", "aux", "--smooth", "50", "--bias-layer", "2"]) == 0
    stdout = capsys.readouterr().out
    assert "| LFB | 200 | 12.50 | 0.0625 | 0.2500 | 0.00% |" in stdout
    assert "| aux | 200 | 16.00 | n/a | 0.7500 | 37.50% |" in stdout
    assert sorted(os.listdir(os.path.join(a, "report"))) == sorted(PNGS + ["summary.md"])


@pytest.mark.parametrize("make_args, message", [
    (lambda a, tmp: [str(tmp / "nope")],
     "RUN_DIR ({tmp}/nope) is not a directory: pass the output directory of a training run"),
    (lambda a, tmp: [str(tmp)],
     "RUN_DIR ({tmp}) has no metrics.jsonl and no TensorBoard events: pass the directory a training run logged "
     "to (mlf-pretrain's --out, or Megatron-LM's --tensorboard-dir)"),
    (lambda a, tmp: [a, "--labels", "x", "y"],
     "--labels (2 given) must have one label per RUN_DIR (1): pass as many labels as run directories"),
    (lambda a, tmp: [a, "--bias-layer", "3", "--out", str(tmp / "o")],
     "--bias-layer (3) must be between 1 and the number of MoE layers of run lossfree (2): "
     "pick one of its MoE layers"),
])
def test_cli_errors_one_line(runs, tmp_path, capsys, make_args, message):
    assert report_main(make_args(runs[0], tmp_path)) == 2
    assert capsys.readouterr().err == f"error: {message.format(tmp=tmp_path)}\n"


# ----------------------------------------------------------------------------- the ablation scatter


def write_ablation_run(root, suite, arm, seed, ppl, maxvio, done=True, dump=False):
    run_dir = os.path.join(root, suite, arm, f"seed{seed}")
    write_rows(run_dir, [{"kind": "train", "step": 10, "loss": 3.0, "maxvio_batch": 1.0},
                         {"kind": "valid", "step": 10, "loss": math.log(ppl), "ppl": ppl, "maxvio_global": maxvio}])
    os.makedirs(os.path.join(run_dir, "ckpt"))
    if done:
        with open(os.path.join(run_dir, "DONE"), "w") as f:
            json.dump({"arm": arm, "seed": seed, "config_flags": ["--preset", "tiny-cpu", "--seed", str(seed)]}, f)
    if dump:  # a collapsed layer the best bias found balances exactly (test_ablation_floors.skewed_scores)
        import torch

        from megatron_moe_lossfree.ablation.floors import VALID_ROUTING, VALID_ROUTING_FORMAT

        scores = torch.tensor([[0.9, 0.8, 0.7, 0.6]] * 8, dtype=torch.float64)
        for t in range(8):
            scores[t, t % 4] += 0.01 * t
        torch.save({"format": VALID_ROUTING_FORMAT, "step": 10, "topk": 1, "layers": [2], "scores": [scores]},
                   os.path.join(run_dir, VALID_ROUTING))
    return run_dir


@pytest.fixture(scope="module")
def ablation_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ablate"))
    write_ablation_run(root, "lfb-main", "aux", 1, 12.0, 2.0)
    write_ablation_run(root, "lfb-main", "aux", 2, 14.0, 3.0)
    write_ablation_run(root, "lfb-main", "bias", 1, 11.0, 0.25, dump=True)
    write_ablation_run(root, "lfb-main", "bias", 2, 13.0, 0.75)
    write_ablation_run(root, "qb", "qb-exact", 1, 12.5, 0.0625)
    write_ablation_run(root, "qb", "qb-exact", 2, 99.0, 9.0, done=False)  # unfinished: left out
    os.makedirs(os.path.join(root, "lfb-main", "report"))
    return root


def test_scatter_points_means_and_floors_exact(ablation_root):
    from megatron_moe_lossfree.ablation.floors import random_floor
    from megatron_moe_lossfree.ablation.scatter import arm_means, collect_points, find_runs, floor_lines, format_points

    runs = find_runs(ablation_root)
    assert [os.path.relpath(r, ablation_root) for r in runs] == [
        "lfb-main/aux/seed1", "lfb-main/aux/seed2", "lfb-main/bias/seed1", "lfb-main/bias/seed2", "qb/qb-exact/seed1"]
    points = collect_points(runs, ablation_root)
    assert [(p.group, p.seed, p.ppl, p.maxvio_global, p.floor_best_bias) for p in points] == [
        ("lfb-main/aux", 1, 12.0, 2.0, None), ("lfb-main/aux", 2, 14.0, 3.0, None),
        ("lfb-main/bias", 1, 11.0, 0.25, 0.0), ("lfb-main/bias", 2, 13.0, 0.75, None),
        ("qb/qb-exact", 1, 12.5, 0.0625, None)]
    # tiny-cpu: 16 experts top-2, an evaluation of 4 x 16 x 128 tokens.
    floor = random_floor(16, 2, 4 * 16 * 128)
    assert all(p.floor_random == floor for p in points)
    assert arm_means(points) == {"lfb-main/aux": (2.5, 13.0, 2), "lfb-main/bias": (0.5, 12.0, 2),
                                 "qb/qb-exact": (0.0625, 12.5, 1)}
    lines = floor_lines(points)
    assert lines["best bias found"] == (0.0, 0.0, 0.0) and lines["random router"][1:] == (floor, floor)
    assert lines["random router"][0] == pytest.approx(floor, rel=1e-12)  # a mean of 5 equal floats
    assert format_points(points) == (
        "| arm | runs | MaxVio_global (mean) | val PPL (mean) |\n|---|---:|---:|---:|\n"
        "| lfb-main/bias | 2 | 0.500 | 12.000 |\n| qb/qb-exact | 1 | 0.062 | 12.500 |\n"
        "| lfb-main/aux | 2 | 2.500 | 13.000 |\n"
        f"\nfloor, random router: MaxVio_global {floor:.4f} (min {floor:.4f}, max {floor:.4f})\n"
        "\nfloor, best bias found: MaxVio_global 0.0000 (min 0.0000, max 0.0000)\n")


def test_cli_scatter_writes_png_and_table(ablation_root, tmp_path, capsys):
    out = str(tmp_path / "pic")
    assert report_main(["--scatter", ablation_root, "--out", out]) == 0
    assert capsys.readouterr().out == f"wrote {out}/scatter.png, {out}/scatter.md\n"
    with open(os.path.join(out, "scatter.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "scatter.md")) as f:
        assert f.read().startswith("# Validation perplexity vs MaxVio_global, every run\n\n| arm | runs |")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report_main(["--scatter", str(empty)]) == 2
    assert capsys.readouterr().err == (f"error: --scatter ({empty}) holds no finished run with a validation perplexity "
                                       f"and MaxVio_global: pass mlf-ablate's --out after runs finished\n")


def test_scatter_reads_the_last_validation_row_of_a_resumed_run(tmp_path):
    from megatron_moe_lossfree.ablation.scatter import final_validation

    rows = [{"kind": "valid", "step": 10, "ppl": 9.0}, {"kind": "valid", "step": 20, "ppl": 8.0},
            {"kind": "train", "step": 30, "loss": 1.0}, {"kind": "valid", "step": 20, "ppl": 7.5}]
    write_rows(str(tmp_path), rows, trailer='{"kind": "valid", "st')  # a resumed run, then a killed one
    assert final_validation(str(tmp_path)) == {"kind": "valid", "step": 20, "ppl": 7.5}
    write_rows(str(tmp_path / "none"), [{"kind": "train", "step": 1, "loss": 2.0}])
    assert final_validation(str(tmp_path / "none")) == {}


def png_size(path):
    with open(path, "rb") as f:
        header = f.read(24)
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_many_runs_get_a_legend_beside_the_axes(runs, tmp_path):
    """A suite's 12 runs: the legend moves beside the axes and the figure widens by one legend column
    (2.6 in at 120 dpi), so the curves keep the 7 in x 4 in of a two-run plot."""
    from megatron_moe_lossfree.report import plot_loss, plot_maxvio

    two = [load_run(runs[0], label=f"arm s{seed}") for seed in (1, 2)]
    twelve = [load_run(runs[0], label=f"arm{arm} s{seed}") for arm in range(4) for seed in (1, 2, 3)]
    for plot in (plot_loss, plot_maxvio):
        plot(two, str(tmp_path / "two.png"), 10)
        plot(twelve, str(tmp_path / "twelve.png"), 10)
        assert png_size(tmp_path / "two.png") == (840, 480), plot.__name__
        assert png_size(tmp_path / "twelve.png") == (round(9.6 * 120), 480), plot.__name__
