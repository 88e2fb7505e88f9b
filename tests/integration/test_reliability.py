"""Crash safety and refused checkpoints: SIGKILL mid-save, truncated checkpoints, missing biases."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.test_pretrain_cli import TINY, run_cli, train_rows

pytestmark = pytest.mark.slow


def cli(*args):
    return [sys.executable, "-m", "megatron_moe_lossfree", "pretrain", *TINY, *args]


def test_sigkill_during_save_resumes_from_last_complete_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen(cli("--train-iters", "40", "--save", str(ckpt), "--save-interval", "2",
                                "--out", str(tmp_path / "a")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=dict(os.environ, TORCHDYNAMO_DISABLE="1"))
    partial = ckpt / "iter_0000004.tmp"
    deadline = time.time() + 240
    while not partial.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    # While iter 4 is being written: the whole job, as a node failure or the OOM killer would (killing only
    # the main process would leave the checkpoint writer's helper process orphaned on this machine).
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert partial.exists(), "the save of step 4 should have been in flight"
    assert not (ckpt / "iter_0000004").exists()
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    proc = run_cli("--train-iters", "4", "--load", str(ckpt), "--save", str(ckpt), "--out", str(tmp_path / "b"))
    assert sorted(train_rows(tmp_path / "b")) == [3, 4]  # resumed after step 2
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert not partial.exists()


def run_fail(*args):
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run(cli(*args), capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_truncated_foreign_and_biasless_checkpoints_are_refused_by_name(tmp_path):
    ckpt = tmp_path / "ckpt"
    run_cli("--train-iters", "2", "--save", str(ckpt), "--out", str(tmp_path / "a"),
            "--lossfree-balancing", "none")
    # A checkpoint saved without bias balancing cannot silently start a bias run from zeros.
    line = run_fail("--train-iters", "3", "--load", str(ckpt), "--out", str(tmp_path / "b"))
    assert line.startswith(f"error: --load checkpoint {ckpt}/iter_0000002 does not match this model (the "
                           f"checkpoint has no expert_bias: it was saved without bias balancing;")
    # A checkpoint of another model shape (hidden 64 saved, 128 asked for) is refused, naming the mismatch.
    line = run_fail("--train-iters", "3", "--load", str(ckpt), "--out", str(tmp_path / "e"),
                    "--lossfree-balancing", "none", "--hidden-size", "128")
    assert line.startswith(f"error: --load checkpoint {ckpt}/iter_0000002 does not match this model (")
    assert "shape" in line and line.endswith(
        ": use the same model shape flags as the run that saved it (the EP and PP sizes may differ: the "
        "checkpoint is resharded)"), line
    # A checkpoint whose metadata is gone (a truncated copy) is reported by name, never loaded.
    os.remove(ckpt / "iter_0000002" / "metadata.json")
    line = run_fail("--train-iters", "3", "--load", str(ckpt), "--out", str(tmp_path / "c"),
                    "--lossfree-balancing", "none")
    assert line == (f"error: --load checkpoint {ckpt}/iter_0000002 is truncated or incomplete (no "
                    f"dist_checkpointing metadata): delete it and point latest_checkpointed_iteration.txt at an "
                    f"earlier complete checkpoint")
    shutil.rmtree(ckpt / "iter_0000002")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("x2")
    line = run_fail("--train-iters", "3", "--load", str(ckpt), "--out", str(tmp_path / "d"))
    assert line.startswith(f"error: --load ({ckpt}) has a corrupt latest_checkpointed_iteration.txt ('x2')")


def test_load_without_checkpoint_starts_from_step_0_and_says_so(tmp_path):
    # Megatron-LM's meaning of --load with nothing there (a first run with --save D --load D): start fresh,
    # in one line on stderr.
    missing, empty = tmp_path / "typo", tmp_path / "empty"
    empty.mkdir()
    for load, why in [(missing, "does not exist"),
                      (empty, "holds no checkpoint (no latest_checkpointed_iteration.txt)")]:
        out = tmp_path / f"run-{load.name}"
        proc = run_cli("--train-iters", "2", "--eval-iters", "0", "--load", str(load), "--out", str(out))
        notices = [line for line in proc.stderr.splitlines() if "--load" in line]
        assert notices == [f"warning: --load ({load}) {why}: training starts from step 0 (add "
                           f"--exit-on-missing-checkpoint to stop instead)"], proc.stderr[-2000:]
        assert sorted(train_rows(out)) == [1, 2]


def test_exit_on_missing_checkpoint_refuses_and_trains_nothing(tmp_path):
    missing, empty = tmp_path / "typo", tmp_path / "empty"
    empty.mkdir()
    for load, why in [(missing, "does not exist"),
                      (empty, "holds no checkpoint (no latest_checkpointed_iteration.txt)")]:
        out = tmp_path / f"run-{load.name}"
        env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
        proc = subprocess.run(cli("--train-iters", "2", "--eval-iters", "0", "--load", str(load),
                                  "--exit-on-missing-checkpoint", "--out", str(out)),
                              capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert errors == [f"error: --exit-on-missing-checkpoint is set and --load ({load}) {why}: fix the --load "
                          f"path, or drop --exit-on-missing-checkpoint to start from step 0"]
        assert proc.stderr.strip().splitlines()[-1] == errors[0]
        assert not out.exists()  # nothing trained, nothing logged
