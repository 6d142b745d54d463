"""Drives one fluxgymd.gpu.GpuMonitor in its own process, for tests.

The library pynvml loads is fixed by LD_LIBRARY_PATH at process start, so each GPU test
starts this script with the environment it needs (``FakeNvml.env()``). Usage:

    python probe.py '{"gpus": ["0"] | null, "call_timeout_s": 0.5}'

then one JSON command per stdin line, one JSON answer per stdout line:

    {"op": "sample", "pids": [123]}   -> GpuSample as a dict, plus "describe" and "elapsed_s"
    {"op": "inventory"}               -> Inventory as a dict
    {"op": "close"}                   -> {"closed": true}, then the process exits
"""
from __future__ import annotations

import dataclasses
import enum
import json
import sys
import time
from typing import Any

from fluxgymd.gpu import GpuMonitor, describe


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def main() -> int:
    config = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    gpus = config.get("gpus")
    monitor = GpuMonitor(tuple(gpus) if gpus is not None else None,
                         call_timeout_s=float(config.get("call_timeout_s", 2.0)))
    for line in sys.stdin:
        cmd = json.loads(line)
        start = time.monotonic()
        if cmd["op"] == "sample":
            sample = monitor.sample(cmd.get("pids", []))
            answer = _plain(sample) | {"describe": describe(sample)}
        elif cmd["op"] == "inventory":
            answer = _plain(monitor.inventory())
        elif cmd["op"] == "close":
            monitor.close()
            answer = {"closed": True}
        else:
            answer = {"error": f"unknown op {cmd['op']!r}"}
        answer["elapsed_s"] = time.monotonic() - start
        print(json.dumps(answer), flush=True)
        if cmd["op"] == "close":
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
