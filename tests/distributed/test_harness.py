"""The harness itself: results per rank and case, Megatron state reset between cases, a failing rank's
traceback, and a hung launch killed at its timeout."""

from __future__ import annotations

import os
import time

import pytest

from tests.distributed import harness
from tests.distributed.harness import Case, RankFailure

pytestmark = pytest.mark.distributed


# -- case functions (run in the ranks; module level so the ranks can import them) ----------------------
def all_reduce_rank() -> int:
    import torch
    import torch.distributed as dist

    value = torch.tensor([dist.get_rank() + 1])
    dist.all_reduce(value)
    return int(value)


def init_tensor_parallel(tp: int) -> tuple:
    from megatron_moe_lossfree.megatron import cpu_runtime

    cpu_runtime.activate()
    from megatron.core import parallel_state as ps

    was_initialized = ps.model_parallel_is_initialized()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    return was_initialized, ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_world_size()


def fail_on_rank_one(pid_dir: str) -> None:
    import torch.distributed as dist

    with open(os.path.join(pid_dir, f"{dist.get_rank()}.pid"), "w") as fh:
        fh.write(str(os.getpid()))
    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 waits for a peer that is gone: the harness must kill it


def hang(pid_dir: str) -> None:
    import torch.distributed as dist

    with open(os.path.join(pid_dir, f"{dist.get_rank()}.pid"), "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(600)


def _assert_gone(pid_dir: str, world: int) -> None:
    for rank in range(world):
        with open(os.path.join(pid_dir, f"{rank}.pid")) as fh:
            pid = int(fh.read())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# -- tests ---------------------------------------------------------------------------------------------
def test_cases_share_one_world_and_megatron_state_is_reset(tmp_path, record_distributed_time):
    launch = harness.launch_cases([
        Case("sum", all_reduce_rank),
        Case("tp2", init_tensor_parallel, dict(tp=2)),
        Case("tp1", init_tensor_parallel, dict(tp=1)),
    ], 2, timeout_s=180, workdir=str(tmp_path))
    record_distributed_time("launch of 2 rank(s), harness self-test", launch.total_seconds)
    assert launch.results["sum"] == [3, 3]
    assert launch.results["tp2"] == [(False, 0, 1), (False, 1, 1)]
    assert launch.results["tp1"] == [(False, 0, 2), (False, 0, 2)]  # reset after "tp2": a fresh layout
    assert list(launch.case_seconds) == ["sum", "tp2", "tp1"]


def test_failing_rank_traceback_is_reported_and_peers_are_killed(tmp_path):
    with pytest.raises(RankFailure) as info:
        harness.launch_cases([Case("boom", fail_on_rank_one, dict(pid_dir=str(tmp_path)))], 2,
                             timeout_s=120, workdir=str(tmp_path / "launch"))
    text = str(info.value)
    assert text.startswith("rank 1 of 2 failed in case 'boom'")  # the root cause, not rank 0's broken barrier
    assert "ValueError: boom on rank 1" in text and "fail_on_rank_one" in text
    _assert_gone(str(tmp_path), 2)


def test_hung_launch_is_killed_at_the_timeout(tmp_path):
    with pytest.raises(RankFailure) as info:
        harness.launch_cases([Case("hang", hang, dict(pid_dir=str(tmp_path)))], 2, timeout_s=20,
                             workdir=str(tmp_path / "launch"))
    assert str(info.value).startswith("launch of 2 ranks timed out after 20 s and was killed (still running: "
                                      "rank 0: 'hang', rank 1: 'hang')")
    _assert_gone(str(tmp_path), 2)
