"""Megatron-LM's UNCHANGED pretrain_gpt.py on a CPU, with the plugin coming in only through ``--spec``.

Exact command (one process, gloo):
    MEGATRON_LM=/path/to/Megatron-LM STOCK=1 bash examples/megatron_lm/run_cpu.sh
Hardware: a CPU. Prints: Megatron-LM's log, then the "lossfree:" summary lines of pretrain_lossfree_gpt.py.

Stock pretrain_gpt.py has no ``extra_args_provider`` for the ``--lossfree-*`` flags, so the plugin runs
with its defaults (LossFreeConfig()); ``--spec megatron_moe_lossfree.megatron.megatron_lm
lossfree_gpt_layer_spec`` both builds the spec and registers the balancer's post-wrap hook. This file only
applies the CPU shims of pretrain_lossfree_gpt.py, then runs pretrain_gpt.py as ``__main__``; on GPUs run
pretrain_gpt.py directly with the same ``--spec``.
"""

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pretrain_lossfree_gpt as launcher  # noqa: E402  (same folder)


def main() -> None:
    launcher.prepare_process()
    sys.argv[0] = os.path.join(os.environ["MEGATRON_LM"], "pretrain_gpt.py")
    recorded = launcher.record_model_configs()
    runpy.run_path(sys.argv[0], run_name="__main__")
    for model_config in recorded:
        launcher.print_balancer_summary(model_config)


if __name__ == "__main__":
    main()
