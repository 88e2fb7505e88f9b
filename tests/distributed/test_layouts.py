"""Every parallel layout against a single-process reference: same global batch, same initial weights.

The reference (1 rank) saves its fresh weights at step 0 and trains ``STEPS`` steps from them; each
layout loads that step-0 checkpoint (dist_checkpointing reshards it), trains the same steps, and
compares against the reference's final checkpoint loaded into the layout's own shards. All fp32.

Tolerances (2 Adam steps, lr 1e-3, grad clipping on, Adam eps 1e-6 -- see ``layout_cases.ADAM_EPS``
for why not 1e-8): TP/PP/EP/DP only change the order of fp32 reductions, so differences stay at
rounding level:
- loss per step: relative 1e-5;
- every parameter: absolute 1e-5 (one Adam step moves a weight by at most ~lr = 1e-3);
- expert_bias and the all-reduced expert counts of every step: exact (the counts are integers and the
  bias moves by +-u per step from them; a difference means a token was routed differently).

Cases are grouped into three launches (1, 2 and 4 ranks) because process start-up and the megatron
import dominate; the wall time of every case shows in the terminal summary.
"""

from __future__ import annotations

import math
import re

import pytest

from tests.distributed import harness, layout_cases
from tests.distributed.harness import Case
from tests.integration.test_pretrain_cli import assert_valid_routing_dump

pytestmark = pytest.mark.distributed

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5
LAUNCH_TIMEOUT_S = 420

# (name, ranks, TP, PP, EP, ETP, dispatcher). SP is on whenever TP > 1 (Megatron requires it for MoE).
# ETP None = Megatron's default (expert TP = TP).
LAYOUTS = [
    ("tp2_sp", 2, 2, 1, 1, None, "alltoall"),
    ("ep2_alltoall", 2, 1, 1, 2, None, "alltoall"),
    ("ep2_allgather", 2, 1, 1, 2, None, "allgather"),
    ("pp2_4microbatches", 2, 1, 2, 1, None, "alltoall"),
    ("dp2", 2, 1, 1, 1, None, "alltoall"),
    ("ep4", 4, 1, 1, 4, None, "alltoall"),
    ("tp2_ep2_etp1", 4, 2, 1, 2, 1, "alltoall"),
    ("tp2_ep2_etp2", 4, 2, 1, 2, 2, "alltoall"),
    ("pp2_ep2", 4, 1, 2, 2, None, "alltoall"),
    ("pp2_tp2", 4, 2, 2, 1, None, "alltoall"),
]


def layout_flags(tp: int, pp: int, ep: int, etp, dispatcher: str) -> list[str]:
    flags = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
             "--expert-model-parallel-size", str(ep), "--moe-token-dispatcher-type", dispatcher]
    if tp > 1:
        flags.append("--sequence-parallel")
    if etp is not None:
        flags += ["--expert-tensor-parallel-size", str(etp)]
    return flags


class _Launches:
    """Runs the reference, then each world size's layouts in one launch, on first use."""

    def __init__(self, workdir: str, record):
        self.workdir = workdir
        self.record = record
        self.by_world: dict[int, harness.LaunchResult] = {}
        self._reference = None

    def reference(self) -> dict:
        if self._reference is None:
            launch = harness.launch_cases(
                [Case("reference", layout_cases.reference_case, dict(workdir=self.workdir))], 1,
                timeout_s=LAUNCH_TIMEOUT_S, workdir=f"{self.workdir}/launch-1",
                warm_up=layout_cases.warm_up)
            self._note(launch)
            self._reference = launch.results["reference"][0]
        return self._reference

    def layout(self, name: str, world: int) -> list:
        self.reference()
        if world not in self.by_world:
            cases = [Case(n, layout_cases.layout_case,
                          dict(workdir=self.workdir, name=n, flags=layout_flags(tp, pp, ep, etp, disp)))
                     for n, w, tp, pp, ep, etp, disp in LAYOUTS if w == world]
            launch = harness.launch_cases(cases, world, timeout_s=LAUNCH_TIMEOUT_S,
                                          workdir=f"{self.workdir}/launch-{world}", warm_up=layout_cases.warm_up)
            self._note(launch)
            self.by_world[world] = launch
        return self.by_world[world].results[name]

    def _note(self, launch: harness.LaunchResult) -> None:
        w = launch.world_size
        self.record(f"launch of {w} rank(s), in all", launch.total_seconds)
        self.record(f"  {w} rank(s): start-up (processes, imports, gloo)", launch.startup_seconds)
        for name, seconds in launch.case_seconds.items():
            self.record(f"  {w} rank(s): case {name}", seconds)


@pytest.fixture(scope="module")
def launches(tmp_path_factory, record_distributed_time):
    return _Launches(str(tmp_path_factory.mktemp("layouts")), record_distributed_time)


