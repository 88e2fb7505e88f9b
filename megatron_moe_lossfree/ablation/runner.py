"""``mlf-ablate``: run the LFB / DeepSeek ablation suites and tabulate them beside the papers.

Every suite at the small scale, unattended and resumable (2 CPU cores; many hours, see
docs/ablations/README.md)::

    mlf-ablate --suite all --scale small

One suite at the tiny scale (the CI smoke shape; lfb-main = 2 arms x 3 seeds, 10-15 minutes)::

    mlf-ablate --suite lfb-main --scale tiny

The paper's scales, on a GPU node (look at the commands first; one process per GPU)::

    mlf-ablate --suite lfb-main --scale paper-1b --nproc-per-node 8 --dry-run

Every arm is an ordinary ``python -m megatron_moe_lossfree pretrain`` run (``torch.distributed.run``
when it needs several processes, e.g. the EP = 2 arms of v2-drop) in ``OUT/ARM/seedS``, with
checkpoints in ``OUT/ARM/seedS/ckpt``; OUT defaults to ``runs/ablate/SCALE/SUITE`` (``--suite all``:
``runs/ablate/SCALE/`` holding one directory per suite). Run the same command again after an
interruption: runs with a DONE marker are skipped, an unfinished run resumes from its last checkpoint.
A run whose flags parse to the same mlf-pretrain arguments as a finished run of another suite in the
same parent directory (lfb-main's loss-free arm is lfb-rate's u = 1e-3 arm) is not rerun: its run
directory is reused, and the runner says so. At the end of each suite it writes ``OUT/report/``
(mlf-report's plots and summary.md), ``OUT/SUITE.md`` (the paper-shaped table, also printed) and
``OUT/results.json``; ``--suite all`` also draws ``scatter.png`` (validation PPL vs MaxVio_global of
every run, with the floors) in its root.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

from megatron_moe_lossfree.ablation.reuse import DONE, config_key, finished_runs, read_done, run_label
from megatron_moe_lossfree.ablation.suites import (ALL, SCALES, SUITES, Arm, Scale, Suite, get_scale,
                                                   get_suites)
from megatron_moe_lossfree.errors import LossFreeConfigError


@dataclass(frozen=True)
class Job:
    """One training run: an arm of a suite at one seed."""

    arm: Arm
    seed: int
    run_dir: str
    """Where the run lives: OUT/ARM/seedS, or the run directory of the run it shares (``shared``)."""
    config_flags: tuple[str, ...]
    """The flags that define the run (recorded in DONE: a finished run with other flags is refused)."""
    nproc: int
    suite: str = ""
    steps: int = 0
    """Training steps of the run (the progress bar's share of this job)."""
    key: str = ""
    """``reuse.config_key`` of the flags: equal keys are the same run."""
    shared: bool = False
    """True when run_dir is another suite's run of the same configuration (reused, not rerun)."""
    threads: Optional[int] = None
    """OMP_NUM_THREADS of the run's processes (``Scale.threads``); None: the environment's."""

    @property
    def ckpt(self) -> str:
        return os.path.join(self.run_dir, "ckpt")

    @property
    def flags(self) -> list[str]:
        """All mlf-pretrain flags: the configuration, then where the run writes and resumes from."""
        return [*self.config_flags, "--out", self.run_dir, "--save", self.ckpt, "--load", self.ckpt,
                "--no-progress"]

    @property
    def command(self) -> list[str]:
        if self.nproc == 1:
            launcher = [sys.executable, "-m", "megatron_moe_lossfree", "pretrain"]
        else:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", str(self.nproc), "-m", "megatron_moe_lossfree", "pretrain"]
        return launcher + self.flags

    @property
    def done(self) -> bool:
        return os.path.isfile(os.path.join(self.run_dir, DONE))

    @property
    def label(self) -> str:
        return f"{self.suite}/{self.arm.name} seed {self.seed}" if self.suite else f"{self.arm.name} seed {self.seed}"


def config_flags(scale: Scale, arm: Arm, seed: int, *, steps: Optional[int], extra: Sequence[str]) -> list[str]:
    """Preset, scale overrides, step override, then the arm's flags, the seed and ``--extra-args`` last."""
    flags = ["--preset", scale.preset, *scale.flags]
    if steps is not None:
        flags += ["--train-iters", str(steps)]
        if scale.lr_warmup_iters >= steps:  # the warmup must end before the last step (mlf-pretrain's rule)
            flags += ["--lr-warmup-iters", str(steps // 10)]
    flags += ["--save-interval", str(scale.save_interval), *arm.flags, "--seed", str(seed), *extra]
    return flags


def plan(suite: Suite, scale: Scale, out: str, *, seeds: Sequence[int], steps: Optional[int] = None,
         extra: Sequence[str] = (), nproc: int = 1, arms: Optional[Sequence[str]] = None) -> list[Job]:
    """The runs of a suite, arm by arm, seed by seed; raises on an arm whose process count does not fit."""
    chosen = [suite.arm(name) for name in arms] if arms else list(suite.arms)
    jobs = []
    for arm in chosen:
        procs = max(nproc, arm.ranks)
        if procs % arm.ranks:
            raise LossFreeConfigError(
                f"--nproc-per-node ({nproc}) must be a multiple of arm {arm.name}'s {arm.ranks} ranks "
                f"(its expert-parallel size): use {arm.ranks * max(1, nproc // arm.ranks)}")
        for seed in seeds:
            jobs.append(Job(arm=arm, seed=seed, run_dir=os.path.join(out, arm.name, f"seed{seed}"),
                            config_flags=tuple(config_flags(scale, arm, seed, steps=steps, extra=extra)),
                            nproc=procs, suite=suite.name, steps=steps or scale.train_iters,
                            threads=scale.threads))
    return jobs


def validate_jobs(jobs: Sequence[Job]) -> list[Job]:
    """Parse every run's flags as mlf-pretrain would, before anything starts; one error for all.

    Returns the jobs with their ``key`` filled. A run directory finished with flags that parse
    differently is refused (it would be silently reused otherwise).
    """
    problems, keyed = [], []
    for job in jobs:
        try:
            key = config_key(job.flags)
        except LossFreeConfigError as err:
            problems.append(f"arm {job.arm.name} seed {job.seed}: {err}")
            continue
        if job.done:
            recorded = (read_done(job.run_dir) or {}).get("config_flags") or []
            if recorded != list(job.config_flags) and _key_or_none(recorded) != key:
                problems.append(
                    f"{job.run_dir} ({DONE}) was finished with other flags ({shlex.join(recorded)}): "
                    f"use another --out, or delete that run directory to rerun it")
        keyed.append(replace(job, key=key))
    if problems:
        raise LossFreeConfigError("; ".join(problems))
    return keyed


def _key_or_none(flags: Sequence[str]) -> Optional[str]:
    try:
        return config_key(list(flags))
    except LossFreeConfigError:
        return None


def share_runs(jobs: Sequence[Job], finished: dict[str, str]) -> list[Job]:
    """Point every job whose configuration already has a run at that run (``shared``).

    The owner of a configuration is, in order: a job whose own directory is finished; a finished run of
    another suite (``finished``: ``reuse.finished_runs``); the first job of the list with that
    configuration (later ones reuse it once it has run). Jobs need their ``key`` (``validate_jobs``).
    """
    owners = {job.key: job.run_dir for job in jobs if job.done}
    for key, run_dir in finished.items():
        owners.setdefault(key, run_dir)
    out = []
    for job in jobs:
        owner = owners.setdefault(job.key, job.run_dir)
        out.append(job if owner == job.run_dir else replace(job, run_dir=owner, shared=True))
    return out


# ----------------------------------------------------------------------------- running

_STEP = re.compile(r"^step\s+(\d+)/(\d+)")


def run_job(job: Job, on_step: Optional[Callable[[int, int], None]] = None) -> int:
    """Run one job to completion, its output into ``run_dir/train.log``; DONE on success. Returns rc.

    ``on_step(step, total)`` is called for every table line the run prints (each ``--log-interval``).
    """
    os.makedirs(job.run_dir, exist_ok=True)
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONUNBUFFERED="1")
    if job.threads is not None:
        env["OMP_NUM_THREADS"] = str(job.threads)
    start, load_start = time.time(), os.getloadavg()[0]
    with open(os.path.join(job.run_dir, "train.log"), "a", buffering=1) as log:  # line-buffered: tail -f
        log.write(f"$ {shlex.join(job.command)}\n")
        proc = subprocess.Popen(job.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, bufsize=1)
        try:
            for line in proc.stdout:
                log.write(line)
                match = _STEP.match(line)
                if on_step is not None and match:
                    on_step(int(match.group(1)), int(match.group(2)))
            rc = proc.wait()
        except BaseException:
            proc.terminate()  # the run's own process (torchrun forwards the signal to its workers)
            proc.wait()
            raise
    if rc == 0:
        with open(os.path.join(job.run_dir, DONE), "w") as fh:
            json.dump({"arm": job.arm.name, "suite": job.suite, "seed": job.seed,
                       "config_flags": list(job.config_flags), "command": job.command,
                       "wall_s": round(time.time() - start, 1),
                       "load_avg_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)]}, fh, indent=1)
    return rc


class Progress:
    """ONE bar for the whole job, in training steps of the runs still to run, with tqdm's ETA."""

    def __init__(self, jobs: Sequence[Job], enabled: bool):
        from tqdm import tqdm

        pending = {job.run_dir: job for job in jobs if not job.done}  # a shared run counts once
        self.resumed = {run_dir: _latest(job.ckpt) or 0 for run_dir, job in pending.items()}
        total = sum(job.steps for job in pending.values())
        self.bar = tqdm(total=total, initial=sum(self.resumed.values()), desc="ablation", unit="step",
                        disable=not enabled or not total, dynamic_ncols=True, file=sys.stderr)
        self.at = 0

    def start(self, job: Job, position: str) -> None:
        self.at = self.resumed.get(job.run_dir, 0)
        self.bar.set_description(f"{position} {job.suite + '/' if job.suite else ''}{job.arm.name} s{job.seed}")

    def step(self, step: int, total: int) -> None:
        if step > self.at:
            self.bar.update(step - self.at)
            self.at = step

    def close(self) -> None:
        self.bar.close()


def run_all(jobs: Sequence[Job], *, progress: bool = True, bar: Optional[Progress] = None) -> list[Job]:
    """Run the jobs one at a time (finished and shared runs are not rerun); returns the jobs that failed.

    ``bar``: a Progress shared by several calls (``--suite all``); by default one for these jobs.
    """
    from megatron_moe_lossfree.ablation.report import run_metrics
    from megatron_moe_lossfree.report import load_run

    own_bar = bar is None
    bar = bar or Progress(jobs, progress)
    failed, failed_dirs = [], set()
    try:
        for i, job in enumerate(jobs, 1):
            head = f"arm {i}/{len(jobs)} {job.arm.name} seed {job.seed}"
            if job.done:
                if job.shared:
                    _say(f"{head}: same configuration as {run_label(job.run_dir)}, reusing {job.run_dir}")
                else:
                    _say(f"{head}: finished before ({DONE} in {job.run_dir}), skipped")
                continue
            if job.run_dir in failed_dirs:
                failed.append(job)
                _say(f"{head}: same configuration as {run_label(job.run_dir)}, which failed above; not rerun")
                continue
            resume = _latest(job.ckpt)
            _say(f"{head}: {'resuming from step ' + str(resume) if resume else 'starting'} "
                 f"({job.nproc} process{'es' if job.nproc > 1 else ''}) -> {job.run_dir}")
            bar.start(job, f"[{i}/{len(jobs)}]")
            start = time.time()
            rc = run_job(job, bar.step)
            wall = time.time() - start
            if rc:
                failed.append(job)
                failed_dirs.add(job.run_dir)
                _say(f"{head}: FAILED (exit {rc}) after {wall:.0f} s; see {job.run_dir}/train.log")
            else:
                m = run_metrics(load_run(job.run_dir))
                _say(f"{head}: done in {wall:.0f} s | val PPL {_num(m['final_ppl'], '.2f')} | "
                     f"MaxVio_global {_num(m['maxvio_global'], '.3f')}")
    finally:
        if own_bar:
            bar.close()
    return failed


def _say(text: str) -> None:
    """A per-arm line above the progress bar, flushed (stdout is often a log file)."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


def _latest(ckpt: str) -> Optional[int]:
    from megatron_moe_lossfree.training.checkpoint import latest_iteration

    return latest_iteration(ckpt)


def _num(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


# ----------------------------------------------------------------------------- reporting


def job_results(jobs: Sequence[Job]) -> list[dict]:
    """Per finished job: arm, seed, run_dir, wall time, then its metrics and floors (``ablation.report``)."""
    from megatron_moe_lossfree.ablation.floors import run_floors
    from megatron_moe_lossfree.ablation.report import run_metrics
    from megatron_moe_lossfree.report import load_run
    from megatron_moe_lossfree.training.arguments import parse_args

    rows = []
    for job in jobs:
        if not job.done:
            continue
        marker = read_done(job.run_dir) or {}
        rows.append({"arm": job.arm.name, "seed": job.seed, "run_dir": job.run_dir, "shared": job.shared,
                     "wall_s": marker.get("wall_s"), "load_avg_1min": marker.get("load_avg_1min"),
                     **run_metrics(load_run(job.run_dir)), **run_floors(parse_args(job.flags), job.run_dir)})
    return rows


def write_outputs(suite: Suite, scale: Scale, jobs: Sequence[Job], out: str, *, steps: int,
                  seeds: Sequence[int], command: str) -> str:
    """OUT/report/ (plots + summary.md over all finished runs), OUT/SUITE.md, OUT/results.json."""
    from megatron_moe_lossfree.ablation.report import format_paper_table, format_wall
    from megatron_moe_lossfree.report import load_run, write_report

    rows = job_results(jobs)
    results: dict[str, list[dict]] = {}
    for row in rows:
        results.setdefault(row["arm"], []).append(row)
    if rows:
        runs = [load_run(row["run_dir"], label=f"{row['arm']} s{row['seed']}") for row in rows]
        write_report(runs, os.path.join(out, "report"), smooth=max(1, min(100, steps // 10)))
    table = format_paper_table(suite, scale, results, steps=steps, seeds=seeds, command=command,
                               wall=format_wall(rows))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{suite.name}.md"), "w") as fh:
        fh.write(table)
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump({"suite": suite.name, "scale": scale.name, "steps": steps, "seeds": list(seeds),
                   "command": command, "runs": rows}, fh, indent=1)
    return table


# ----------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    """argparse that raises LossFreeConfigError (one line, no usage dump) instead of exiting."""

    def error(self, message):
        raise LossFreeConfigError(f"{message}: see mlf-ablate --help")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = _Parser(prog="mlf-ablate", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--suite", required=True, metavar="{" + ",".join([*SUITES, ALL]) + "}")
    p.add_argument("--scale", default="tiny", metavar="{" + ",".join(SCALES) + "}")
    p.add_argument("--out", default=None, help="output directory (default: runs/ablate/SCALE/SUITE; "
                   "--suite all: runs/ablate/SCALE, one directory per suite)")
    p.add_argument("--steps", type=int, default=None, help="override the scale's training steps")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm, 1..S (default: tiny/small 3, paper 1)")
    p.add_argument("--arms", default=None, help="comma-separated subset of the suite's arms (one suite only)")
    p.add_argument("--extra-args", default="", help="flags appended to every run (they win), e.g. "
                   "--extra-args='--num-layers 2'")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes per run (arms that need more, "
                   "e.g. EP = 2, get at least their own count)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run process (default: "
                   "the scale's; small: 1, as two threads spin at OpenMP barriers on a shared 2-core machine)")
    p.add_argument("--dry-run", action="store_true", help="print the runs' commands; run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the per-arm lines stay)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p.parse_args(list(argv))


def _check(args: argparse.Namespace) -> None:
    problems = []
    if args.steps is not None and args.steps < 1:
        problems.append(f"--steps ({args.steps}) must be >= 1")
    if args.seeds is not None and args.seeds < 1:
        problems.append(f"--seeds ({args.seeds}) must be >= 1")
    if args.nproc_per_node < 1:
        problems.append(f"--nproc-per-node ({args.nproc_per_node}) must be >= 1")
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads ({args.threads}) must be >= 1")
    if args.arms and args.suite == ALL:
        problems.append(f"--arms ({args.arms}) needs one --suite, not {ALL}: pick the suite the arms belong to")
    if problems:
        raise LossFreeConfigError("; ".join(problems))


@dataclass
class _SuitePlan:
    suite: Suite
    out: str
    jobs: list
    problem: Optional[str] = None


def _plan_suites(args: argparse.Namespace, scale: Scale, seeds: list[int]) -> tuple[str, list[_SuitePlan]]:
    """(root, one plan per suite): validated, sharing runs between suites and with earlier invocations.

    One suite: its own problems raise. ``--suite all``: a suite whose flags do not parse (e.g. qb before
    mlf-pretrain has the quantile flags) is skipped with the reason, the others run.
    """
    suites = get_suites(args.suite, scale)
    single = args.suite != ALL
    base = args.out or os.path.join("runs", "ablate", scale.name, *([suites[0].name] if single else []))
    root = os.path.dirname(os.path.abspath(base)) if single else base
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    plans = []
    for suite in suites:
        out = base if single else os.path.join(root, suite.name)
        jobs = plan(suite, scale, out, seeds=seeds, steps=args.steps, extra=shlex.split(args.extra_args),
                    nproc=args.nproc_per_node, arms=arms)
        try:
            plans.append(_SuitePlan(suite, out, validate_jobs(jobs)))
        except LossFreeConfigError as err:
            if single:
                raise
            plans.append(_SuitePlan(suite, out, [], problem=str(err)))
    shared = share_runs([job for p in plans for job in p.jobs], finished_runs(root))
    at = 0
    for p in plans:
        p.jobs, at = shared[at: at + len(p.jobs)], at + len(p.jobs)
    return root, plans


def main(argv: Sequence[str]) -> dict:
    args = parse_args(argv)
    _check(args)
    scale = get_scale(args.scale)
    if args.threads is not None:
        scale = replace(scale, threads=args.threads)
    seeds = list(range(1, (args.seeds or scale.seeds) + 1))
    steps = args.steps or scale.train_iters
    root, plans = _plan_suites(args, scale, seeds)
    command = "mlf-ablate " + shlex.join([a for a in argv if a not in ("--dry-run", "--no-progress", "--debug")])
    jobs = [job for p in plans for job in p.jobs]
    for p in plans:
        if p.problem:
            print(f"{p.suite.name}: skipped, its runs do not parse: {p.problem}", flush=True)
            continue
        shared = sum(job.shared for job in p.jobs)
        print(f"{p.suite.name} ({p.suite.title}) at scale {scale.name}: {len(p.jobs) // len(seeds)} arm(s) x "
              f"{len(seeds)} seed(s) = {len(p.jobs)} run(s), {steps} steps each, in {p.out}"
              + (f" ({shared} shared with other suites' runs)" if shared else ""), flush=True)
        if args.dry_run:
            for i, job in enumerate(p.jobs, 1):
                state = " [done]" if job.done else ""
                reuse = f" [reuses {run_label(job.run_dir)}]" if job.shared else ""
                print(f"arm {i}/{len(p.jobs)} {job.arm.name} seed {job.seed}{state}{reuse}: "
                      f"{shlex.join(job.command)}")
    distinct = {job.run_dir: job for job in jobs}
    print(f"{len(jobs)} run(s) in {sum(not p.problem for p in plans)} suite(s): {len(distinct)} distinct "
          f"configuration(s), {sum(job.done for job in distinct.values())} finished, "
          f"{sum(job.steps for job in distinct.values() if not job.done)} training steps to go", flush=True)
    if args.dry_run:
        return {"jobs": jobs, "failed": [], "table": None, "plans": plans}
    start = time.time()
    failed, tables = [], {}
    bar = Progress(jobs, not args.no_progress)
    try:
        for p in plans:
            if p.problem:
                continue
            failed += run_all(p.jobs, bar=bar)
            tables[p.suite.name] = write_outputs(p.suite, scale, p.jobs, p.out, steps=steps, seeds=seeds,
                                                 command=command)
            _say(tables[p.suite.name].rstrip("\n"))  # above the bar, which stays open for the next suite
            _say(f"wrote {os.path.join(p.out, p.suite.name + '.md')}, {os.path.join(p.out, 'report')}/ and "
                 f"{os.path.join(p.out, 'results.json')} ({time.time() - start:.0f} s so far)")
    finally:
        bar.close()
    if args.suite == ALL:
        from megatron_moe_lossfree.ablation.scatter import write_scatter

        for path in write_scatter([root], root):
            print(f"wrote {path}")
    problems = [f"{p.suite.name} skipped ({p.problem})" for p in plans if p.problem]
    if failed:
        problems.insert(0, f"{len(failed)} run(s) failed ({', '.join(job.label for job in failed)}): see their "
                           f"train.log")
    if problems:
        raise LossFreeConfigError("; ".join(problems) + ": fix the cause and rerun the same command (finished "
                                  "runs are reused)")
    return {"jobs": jobs, "failed": failed, "table": tables.get(plans[0].suite.name) if plans else None,
            "tables": tables, "plans": plans}
