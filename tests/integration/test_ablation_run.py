"""mlf-ablate end to end on a shrunken model: 2 steps of every distinct arm of the suites, 1 seed.

Arms that differ from another arm only in a non-zero number (a rate, alpha, micro-batch size) share a
code path, so one of each such family trains here (the unit tests parse every arm; lfb-rate adds no new
family). v2-drop's arms run on two gloo ranks with EP = 2; qb's arms only once mlf-pretrain has the
quantile flags. Then: a finished run is skipped on rerun, an unfinished run resumes from its checkpoint,
another suite reuses it instead of rerunning it, and mlf-report draws the scatter of the runs. About 5
minutes on 2 busy cores.
"""

import json
import os
import re

import pytest
import torch

from megatron_moe_lossfree.ablation.floors import load_valid_routing, routed_counts_E
from megatron_moe_lossfree.ablation.suites import QUANTILE_FLAGS, SCALES, SUITES
from megatron_moe_lossfree.cli import ablate_main, report_main
from megatron_moe_lossfree.metrics import max_violation
from megatron_moe_lossfree.training.arguments import build_parser

pytestmark = pytest.mark.slow
MISSING_QB = [f for f in QUANTILE_FLAGS if f not in build_parser()._option_string_actions]

SHRINK = ("--extra-args=--num-layers 2 --hidden-size 32 --num-attention-heads 2 --ffn-hidden-size 64 "
          "--moe-ffn-hidden-size 32 --moe-shared-expert-intermediate-size 32 --num-experts 8 --seq-length 32 "
          "--eval-iters 1 --log-interval 1")


def _shape(flags):
    """An arm's flags with every non-zero number replaced: arms of one sweep share a shape."""
    def word(token):
        try:
            return "0" if float(token) == 0 else "#"
        except ValueError:
            return token
    return tuple(word(t) for t in flags)


def distinct_arms():
    """{suite: [arm names]}: the first arm of each flag shape, over all suites."""
    seen, chosen = set(), {}
    for name, build in SUITES.items():
        for arm in build(SCALES["tiny"]).arms:
            if _shape(arm.flags) not in seen:
                seen.add(_shape(arm.flags))
                chosen.setdefault(name, []).append(arm.name)
    return chosen


def ablate(suite, out, *extra):
    return ablate_main(["--suite", suite, "--scale", "tiny", "--out", str(out), "--steps", "2", "--seeds", "1",
                        "--no-progress", SHRINK, *extra])


def test_distinct_arms_cover_every_suite():
    chosen = distinct_arms()
    # lfb-rate's arms have lfb-main's loss-free shape (sign rule, a non-zero rate): nothing new to train.
    assert set(chosen) == set(SUITES) - {"lfb-rate"}
    assert sum(map(len, chosen.values())) == 23
    # balancers: its sign arm is lfb-main's shape; the five others are new code paths (issue 28)
    assert chosen["balancers"] == ["smebu-u5e-4", "sign-primal-dual-u1e-2-tau20", "phi-u1e-1-ema0.9", "bip-t4",
                                   "global-aux-a1e-3"]
    assert chosen["v2-drop"] == ["drop-free", "device-cf1-exempt0.1", "device-cf1-exempt0", "expert-cf1"]
    assert chosen["qb"] == ["qb-exact", "qb-histogram", "qb-exact-ema0.9"]
    assert "aux-a0" in chosen["lfb-alpha"]


