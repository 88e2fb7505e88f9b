"""A resumed job continues exactly at EP 2 (device-level dropping), PP 2 (expert-level dropping) and PP 2 with
an MTP layer on the last stage.

See ``resume_cases`` for what each rank runs and why those flags. Both layouts run in one 2-rank launch.
Same layout, same reduction order: the resumed steps must equal the uninterrupted ones bit for bit --
losses, all-reduced counts, biases and every local tensor of the final state.
"""

from __future__ import annotations

import pytest

from tests.distributed import harness, layout_cases, resume_cases
from tests.distributed.harness import Case

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def launch(tmp_path_factory, record_distributed_time):
    workdir = str(tmp_path_factory.mktemp("resume"))
    cases = [Case(name, resume_cases.resume_case, dict(workdir=workdir, name=name))
             for name in resume_cases.RESUME_LAYOUTS]
    result = harness.launch_cases(cases, 2, timeout_s=420, workdir=f"{workdir}/launch",
                                  warm_up=layout_cases.warm_up)
    record_distributed_time("resume launch of 2 ranks, in all", result.total_seconds)
    for name, seconds in result.case_seconds.items():
        record_distributed_time(f"  2 rank(s): case resume {name}", seconds)
    return result


@pytest.mark.parametrize("name", list(resume_cases.RESUME_LAYOUTS))
def test_resumed_run_equals_uninterrupted_run(launch, name):
    per_rank = launch.results[name]
    assert (per_rank[0]["ep"], per_rank[0]["pp"]) == ((2, 1) if name.startswith("ep2") else (1, 2))
    save_at, steps, per_step = resume_cases.SAVE_AT, resume_cases.STEPS, resume_cases.TOKENS_PER_STEP
    for rank, result in enumerate(per_rank):
        full, resumed = result["uninterrupted"], result["resumed"]
        assert [r["step"] for r in full] == list(range(1, steps + 1))
        assert [r["step"] for r in resumed] == list(range(save_at + 1, steps + 1)), f"rank {rank}"
        # The schedule state came back with the checkpoint, not from zero.
        assert result["start"] == dict(step=save_at, tokens_seen=save_at * per_step, steps=save_at)
        for want, got in zip(full[save_at:], resumed):
            assert got == want, f"rank {rank} step {want['step']}: resumed {got} != uninterrupted {want}"
        # Every local tensor of the final state (weights and expert_bias), bit for bit.
        assert result["diff"] and max(result["diff"].values()) == 0.0, \
            {k: v for k, v in result["diff"].items() if v}
        # The v3 freeze is in force at step 4 (tokens seen 768 = the freeze point); steps 1-3 moved the bias.
        assert [r["tokens_seen"] for r in full] == [per_step * s for s in range(1, steps + 1)]
        for before, after in zip(full, full[1:]):
            moved = before["expert_bias"] != after["expert_bias"]
            assert moved == (after["step"] < steps), f"step {after['step']}: bias moved={moved}"
    # The MTP layer (layer number 5, after the 4 decoder layers) was among the compared routers, on the last stage.
    mtp_layers = [{int(n) for n in r["resumed"][-1]["expert_bias"]} for r in launch.results["pp2_mtp_expert_drop"]]
    assert mtp_layers == [{2}, {3, 4, 5}], mtp_layers
    # The losses are real numbers on the last stage, the same on every rank that has them.
    losses = [r["loss"] for result in per_rank for r in result["resumed"] if r["loss"] is not None]
    assert losses and all(0 < x < 20 for x in losses)


def test_dropping_was_active(launch):
    """The resumed steps dropped tokens: the comparison covered the exempt choice and the capacity."""
    for name in resume_cases.RESUME_LAYOUTS:
        dropped = [r["drop_fraction"] for result in launch.results[name] for r in result["resumed"]
                   if r["step"] in resume_cases.LOG_DROPS_AT]
        assert min(dropped) > 0, f"{name}: drop fractions {dropped}"
