"""Megatron-LM's unchanged ``pretrain_gpt.py`` with the plugin's ``--spec``, 5 iterations on CPU
(``examples/megatron_lm/run_cpu.sh``): its TensorBoard events hold the plugin's scalars, read back with
tensorboard's event reader.

Megatron-LM is not on the package index: set ``MEGATRON_LM`` to a checkout (docs/megatron_lm.md names the
verified commit) and have pybind11 importable (it compiles its dataset helpers); skipped otherwise.
About 1 to 3 minutes on 2 cores.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MEGATRON_LM = os.environ.get("MEGATRON_LM", "")


@pytest.mark.skipif(not os.path.isfile(os.path.join(MEGATRON_LM, "pretrain_gpt.py")),
                    reason="MEGATRON_LM does not point to a Megatron-LM checkout (not on the package index)")
@pytest.mark.skipif(importlib.util.find_spec("pybind11") is None,
                    reason="Megatron-LM compiles its dataset helpers with pybind11: pip install pybind11")
def test_stock_pretrain_gpt_writes_the_plugins_scalars_to_tensorboard(tmp_path):
    from tests.unit.test_lm_logging import read_scalars

    from megatron_moe_lossfree import metrics

    env = dict(os.environ, STOCK="1", V3="1", MASTER_PORT=str(29500 + os.getpid() % 1000),
               TORCHRUN=f"{sys.executable} -m torch.distributed.run",
               PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "examples", "megatron_lm", "run_cpu.sh"), "--tensorboard-dir",
         str(tmp_path / "tb"), "--moe-per-layer-logging", "--log-interval", "5", "--eval-interval", "5",
         "--eval-iters", "1"], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scalars = read_scalars(tmp_path / "tb")
    assert [step for step, _ in scalars["lm loss"]] == [1, 2, 3, 4, 5]  # Megatron's own, every iteration
    # The plugin's: at --log-interval 5 only, per layer (2 MoE layers), and MaxVio_global at each of the
    # three evaluations of iteration 5 (in the loop, then validation and test after training), as Megatron
    # logs "lm loss validation".
    assert [step for step, _ in scalars["lossfree/MaxVio_batch"]] == [5]
    assert [step for step, _ in scalars["lossfree/MaxVio_global"]] == [5, 5, 5]
    assert [step for step, _ in scalars["lm loss validation"]] == [5, 5, 5]
    for name in ("MaxVio_computation-batch", "expert_bias_mean", "expert_bias_std", "expert_bias_absmax",
                 "expert_bias_motion"):
        assert [step for step, _ in scalars[f"lossfree/{name}_layer_1"]] == [5], name
    # Iteration 5's loads, as the launcher prints them, give the logged per-expert loads and MaxVio_batch.
    for layer in (1, 2):
        printed = re.search(rf"lossfree: layer {layer}: .* last step tokens per expert \[([0-9, ]+)\]", proc.stdout)
        loads = [int(x) for x in printed.group(1).split(",")]
        assert sum(loads) == 4 * 64 * 2  # 4 sequences x 64 tokens x top-2
        logged = [scalars[f"lossfree_experts/tokens_per_expert_layer_{layer - 1}/expert_{e}"] for e in range(8)]
        assert logged == [[(5, float(n))] for n in loads]
        import torch

        assert scalars[f"lossfree/MaxVio_batch_layer_{layer - 1}"] == [
            (5, pytest.approx(metrics.max_violation(torch.tensor(loads)), abs=1e-6))]
    # The sign rule at u = 1e-2 moves each expert by u or 0 per step: |b| <= 5u after 5 steps.
    assert 0 < scalars["lossfree/expert_bias_absmax"][0][1] <= 0.05 + 1e-6
