"""A small gloo multi-rank harness for the distributed tests (CPU, no GPU needed).

``launch_cases(cases, world_size, timeout_s=...)`` starts ``world_size`` Python processes (one per rank)
on a free local port, joins them into ONE gloo ``torch.distributed`` world, and runs every case in
order on every rank: ``fn(**kwargs)`` for each ``Case(name, fn, kwargs)``. Megatron's model-parallel
state is destroyed after each case, so the next case may pick another layout; process start-up and the
megatron import (the expensive part) are paid once per launch.

- A case function must be importable by module name (a module-level function) and its result picklable.
- A failing rank ends the launch: the other ranks are killed and ``RankFailure`` carries the failing
  rank's traceback and the tail of its log.
- A launch that outlives ``timeout_s`` is killed (every rank's process group) and fails with a message
  naming the case each rank was in; no hung CI.

``run_torchrun(argv, nproc, timeout_s=...)`` runs ``python -m torch.distributed.run`` on a free port with
the same timeout rule (used for the ``mlf-pretrain`` end-to-end check).

The worker side of the harness is this same file run as a script (``python harness.py PAYLOAD RANK``).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
_POLL_S = 0.2
_GRACE_S = 1.0  # after a first failure, how long to wait for the others before naming the first


class RankFailure(AssertionError):
    """A rank raised, crashed, or the launch timed out."""


@dataclass(frozen=True)
class Case:
    """One unit of work run on every rank of a launch: ``fn(**kwargs)``."""

    name: str
    fn: Callable[..., Any]
    kwargs: dict = field(default_factory=dict)


@dataclass
class LaunchResult:
    """Per-case, per-rank return values and wall times (seconds, measured on rank 0 between barriers)."""

    world_size: int
    results: dict[str, list[Any]]
    case_seconds: dict[str, float]
    startup_seconds: float
    total_seconds: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, chars: int = 4000) -> str:
    try:
        with open(path, errors="replace") as fh:
            return fh.read()[-chars:]
    except OSError:
        return ""


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill one rank and anything it started (its own session), by process-group id."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _child_env(world_size: int, rank: int, port: int) -> dict:
    threads = max(1, (os.cpu_count() or 1) // world_size)
    return dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
                HARNESS_LAUNCH_TIME=repr(time.time()))


def launch_cases(cases: Sequence[Case], world_size: int, *, timeout_s: float = 300.0,
                 workdir: Optional[str] = None, warm_up: Optional[Callable[[], None]] = None) -> LaunchResult:
    """Run ``cases`` in order on ``world_size`` gloo ranks; returns every rank's result of every case.

    ``warm_up()`` (optional, importable) runs once per rank before the first case and counts as start-up.
    """
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"case names must be unique, got {names}")
    workdir = workdir or tempfile.mkdtemp(prefix=f"harness-{world_size}r-")
    os.makedirs(workdir, exist_ok=True)
    payload = os.path.join(workdir, "payload.pkl")
    with open(payload, "wb") as fh:
        pickle.dump({"cases": list(cases), "timeout_s": timeout_s, "warm_up": warm_up}, fh)
    with open(os.path.join(workdir, "sys_path.json"), "w") as fh:
        json.dump(list(sys.path), fh)
    port = free_port()
    start = time.time()
    procs, logs = [], []
    for rank in range(world_size):
        log = os.path.join(workdir, f"rank{rank}.log")
        with open(log, "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, os.path.join(_HERE, "harness.py"), payload, str(rank)],
                stdout=out, stderr=subprocess.STDOUT, env=_child_env(world_size, rank, port),
                cwd=os.getcwd(), start_new_session=True))
        logs.append(log)
    try:
        _wait(procs, logs, workdir, start + timeout_s, timeout_s)
    finally:
        for proc in procs:
            _kill_group(proc)
    total = time.time() - start
    per_rank = []
    for rank in range(world_size):
        path = os.path.join(workdir, f"rank{rank}.result.pkl")
        if not os.path.exists(path):
            raise RankFailure(f"rank {rank} of {world_size} exited 0 without results (a case called exit?)\n"
                              f"--- log tail ---\n{_tail(logs[rank])}")
        with open(path, "rb") as fh:
            per_rank.append(pickle.load(fh))
    timing = per_rank[0]["seconds"]
    return LaunchResult(world_size=world_size,
                        results={n: [r["results"][n] for r in per_rank] for n in names},
                        case_seconds=dict(timing), startup_seconds=per_rank[0]["startup_seconds"],
                        total_seconds=total)


def _current_case(workdir: str, rank: int) -> str:
    try:
        with open(os.path.join(workdir, f"rank{rank}.status")) as fh:
            return fh.read().strip() or "start-up"
    except OSError:
        return "start-up"


def _first_failure(procs, workdir: str) -> Optional[int]:
    """The rank that failed first (by when it wrote its traceback), or None while none failed.

    A rank that raises makes its peers' pending collectives fail too (gloo sees the closed connection):
    after a short grace period the earliest traceback, the root cause, is the one reported.
    """
    failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
    if not failed:
        return None
    time.sleep(_GRACE_S)
    failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]

    def written_at(rank: int) -> float:
        path = os.path.join(workdir, f"rank{rank}.error")
        return os.stat(path).st_mtime if os.path.exists(path) else float("inf")

    return min(failed, key=lambda r: (written_at(r), r))


def _wait(procs, logs, workdir: str, deadline: float, timeout_s: float) -> None:
    while True:
        rank = _first_failure(procs, workdir)
        if rank is not None:
            error_file = os.path.join(workdir, f"rank{rank}.error")
            detail = _tail(error_file, 8000) if os.path.exists(error_file) else (
                f"(no Python traceback: exit code {procs[rank].poll()})\n--- log tail ---\n{_tail(logs[rank])}")
            others = [r for r, p in enumerate(procs) if r != rank and p.poll() not in (None, 0)]
            also = f" (then ranks {others} failed too)" if others else ""
            raise RankFailure(f"rank {rank} of {len(procs)} failed in case "
                              f"{_current_case(workdir, rank)!r}{also}:\n{detail}")
        codes = [p.poll() for p in procs]
        if all(code == 0 for code in codes):
            return
        if time.time() > deadline:
            where = ", ".join(f"rank {r}: {_current_case(workdir, r)!r}" for r, c in enumerate(codes) if c is None)
            tails = "\n".join(f"--- rank {r} log tail ---\n{_tail(logs[r], 1500)}"
                              for r, c in enumerate(codes) if c is None)
            raise RankFailure(f"launch of {len(procs)} ranks timed out after {timeout_s:.0f} s and was killed "
                              f"(still running: {where})\n{tails}")
        time.sleep(_POLL_S)


@dataclass
class TorchrunResult:
    """What ``run_torchrun`` saw: the command, its exit status, its output and its wall time."""

    cmd: list
    returncode: int
    stdout: str
    stderr: str
    wall_seconds: float


def run_torchrun(argv: Sequence[str], nproc: int, *, timeout_s: float = 300.0,
                 module: str = "megatron_moe_lossfree") -> TorchrunResult:
    """``python -m torch.distributed.run --nproc-per-node N -m MODULE ARGV`` on a free local port.

    Output is captured as text. On timeout, torchrun and its workers (one process group) are killed
    and ``RankFailure`` carries the output so far.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", module, *argv]
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
    start = time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True, text=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out.seek(0), err.seek(0)
            raise RankFailure(f"torchrun ({' '.join(cmd)}) timed out after {timeout_s:.0f} s and was killed\n"
                              f"--- stdout ---\n{out.read()[-3000:]}\n--- stderr ---\n{err.read()[-3000:]}")
        finally:
            _kill_group(proc)
        out.seek(0), err.seek(0)
        return TorchrunResult(cmd, proc.returncode, out.read(), err.read(), time.time() - start)


