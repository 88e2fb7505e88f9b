"""Megatron-LM's UNCHANGED pretrain_gpt.py on a CPU, with the plugin coming in only through ``--spec``.

Exact command (one process, gloo):
    MEGATRON_LM=/path/to/Megatron-LM STOCK=1 bash examples/megatron_lm/run_cpu.sh
Hardware: a CPU. Prints: Megatron-LM's log, then the "lossfree:" summary lines of pretrain_lossfree_gpt.py
and, on every rank, one "router:" line per router it holds (its expert_bias), with or without the plugin.

Stock pretrain_gpt.py has no ``extra_args_provider`` for the ``--lossfree-*`` flags, so Megatron's own
flags alone decide what the plugin does (no bias unless ``--moe-router-enable-expert-bias``);
``--spec megatron_moe_lossfree.megatron.megatron_lm lossfree_gpt_layer_spec`` both builds the spec and
registers the balancer's post-wrap hook. Without that ``--spec`` (``NATIVE=1`` in run_cpu.sh) this runs
Megatron's own router: the reference the plugin's run is compared with. This file only
applies the CPU shims of pretrain_lossfree_gpt.py, then runs pretrain_gpt.py as ``__main__``; on GPUs run
pretrain_gpt.py directly with the same ``--spec``.
"""

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pretrain_lossfree_gpt as launcher  # noqa: E402  (same folder)


def _spawned_children_start_here() -> None:
    """Megatron-LM's checkpoint writer starts a ``spawn`` process (``filesystem_async``:
    ``mp.get_context('spawn').Manager()``), which re-imports the parent's ``__main__`` file. Under
    ``runpy`` that file is pretrain_gpt.py, whose imports reach triton before any shim: the save fails
    (``ModuleNotFoundError: No module named 'triton'`` in the child, ``EOFError`` in the parent). Name this
    file instead: as ``__mp_main__`` it runs nothing."""
    import multiprocessing.spawn as spawn

    original = spawn.get_preparation_data

    def preparation_data(name):
        data = original(name)
        if "init_main_from_path" in data:
            data["init_main_from_path"] = os.path.abspath(__file__)
        return data

    spawn.get_preparation_data = preparation_data


def main() -> None:
    launcher.prepare_process()
    _spawned_children_start_here()
    sys.argv[0] = os.path.join(os.environ["MEGATRON_LM"], "pretrain_gpt.py")
    recorded = launcher.record_model_configs()
    runpy.run_path(sys.argv[0], run_name="__main__")
    for model_config in recorded:
        launcher.print_balancer_summary(model_config)
        launcher.print_router_biases(model_config)


if __name__ == "__main__":
    main()
