"""Cost of GpuMonitor.sample(): wall time per sample and CPU seconds per hour of polling.

    .venv/bin/python bench/bench_gpu_poll.py [--gpus 2] [--samples 500] [--real]

By default it runs against the stand-in libnvidia-ml.so.1 (built on demand), re-executing
itself with LD_LIBRARY_PATH set, because the loader reads that only at process start.
The stand-in re-parses its state file on every call, so it is, if anything, slower than a
driver's NVML for most calls. With --real it uses whatever NVML this machine has.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

POLL_INTERVAL_S = 5.0
_CHILD_MARK = "FLUXGYMD_BENCH_GPU_CHILD"


def _reexec_with_fake(args: argparse.Namespace) -> int:
    from fake_nvml.build import FakeNvml, build_fake_nvml

    lib = build_fake_nvml()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        fake = FakeNvml(Path(tmp) / "state.txt", lib)
        for i in range(args.gpus):
            fake.set_device(i, util_percent=90)
        own = 100_000  # the PIDs the child samples for (they need not exist)
        for i in range(args.gpus):
            fake.set_proc(own + i, i, 80)
            fake.set_proc(900_000 + i, i, 15)  # someone else's process
        env = fake.env() | {_CHILD_MARK: ",".join(str(own + i) for i in range(args.gpus))}
        env["PYTHONPATH"] = str(REPO)
        return subprocess.run([sys.executable, __file__, *sys.argv[1:]], env=env, check=False).returncode


def _measure(args: argparse.Namespace, pids: list[int]) -> None:
    from fluxgymd.gpu import GpuMonitor, describe

    monitor = GpuMonitor(gpus=None, call_timeout_s=2.0)
    first_start = time.perf_counter()
    first = monitor.sample(pids)  # includes nvmlInit and handle resolution
    first_s = time.perf_counter() - first_start
    walls: list[float] = []
    cpu_start = time.process_time()  # all threads, the NVML call thread included
    for _ in range(args.samples):
        t0 = time.perf_counter()
        s = monitor.sample(pids)
        walls.append(time.perf_counter() - t0)
    cpu_per_sample_s = (time.process_time() - cpu_start) / args.samples
    monitor.close()

    walls.sort()
    p95 = walls[int(0.95 * (len(walls) - 1))]
    per_hour = cpu_per_sample_s * 3600.0 / POLL_INTERVAL_S
    print(f"NVML: {'real' if args.real else 'stand-in'}; GPUs: {len(s.gpus)}; status: {s.status.name}; "
          f"last: {describe(s)} (first sample: {describe(first)})")
    print(f"first sample (init + resolve): {first_s * 1e3:.2f} ms")
    print(f"sample() wall: median {statistics.median(walls) * 1e3:.3f} ms, p95 {p95 * 1e3:.3f} ms, "
          f"max {walls[-1] * 1e3:.3f} ms over {args.samples}")
    print(f"CPU per sample: {cpu_per_sample_s * 1e3:.3f} ms")
    print(f"CPU per hour at {POLL_INTERVAL_S:g} s poll: {per_hour:.3f} s "
          f"({per_hour / 36:.4f}% of one core)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=1, help="stand-in GPUs to simulate")
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--real", action="store_true", help="use this machine's NVML")
    args = ap.parse_args()
    if args.real:
        _measure(args, [os.getpid()])
        return 0
    if _CHILD_MARK not in os.environ:
        return _reexec_with_fake(args)
    _measure(args, [int(p) for p in os.environ[_CHILD_MARK].split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
