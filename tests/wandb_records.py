"""Read what an offline W&B run logged, from its `run-*.wandb` file.

The file is a LevelDB-style log (7-byte W&B header, 32 KiB blocks, records split into
FULL/FIRST/MIDDLE/LAST chunks) of protobuf `Record`s; wandb ships the protobuf classes
but no longer a Python reader.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(data: bytes):
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload


def logged(run_dir: Path) -> dict:
    """History, summary, config, group, name, job type and artifacts (name, type, "output" or
    "input") of the run folder's only W&B run."""
    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    out = {"history": [], "summary": {}, "config": {}, "group": None, "name": None, "job_type": None, "artifacts": []}
    for chunk in _chunks(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out["summary"].update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "artifact":
            a = record.artifact
            out["artifacts"].append((a.name, a.type, "input" if a.use_after_commit else "output"))
        if kind == "run":
            out["group"] = record.run.run_group
            out["name"], out["job_type"] = record.run.display_name, record.run.job_type
        if kind in ("config", "run"):
            config = record.config if kind == "config" else record.run.config
            out["config"].update({_key(i): json.loads(i.value_json) for i in config.update})
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)
