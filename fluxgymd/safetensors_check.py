"""Validate a .safetensors file without loading tensors (no safetensors dependency).

Format: 8-byte little-endian header length N, N bytes of JSON mapping tensor names to
{dtype, shape, data_offsets: [begin, end]} (plus optional "__metadata__"), then the data.
A file is valid when the header parses and the data region is exactly as long as the
tensors it declares: a truncated copy or a half-written save fails.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


def safetensors_problem(path: Path) -> str | None:
    """None when PATH is a complete safetensors file, else a short reason."""
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "too short for a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                return f"header length {n} does not fit the file ({size} bytes)"
            raw = f.read(n)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable: {e.strerror}"
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "header is not valid JSON"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    data_len = size - 8 - n
    end_max = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            count = 1
            for d in info["shape"]:
                count *= int(d)
            width = _DTYPE_BYTES.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            return f"tensor {key!r} has a malformed header entry"
        if not (0 <= begin <= end) or (width is not None and end - begin != count * width):
            return f"tensor {key!r} offsets do not match its shape"
        end_max = max(end_max, end)
    if end_max != data_len:
        return f"data is {data_len} bytes but the header declares {end_max}"
    return None
