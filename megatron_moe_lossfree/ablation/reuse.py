"""Runs shared between suites (issue 18, item 6): lfb-main's loss-free arm IS lfb-rate's u = 1e-3 arm.

Two runs are the same run when their flags parse to the same ``mlf-pretrain`` arguments (``config_key``:
every argument except where the run writes), so arms that spell a default explicitly
(``--lossfree-bias-kind additive``) or set the scale's own micro-batch size still match. The runs a
suite may reuse are the finished runs (a ``DONE`` marker) of every suite under the same parent
directory: ``PARENT/SUITE/ARM/seedS/DONE`` (``finished_runs``).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Optional, Sequence

from megatron_moe_lossfree.errors import LossFreeConfigError

DONE = "DONE"
PLACE_ARGS = frozenset({"out", "save", "load", "no_progress", "debug", "tensorboard_dir",
                        "exit_on_missing_checkpoint"})
"""Arguments that say where a run writes or how it talks, not what it trains."""


def config_key(flags: Sequence[str]) -> str:
    """A canonical text of what the flags train: the parsed arguments (presets applied, derived values
    filled, the plugin's LossFreeConfig expanded) without ``PLACE_ARGS``. Raises LossFreeConfigError as
    mlf-pretrain would on bad flags."""
    from megatron_moe_lossfree.training.arguments import parse_args

    args = parse_args(list(flags))
    values = {k: v for k, v in vars(args).items() if k not in PLACE_ARGS and k != "lossfree"}
    values["lossfree"] = dataclasses.asdict(args.lossfree)
    return json.dumps(values, sort_keys=True, default=repr)


def read_done(run_dir: str) -> Optional[dict]:
    """The DONE marker of a run directory (None when there is none or it is not a JSON object)."""
    try:
        with open(os.path.join(run_dir, DONE)) as fh:
            marker = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


def finished_runs(parent: str) -> dict[str, str]:
    """{config_key: run_dir} of the finished runs ``PARENT/SUITE/ARM/seedS`` (first in sorted order wins).

    A marker whose flags no longer parse (a flag since renamed) is skipped: that run cannot be reused.
    """
    found: dict[str, str] = {}
    for done in sorted(glob.glob(os.path.join(glob.escape(parent), "*", "*", "seed*", DONE))):
        run_dir = os.path.dirname(done)
        marker = read_done(run_dir)
        if not marker or not isinstance(marker.get("config_flags"), list):
            continue
        try:
            key = config_key(marker["config_flags"])
        except LossFreeConfigError:
            continue
        found.setdefault(key, run_dir)
    return found


def run_label(run_dir: str) -> str:
    """``SUITE/ARM seed S`` of ``.../SUITE/ARM/seedS``."""
    head, seed = os.path.split(os.path.normpath(run_dir))
    head, arm = os.path.split(head)
    return f"{os.path.basename(head)}/{arm} {seed.replace('seed', 'seed ')}"
