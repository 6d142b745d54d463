"""fluxgymd.gpu against the real pynvml loading the stand-in libnvidia-ml.so.1.

The dynamic loader reads LD_LIBRARY_PATH only at process start, so each test drives a
GpuMonitor in a child process (tests/fake_nvml/probe.py) started with the stand-in's
environment; the state file is changed live between samples.
"""
from __future__ import annotations

import ctypes.util
import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fake_nvml.build import DEFAULT_BUILD_DIR, FakeNvml, build_fake_nvml
from fluxgymd.gpu import GpuReading, GpuSample, NvmlStatus, describe, parse_cuda_visible_devices, process_tree_pids

REPO = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("fake_nvml") / "probe.py"
# Only guards against a hung probe; never a speed assertion.
ANSWER_GUARD_S = 30.0


@pytest.fixture(scope="session")
def fake_lib() -> Path:
    return build_fake_nvml(DEFAULT_BUILD_DIR)


@pytest.fixture(scope="session")
def noproc_lib() -> Path:
    return build_fake_nvml(DEFAULT_BUILD_DIR.with_name("fake-nvml-no-process-util"), ["NO_PROCESS_UTIL"])


@pytest.fixture
def fake(tmp_path: Path, fake_lib: Path) -> FakeNvml:
    return FakeNvml(tmp_path / "state.txt", fake_lib)


