"""mlf-ablate: every suite's arms are valid mlf-pretrain configurations that differ exactly as intended,
--dry-run lists the commands, DONE markers skip and guard runs, and the paper table is exact markdown."""

import dataclasses
import json
import os
import shlex
import sys

import pytest

from megatron_moe_lossfree.ablation import runner
from megatron_moe_lossfree.ablation.report import Spread, format_paper_table, format_spread, judge, spread
from megatron_moe_lossfree.ablation.suites import SCALES, SUITES, Arm, Scale, Suite, get_suite
from megatron_moe_lossfree.cli import COMMANDS, ablate_main
from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.training.arguments import parse_args

TINY = SCALES["tiny"]
PATH_KEYS = {"out", "save", "load", "seed", "no_progress"}


def parsed(scale, arm, seed=1):
    """The arm's run as mlf-pretrain parses it: top-level args plus lossfree.* fields, paths left out."""
    flags = runner.config_flags(scale, arm, seed, steps=None, extra=())
    args = parse_args(flags + ["--out", "o", "--save", "o/ckpt", "--load", "o/ckpt"])
    values = {k: v for k, v in vars(args).items() if k not in PATH_KEYS | {"lossfree"}}
    values.update({f"lossfree.{k}": v for k, v in dataclasses.asdict(args.lossfree).items() if k != "seed"})
    return values


def diff(suite, a, b):
    pa, pb = parsed(TINY, suite.arm(a)), parsed(TINY, suite.arm(b))
    return {k: (pa[k], pb[k]) for k in pa if pa[k] != pb[k]}


@pytest.mark.parametrize("scale", list(SCALES))
@pytest.mark.parametrize("suite_name", list(SUITES))
def test_every_arm_parses_and_names_are_unique(suite_name, scale):
    suite = get_suite(suite_name, SCALES[scale])
    names = [arm.name for arm in suite.arms]
    assert len(set(names)) == len(names)
    assert suite.baseline in names and all(arm.versus in (None, *names) for arm in suite.arms)
    jobs = runner.plan(suite, SCALES[scale], "/tmp/ablate-test", seeds=[1, 2])
    assert len(jobs) == 2 * len(suite.arms)
    for job in jobs:
        args = parse_args(job.flags)  # raises LossFreeConfigError on an invalid arm
        assert args.seed == job.seed and args.load == args.save == job.ckpt
        assert len(job.arm.paper) == len(suite.paper_columns)


def test_lfb_main_arms_differ_in_balancing_only():
    suite = get_suite("lfb-main", TINY)
    assert [a.name for a in suite.arms] == ["aux-a1e-3", "bias-sign-u1e-2"]
    assert diff(suite, "aux-a1e-3", "bias-sign-u1e-2") == {
        "lossfree_balancing": ("none", "bias"), "lossfree.balancing": ("none", "bias"),
        "lossfree_aux_loss_coeff": (1e-3, 0.0), "lossfree.aux_loss_coeff": (1e-3, 0.0)}
    # The paper scale uses the paper's u.
    paper = get_suite("lfb-main", SCALES["paper-1b"])
    assert paper.arms[1].flags == ("--lossfree-balancing", "bias", "--lossfree-update-rule", "sign",
                                   "--lossfree-update-rate", "1e-3")


def test_sweeps_change_one_value():
    rate = get_suite("lfb-rate", TINY)
    assert diff(rate, "bias-sign-u1e-4", "bias-sign-u1e-2") == {
        "lossfree_update_rate": (1e-4, 1e-2), "lossfree.update_rate": (1e-4, 1e-2)}
    alpha = get_suite("lfb-alpha", TINY)
    assert [a.name for a in alpha.arms] == ["aux-a1e-2", "aux-a1e-3", "aux-a1e-4", "aux-a0"]
    assert diff(alpha, "aux-a1e-2", "aux-a0") == {
        "lossfree_aux_loss_coeff": (1e-2, 0.0), "lossfree.aux_loss_coeff": (1e-2, 0.0)}
    rule = get_suite("lfb-rule", TINY)
    assert len(rule.arms) == 6
    assert diff(rule, "bias-sign-u1e-3", "bias-prop-u1e-3") == {
        "lossfree_update_rule": ("sign", "proportional"), "lossfree.update_rule": ("sign", "proportional")}
    kind = get_suite("lfb-bias-kind", TINY)
    assert diff(kind, "bias-add-u1e-3", "bias-mul-u1e-3") == {
        "lossfree_update_rule": ("sign", "multiplicative"), "lossfree.update_rule": ("sign", "multiplicative"),
        "lossfree_bias_kind": ("additive", "multiplicative"), "lossfree.bias_kind": ("additive", "multiplicative")}


