"""``make gpu-check`` on CPU: the exact plan (``--dry-run``), that the orchestrator never touches CUDA, that it
keeps going past a failed or timed-out stage, and what it does on a machine without a GPU."""

import importlib.util
import os
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")

spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up by name
spec.loader.exec_module(gpu_check)

PRETRAIN = ["py", "-m", "megatron_moe_lossfree", "pretrain", "--preset", "tiny-cpu", "--hidden-size", "512",
            "--num-attention-heads", "8", "--ffn-hidden-size", "2048", "--moe-ffn-hidden-size", "512",
            "--seq-length", "512", "--micro-batch-size", "8", "--global-batch-size", "8", "--train-iters", "50",
            "--lr-warmup-iters", "5", "--log-interval", "10", "--eval-interval", "50", "--eval-iters", "2", "--bf16",
            "--no-progress"]
TE_MISSING = "needs Transformer Engine: pip install 'megatron_moe_lossfree[te]'"


def expected_plan(have_te: bool):
    return [
        ("card", ["py", "benchmarks/gpu_check.py", "--card"], 40, None),
        ("gpu-tests", ["py", "-m", "pytest", "-q", "-rs", "-m", "gpu or fp8", "tests/gpu",
                       "--ignore=tests/gpu/test_cuda_graph_router.py"], 70, None),
        ("router-graph", ["py", "-m", "pytest", "-q", "-rs", "-s", "-m", "gpu", "tests/gpu/test_cuda_graph_router.py"],
         25, None),
        ("train-bf16", PRETRAIN + ["--transformer-impl", "transformer_engine" if have_te else "local",
                                   "--out", "runs/gpu_check/train-bf16"], 75, None),
        ("train-bf16-native", PRETRAIN + ["--transformer-impl", "transformer_engine" if have_te else "local",
                                          "--megatron-router", "--moe-router-enable-expert-bias",
                                          "--lossfree-balancing", "none", "--out", "runs/gpu_check/train-bf16-native"],
         75, None),
        ("train-fp8", PRETRAIN + ["--transformer-impl", "transformer_engine", "--fp8-format", "hybrid",
                                  "--fp8-recipe", "tensorwise", "--out", "runs/gpu_check/train-fp8"], 75,
         None if have_te else TE_MISSING),
        ("router", ["py", "benchmarks/bench_router.py"], 70, None),
        ("router-fused", ["py", "benchmarks/bench_router.py", "--megatron-fusion"], 45,
         None if have_te else TE_MISSING),
    ]


@pytest.mark.parametrize("have_te", [True, False])
def test_plan_is_exact(have_te):
    stages = gpu_check.plan("py", have_te=have_te)
    assert [(s.name, list(s.command), s.timeout_s, s.skip) for s in stages] == expected_plan(have_te)
    # Every stage's own timeout fits the 8-minute budget together, with the summary's reserve.
    assert sum(s.timeout_s for s in stages) <= gpu_check.TOTAL_BUDGET_S - gpu_check.RESERVE_S
    assert gpu_check.TOTAL_BUDGET_S == 8 * 60


def test_dry_run_prints_the_plan_and_never_imports_torch():
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(SCRIPT)!r}); import gpu_check; "
            f"status = gpu_check.main(['--dry-run']); print('torch imported:', 'torch' in sys.modules); "
            f"sys.exit(status)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    have_te = importlib.util.find_spec("transformer_engine") is not None
    lines = proc.stdout.splitlines()
    assert lines[0] == (f"gpu-check plan: 8 stages, total budget 480 s (stage timeouts sum to 475 s); "
                        f"run from {ROOT}")
    import shlex

    for line, (name, command, timeout, skip) in zip(lines[1:9], expected_plan(have_te)):
        command = shlex.join([sys.executable if c == "py" else c for c in command])
        assert line == f"{name} (timeout {timeout} s): {command}" + (f"  [skipped here: {skip}]" if skip else "")
    assert lines[9:] == ["torch imported: False"]


