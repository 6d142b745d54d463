"""Watchdog detection overshoot, and the wrapper's own CPU and memory cost, under a real systemd.

    .venv/bin/python bench/bench_watchdog.py [--runs 5] [--stall 8] [--poll 2]
                                             [--cost-seconds 60] [--cost-poll 5] [--cost-step S ...]
                                             [--skip-cost]

Boots a throwaway systemd (tests/systemd_box.py; needs root), installs the real unit with
the stand-in libnvidia-ml.so.1 (tests/fake_nvml) and runs the real wrapper and stand-in
trainer (tests/service_helpers.py), then measures:

1. Detection overshoot of an idle deadlock: ``kill - onset - stall_timeout``, where onset is
   when the stand-in recorded its last trained step (mtime of its fsynced step record; the
   hang starts right after) and kill is the ``__REALTIME_TIMESTAMP`` of systemd's
   "Watchdog timeout" journal entry. Median of ``--runs``; target <= poll_interval + 1 s.
2. The wrapper process (the unit's MainPID, not its trainer) over ``--cost-seconds`` of a
   long stand-in run on the stand-in NVML at ``--cost-poll``, once per ``--cost-step``
   (seconds per training step; each step prints one tqdm ``\r`` frame): CPU seconds
   (user + system) extrapolated to one hour (target < 20 s) and peak RSS (target < 40 MB).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import psutil  # noqa: E402

from fake_nvml.build import STATE_ENV, FakeNvml, build_fake_nvml  # noqa: E402
from service_helpers import Runs, unit  # noqa: E402
from systemd_box import SystemdBox, box_unavailable_reason  # noqa: E402

HANG_STEP = 8  # 5 batches per epoch: epoch 1 saved, steps 6-7 trained, then the hang
OVERSHOOT_SLACK_S = 1.0
CPU_TARGET_S_PER_HOUR = 20.0
RSS_TARGET_MB = 40.0


def _entry_time_s(runs: Runs, name: str, needle: str) -> float | None:
    for e in runs.journal(name):
        if needle in str(e.get("MESSAGE", "")):
            return int(e["__REALTIME_TIMESTAMP"]) / 1e6
    return None


def overshoot_once(runs: Runs, name: str, fake: FakeNvml, stall_s: float, poll_s: float) -> float:
    runs.create(name, "--fault", f"hang-idle@{HANG_STEP}", "--standin_nvml_dir", str(fake.procs_dir),
                watchdog={"stall_timeout": f"{stall_s:g}s", "poll_interval": f"{poll_s:g}s"})
    runs.start(name)
    kill_s = runs.box.wait_for(lambda: _entry_time_s(runs, name, "Watchdog timeout"), timeout_s=180,
                               what=f"{unit(name)}'s watchdog to fire", interval_s=0.3)
    record = runs.run_dir(name) / ".standin-steps.jsonl"
    onset_s = record.stat().st_mtime
    last_step = runs.steps_trained(name)[-1]
    runs.box.systemctl("stop", unit(name))  # no need to watch the resume
    if last_step != HANG_STEP - 1:
        raise RuntimeError(f"{name}: step record ends at {last_step}, not {HANG_STEP - 1}: "
                           "the restarted attempt trained before the record was read")
    return kill_s - onset_s - stall_s


def wrapper_host_pid(runs: Runs, name: str) -> int:
    """The host PID of the unit's MainPID (which systemd reports in the box's PID namespace)."""
    main_pid = int(runs.box.show(unit(name), "MainPID")["MainPID"])
    for pid in runs.box.namespace_pids():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:") and int(line.split()[-1]) == main_pid:
                return pid
    raise RuntimeError(f"MainPID {main_pid} of {unit(name)} not found among the box's processes")


def wrapper_cost(runs: Runs, name: str, fake: FakeNvml, seconds: float, poll_s: float,
                 step_s: float) -> tuple[float, float, float]:
    """(CPU seconds used, wall seconds measured, peak RSS bytes) of the wrapper process."""
    runs.create(name, "--standin_nvml_dir", str(fake.procs_dir), epochs=10_000, batches=20, step_s=step_s,
                watchdog={"stall_timeout": "5min", "poll_interval": f"{poll_s:g}s"})
    runs.start(name)
    runs.box.wait_for(lambda: (runs.status(name).get("step") or 0) >= 3, timeout_s=180,
                      what="the cost run's first steps")
    proc = psutil.Process(wrapper_host_pid(runs, name))
    time.sleep(poll_s)  # past start-up work (imports, first NVML init) in the wrapper
    t0, c0 = time.monotonic(), proc.cpu_times()
    peak_rss = proc.memory_info().rss
    while time.monotonic() - t0 < seconds:
        time.sleep(1.0)
        peak_rss = max(peak_rss, proc.memory_info().rss)
    c1, wall_s = proc.cpu_times(), time.monotonic() - t0
    runs.box.systemctl("stop", unit(name))
    return (c1.user + c1.system) - (c0.user + c0.system), wall_s, peak_rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="hang runs for the overshoot median")
    ap.add_argument("--stall", type=float, default=8.0, help="stall_timeout of the hang runs, s")
    ap.add_argument("--poll", type=float, default=2.0, help="poll_interval of the hang runs, s")
    ap.add_argument("--cost-seconds", type=float, default=60.0, help="wrapper measuring window, s")
    ap.add_argument("--cost-poll", type=float, default=5.0, help="poll_interval of the cost run, s")
    ap.add_argument("--cost-step", type=float, action="append",
                    help="stand-in seconds per step of a cost run (repeatable; default 0.5 and 3)")
    ap.add_argument("--skip-cost", action="store_true", help="measure the overshoot only")
    args = ap.parse_args()
    reason = box_unavailable_reason()
    if reason:
        print(f"bench_watchdog: cannot boot a systemd box: {reason}", file=sys.stderr)
        return 2

    work = REPO / ".work" / f"bench-watchdog-{uuid.uuid4().hex[:8]}"
    lib = build_fake_nvml()
    box = SystemdBox(work / "box")
    try:
        box.start()
        home = work / "home"
        fake = FakeNvml(home / "nvml" / "state", lib)
        fake.set_device(0, util_percent=97)
        runs = Runs(box, home, extra_unit=f"Environment=LD_LIBRARY_PATH={lib.parent}\n"
                                          f"Environment={STATE_ENV}={fake.state_path}\n")

        print(f"detection overshoot: idle hang, stall_timeout {args.stall:g} s, "
              f"poll_interval {args.poll:g} s, {args.runs} runs")
        overshoots = []
        for i in range(args.runs):
            o = overshoot_once(runs, f"ovs{i}", fake, args.stall, args.poll)
            overshoots.append(o)
            print(f"  run {i + 1}: kill - onset - stall_timeout = {o:+.2f} s", flush=True)
        med = statistics.median(overshoots)
        target = args.poll + OVERSHOOT_SLACK_S
        print(f"  median {med:+.2f} s (min {min(overshoots):+.2f}, max {max(overshoots):+.2f}); "
              f"target <= {target:g} s: {'OK' if med <= target else 'MISSED'}")

        for i, step_s in enumerate([] if args.skip_cost else args.cost_step or [0.5, 3.0]):
            print(f"wrapper cost: {args.cost_seconds:g} s of a long stand-in run at {step_s:g} s/step "
                  f"on the stand-in NVML, poll_interval {args.cost_poll:g} s", flush=True)
            cpu_s, wall_s, rss = wrapper_cost(runs, f"cost{i}", fake, args.cost_seconds, args.cost_poll, step_s)
            per_hour = cpu_s * 3600.0 / wall_s
            rss_mb = rss / 2**20
            print(f"  CPU {cpu_s:.2f} s over {wall_s:.1f} s -> {per_hour:.1f} s per hour "
                  f"(target < {CPU_TARGET_S_PER_HOUR:g}): {'OK' if per_hour < CPU_TARGET_S_PER_HOUR else 'MISSED'}")
            print(f"  peak RSS {rss_mb:.1f} MB (target < {RSS_TARGET_MB:g}): "
                  f"{'OK' if rss_mb < RSS_TARGET_MB else 'MISSED'}", flush=True)
    finally:
        box.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