def test_softmax_seqaux_and_batch_suites():
    soft = get_suite("lfb-softmax", TINY)
    assert all(parsed(TINY, a)["moe_router_score_function"] == "softmax" for a in soft.arms)
    assert diff(soft, "softmax-aux-a3e-4", "softmax-bias-prop-u1e-2") == {
        "lossfree_balancing": ("none", "bias"), "lossfree.balancing": ("none", "bias"),
        "lossfree_aux_loss_coeff": (3e-4, 0.0), "lossfree.aux_loss_coeff": (3e-4, 0.0),
        "lossfree_update_rule": ("sign", "proportional"), "lossfree.update_rule": ("sign", "proportional")}
    seq = get_suite("v3-seqaux", TINY)
    assert diff(seq, "bias-sign-u1e-2", "bias-sign-u1e-2-seqaux1e-4") == {
        "lossfree_seq_aux_loss_coeff": (0.0, 1e-4), "lossfree.seq_aux_loss_coeff": (0.0, 1e-4)}
    batch = get_suite("lfb-batch", TINY)
    assert [parsed(TINY, a)["micro_batch_size"] for a in batch.arms] == [2, 2, 4, 4, 8, 8, 16, 16]
    assert diff(batch, "aux-a1e-3-mbs2", "aux-a1e-3-mbs16") == {"micro_batch_size": (2, 16)}
    assert batch.arm("bias-sign-u1e-2-mbs4").versus == "aux-a1e-3-mbs4"


def test_v2_drop_arms_run_on_two_ranks_and_differ_in_dropping_only():
    suite = get_suite("v2-drop", TINY)
    assert all(a.ranks == 2 and parsed(TINY, a)["expert_model_parallel_size"] == 2 for a in suite.arms)
    assert diff(suite, "drop-free", "device-cf1-exempt0.1") == {
        "lossfree_drop": ("none", "device"), "lossfree.drop": ("none", "device"),
        "lossfree_capacity_factor": (None, 1.0), "lossfree.capacity_factor": (None, 1.0)}
    assert diff(suite, "device-cf1-exempt0.1", "device-cf1-exempt0") == {
        "lossfree_exempt_fraction": (0.1, 0.0), "lossfree.exempt_fraction": (0.1, 0.0)}
    assert diff(suite, "device-cf1-exempt0.1", "expert-cf1") == {
        "lossfree_drop": ("device", "expert"), "lossfree.drop": ("device", "expert")}
    job = runner.plan(suite, TINY, "out", seeds=[1])[0]
    assert job.command[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]


def test_steps_override_shortens_the_warmup_and_extra_args_come_last():
    arm = get_suite("lfb-main", TINY).arms[0]
    flags = runner.config_flags(TINY, arm, 3, steps=5, extra=["--num-layers", "2"])
    assert flags[flags.index("--preset"):][:2] == ["--preset", "tiny-cpu"]
    assert flags[-8:] == ["--lossfree-balancing", "none", "--lossfree-aux-loss-coeff", "1e-3", "--seed", "3",
                          "--num-layers", "2"]
    args = parse_args(flags)
    assert (args.train_iters, args.lr_warmup_iters, args.num_layers) == (5, 0, 2)
    assert runner.config_flags(TINY, arm, 1, steps=None, extra=()).count("--train-iters") == 1


