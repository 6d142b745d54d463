"""Issue 4 under a real systemd: the watchdog's liveness on the stand-in NVML.

The real unit, wrapper and stand-in trainer run in a throwaway systemd; the wrapper loads
tests/fake_nvml's libnvidia-ml.so.1 through LD_LIBRARY_PATH, and the stand-in reports its
own PID's SM utilisation into ``<state>.d/`` (97% stepping, 0% hang-idle, 100% hang-spin).
Each run gets its own NVML state file (an instance drop-in points the wrapper at it), so
faults such as a lost GPU never leak into another test's run.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fake_nvml.build import STATE_ENV, FakeNvml, build_fake_nvml
from service_helpers import Runs, unit

pytestmark = pytest.mark.systemd

WATCHDOG_TIMEOUT = "Watchdog timeout"


@pytest.fixture(scope="module")
def nvml_lib() -> Path:
    return build_fake_nvml()  # under /work/main/.work/: the box sees it, its /tmp is private


@pytest.fixture(scope="module")
def runs(systemd_box_module, nvml_lib, module_home) -> Runs:
    home = module_home
    # a default state for the template; every test points its instance at its own state
    default = FakeNvml(home / "nvml" / "default" / "state", nvml_lib)
    default.set_device(0, util_percent=0)
    extra = (f"Environment=LD_LIBRARY_PATH={nvml_lib.parent}\n"
             f"Environment={STATE_ENV}={default.state_path}\n")
    return Runs(systemd_box_module, home, extra_unit=extra)


def nvml_for(runs: Runs, name: str, device_util: int = 97) -> FakeNvml:
    """A fresh stand-in NVML (one GPU) for run `name`. Its state lives under FLUXGYM_HOME,
    which the unit may write: the stand-in trainer writes its own reading into it."""
    fake = FakeNvml(runs.home / "nvml" / name / "state", build_fake_nvml())
    fake.set_device(0, util_percent=device_util)
    runs.box.install_dropin(unit(name), "60-nvml.conf",
                            f"[Service]\nEnvironment={STATE_ENV}={fake.state_path}\n")
    runs.box.daemon_reload()
    return fake


def standin_nvml(fake: FakeNvml) -> tuple[str, str]:
    return ("--standin_nvml_dir", str(fake.procs_dir))


def journal_text(runs: Runs, name: str, *args: str) -> list[str]:
    return [str(e.get("MESSAGE", "")) for e in runs.journal(name, *args)]


def first_entry(runs: Runs, name: str, needle: str) -> dict[str, Any]:
    for e in runs.journal(name):
        if needle in str(e.get("MESSAGE", "")):
            return e
    raise AssertionError(f"no journal entry of {unit(name)} contains {needle!r}")


def realtime_s(entry: dict[str, Any]) -> float:
    return int(entry["__REALTIME_TIMESTAMP"]) / 1e6


def stall_reports(runs: Runs, name: str) -> list[str]:
    return [p.read_text() for p in sorted((runs.run_dir(name) / "stalls").glob("*.txt"))]


def banners(log: str) -> list[str]:
    return re.findall(r"^==== attempt \d+ .*$", log, flags=re.M)


def status_text(runs: Runs, name: str) -> str:
    return runs.box.show(unit(name), "StatusText").get("StatusText", "")


def wait_step(runs: Runs, name: str, step: int, timeout_s: float = 120.0) -> None:
    runs.box.wait_for(lambda: (runs.status(name).get("step") or 0) >= step, timeout_s=timeout_s,
                      what=f"{name} to reach step {step}")


def assert_completed_once(runs: Runs, name: str, total_steps: int) -> None:
    props = runs.wait_settled(name)
    assert props["Result"] == "success", props
    assert runs.restarts(name) == 0
    assert not any(WATCHDOG_TIMEOUT in m for m in journal_text(runs, name))
    assert runs.status(name)["status"] == "completed"
    assert sorted(runs.steps_trained(name)) == list(range(1, total_steps + 1))


# --------------------------------------------------------------------------- deadlocks

def test_idle_hang_is_restarted_with_stacks_then_completes(runs):
    fake = nvml_for(runs, "idle")
    runs.create("idle", "--fault", "hang-idle@8", *standin_nvml(fake), watchdog={"stall_timeout": "6s"})
    runs.start("idle")
    props = runs.wait_settled("idle")
    assert props["Result"] == "success" and runs.restarts("idle") == 1
    assert any(WATCHDOG_TIMEOUT in m for m in journal_text(runs, "idle"))
    reports = stall_reports(runs, "idle")
    assert reports and "standin_hang_idle" in reports[0]
    log = runs.log("idle")
    assert re.search(r"^==== attempt 1 stalled: watchdog: no sign of life", log, re.M), banners(log)
    assert "resumed from idle-000001-state" in banners(log)[2]
    assert runs.status("idle")["status"] == "completed"
    assert sorted(set(runs.steps_trained("idle"))) == list(range(1, 21))


def test_spin_hang_is_restarted_after_progress_timeout_not_before(runs):
    fake = nvml_for(runs, "spin")
    runs.create("spin", "--fault", "hang-spin@8", *standin_nvml(fake),
                watchdog={"stall_timeout": "6s", "progress_timeout": "20s"})
    runs.start("spin")
    props = runs.wait_settled("spin")
    assert props["Result"] == "success" and runs.restarts("spin") == 1
    # the hang begins after the last step was trained; its line reached the journal no
    # earlier than it was printed, so this interval is a lower bound on (kill - last step)
    hang = first_entry(runs, "spin", "stand-in fault hang-spin@8 fires")
    kill = first_entry(runs, "spin", WATCHDOG_TIMEOUT)
    assert realtime_s(kill) - realtime_s(hang) >= 20.0, (realtime_s(kill) - realtime_s(hang))
    reports = stall_reports(runs, "spin")
    assert reports and "standin_hang_spin" in reports[0]
    log = runs.log("spin")
    # the busy GPU kept it alive past stall_timeout; the progress rule ended it
    assert re.search(r"^==== attempt 1 stalled: watchdog: no step progress within progress_timeout", log, re.M), banners(log)
    assert "resumed from spin-000001-state" in banners(log)[2]
    assert runs.status("spin")["status"] == "completed"
    assert sorted(set(runs.steps_trained("spin"))) == list(range(1, 21))


def test_silent_busy_startup_three_stall_windows_long_is_not_killed(runs):
    fake = nvml_for(runs, "slowstart")
    runs.create("slowstart", "--standin_startup_seconds", "18", *standin_nvml(fake),
                watchdog={"stall_timeout": "6s"})
    runs.start("slowstart")
    assert_completed_once(runs, "slowstart", 20)
    assert not stall_reports(runs, "slowstart")
    # the scenario really happened: >= 3 stall windows from launch to the first progress line
    launched = first_entry(runs, "slowstart", "attempt 1: fresh start")
    first_step = next(e for e in runs.journal("slowstart")
                      if re.search(r"steps:\s+\d+%.*\b[1-9]\d*/20\b", str(e.get("MESSAGE", ""))))
    assert realtime_s(first_step) - realtime_s(launched) >= 18.0


def test_idle_hang_is_restarted_while_another_process_keeps_the_gpu_busy(runs):
    fake = nvml_for(runs, "neighbour", device_util=100)
    neighbour = subprocess.Popen(["sleep", "600"])
    try:
        fake.set_proc(neighbour.pid, 0, 100)
        runs.create("neighbour", "--fault", "hang-idle@8", *standin_nvml(fake),
                    watchdog={"stall_timeout": "6s"})
        runs.start("neighbour")
        # while ours hangs, the wrapper reads OUR share (0%), not the device's 100%
        runs.box.wait_for(lambda: "GPU 0%" in status_text(runs, "neighbour"), timeout_s=120,
                          what="StatusText to show our own 0% during the hang")
        props = runs.wait_settled("neighbour")
    finally:
        neighbour.kill()
        neighbour.wait()
    assert props["Result"] == "success" and runs.restarts("neighbour") == 1
    assert any(WATCHDOG_TIMEOUT in m for m in journal_text(runs, "neighbour"))
    log = runs.log("neighbour")
    assert re.search(r"^==== attempt 1 stalled: watchdog: no sign of life", log, re.M), banners(log)
    assert runs.status("neighbour")["status"] == "completed"


# --------------------------------------------------------------------------- NVML faults

SLOW = dict(step_s=0.3, epochs=8, batches=5)  # 40 steps, ~12 s: faults land mid-run


@pytest.mark.parametrize("name, fault, shown", [
    ("nvlost", "gpu_lost 0", "GPU 0 lost"),
    ("nvblockutil", "block nvmlDeviceGetUtilizationRates", "NVML hung"),
    ("nvblockproc", "block nvmlDeviceGetProcessUtilization", "NVML hung"),
], ids=["gpu-lost", "block-utilization", "block-process-utilization"])
def test_nvml_fault_mid_run_is_reported_and_the_run_goes_on(runs, name, fault, shown):
    # names without '-': the unit's %I would unescape it to '/'
    fake = nvml_for(runs, name)
    runs.create(name, *standin_nvml(fake), **SLOW)
    runs.start(name)
    runs.box.wait_for(lambda: "GPU 97%" in status_text(runs, name), timeout_s=120,
                      what="StatusText to show the trainer's own 97%")
    wait_step(runs, name, 3)
    fake.add_fault(fault)
    runs.box.wait_for(lambda: shown in status_text(runs, name), timeout_s=60,
                      what=f"StatusText to show {shown!r}")
    # still mid-run when the fault showed: it has not simply finished
    assert runs.status(name)["status"] == "running"
    assert_completed_once(runs, name, 40)
    errs = [m for m in journal_text(runs, name, "-p", "err") if "GPU monitoring" in m]
    assert len(errs) == 1, errs  # reported once, not at every poll
    assert shown in errs[0] and "training progress" in errs[0]
    if fault.startswith("block"):
        assert fault.split()[1] in errs[0]  # names the call that hung


def test_no_nvml_runs_on_progress_and_says_so_once(runs):
    runs.box.install_dropin(unit("nonvml"), "60-nvml.conf",
                            f"[Service]\nUnsetEnvironment=LD_LIBRARY_PATH {STATE_ENV}\n")
    runs.box.daemon_reload()
    runs.create("nonvml", step_s=0.3, epochs=4, batches=5)
    runs.start("nonvml")
    assert_completed_once(runs, "nonvml", 20)
    said = [m for m in journal_text(runs, "nonvml") if "NVML" in m or "libnvidia-ml" in m]
    assert len(said) == 1, said
    assert "liveness runs on training progress" in said[0]
    assert not [m for m in journal_text(runs, "nonvml", "-p", "err") if m.startswith("fluxgymd:")]
