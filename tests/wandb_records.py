"""Reading a W&B run file (``run-<id>.wandb``) back, for tests of what was logged offline.

The file is W&B's record log: a 7-byte header, then 32 KiB blocks of chunks (crc32, length,
type: full/first/middle/last), each record a ``wandb_internal_pb2.Record`` protobuf.
"""

import json
import struct
from pathlib import Path
from typing import Any, Dict, List

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
FULL, LAST = 1, 4


def records(path: Path) -> List[Any]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B record log"
    pos, out, chunk = 7, [], b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def history(recs: List[Any]) -> List[Dict[str, Any]]:
    """Every logged step as ``{key: value}``."""
    rows = []
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


def run_record(recs: List[Any]) -> Any:
    return next(r.run for r in recs if r.WhichOneof("record_type") == "run")
