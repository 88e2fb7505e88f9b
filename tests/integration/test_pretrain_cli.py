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


def run_cli(*args, timeout=300, **env_vars):
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", **env_vars)
    proc = subprocess.run([sys.executable, "-m", "megatron_moe_lossfree", "pretrain", *TINY, *args],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_rows(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return {row["step"]: row for row in map(json.loads, fh) if row["kind"] == "train"}


def test_two_step_run_prints_table_and_validation(tmp_path):
    proc = run_cli("--train-iters", "2", "--out", str(tmp_path / "run"), "--lossfree-dump-loads")
    assert "step      2/2 | loss " in proc.stdout
    assert "validation at step 2: loss " in proc.stdout and "final validation perplexity" in proc.stdout
    rows = train_rows(tmp_path / "run")
    assert sorted(rows) == [1, 2]
    assert all(0 < rows[s]["loss"] < 20 for s in rows)
    assert len(rows[2]["maxvio_batch_layers"]) == 1  # 2 layers, the first dense
    assert os.listdir(tmp_path / "run" / "tensorboard")
    # --lossfree-dump-loads: every step's loads, 4 x 32 tokens x top-2 on the one MoE layer, as logged.
    with open(tmp_path / "run" / "loads.jsonl") as fh:
        loads = [json.loads(line) for line in fh]
    assert [(row["step"], row["layers"]) for row in loads] == [(1, [2]), (2, [2])]
    assert all(len(row["loads"][0]) == 8 and sum(row["loads"][0]) == 4 * 32 * 2 for row in loads)
    assert [row["loads"] for row in loads] == [rows[1]["loads_layers"], rows[2]["loads_layers"]]
    # The final evaluation's routing (the ablations' best bias found): one eval batch of 4 x 32 tokens.
    assert_valid_routing_dump(tmp_path / "run", step=2, tokens=4 * 32, layers=[2], num_experts=8, topk=2)


def test_offline_wandb_run_holds_the_metrics_jsonl_values(tmp_path):
    """--wandb-project with WANDB_MODE=offline: the run directory's history is the TensorBoard scalars of every
    metrics.jsonl row, at the same steps (train and validation rows of one step are one W&B row)."""
    from megatron_moe_lossfree.training.logger import tensorboard_scalars
    from tests.wandb_offline import offline_history

    out = tmp_path / "run"
    run_cli("--train-iters", "2", "--eval-interval", "2", "--out", str(out), "--wandb-project", "mlf-test",
            "--wandb-exp-name", "tiny", "--wandb-save-dir", str(tmp_path / "wb"), WANDB_MODE="offline",
            WANDB_SILENT="true")
    expected: dict = {}
    with open(out / "metrics.jsonl") as fh:
        for row in map(json.loads, fh):
            scalars = {k: v for k, v in row.items() if k not in ("kind", "step")}
            expected.setdefault(row["step"], {}).update(tensorboard_scalars(row["kind"], scalars))
    history = offline_history(str(tmp_path / "wb"))
    assert sorted(history) == sorted(expected) == [1, 2]
    assert "train/maxvio_batch" in history[2] and "valid/maxvio_global" in history[2]
    assert history == expected  # JSON round trip: the same float64 values


def valid_rows(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return {row["step"]: row for row in map(json.loads, fh) if row["kind"] == "valid"}


def assert_valid_routing_dump(out_dir, *, step, tokens, layers, num_experts, topk):
    """``OUT/valid_routing.pt`` holds every token of the final evaluation once: routing its scores with its
    bias gives its counts, and those counts give the logged MaxVio_global, layer by layer."""
    import torch

    from megatron_moe_lossfree.ablation.floors import best_bias_found, load_valid_routing, routed_counts_E
    from megatron_moe_lossfree.metrics import max_violation

    dump = load_valid_routing(str(out_dir))
    assert (dump.step, dump.topk, dump.bias_kind, list(dump.layers)) == (step, topk, "additive", layers)
    logged = valid_rows(out_dir)[step]["maxvio_global_layers"]
    for scores_TE, bias_E, counts_E in zip(dump.scores_LTE, dump.bias_LE, dump.counts_LE):
        assert scores_TE.shape == (tokens, num_experts) and scores_TE.dtype == torch.float32
        assert bias_E.shape == (num_experts,)
        assert int(counts_E.sum()) == tokens * topk
        assert torch.equal(routed_counts_E(scores_TE, bias_E, topk), counts_E)
    found = best_bias_found(dump)
    assert found.learned == pytest.approx(sum(logged) / len(logged), rel=1e-12)
    # The best bias found is reachable: its bias routes the dumped scores to the MaxVio reported per layer.
    for scores_TE, bias_E, vio in zip(dump.scores_LTE, found.bias_LE, found.layers):
        assert max_violation(routed_counts_E(scores_TE, bias_E, topk)) == vio


# The second case carries state across the checkpoint besides the bias (issue 28): SMEBU's momentum (a router
# buffer) and the primal_dual schedule's step count (the balancer's state); were either lost, the bias of
# steps 4-6 would differ from the uninterrupted run's.
RESUME_RULES = {"sign": [], "smebu-primal-dual": ["--lossfree-update-rule", "smebu", "--lossfree-rate-schedule",
                                                  "primal_dual", "--lossfree-rate-decay-steps", "2"]}


@pytest.mark.parametrize("rule", list(RESUME_RULES))
def test_resume_continues_exactly(tmp_path, rule):
    full, part = tmp_path / "full", tmp_path / "part"
    flags = RESUME_RULES[rule]
    run_cli(*flags, "--train-iters", "6", "--save", str(full / "ckpt"), "--save-interval", "3", "--out", str(full))
    # A second job that stops at step 3: take the full run's step-3 checkpoint as its latest.
    os.makedirs(part / "ckpt")
    shutil.copytree(full / "ckpt" / "iter_0000003", part / "ckpt" / "iter_0000003")
    (part / "ckpt" / "latest_checkpointed_iteration.txt").write_text("3")
    run_cli(*flags, "--train-iters", "6", "--load", str(part / "ckpt"), "--out", str(part))
    a, b = train_rows(full), train_rows(part)
    assert sorted(b) == [4, 5, 6]
    # Same process layout, same operations: the resumed steps are bit-for-bit the uninterrupted ones.
    for step in (4, 5, 6):
        for key in ("loss", "maxvio_batch", "loads_layers", "bias_layers", "lr"):
            assert b[step][key] == a[step][key], f"step {step} {key}"
    # The evaluation at step 6 (the second: every 3 steps) scores the same validation samples as the
    # uninterrupted run's, as Megatron-LM's restored consumed_valid_samples gives: loss and loads equal.
    valid_a, valid_b = valid_rows(full), valid_rows(part)
    assert sorted(valid_a) == [3, 6] and sorted(valid_b) == [6]
    assert valid_b[6]["loss"] == valid_a[6]["loss"] and valid_b[6]["maxvio_global"] == valid_a[6]["maxvio_global"]


def test_checkpoint_without_rule_state_is_refused_by_a_stateful_rule(tmp_path):
    """A sign-rule checkpoint has no lossfree_rule_state: a SMEBU job loading it stops with one line naming
    the missing key, instead of starting SMEBU's momentum from zero unnoticed."""
    run_cli("--train-iters", "2", "--save", str(tmp_path / "ckpt"), "--save-interval", "2", "--eval-iters", "0",
            "--out", str(tmp_path / "a"))
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run([sys.executable, "-m", "megatron_moe_lossfree", "pretrain", *TINY, "--train-iters", "3",
                           "--lossfree-update-rule", "smebu", "--load", str(tmp_path / "ckpt"), "--eval-iters", "0",
                           "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "does not match this model" in last and "lossfree_rule_state is not in the checkpoint" in last, last