class Probe:
    """A child process running one GpuMonitor; answers one JSON line per command."""

    def __init__(self, env: dict[str, str], gpus: list[str] | None = None, call_timeout_s: float = 2.0) -> None:
        env = dict(env)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        config = json.dumps({"gpus": gpus, "call_timeout_s": call_timeout_s})
        self.proc = subprocess.Popen([sys.executable, str(PROBE), config], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        if not self._sel.select(timeout=ANSWER_GUARD_S):
            raise AssertionError(f"GPU probe did not answer {cmd} within {ANSWER_GUARD_S}s")
        line = self.proc.stdout.readline()
        assert line, f"GPU probe exited with {self.proc.wait()}"
        return json.loads(line)

    def sample(self, pids: list[int] | frozenset[int] = ()) -> dict[str, Any]:
        return self.ask(op="sample", pids=sorted(pids))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


@pytest.fixture
def probes() -> Iterator[list[Probe]]:
    started: list[Probe] = []
    yield started
    for p in started:
        p.close()


@pytest.fixture
def start(probes: list[Probe]):  # type: ignore[no-untyped-def]
    def _start(env: dict[str, str], gpus: list[str] | None = None, call_timeout_s: float = 2.0) -> Probe:
        p = Probe(env, gpus, call_timeout_s)
        probes.append(p)
        return p
    return _start


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A real process standing in for a trainer: a parent whose child 'uses the GPU'."""
    code = ("import subprocess, sys\n"
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            "print(c.pid, flush=True)\n"
            "c.wait()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    yield proc
    for child in process_tree_pids(proc.pid) - {proc.pid}:
        try:
            os.kill(child, 9)
        except ProcessLookupError:
            pass
    proc.kill()
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()


def grandchild_pid(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdout is not None
    return int(proc.stdout.readline())


def poll_until(fn, what: str, guard_s: float = ANSWER_GUARD_S):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + guard_s
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


# -- per-process and device utilisation --------------------------------------------------


def test_own_process_tree_sm_utilisation(fake: FakeNvml, start, sleeper) -> None:  # type: ignore[no-untyped-def]
    gpu_user = grandchild_pid(sleeper)
    pids = process_tree_pids(sleeper.pid)
    assert pids == {sleeper.pid, gpu_user}
    dev = fake.set_device(0, util_percent=91, mem_used_bytes=5 << 30, name="NVIDIA GeForce RTX 4090")
    fake.set_proc(gpu_user, 0, 87)

    probe = start(fake.env())
    s = probe.sample(pids)
    assert s["status"] == "OK", s
    assert s["own_sm_percent"] == 87
    assert s["own_pids_on_gpu"] == [gpu_user]
    assert s["device_busy_percent"] == 91
    assert s["per_process_supported"] is True
    assert s["others_busy"] is False
    assert s["describe"] == "GPU 87%"
    (g,) = s["gpus"]
    assert (g["index"], g["uuid"], g["name"]) == (0, dev.uuid, "NVIDIA GeForce RTX 4090")
    assert (g["mem_used_bytes"], g["mem_total_bytes"]) == (5 << 30, dev.mem_total_bytes)
    # Right away again: the sample window reaches back at least 1 s, so no false idle.
    assert probe.sample(pids)["own_sm_percent"] == 87


def test_own_idle_while_another_process_spins(fake: FakeNvml, start, sleeper) -> None:  # type: ignore[no-untyped-def]
    ours = grandchild_pid(sleeper)
    fake.set_device(0, util_percent=100)
    fake.set_proc(ours, 0, 0)  # our context exists, but our kernels do not run
    fake.set_proc(ours + 100_000, 0, 100)  # somebody else's job on the same GPU

    s = start(fake.env()).sample(process_tree_pids(sleeper.pid))
    assert s["own_sm_percent"] == 0
    assert s["own_pids_on_gpu"] == [ours]
    assert s["others_busy"] is True
    assert s["device_busy_percent"] == 100


def test_several_own_processes_sum_per_gpu_and_max_over_gpus(fake: FakeNvml, start) -> None:  # type: ignore[no-untyped-def]
    fake.set_device(0, util_percent=80)
    fake.set_device(1, util_percent=30)
    fake.set_proc(5001, 0, 30)
    fake.set_proc(5002, 0, 40)
    fake.set_proc(5003, 1, 25)
    s = start(fake.env()).sample([5001, 5002, 5003])
    assert s["own_sm_percent"] == 70
    assert s["own_pids_on_gpu"] == [5001, 5002, 5003]
    assert s["device_busy_percent"] == 80


def test_pids_invisible_to_nvml_fall_back_to_device(fake: FakeNvml, start) -> None:  # type: ignore[no-untyped-def]
    # In a PID namespace NVML reports host PIDs: our trainer shows up under a PID we never saw.
    fake.set_device(0, util_percent=97)
    fake.set_proc(777_777, 0, 97)
    s = start(fake.env()).sample([4321])
    assert s["status"] == "OK"
    assert s["own_sm_percent"] is None
    assert s["own_pids_on_gpu"] == []
    assert s["device_busy_percent"] == 97
    assert s["others_busy"] is None
    assert s["describe"] == "GPU 97%"


def test_process_utilisation_not_supported(fake: FakeNvml, start) -> None:  # type: ignore[no-untyped-def]
    fake.set_device(0, util_percent=64)
    fake.set_proc(4321, 0, 64)
    fake.add_fault("process_util_not_supported")
    s = start(fake.env()).sample([4321])
    assert s["status"] == "OK", s
    assert s["per_process_supported"] is False
    assert s["own_sm_percent"] is None
    assert s["device_busy_percent"] == 64
    assert s["own_pids_on_gpu"] == [4321]  # still in the compute-process list


def test_driver_without_process_utilisation_function(tmp_path: Path, noproc_lib: Path, start) -> None:  # type: ignore[no-untyped-def]
    fake = FakeNvml(tmp_path / "state.txt", noproc_lib)
    fake.set_device(0, util_percent=42)
    fake.set_proc(4321, 0, 42)
    s = start(fake.env()).sample([4321])
    assert s["status"] == "OK", s
    assert s["per_process_supported"] is False
    assert s["own_sm_percent"] is None
    assert s["device_busy_percent"] == 42


# -- faults ---------------------------------------------------------------------------------


def test_gpu_lost_is_reported_and_other_gpus_still_read(fake: FakeNvml, start) -> None:  # type: ignore[no-untyped-def]
    fake.set_device(0, util_percent=50)
    fake.set_device(1, util_percent=33)
    probe = start(fake.env())
    assert probe.sample([])["status"] == "OK"
    fake.add_fault("gpu_lost 0")
    s = probe.sample([])
    assert s["status"] == "GPU_LOST"
    assert "NVML_ERROR_GPU_IS_LOST" in s["detail"]
    assert [g["status"] for g in s["gpus"]] == ["GPU_LOST", "OK"]
    assert s["gpus"][1]["util_percent"] == 33
    assert s["describe"] == "GPU 0 lost"


def test_gpu_lost_before_first_sample(fake: FakeNvml, start) -> None:  # type: ignore[no-untyped-def]
    fake.set_device(0, util_percent=50)
    fake.add_fault("gpu_lost 0")
    s = start(fake.env(), gpus=["0"]).sample([1])
    assert s["status"] == "GPU_LOST"
    assert s["device_busy_percent"] is None
    assert s["describe"] == "GPU 0 lost"


@pytest.mark.parametrize("blocked", [
    "nvmlDeviceGetUtilizationRates",
    "nvmlInitWithFlags",
    "nvmlDeviceGetCount_v2",
    "nvmlDeviceGetHandleByIndex_v2",
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetProcessUtilization",
])
def test_hung_call_times_out_and_is_never_stacked(fake: FakeNvml, start, blocked: str) -> None:  # type: ignore[no-untyped-def]
    fake.set_device(0, util_percent=88)
    fake.set_proc(4321, 0, 88)
    fake.add_fault(f"block {blocked}")
    probe = start(fake.env(), call_timeout_s=0.5)

    first = probe.sample([4321])
    assert first["status"] == "TIMED_OUT"
    assert blocked.removesuffix("_v2").removesuffix("_v3").replace("InitWithFlags", "Init") in first["detail"]
    assert first["describe"] == "NVML hung"
    assert first["own_sm_percent"] is None and first["device_busy_percent"] is None
    for _ in range(3):
        again = probe.sample([4321])
        assert again["status"] == "TIMED_OUT"
        assert "hung" in again["detail"]
    # One hung call in the driver, not one per sample.
    assert fake.calls().count(blocked) == 1

    fake.clear_faults()  # the driver recovers: the hung call returns
    s = poll_until(lambda: (r := probe.sample([4321]))["status"] == "OK" and r, "NVML to recover")
    assert s["own_sm_percent"] == 88
    assert s["device_busy_percent"] == 88


def test_inventory_while_hung_answers_timed_out(fake: FakeNvml, start) -> None:  # type: ignore[no-untyped-def]
    fake.set_device(0)
    fake.add_fault("block nvmlDeviceGetCount_v2")
    probe = start(fake.env(), call_timeout_s=0.3)
    assert probe.sample([])["status"] == "TIMED_OUT"
    inv = probe.ask(op="inventory")
    assert inv["status"] == "TIMED_OUT"
    assert "nvmlDeviceGetCount" in inv["detail"]
    assert fake.calls().count("nvmlDeviceGetCount_v2") == 1


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None, reason="a real NVML is installed here")
def test_no_library(fake: FakeNvml, start) -> None:  # type: ignore[no-untyped-def]
    env = fake.env()
    del env["LD_LIBRARY_PATH"]
    probe = start(env)
    for _ in range(2):
        s = probe.sample([1])
        assert s["status"] == "NO_LIBRARY"
        assert s["describe"] == "GPU n/a (no NVML)"
        assert s["own_sm_percent"] is None and s["device_busy_percent"] is None
    assert probe.ask(op="inventory")["status"] == "NO_LIBRARY"
    assert fake.calls() == []


def test_no_driver(fake: FakeNvml, start) -> None:  # type: ignore[no-untyped-def]
    fake.set_device(0, util_percent=10)
    fake.add_fault("no_driver")
    probe = start(fake.env())
    s = probe.sample([1])
    assert s["status"] == "NO_DRIVER"
    assert "driver" in s["detail"]
    assert s["describe"] == "GPU n/a (no driver)"
    # Not retried on every sample: init is attempted again only after a back-off.
    probe.sample([1])
    assert fake.calls().count("nvmlInitWithFlags") == 1


# -- selection ------------------------------------------------------------------------------


def test_select_by_uuid_and_uuid_prefix(fake: FakeNvml, start) -> None:  # type: ignore[no-untyped-def]
    fake.set_device(0, util_percent=5)
    gpu1 = fake.set_device(1, util_percent=75, name="NVIDIA H100")
    for spec in (gpu1.uuid, gpu1.uuid[:12]):
        s = start(fake.env(), gpus=[spec]).sample([])
        assert s["status"] == "OK", s
        assert [(g["index"], g["uuid"], g["name"]) for g in s["gpus"]] == [(1, gpu1.uuid, "NVIDIA H100")]
        assert s["device_busy_percent"] == 75


def test_unknown_gpu_is_an_error_reading(fake: FakeNvml, start) -> None:  # type: ignore[no-untyped-def]
    fake.set_device(0, util_percent=5)
    s = start(fake.env(), gpus=["0", "GPU-does-not-exist", "7"]).sample([])
    assert s["status"] == "ERROR"
    assert [g["status"] for g in s["gpus"]] == ["OK", "ERROR", "ERROR"]
    assert "GPU-does-not-exist" in s["detail"] and "GPU 7" in s["detail"]
    assert s["device_busy_percent"] == 5


@pytest.mark.parametrize(("visible", "indices"), [("1", [1]), ("1,0", [1, 0]), ("", []), (None, [0, 1])])
def test_select_by_cuda_visible_devices(fake: FakeNvml, start, visible: str | None, indices: list[int]) -> None:  # type: ignore[no-untyped-def]
    fake.set_device(0, util_percent=10)
    fake.set_device(1, util_percent=20)
    env = fake.env()
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    s = start(env).sample([])
    assert s["status"] == "OK"
    assert [g["index"] for g in s["gpus"]] == indices
    if not indices:
        assert s["describe"] == "GPU n/a (none)"


def test_cuda_visible_devices_by_uuid(fake: FakeNvml, start) -> None:  # type: ignore[no-untyped-def]
    fake.set_device(0, util_percent=10)
    gpu1 = fake.set_device(1, util_percent=20)
    env = fake.env() | {"CUDA_VISIBLE_DEVICES": gpu1.uuid}
    s = start(env).sample([])
    assert [g["index"] for g in s["gpus"]] == [1]


@pytest.mark.parametrize(("value", "expected"), [
    (None, None),
    ("", ()),
    ("0", ("0",)),
    (" 2, 00 ,1", ("2", "0", "1")),
    ("GPU-abc,1", ("GPU-abc", "1")),
    ("MIG-xyz", ("MIG-xyz",)),
    ("0,-1,1", ("0",)),  # CUDA stops at the first invalid entry
    ("-1", ()),
])
def test_parse_cuda_visible_devices(value: str | None, expected: tuple[str, ...] | None) -> None:
    assert parse_cuda_visible_devices(value) == expected


# -- inventory, trainer files, text --------------------------------------------------------


def test_inventory_lists_all_gpus_with_driver(fake: FakeNvml, start) -> None:  # type: ignore[no-untyped-def]
    fake.set_device(0, util_percent=10, name="NVIDIA A100-SXM4-80GB")
    fake.set_device(1, util_percent=90)
    fake.add_fault("gpu_lost 1")
    inv = start(fake.env(), gpus=["0"]).ask(op="inventory")
    assert inv["driver_version"] == "999.99.99-fake"
    assert [g["index"] for g in inv["gpus"]] == [0, 1]
    g0, g1 = inv["gpus"]
    assert g0["name"] == "NVIDIA A100-SXM4-80GB" and g0["status"] == "OK"
    assert g0["temperature_c"] is not None and g0["power_w"] is not None
    assert g1["status"] == "GPU_LOST"
    assert inv["status"] == "GPU_LOST"


def test_trainer_written_pid_files_are_read_live(fake: FakeNvml, start) -> None:  # type: ignore[no-untyped-def]
    fake.set_device(0, util_percent=60)
    probe = start(fake.env())
    s = probe.sample([31337])
    assert s["own_sm_percent"] is None and s["own_pids_on_gpu"] == []  # no CUDA context yet
    # What the stand-in trainer does: one atomically replaced file per PID in <state>.d/
    (fake.procs_dir / ".31337.partial.tmp").write_text("proc 31337 0 9")  # a writer mid-way: ignored
    (fake.procs_dir / "31337.tmp").write_text("proc 31337 0 1")
    fake.set_proc(31337, 0, 55)
    s = probe.sample([31337])
    assert s["own_sm_percent"] == 55
    fake.remove_proc(31337)
    assert probe.sample([31337])["own_pids_on_gpu"] == []


def _sample(status: NvmlStatus, gpus: tuple[GpuReading, ...] = (), own: int | None = None,
            device: int | None = None) -> GpuSample:
    return GpuSample(0.0, status, "", gpus, own, (), device, None, None)


def _reading(index: int, status: NvmlStatus) -> GpuReading:
    return GpuReading(index, f"GPU-{index}", "x", None, None, None, status, "")


@pytest.mark.parametrize(("sample", "text"), [
    (_sample(NvmlStatus.OK, (_reading(0, NvmlStatus.OK),), own=97, device=100), "GPU 97%"),
    (_sample(NvmlStatus.OK, (_reading(0, NvmlStatus.OK),), device=12), "GPU 12%"),
    (_sample(NvmlStatus.OK), "GPU n/a (none)"),
    (_sample(NvmlStatus.NO_LIBRARY), "GPU n/a (no NVML)"),
    (_sample(NvmlStatus.NO_DRIVER), "GPU n/a (no driver)"),
    (_sample(NvmlStatus.TIMED_OUT), "NVML hung"),
    (_sample(NvmlStatus.GPU_LOST, (_reading(0, NvmlStatus.OK), _reading(1, NvmlStatus.GPU_LOST),
                                   _reading(2, NvmlStatus.GPU_LOST))), "GPU 1,2 lost"),
    (_sample(NvmlStatus.ERROR, (_reading(0, NvmlStatus.ERROR),)), "GPU n/a (NVML error)"),
])
def test_describe(sample: GpuSample, text: str) -> None:
    assert describe(sample) == text


def test_problem_statuses() -> None:
    problems = {s for s in NvmlStatus if s.is_problem}
    assert problems == {NvmlStatus.NO_DRIVER, NvmlStatus.GPU_LOST, NvmlStatus.TIMED_OUT, NvmlStatus.ERROR}


def test_monitor_without_nvml_in_this_process_never_raises() -> None:
    # This test process has no libnvidia-ml on its loader path (or a real one): either way
    # sample() answers with a status instead of raising.
    from fluxgymd.gpu import GpuMonitor

    with GpuMonitor(gpus=None, call_timeout_s=1.0) as monitor:
        s = monitor.sample([os.getpid()])
        assert isinstance(s.status, NvmlStatus)
        assert describe(s)
    assert monitor.sample([]).status is NvmlStatus.ERROR  # closed
