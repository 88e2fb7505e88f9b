"""``mlf-ablate``: run one of the LFB / DeepSeek ablation suites and tabulate it beside the paper.

Tiny scale, on this CPU (2 cores; lfb-main = 2 arms x 3 seeds, about 10-15 minutes)::

    mlf-ablate --suite lfb-main --scale tiny --out runs/ablate/lfb-main

The paper's scales, on a GPU node (look at the commands first; one process per GPU)::

    mlf-ablate --suite lfb-main --scale paper-1b --out runs/ablate/lfb-main-1b --nproc-per-node 8 --dry-run

Every arm is an ordinary ``python -m megatron_moe_lossfree pretrain`` run (``torch.distributed.run``
when it needs several processes, e.g. the EP = 2 arms of v2-drop) in ``OUT/ARM/seedS``, with
checkpoints in ``OUT/ARM/seedS/ckpt``. Run the same command again after an interruption: arms with a
DONE marker are skipped, an unfinished arm resumes from its last checkpoint. At the end it writes
``OUT/report/`` (mlf-report's plots and summary.md over all runs), ``OUT/SUITE.md`` (the paper-shaped
table, also printed) and ``OUT/results.json`` (every run's numbers).
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
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_moe_lossfree.ablation.suites import SCALES, SUITES, Arm, Scale, Suite, get_scale, get_suite
from megatron_moe_lossfree.errors import LossFreeConfigError

DONE = "DONE"


@dataclass(frozen=True)
class Job:
    """One training run: an arm at one seed."""

    arm: Arm
    seed: int
    run_dir: str
    config_flags: tuple[str, ...]
    """The flags that define the run (recorded in DONE: a finished run with other flags is refused)."""
    nproc: int

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
                            nproc=procs))
    return jobs


def validate_jobs(jobs: Sequence[Job]) -> None:
    """Parse every run's flags as mlf-pretrain would, before anything starts; one error for all."""
    from megatron_moe_lossfree.training.arguments import parse_args

    problems = []
    for job in jobs:
        try:
            parse_args(job.flags)
        except LossFreeConfigError as err:
            problems.append(f"arm {job.arm.name} seed {job.seed}: {err}")
        if job.done:
            with open(os.path.join(job.run_dir, DONE)) as fh:
                recorded = json.load(fh).get("config_flags")
            if recorded != list(job.config_flags):
                problems.append(
                    f"{job.run_dir} ({DONE}) was finished with other flags ({shlex.join(recorded or [])}): "
                    f"use another --out, or delete that run directory to rerun it")
    if problems:
        raise LossFreeConfigError("; ".join(problems))


# ----------------------------------------------------------------------------- running

_STEP = re.compile(r"^step\s+(\d+)/(\d+)")


def run_job(job: Job, bar=None) -> int:
    """Run one job to completion, its output into ``run_dir/train.log``; DONE on success. Returns rc."""
    os.makedirs(job.run_dir, exist_ok=True)
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONUNBUFFERED="1")
    start = time.time()
    with open(os.path.join(job.run_dir, "train.log"), "a", buffering=1) as log:  # line-buffered: tail -f
        log.write(f"$ {shlex.join(job.command)}\n")
        proc = subprocess.Popen(job.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, bufsize=1)
        try:
            for line in proc.stdout:
                log.write(line)
                match = _STEP.match(line)
                if bar is not None and match:
                    bar.total = int(match.group(2))
                    bar.n = int(match.group(1))
                    bar.refresh()
            rc = proc.wait()
        except BaseException:
            proc.terminate()  # the run's own process (torchrun forwards the signal to its workers)
            proc.wait()
            raise
    if rc == 0:
        with open(os.path.join(job.run_dir, DONE), "w") as fh:
            json.dump({"arm": job.arm.name, "seed": job.seed, "config_flags": list(job.config_flags),
                       "command": job.command, "wall_s": round(time.time() - start, 1)}, fh, indent=1)
    return rc


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    overall = tqdm(total=total, initial=initial, desc="arms", unit="run", position=0, disable=not enabled,
                   dynamic_ncols=True, file=sys.stderr)
    arm = tqdm(total=1, desc="arm", unit="step", position=1, leave=False, disable=not enabled,
               dynamic_ncols=True, file=sys.stderr)
    return overall, arm


def run_all(jobs: Sequence[Job], *, progress: bool = True) -> list[Job]:
    """Run the jobs one at a time (skipping finished ones); returns the jobs that failed."""
    from megatron_moe_lossfree.ablation.report import run_metrics
    from megatron_moe_lossfree.report import load_run

    overall, arm_bar = _progress(len(jobs), sum(job.done for job in jobs), progress)
    failed = []
    try:
        for i, job in enumerate(jobs, 1):
            head = f"arm {i}/{len(jobs)} {job.arm.name} seed {job.seed}"
            if job.done:
                _say(f"{head}: finished before ({DONE} in {job.run_dir}), skipped")
                continue
            resume = _latest(job.ckpt)
            _say(f"{head}: {'resuming from step ' + str(resume) if resume else 'starting'} "
                 f"({job.nproc} process{'es' if job.nproc > 1 else ''}) -> {job.run_dir}")
            arm_bar.reset(total=1)
            arm_bar.set_description(f"{job.arm.name} s{job.seed}")
            start = time.time()
            rc = run_job(job, arm_bar)
            wall = time.time() - start
            if rc:
                failed.append(job)
                _say(f"{head}: FAILED (exit {rc}) after {wall:.0f} s; see {job.run_dir}/train.log")
            else:
                m = run_metrics(load_run(job.run_dir))
                _say(f"{head}: done in {wall:.0f} s | val PPL {_num(m['final_ppl'], '.2f')} | "
                     f"MaxVio_global {_num(m['maxvio_global'], '.3f')}")
                overall.update(1)
    finally:
        arm_bar.close()
        overall.close()
    return failed


