"""Read the history of an offline W&B run (``WANDB_MODE=offline``) from its ``run-<id>.wandb`` file.

No server is reachable from the tests, and wandb's public API reads runs from one. The file is wandb's
transaction log: a 7-byte header (``:W&B``, a magic number, a version), then records in the LevelDB log
format (32 KiB blocks; each chunk a 4-byte checksum, 2-byte little-endian length and a type: 1 full, 2 first,
3 middle, 4 last), each record one ``wandb_internal_pb2.Record``; history records hold the logged rows.
"""

import glob
import json
import os

BLOCK = 32 * 1024
HEADER = 7


def _records(path):
    with open(path, "rb") as fh:
        data = fh.read()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4: pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def offline_history(save_dir: str) -> dict[int, dict]:
    """{step: {key: value}} of the one offline run under ``save_dir`` (W&B's own ``_``-keys left out)."""
    from wandb.proto import wandb_internal_pb2

    runs = glob.glob(os.path.join(save_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(runs) == 1, f"expected one offline run under {save_dir}, found {runs}"
    rows: dict[int, dict] = {}
    for raw in _records(runs[0]):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        rows.setdefault(int(row["_step"]), {}).update({k: v for k, v in row.items() if not k.startswith("_")})
    return rows