def test_training_stages_are_valid_mlf_pretrain_commands(monkeypatch):
    """The flags exist and pass validation (the TE/FP8 guard needs a GPU, so it is stubbed here)."""
    from megatron_moe_lossfree.megatron import te
    from megatron_moe_lossfree.training.arguments import parse_args

    monkeypatch.setattr(te, "check_te_request", lambda *a, **k: None)
    stages = {s.name: s for s in gpu_check.plan("py", have_te=True)}
    bf16 = parse_args(list(stages["train-bf16"].command[4:]))
    fp8 = parse_args(list(stages["train-fp8"].command[4:]))
    assert (bf16.train_iters, bf16.bf16, bf16.transformer_impl, bf16.fp8_format) == (50, True, "transformer_engine",
                                                                                      None)
    assert (fp8.train_iters, fp8.fp8_format, fp8.fp8_recipe) == (50, "hybrid", "tensorwise")
    native = parse_args(list(stages["train-bf16-native"].command[4:]))
    assert (native.train_iters, native.bf16, native.megatron_router, native.moe_router_enable_expert_bias,
            native.lossfree_balancing) == (50, True, True, True, "none")
    assert bf16.lossfree.balancing == "bias" and fp8.lossfree.balancing == "bias"  # the plugin is on


def test_keeps_going_past_a_failed_and_a_timed_out_stage(capsys, monkeypatch):
    py = sys.executable
    stages = [
        gpu_check.Stage("card", (py, "-c", "print('card: Fake GPU'); print('memory: 1.0 GiB')"), 20),
        gpu_check.Stage("crash", (py, "-c", "import sys; print('half'); sys.exit(4)"), 20),
        gpu_check.Stage("hang", (py, "-c", "import time; print('started', flush=True); time.sleep(60)"), 2),
        gpu_check.Stage("router", (py, "-c", "print('router paired ratio: median over shapes 0.9, max 1.0')"), 20),
    ]
    start = time.time()
    assert gpu_check.run_all(stages) == 1
    assert time.time() - start < 30
    out = capsys.readouterr().out
    assert "[Fake GPU] crash: half" in out and "[Fake GPU] hang: started" in out
    assert "[Fake GPU] card: memory: 1.0 GiB" in out
    table = out[out.index("### gpu-check on Fake GPU"):].splitlines()
    rows = [line.split(" | ")[:2] for line in table if line.startswith("| ") and "stage" not in line]
    assert rows == [["| card", "passed"], ["| crash", "failed (exit 4)"], ["| hang", "timed out (2 s)"],
                    ["| router", "passed"]]
    assert re.search(r"\| router \| passed \| \d+ \| router paired ratio: median over shapes 0.9, max 1.0 \|", out)
    assert re.search(r"\| card \| passed \| \d+ \| memory 1.0 GiB \|", out)


def test_a_stage_skipped_for_a_missing_extra_is_named_and_does_not_fail_the_check(capsys):
    py = sys.executable
    stages = [
        gpu_check.Stage("card", (py, "-c", "print('card: Fake GPU')"), 20),
        gpu_check.Stage("train-fp8", (py, "-c", "raise SystemExit(7)"), 20, skip="needs Transformer Engine"),
        gpu_check.Stage("router", (py, "-c", "print('ok')"), 20),
    ]
    assert gpu_check.run_all(stages) == 0
    out = capsys.readouterr().out
    assert "| train-fp8 | skipped: needs Transformer Engine | 0 |  |" in out
    assert out.splitlines()[-1] == "not verified on this machine (optional extra missing): train-fp8"
    # The same plan with the router failing: exit 1.
    stages[2] = gpu_check.Stage("router", (py, "-c", "raise SystemExit(3)"), 20)
    assert gpu_check.run_all(stages) == 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the path of a machine without CUDA")
def test_without_a_gpu_the_card_stage_says_so_and_the_rest_is_skipped(capsys):
    assert gpu_check.main([]) == 1
    out = capsys.readouterr().out
    assert "[unknown GPU] card: no CUDA device on this machine: gpu-check needs one NVIDIA GPU" in out
    assert "| card | failed: no CUDA device |" in out
    assert "| gpu-tests | skipped: no CUDA device (see the card stage) | 0 |  |" in out
    assert "| router | skipped: no CUDA device (see the card stage) | 0 |  |" in out
