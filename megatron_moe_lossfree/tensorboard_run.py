"""A Megatron-LM run's TensorBoard directory as ``mlf-report`` rows (the keys of ``metrics.jsonl``).

Megatron-LM with the plugin (docs/megatron_lm.md) writes its own scalars and the plugin's
(``megatron/lm_logging.py``) to ``--tensorboard-dir``; this reads them back with tensorboard's event reader:

| Megatron-LM tag | row key |
|---|---|
| ``lm loss``, ``learning-rate`` | train ``loss``, ``lr`` |
| ``lossfree/MaxVio_batch`` (``_layer_<i>``) | train ``maxvio_batch`` (``maxvio_batch_layers``) |
| ``lossfree/MaxVio_computation-batch`` | train ``maxvio_compute`` |
| ``lossfree/drop_fraction`` | train ``drop_fraction`` |
| ``lossfree_experts/tokens_per_expert_layer_<i>/expert_<e>`` | train ``loads_layers`` (``--moe-per-layer-logging``) |
| ``lossfree_experts/expert_bias_layer_<i>/expert_<e>`` | train ``bias_layers`` (``--moe-per-layer-logging``) |
| ``lm loss validation`` | valid ``loss``; ``ppl`` = exp(min(20, loss)), Megatron-LM's own PPL |
| ``lossfree/MaxVio_global`` (``_layer_<i>``) | valid ``maxvio_global`` (``maxvio_global_layers``) |

Per-layer lists are in layer order (MTP layers after the decoder's). A step logged twice keeps, for training
tags, the last value (a resumed job logs its steps again) and, for evaluation tags, the first: Megatron-LM logs
its after-training validation and test evaluations under the same names at the same iteration as the last
evaluation in the loop.
"""

from __future__ import annotations

import math
import os
import re
from typing import Optional

EVENTS_PREFIX = "events.out.tfevents"

TRAIN_TAGS = {"lm loss": "loss", "learning-rate": "lr", "lossfree/MaxVio_batch": "maxvio_batch",
              "lossfree/MaxVio_computation-batch": "maxvio_compute", "lossfree/drop_fraction": "drop_fraction"}
VALID_TAGS = {"lm loss validation": "loss", "lossfree/MaxVio_global": "maxvio_global"}
LAYER_LISTS = {"lossfree/MaxVio_batch": ("train", "maxvio_batch_layers"),
               "lossfree/MaxVio_global": ("valid", "maxvio_global_layers")}
EXPERT_TABLES = {"lossfree_experts/tokens_per_expert": "loads_layers", "lossfree_experts/expert_bias": "bias_layers"}
_LAYER = re.compile(r"^(?P<base>.+?)_(?P<mtp>mtp_)?layer_(?P<index>\d+)$")
_EXPERT = re.compile(r"^(?P<base>.+?)_(?P<mtp>mtp_)?layer_(?P<index>\d+)/expert_(?P<expert>\d+)$")


def has_events(path: str) -> bool:
    return os.path.isdir(path) and any(name.startswith(EVENTS_PREFIX) for name in os.listdir(path))


def read_scalars(path: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...] in the order written} of every event file in ``path``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(path, size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _layer_key(match) -> tuple[int, int]:
    return (1 if match.group("mtp") else 0, int(match.group("index")))


def rows_from_scalars(scalars: dict[str, list[tuple[int, float]]]) -> tuple[list[dict], list[dict]]:
    """(train rows, valid rows), each sorted by step, with the keys of ``metrics.jsonl`` (pure)."""
    rows: dict[str, dict[int, dict]] = {"train": {}, "valid": {}}

    def put(kind: str, key: str, points, *, first: bool, layer=None, expert=None):
        for step, value in points:
            row = rows[kind].setdefault(step, {"kind": kind, "step": step})
            if layer is None:
                if not (first and key in row):
                    row[key] = value
                continue
            table = row.setdefault(key, {})
            slot = table.setdefault(layer, {}) if expert is not None else table
            index = expert if expert is not None else layer
            if not (first and index in slot):
                slot[index] = value

    for tag, points in scalars.items():
        if tag in TRAIN_TAGS:
            put("train", TRAIN_TAGS[tag], points, first=False)
        elif tag in VALID_TAGS:
            put("valid", VALID_TAGS[tag], points, first=True)
        elif (m := _LAYER.match(tag)) and m.group("base") in LAYER_LISTS:
            kind, key = LAYER_LISTS[m.group("base")]
            put(kind, key, points, first=kind == "valid", layer=_layer_key(m))
        elif (m := _EXPERT.match(tag)) and m.group("base") in EXPERT_TABLES:
            put("train", EXPERT_TABLES[m.group("base")], points, first=False, layer=_layer_key(m),
                expert=int(m.group("expert")))
    out = {}
    for kind, by_step in rows.items():
        out[kind] = [_finish(by_step[step]) for step in sorted(by_step)]
    for row in out["valid"]:
        if isinstance(row.get("loss"), float):
            row["ppl"] = math.exp(min(20.0, row["loss"]))
    return out["train"], out["valid"]


def _finish(row: dict) -> dict:
    """Layer tables (dicts keyed by layer, then expert) become lists in layer order."""
    for key, value in list(row.items()):
        if isinstance(value, dict):
            layers = [value[layer] for layer in sorted(value)]
            row[key] = [[v[e] for e in sorted(v)] if isinstance(v, dict) else v for v in layers]
    if "loads_layers" in row:
        row["loads_layers"] = [[int(round(x)) for x in layer] for layer in row["loads_layers"]]
    return row


def load_tensorboard_rows(path: str) -> Optional[tuple[list[dict], list[dict]]]:
    """(train, valid) rows of the TensorBoard events in ``path``; None when it holds none."""
    if not has_events(path):
        return None
    return rows_from_scalars(read_scalars(path))
