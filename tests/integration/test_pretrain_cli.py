"""End-to-end ``mlf-pretrain`` runs in one process: a short run, and save -> resume continuity."""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--num-experts", "8",
        "--moe-router-topk", "2", "--moe-first-dense-layers", "1", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--lr", "1e-3", "--lr-warmup-iters", "1", "--eval-iters", "1", "--eval-interval", "3",
        "--log-interval", "1", "--no-progress", "--lossfree-update-rate", "1e-2"]


def run_cli(*args, timeout=300):
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run([sys.executable, "-m", "megatron_moe_lossfree", "pretrain", *TINY, *args],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_rows(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return {row["step"]: row for row in map(json.loads, fh) if row["kind"] == "train"}


def test_two_step_run_prints_table_and_validation(tmp_path):
    proc = run_cli("--train-iters", "2", "--out", str(tmp_path / "run"))
    assert "step      2/2 | loss " in proc.stdout
    assert "validation at step 2: loss " in proc.stdout and "final validation perplexity" in proc.stdout
    rows = train_rows(tmp_path / "run")
    assert sorted(rows) == [1, 2]
    assert all(0 < rows[s]["loss"] < 20 for s in rows)
    assert len(rows[2]["maxvio_batch_layers"]) == 1  # 2 layers, the first dense
    assert os.listdir(tmp_path / "run" / "tensorboard")


def test_resume_continues_exactly(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run_cli("--train-iters", "6", "--save", str(full / "ckpt"), "--save-interval", "3", "--out", str(full))
    # A second job that stops at step 3: take the full run's step-3 checkpoint as its latest.
    os.makedirs(part / "ckpt")
    shutil.copytree(full / "ckpt" / "iter_0000003", part / "ckpt" / "iter_0000003")
    (part / "ckpt" / "latest_checkpointed_iteration.txt").write_text("3")
    run_cli("--train-iters", "6", "--load", str(part / "ckpt"), "--out", str(part))
    a, b = train_rows(full), train_rows(part)
    assert sorted(b) == [4, 5, 6]
    # Same process layout, same operations: the resumed steps are bit-for-bit the uninterrupted ones.
    for step in (4, 5, 6):
        for key in ("loss", "maxvio_batch", "loads_layers", "bias_layers", "lr"):
            assert b[step][key] == a[step][key], f"step {step} {key}"