# ----------------------------------------------------------------------------------------------------
# Worker side: one rank.


def _reset_megatron_state() -> None:
    """Forget the previous case's layout; the torch.distributed world stays."""
    if "megatron.core" in sys.modules:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()


def _write_error(workdir: str, rank: int) -> None:
    with open(os.path.join(workdir, f"rank{rank}.error"), "w") as fh:
        fh.write(traceback.format_exc())


def _run_cases(payload: dict, workdir: str, rank: int) -> None:
    import datetime

    import torch.distributed as dist

    def set_status(text: str) -> None:
        with open(os.path.join(workdir, f"rank{rank}.status"), "w") as fh:
            fh.write(text)

    t0 = float(os.environ.get("HARNESS_LAUNCH_TIME", time.time()))  # the parent's Popen time
    results, seconds = {}, {}
    try:
        if payload["warm_up"] is not None:
            payload["warm_up"]()
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=payload["timeout_s"]))
        dist.barrier()
        startup = time.time() - t0
        for case in payload["cases"]:
            set_status(case.name)
            print(f"[harness] rank {rank}: case {case.name}", flush=True)
            dist.barrier()
            start = time.time()
            results[case.name] = case.fn(**case.kwargs)
            dist.barrier()
            seconds[case.name] = time.time() - start
            _reset_megatron_state()
        set_status("shutdown")
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        _write_error(workdir, rank)
        print(traceback.format_exc(), flush=True)
        os._exit(1)  # do not wait for peers stuck in a collective
    with open(os.path.join(workdir, f"rank{rank}.result.pkl"), "wb") as fh:
        pickle.dump({"results": results, "seconds": seconds, "startup_seconds": startup}, fh)


def _main(argv: list[str]) -> None:
    payload_path, rank = argv[0], int(argv[1])
    workdir = os.path.dirname(payload_path)
    try:
        # Unpickling the cases imports their modules: put the parent's import path first.
        with open(os.path.join(workdir, "sys_path.json")) as fh:
            sys.path[:0] = [p for p in json.load(fh) if p not in sys.path]
        with open(payload_path, "rb") as fh:
            payload = pickle.load(fh)
    except BaseException:
        _write_error(workdir, rank)
        print(traceback.format_exc(), flush=True)
        os._exit(1)
    _run_cases(payload, workdir, rank)


if __name__ == "__main__":
    _main(sys.argv[1:])
