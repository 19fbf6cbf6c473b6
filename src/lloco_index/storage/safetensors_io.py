"""Read single tensors out of a safetensors blob with ranged reads (no full download, no mmap).

The safetensors layout is: 8 bytes little-endian header length ``N``, ``N``
bytes of JSON (``{name: {dtype, shape, data_offsets: [start, end]}, ...}``,
offsets relative to the end of the header), then the data. On object
storage a soft prompt is thus two small ranged GETs the first time a shard
is touched (header) and one per tensor after that.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclass
class ShardHeader:
    data_start: int  # absolute offset of the data section
    tensors: dict[str, dict]  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict[str, str]


def read_header(backend, name: str) -> ShardHeader:
    """Parse a shard's header with two ranged reads; ValueError when it is not a whole safetensors file."""
    head = backend.read_range(name, 0, 8)
    if len(head) != 8:
        raise ValueError("file shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER:
        raise ValueError(f"header length {n} is implausible")
    raw = backend.read_range(name, 8, 8 + n)
    if len(raw) != n:
        raise ValueError("header truncated")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"header is not JSON ({exc})") from exc
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    total = backend.size(name)
    if data_start + end > total:
        raise ValueError(f"data truncated ({total} bytes, header promises {data_start + end})")
    return ShardHeader(data_start, header, metadata)


def read_tensor(backend, name: str, header: ShardHeader, key: str) -> torch.Tensor:
    info = header.tensors[key]
    start, end = info["data_offsets"]
    data = backend.read_range(name, header.data_start + start, header.data_start + end)
    if len(data) != end - start:
        raise ValueError(f"tensor {key!r} truncated")
    dtype = _DTYPES[info["dtype"]]
    if not data:
        return torch.empty(info["shape"], dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(info["shape"])
