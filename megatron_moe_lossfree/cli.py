"""Console entry points. Bad input prints one line (flag, value, fix) and exits 2; ``--debug`` re-raises."""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence


def _run(fn: Callable[[Sequence[str]], object], argv: Optional[Sequence[str]]) -> int:
    from megatron_moe_lossfree.errors import LossFreeConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_optional_dependency_warnings()
    try:
        fn(argv)
    except LossFreeConfigError as err:
        if "--debug" in argv:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _quiet_optional_dependency_warnings() -> None:
    """Megatron warns at import that Transformer Engine/Apex are absent; on CPU that is expected."""
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # Megatron's advisory UserWarnings (deprecated cuda-graph scope, pad == eod for byte-level BPE) are
    # about options this entry point does not use.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core\..*")


def pretrain_main(argv: Optional[Sequence[str]] = None) -> int:
    """``mlf-pretrain``."""

    def run(argv):
        from megatron_moe_lossfree.training.arguments import parse_args
        from megatron_moe_lossfree.training.pretrain import pretrain

        args = parse_args(argv)
        pretrain(args)
        _shutdown()

    return _run(run, argv)


def prepare_data_main(argv: Optional[Sequence[str]] = None) -> int:
    """``mlf-prepare-data``."""

    def run(argv):
        from megatron_moe_lossfree.training.prepare_data import main

        main(argv)

    return _run(run, argv)


def report_main(argv: Optional[Sequence[str]] = None) -> int:
    """``mlf-report``: plots and a summary table from runs' metrics.jsonl."""

    def run(argv):
        from megatron_moe_lossfree.report import main

        main(argv)

    return _run(run, argv)


def ablate_main(argv: Optional[Sequence[str]] = None) -> int:
    """``mlf-ablate``: an LFB / DeepSeek ablation suite, run arm by arm, tabulated beside the paper."""

    def run(argv):
        from megatron_moe_lossfree.ablation.runner import main

        main(argv)

    return _run(run, argv)


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


COMMANDS = {"pretrain": pretrain_main, "prepare-data": prepare_data_main, "report": report_main,
            "ablate": ablate_main}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m megatron_moe_lossfree COMMAND ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m megatron_moe_lossfree {{{','.join(COMMANDS)}}} [args]", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])