def test_reference_checkpoint_round_trip_is_exact(launches):
    ref = launches.reference()
    assert ref["self_diff"], "no tensors compared"
    assert max(ref["self_diff"].values()) == 0.0
    assert all(math.isfinite(x) for x in ref["losses"])
    # The bias moved (+-u per step): the comparison below is not between two untouched zero vectors.
    assert any(abs(b) > 0 for bias in ref["expert_bias"].values() for b in bias)


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_layout_matches_single_process(launches, layout, record_layout_difference):
    name, world, tp, pp, ep, etp, _ = layout
    ref = launches.reference()
    per_rank = launches.layout(name, world)
    got = per_rank[0]["layout"]
    assert (got["tp"], got["pp"], got["ep"], got["etp"]) == (tp, pp, ep, etp or tp)

    losses = layout_cases.last_stage_losses(per_rank)
    assert losses is not None
    # Every rank's every local tensor against the reference's matching shard: (max |diff|, rank).
    worst = {}
    for rank, result in enumerate(per_rank):
        for key, diff in result["diff"].items():
            if diff > worst.get(key, (-1.0, None))[0]:
                worst[key] = (diff, rank)
    bias_keys = [k for k in worst if k.endswith("router.expert_bias")]
    record_layout_difference(
        name, max(abs(a - b) / abs(b) for a, b in zip(losses, ref["losses"])),
        max(v[0] for k, v in worst.items() if k not in bias_keys), max((worst[k][0] for k in bias_keys), default=-1))

    assert losses == pytest.approx(ref["losses"], rel=LOSS_RTOL, abs=0)
    too_far = {k: v for k, v in worst.items() if v[0] > WEIGHT_ATOL}
    assert not too_far, f"tensors beyond {WEIGHT_ATOL}: {too_far}"
    assert bias_keys and max(worst[k][0] for k in bias_keys) == 0.0

    # Routing: the global per-layer counts of every step, and the final bias, exactly.
    for result in per_rank:
        for step, counts in enumerate(result["counts"]):
            for layer, row in counts.items():
                assert row == ref["counts"][step][layer], f"step {step + 1} layer {layer} counts"
        for layer, bias in result["expert_bias"].items():
            assert bias == ref["expert_bias"][layer], f"layer {layer} expert_bias"
        # MaxVio_batch as the training log computes it: the same numbers as one process, every rank.
        assert result["maxvio_batch"] == ref["maxvio_batch"]
    layers = set().union(*(r["expert_bias"].keys() for r in per_rank))
    assert layers == set(ref["expert_bias"]), "some MoE layer was compared on no rank"


def _loss_values(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"\| loss (\S+) \|", stdout)]


def test_mlf_pretrain_under_torchrun_tp2_sp_ep2(tmp_path, record_distributed_time):
    argv = ["pretrain", *layout_cases.TINY_MODEL, "--train-iters", "3",  # overrides the 2 of TINY_MODEL
            "--tensor-model-parallel-size", "2",
            "--sequence-parallel", "--expert-model-parallel-size", "2", "--out", str(tmp_path / "run"),
            "--eval-iters", "1", "--eval-interval", "3"]
    proc = harness.run_torchrun(argv, 4, timeout_s=LAUNCH_TIMEOUT_S)
    record_distributed_time("torchrun mlf-pretrain TP2+SP x EP2 (4 ranks)", proc.wall_seconds)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = _loss_values(proc.stdout)
    assert len(losses) == 3 and all(math.isfinite(x) and 0 < x < 20 for x in losses), proc.stdout[-2000:]
    assert "done: 3 steps" in proc.stdout
    # The final evaluation's routing, gathered over the ranks that route distinct tokens (TP x DP under
    # SP): every token of the global batch (8 x 32) exactly once, consistent with the logged loads.
    assert_valid_routing_dump(tmp_path / "run", step=3, tokens=8 * 32, layers=[2, 3, 4], num_experts=8, topk=2)


def test_valid_routing_dump_assembles_pipeline_stages(tmp_path, record_distributed_time):
    """PP2 x DP2: each stage holds its own MoE layers and each DP rank half the tokens; the dump has every
    layer and every token once (the TP2+SP x EP2 run above covers the sequence-parallel gather)."""
    argv = ["pretrain", *layout_cases.TINY_MODEL, "--train-iters", "3", "--pipeline-model-parallel-size", "2",
            "--out", str(tmp_path / "run"), "--eval-iters", "1", "--eval-interval", "3"]
    proc = harness.run_torchrun(argv, 4, timeout_s=LAUNCH_TIMEOUT_S)
    record_distributed_time("torchrun mlf-pretrain PP2 x DP2 (4 ranks)", proc.wall_seconds)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_valid_routing_dump(tmp_path / "run", step=3, tokens=8 * 32, layers=[2, 3, 4], num_experts=8, topk=2)