def _say(text: str) -> None:
    """A per-arm line above the progress bars, flushed (stdout is often a log file)."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


def _latest(ckpt: str) -> Optional[int]:
    from megatron_moe_lossfree.training.checkpoint import latest_iteration

    return latest_iteration(ckpt)


def _num(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


# ----------------------------------------------------------------------------- reporting


def write_outputs(suite: Suite, scale: Scale, jobs: Sequence[Job], out: str, *, steps: int,
                  seeds: Sequence[int], command: str) -> str:
    """OUT/report/ (plots + summary.md over all finished runs), OUT/SUITE.md, OUT/results.json."""
    from megatron_moe_lossfree.ablation.report import format_paper_table, run_metrics
    from megatron_moe_lossfree.report import load_run, write_report

    finished = [job for job in jobs if job.done]
    runs = [load_run(job.run_dir, label=f"{job.arm.name} s{job.seed}") for job in finished]
    results: dict[str, list[dict]] = {}
    per_run = []
    for job, run in zip(finished, runs):
        m = run_metrics(run)
        results.setdefault(job.arm.name, []).append(m)
        per_run.append({"arm": job.arm.name, "seed": job.seed, "run_dir": job.run_dir, **m})
    if runs:
        write_report(runs, os.path.join(out, "report"), smooth=max(1, min(100, steps // 10)))
    table = format_paper_table(suite, scale, results, steps=steps, seeds=seeds, command=command)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{suite.name}.md"), "w") as fh:
        fh.write(table)
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump({"suite": suite.name, "scale": scale.name, "steps": steps, "seeds": list(seeds),
                   "runs": per_run}, fh, indent=1)
    return table


# ----------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    """argparse that raises LossFreeConfigError (one line, no usage dump) instead of exiting."""

    def error(self, message):
        raise LossFreeConfigError(f"{message}: see mlf-ablate --help")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = _Parser(prog="mlf-ablate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--suite", required=True, metavar="{" + ",".join(SUITES) + "}")
    p.add_argument("--scale", default="tiny", metavar="{" + ",".join(SCALES) + "}")
    p.add_argument("--out", default=None, help="output directory (default: runs/ablate/SUITE)")
    p.add_argument("--steps", type=int, default=None, help="override the scale's training steps")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm, 1..S (default: tiny 3, paper 1)")
    p.add_argument("--arms", default=None, help="comma-separated subset of the suite's arms")
    p.add_argument("--extra-args", default="", help="flags appended to every run (they win), e.g. "
                   "--extra-args='--num-layers 2'")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes per run (arms that need more, "
                   "e.g. EP = 2, get at least their own count)")
    p.add_argument("--dry-run", action="store_true", help="print the runs' commands; run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the per-arm lines stay)")
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
    if problems:
        raise LossFreeConfigError("; ".join(problems))


def main(argv: Sequence[str]) -> dict:
    args = parse_args(argv)
    _check(args)
    scale = get_scale(args.scale)
    suite = get_suite(args.suite, scale)
    out = args.out or os.path.join("runs", "ablate", suite.name)
    seeds = list(range(1, (args.seeds or scale.seeds) + 1))
    steps = args.steps or scale.train_iters
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    jobs = plan(suite, scale, out, seeds=seeds, steps=args.steps, extra=shlex.split(args.extra_args),
                nproc=args.nproc_per_node, arms=arms)
    validate_jobs(jobs)
    command = "mlf-ablate " + shlex.join([a for a in argv if a not in ("--dry-run", "--no-progress", "--debug")])
    print(f"{suite.name} ({suite.title}) at scale {scale.name}: {len(jobs) // len(seeds)} arm(s) x "
          f"{len(seeds)} seed(s) = {len(jobs)} run(s), {steps} steps each, in {out}", flush=True)
    if args.dry_run:
        for i, job in enumerate(jobs, 1):
            state = " [done]" if job.done else ""
            print(f"arm {i}/{len(jobs)} {job.arm.name} seed {job.seed}{state}: {shlex.join(job.command)}")
        return {"jobs": jobs, "failed": [], "table": None}
    start = time.time()
    failed = run_all(jobs, progress=not args.no_progress)
    table = write_outputs(suite, scale, jobs, out, steps=steps, seeds=seeds, command=command)
    print(table, end="")
    print(f"wrote {os.path.join(out, suite.name + '.md')}, {os.path.join(out, 'report')}/ and "
          f"{os.path.join(out, 'results.json')} ({time.time() - start:.0f} s)")
    if failed:
        raise LossFreeConfigError(
            f"{len(failed)} run(s) failed ({', '.join(f'{j.arm.name} seed {j.seed}' for j in failed)}): see "
            f"their train.log; fix the cause and rerun the same command (finished runs are skipped)")
    return {"jobs": jobs, "failed": failed, "table": table}
