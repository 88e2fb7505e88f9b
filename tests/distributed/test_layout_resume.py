"""A checkpoint saved at one parallel layout continues at another (EP 2 -> 4, PP 2 -> 1).

See ``layout_resume_cases`` for what each rank runs. The resumed steps are compared with the uninterrupted
run at the ORIGINAL layout: the two differ only in the order of float reductions (another DP/EP/PP split of
the same global batch), so the loss is compared within rel 1e-5 and the final weights within abs 1e-5 (the
layout tests' tolerances), while everything integer-valued or built from integers is exact: the all-reduced
expert counts, the drop fractions, ``tokens_seen`` and ``steps``, and the biases (sign updates of +-u
decided by the counts).
"""

from __future__ import annotations

import pytest

from tests.distributed import harness, layout_cases, layout_resume_cases as cases
from tests.distributed.harness import Case
from tests.distributed.resume_cases import LOG_DROPS_AT, SAVE_AT, STEPS, TOKENS_PER_STEP

pytestmark = pytest.mark.distributed

LOSS_REL, WEIGHT_ABS = 1e-5, 1e-5


@pytest.fixture(scope="module")
def launches(tmp_path_factory, record_distributed_time):
    """Launch A (2 ranks): both uninterrupted jobs and the PP 1 resume; launch B (4 ranks): the EP 4 resume."""
    workdir = str(tmp_path_factory.mktemp("layout-resume"))
    first = [Case(f"save {name}", cases.save_case, dict(workdir=workdir, name=name)) for name in cases.LAYOUT_CHANGES]
    first.append(Case("resume pp2_to_pp1", cases.resume_case, dict(workdir=workdir, name="pp2_to_pp1")))
    second = [Case("resume ep2_to_ep4", cases.resume_case, dict(workdir=workdir, name="ep2_to_ep4"))]
    results = {}
    for world, batch in ((2, first), (4, second)):
        launch = harness.launch_cases(batch, world, timeout_s=300, workdir=f"{workdir}/launch{world}",
                                      warm_up=layout_cases.warm_up)
        record_distributed_time(f"layout-resume launch of {world} ranks, in all", launch.total_seconds)
        for case, seconds in launch.case_seconds.items():
            record_distributed_time(f"  {world} rank(s): {case}", seconds)
        results.update(launch.results)
    return results


def merged(per_rank: list, step: int, key: str) -> dict:
    """Layer -> value at ``step`` over all ranks (a PP stage holds its own layers); ranks must agree."""
    out = {}
    for result in per_rank:
        for record in result["records"]:
            if record["step"] == step:
                for layer, value in record[key].items():
                    assert out.setdefault(layer, value) == value, f"ranks disagree on layer {layer} {key}"
    return out


def one_value(per_rank: list, step: int, key: str):
    """The value every rank that has one reports at ``step`` (the loss: last-stage ranks only)."""
    values = {r[key] for result in per_rank for r in result["records"] if r["step"] == step and r[key] is not None}
    assert len(values) == 1, f"step {step} {key}: {values}"
    return values.pop()


@pytest.mark.parametrize("name", list(cases.LAYOUT_CHANGES))
def test_resume_at_another_layout_continues_the_original_run(launches, name, record_layout_difference):
    (_, world_before), (_, world_after) = cases.LAYOUT_CHANGES[name]
    full, resumed = launches[f"save {name}"], launches[f"resume {name}"]
    assert (len(full), len(resumed)) == (world_before, world_after)
    layout_before, layout_after = full[0]["layout"], resumed[0]["layout"]
    assert (layout_before, layout_after) == {
        "ep2_to_ep4": (dict(pp=1, ep=2, dp=2), dict(pp=1, ep=4, dp=4)),
        "pp2_to_pp1": (dict(pp=2, ep=1, dp=1), dict(pp=1, ep=1, dp=2)),
    }[name]
    for result in resumed:
        # The balancer state came back from the other layout's checkpoint, not from zero.
        assert result["start"] == dict(step=SAVE_AT, tokens_seen=SAVE_AT * TOKENS_PER_STEP, steps=SAVE_AT)
        assert [r["step"] for r in result["records"]] == list(range(SAVE_AT + 1, STEPS + 1))
    worst_loss = 0.0
    for step in range(SAVE_AT + 1, STEPS + 1):
        want, got = one_value(full, step, "loss"), one_value(resumed, step, "loss")
        worst_loss = max(worst_loss, abs(got - want) / abs(want))
        assert abs(got - want) <= LOSS_REL * abs(want), f"step {step}: loss {got} vs {want}"
        assert merged(resumed, step, "counts") == merged(full, step, "counts"), f"step {step}: counts"
        assert merged(resumed, step, "expert_bias") == merged(full, step, "expert_bias"), f"step {step}: bias"
        assert one_value(resumed, step, "tokens_seen") == one_value(full, step, "tokens_seen") == step * TOKENS_PER_STEP
        if step in LOG_DROPS_AT:  # step 3's window spans the save: step 2's drops came with the checkpoint
            dropped = one_value(resumed, step, "drop_fraction")
            assert dropped == one_value(full, step, "drop_fraction") and dropped > 0
    # The v3 freeze held at the new layout: step 4 (tokens seen 768) left the bias where step 3 put it.
    assert merged(resumed, STEPS, "expert_bias") == merged(resumed, STEPS - 1, "expert_bias")
    # Every local tensor of the final state against the original run's final checkpoint, resharded.
    diffs = {key: value for result in resumed for key, value in result["diff"].items()}
    assert diffs and all(diffs[key] == 0.0 for key in diffs if key.endswith("expert_bias"))
    worst_weight = max(diffs.values())
    assert worst_weight <= WEIGHT_ABS, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    record_layout_difference(f"resume {name}", worst_loss, worst_weight, 0.0)