def test_dry_run_lists_every_command_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "abl"
    result = runner.main(["--suite", "lfb-rate", "--out", str(out), "--seeds", "2", "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"lfb-rate (LFB Fig. 4: update rate u of the sign rule) at scale tiny: 3 arm(s) x 2 "
                        f"seed(s) = 6 run(s), 200 steps each, in {out}")
    assert len(lines) == 7 and not out.exists()
    for line, (u, seed) in zip(lines[1:], [(u, s) for u in ("1e-4", "1e-3", "1e-2") for s in (1, 2)]):
        head, command = line.split(": ", 1)
        assert head.startswith(f"arm ") and head.endswith(f"bias-sign-u{u} seed {seed}")
        argv = shlex.split(command)
        assert argv[:4] == [sys.executable, "-m", "megatron_moe_lossfree", "pretrain"]
        assert argv[argv.index("--lossfree-update-rate") + 1] == u
        assert argv[argv.index("--out") + 1] == str(out / f"bias-sign-u{u}" / f"seed{seed}")
    assert len(result["jobs"]) == 6


def test_bad_input_names_flag_value_and_fix(capsys):
    cases = [
        (["--suite", "lfb-nope"], "--suite (lfb-nope) is unknown: use one of lfb-main, lfb-alpha, lfb-rate, "
         "lfb-rule, lfb-bias-kind, lfb-softmax, lfb-batch, v2-drop, v3-seqaux"),
        (["--suite", "lfb-main", "--scale", "7b"], "--scale (7b) is unknown: use one of tiny, paper-1b, paper-3b"),
        (["--suite", "lfb-main", "--arms", "bias"], "--arms (bias) is not an arm of suite lfb-main: use one of "
         "aux-a1e-3, bias-sign-u1e-2"),
        (["--suite", "lfb-main", "--seeds", "0", "--steps", "0"], "--steps (0) must be >= 1; --seeds (0) must be >= 1"),
        (["--suite", "v2-drop", "--nproc-per-node", "3"], "--nproc-per-node (3) must be a multiple of arm "
         "drop-free's 2 ranks (its expert-parallel size): use 2"),
    ]
    for argv, message in cases:
        with pytest.raises(LossFreeConfigError) as err:
            runner.main(argv + ["--dry-run"])
        assert str(err.value) == message
    assert ablate_main(["--suite", "lfb-nope", "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("error: --suite (lfb-nope) is unknown")
    assert COMMANDS["ablate"] is ablate_main


def test_extra_args_that_break_an_arm_fail_before_anything_runs(tmp_path):
    with pytest.raises(LossFreeConfigError, match=r"^arm aux-a1e-3 seed 1: --num-experts \(6\) must be divisible"):
        runner.main(["--suite", "lfb-main", "--out", str(tmp_path), "--dry-run",
                     "--extra-args=--num-experts 6 --expert-model-parallel-size 4"])


# ----------------------------------------------------------------------------- DONE markers, resume


def fake_jobs(tmp_path, suite_name="lfb-main"):
    return runner.plan(get_suite(suite_name, TINY), TINY, str(tmp_path), seeds=[1])


def test_done_runs_are_skipped_and_a_changed_run_is_refused(tmp_path, monkeypatch):
    jobs = fake_jobs(tmp_path)
    os.makedirs(jobs[0].run_dir)
    with open(os.path.join(jobs[0].run_dir, runner.DONE), "w") as fh:
        json.dump({"config_flags": list(jobs[0].config_flags)}, fh)
    ran = []
    monkeypatch.setattr(runner, "run_job", lambda job, bar=None: ran.append(job) or 1)
    failed = runner.run_all(jobs, progress=False)
    assert ran == [jobs[1]] and failed == [jobs[1]]  # only the unfinished arm runs (and "fails" here)
    changed = runner.plan(get_suite("lfb-main", TINY), TINY, str(tmp_path), seeds=[1], steps=7)
    with pytest.raises(LossFreeConfigError) as err:
        runner.validate_jobs(changed)
    assert str(err.value).startswith(f"{jobs[0].run_dir} (DONE) was finished with other flags (--preset tiny-cpu ")
    assert str(err.value).endswith("use another --out, or delete that run directory to rerun it")


@dataclasses.dataclass(frozen=True)
class ScriptJob(runner.Job):
    script: str = ""

    @property
    def command(self):
        return [sys.executable, "-c", self.script]


def test_run_job_logs_progress_and_writes_done_only_on_success(tmp_path):
    arm = Arm("a", ("--lossfree-balancing", "none"))
    ok = ScriptJob(arm=arm, seed=1, run_dir=str(tmp_path / "ok"), config_flags=("--seed", "1"), nproc=1,
                   script="print('step      1/2 | loss 1.0'); print('step      2/2 | loss 0.5')")

    class Bar:
        n, total = 0, 0

        def refresh(self):
            pass

    bar = Bar()
    assert runner.run_job(ok, bar) == 0
    assert (bar.n, bar.total) == (2, 2)
    done = json.load(open(tmp_path / "ok" / runner.DONE))
    assert done["config_flags"] == ["--seed", "1"] and done["arm"] == "a"
    assert "step      2/2 | loss 0.5" in (tmp_path / "ok" / "train.log").read_text()
    bad = dataclasses.replace(ok, run_dir=str(tmp_path / "bad"), script="import sys; sys.exit(3)")
    assert runner.run_job(bad) == 3 and not (tmp_path / "bad" / runner.DONE).exists()


# ----------------------------------------------------------------------------- the paper table


def test_spread_and_judge_call_a_difference_only_outside_the_spread():
    assert spread([3.0, None, 1.0, 2.0]) == Spread(2.0, 1.0, 3.0, 3)
    assert spread([None]) is None
    assert format_spread(Spread(2.0, 1.0, 3.0, 3), ".1f") == "2.0 [1.0, 3.0]"
    assert format_spread(Spread(0.5, 0.5, 0.5, 1), ".2f", 100.0) == "50.00"
    low, high = Spread(1.0, 0.9, 1.1, 3), Spread(2.0, 1.5, 2.5, 3)
    assert (judge(low, high), judge(high, low), judge(low, Spread(1.2, 1.05, 1.3, 3))) == ("lower", "higher", "≈")
    assert judge(Spread(1.0, 1.0, 1.0, 1), Spread(2.0, 2.0, 2.0, 1)) == "n/a"


def synthetic_suite():
    return Suite(
        name="demo", title="Demo table", source="LFB Table 9", baseline="aux",
        paper_columns=("paper 1B: PPL / MaxVio_global",),
        arms=(Arm("aux", ("--lossfree-balancing", "none"), paper=("9.56 / 0.72",)),
              Arm("bias", ("--lossfree-balancing", "bias"), paper=("9.50 / 0.04",)),
              Arm("mbs", ("--micro-batch-size", "2"), versus="bias"),
              Arm("missing", ("--seed", "9"), paper=("n/a",))),
        metrics=("final_ppl", "maxvio_global", "drop_tail"), compare=("final_ppl", "maxvio_global"),
        notes=("a suite note.",))


def test_paper_table_exact_markdown():
    scale = Scale(name="tiny", preset="tiny-cpu", flags=(), seeds=3, train_iters=200, lr_warmup_iters=10,
                  save_interval=50, lossfree_rate="1e-2", micro_batch_sizes=(2,), notes=("a scale note.",))
    m = lambda ppl, mv, drop=0.0: {"final_ppl": ppl, "maxvio_global": mv, "drop_tail": drop}  # noqa: E731
    results = {"aux": [m(400.0, 1.2), m(410.0, 1.0), m(420.0, 1.4)],
               "bias": [m(405.0, 0.1), m(415.0, 0.2), m(395.0, 0.3)],
               "mbs": [m(300.0, 0.5, 0.25), m(310.0, 0.7, 0.5)]}
    table = format_paper_table(synthetic_suite(), scale, results, steps=200, seeds=[1, 2, 3],
                               command="mlf-ablate --suite demo")
    assert table == """## demo: Demo table

- command: `mlf-ablate --suite demo`
- scale: tiny (preset tiny-cpu), 200 steps, 3 seed(s) per arm (1, 2, 3)
- ours: mean [min, max] over seeds; the last column calls a difference from the compared arm ("lower"/"higher") only when the seed ranges do not overlap, "≈" when they do
- paper: LFB Table 9

| arm | flags | paper 1B: PPL / MaxVio_global | val PPL | MaxVio_global | drop % (last 10%) | vs compared arm |
|---|---|---|---:|---:|---:|---|
| aux | `--lossfree-balancing none` | 9.56 / 0.72 | 410.0 [400.0, 420.0] | 1.200 [1.000, 1.400] | 0.00 [0.00, 0.00] | baseline |
| bias | `--lossfree-balancing bias` | 9.50 / 0.04 | 405.0 [395.0, 415.0] | 0.200 [0.100, 0.300] | 0.00 [0.00, 0.00] | vs aux: val PPL ≈, MaxVio_global lower |
| mbs | `--micro-batch-size 2` | n/a | 305.0 [300.0, 310.0] (n=2) | 0.600 [0.500, 0.700] | 37.50 [25.00, 50.00] | vs bias: val PPL lower, MaxVio_global higher |
| missing | `--seed 9` | n/a | not run | not run | not run | vs aux: val PPL n/a, MaxVio_global n/a |

Notes:
- a suite note.
- a scale note.
"""
    one_seed = format_paper_table(synthetic_suite(), scale, {"aux": [m(400.0, 1.2)], "bias": [m(405.0, 0.1)]},
                                  steps=2, seeds=[1])
    assert "3 seed(s)" not in one_seed and ", n/a with one seed" in one_seed
    assert "| 405.0 | 0.100 | 0.00 | vs aux: val PPL n/a, MaxVio_global n/a |" in one_seed


def test_run_metrics_reads_a_run_directory(tmp_path):
    from megatron_moe_lossfree.ablation.report import run_metrics
    from megatron_moe_lossfree.report import load_run

    rows = [{"kind": "train", "step": s, "loss": 5.0, "maxvio_batch": 1.0 if s < 10 else 0.5,
             "maxvio_compute": 2.0 if s < 10 else 0.75} for s in range(1, 11)]
    rows.append({"kind": "valid", "step": 10, "loss": 6.0, "ppl": 403.4287934927351, "maxvio_global": 0.25})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_metrics(load_run(str(tmp_path))) == {
        "steps": 10, "final_loss": 6.0, "final_ppl": 403.4287934927351, "maxvio_global": 0.25,
        "maxvio_batch_tail": 0.5, "maxvio_compute_tail": 0.75, "drop_tail": 0.0}
