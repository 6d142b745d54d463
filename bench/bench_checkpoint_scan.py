"""Checkpoint scan time for an output dir holding 1,000 states (issue 3).

Builds N state directories shaped like accelerate's (train_state.json, a small but valid
model.safetensors, optimizer.bin, scheduler.bin, random_states_0.pkl; 10% of them partial),
then times scan + validation + ranking as `fluxgymd run` does at start.

    .venv/bin/python bench/bench_checkpoint_scan.py [--states 1000]
"""
from __future__ import annotations

import argparse
import json
import statistics
import struct
import tempfile
import time
from pathlib import Path

from fluxgymd.checkpoints import rank, scan_states, with_absolute_progress


def safetensors_bytes(n_floats: int = 256) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * (4 * n_floats)


def build(out: Path, n: int) -> None:
    model = safetensors_bytes()
    for i in range(1, n + 1):
        d = out / f"lora-{i:06d}-state"
        d.mkdir()
        (d / "train_state.json").write_text(json.dumps({"current_epoch": i, "current_step": i * 10}))
        (d / "model.safetensors").write_bytes(model)
        (d / "optimizer.bin").write_bytes(b"x" * 64)
        (d / "scheduler.bin").write_bytes(b"x" * 64)
        if i % 10:  # every 10th is an interrupted save
            (d / "random_states_0.pkl").write_bytes(b"x" * 64)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--states", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        build(out, args.states)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            states = [with_absolute_progress(c, 10, {}) for c in scan_states(out, "lora")]
            ranked = rank(states)
            times.append(time.perf_counter() - t0)
        assert len(states) == args.states and len(ranked) == args.states - args.states // 10
    print(f"scan+validate+rank {args.states} states: median {statistics.median(times) * 1000:.1f} ms "
          f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}; warm page cache)")


if __name__ == "__main__":
    main()