@pytest.mark.parametrize("suite", sorted(distinct_arms()))
def test_every_distinct_arm_trains_two_steps(suite, tmp_path, capsys):
    if suite == "qb" and MISSING_QB:
        pytest.skip(f"mlf-pretrain has no {', '.join(MISSING_QB)} yet")
    arms = distinct_arms()[suite]
    out_dir = tmp_path / suite  # its own parent: no run of another test is reused
    assert ablate(suite, out_dir, "--arms", ",".join(arms)) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    results = json.load(open(out_dir / "results.json"))
    assert [r["arm"] for r in results["runs"]] == arms
    for run in results["runs"]:
        assert run["steps"] == 2 and run["final_ppl"] is not None and run["maxvio_global"] is not None
        assert os.path.isfile(os.path.join(run["run_dir"], "DONE"))
        assert os.path.isfile(os.path.join(run["run_dir"], "ckpt", "latest_checkpointed_iteration.txt"))
        # --eval-iters 1: one evaluation counts as many tokens as one global batch, so the floors agree.
        assert run["floor_random_global"] == run["floor_random_batch"] > 0
        # Every run writes its final evaluation's routing: the best bias is searched on it, the learned bias
        # routed on the dumped scores gives back the run's own MaxVio_global, and the biases the cache keeps
        # reach the MaxVio it reports (a reachable value, not a floor by construction).
        found = json.load(open(os.path.join(run["run_dir"], "best_bias_found.json")))
        assert found["learned_bias_maxvio_global"] == pytest.approx(run["maxvio_global"], rel=1e-9)
        assert run["floor_best_bias_global"] == found["maxvio_global"] == pytest.approx(
            sum(found["layers"]) / len(found["layers"]), rel=1e-12)
        dump = load_valid_routing(run["run_dir"])
        for scores_TE, bias_E, vio in zip(dump.scores_LTE, found["bias_layers"], found["layers"]):
            bias_E = torch.tensor(bias_E, dtype=torch.float64)
            assert max_violation(routed_counts_E(scores_TE, bias_E, dump.topk)) == vio
    table = (out_dir / f"{suite}.md").read_text()
    assert ", 2 steps, 1 seed(s) per arm (1), the same seeds for every arm" in table and table in out
    assert "| MaxVio_global floor: random | MaxVio_global: best bias found |" in table
    assert all(f"| {arm} | `" in table for arm in arms)
    assert {"maxvio_batch.png", "loss.png", "summary.md"} <= set(os.listdir(out_dir / "report"))
    if suite == "v2-drop":
        drops = {r["arm"]: r["drop_tail"] for r in results["runs"]}
        assert drops["drop-free"] == 0.0


def test_rerun_skips_finished_runs_an_unfinished_run_resumes_and_another_suite_reuses_it(tmp_path, capsys):
    main_dir = tmp_path / "lfb-main"
    assert ablate("lfb-main", main_dir, "--arms", "aux-a1e-3") == 0
    capsys.readouterr()
    assert ablate("lfb-main", main_dir, "--arms", "aux-a1e-3") == 0
    assert "arm 1/1 aux-a1e-3 seed 1: finished before (DONE in " in capsys.readouterr().out
    # An interrupted 3-step run: its checkpoint is at step 2 and it has no DONE marker.
    run_dir = main_dir / "aux-a1e-3" / "seed1"
    os.remove(run_dir / "DONE")
    assert ablate_main(["--suite", "lfb-main", "--out", str(main_dir), "--steps", "3", "--seeds", "1",
                        "--no-progress", SHRINK, "--arms", "aux-a1e-3"]) == 0
    assert "arm 1/1 aux-a1e-3 seed 1: resuming from step 2 (1 process)" in capsys.readouterr().out
    second = (run_dir / "train.log").read_text().split("\n$ ")[-1]
    assert re.findall(r"^step\s+(\d+)/3", second, flags=re.M) == ["3"]
    steps = [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl")
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3]
    # lfb-alpha's alpha = 1e-3 arm is that run: reused, not rerun; its table reads the same run.
    capsys.readouterr()
    assert ablate_main(["--suite", "lfb-alpha", "--out", str(tmp_path / "lfb-alpha"), "--steps", "3", "--seeds", "1",
                        "--no-progress", SHRINK, "--arms", "aux-a1e-3"]) == 0
    assert (f"arm 1/1 aux-a1e-3 seed 1: same configuration as lfb-main/aux-a1e-3 seed 1, reusing {run_dir}"
            in capsys.readouterr().out)
    assert not (tmp_path / "lfb-alpha" / "aux-a1e-3").exists()
    shared = json.load(open(tmp_path / "lfb-alpha" / "results.json"))["runs"]
    assert [(r["run_dir"], r["shared"], r["steps"]) for r in shared] == [(str(run_dir), True, 3)]
    # The picture of every run under the root.
    assert report_main(["--scatter", str(tmp_path), "--out", str(tmp_path / "pic")]) == 0
    assert "| lfb-main/aux-a1e-3 | 1 |" in (tmp_path / "pic" / "scatter.md").read_text()
