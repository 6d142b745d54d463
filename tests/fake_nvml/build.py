"""Builds the stand-in ``libnvidia-ml.so.1`` and writes the state it reads.

The library (fake_nvml.c) re-reads ``$FLUXGYMD_FAKE_NVML_STATE`` and every file in
``<state>.d/`` on each NVML call; :class:`FakeNvml` writes those files atomically so a
monitor running in another process never reads half a file.

pynvml opens the library with ``CDLL("libnvidia-ml.so.1")``; the dynamic loader reads
``LD_LIBRARY_PATH`` once at process start, so the process that uses it must be started with
:func:`FakeNvml.env` (setting ``os.environ`` later has no effect on dlopen).
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

SOURCE = Path(__file__).with_name("fake_nvml.c")
REPO = Path(__file__).resolve().parents[2]
DEFAULT_BUILD_DIR = REPO / ".work" / "fake-nvml"
LIBRARY_NAME = "libnvidia-ml.so.1"
STATE_ENV = "FLUXGYMD_FAKE_NVML_STATE"
CALL_LOG_ENV = "FLUXGYMD_FAKE_NVML_CALL_LOG"


class FakeNvmlBuildError(RuntimeError):
    """gcc failed or is missing; the message carries gcc's diagnostics."""


def build_fake_nvml(out_dir: Path = DEFAULT_BUILD_DIR, defines: Iterable[str] = ()) -> Path:
    """Compiles fake_nvml.c into ``out_dir/libnvidia-ml.so.1`` unless that is newer than the
    source; ``defines`` (e.g. ``["NO_PROCESS_UTIL"]``) become ``-D`` flags, so give each
    variant its own ``out_dir``. Returns the library path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / LIBRARY_NAME
    if lib.exists() and lib.stat().st_mtime_ns >= SOURCE.stat().st_mtime_ns:
        return lib
    # Compile to a private name and rename: parallel builders never load a half-written .so.
    fd, tmp_name = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)
    os.close(fd)
    argv = ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Wextra",
            f"-Wl,-soname,{LIBRARY_NAME}",
            *(f"-D{d}" for d in defines),
            "-o", tmp_name, str(SOURCE)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        os.unlink(tmp_name)
        raise FakeNvmlBuildError(f"gcc not found: cannot build {lib}") from exc
    if proc.returncode != 0:
        os.unlink(tmp_name)
        raise FakeNvmlBuildError(f"gcc failed building {lib}: {proc.stderr.strip()}")
    os.replace(tmp_name, lib)
    return lib


@dataclass(frozen=True)
class FakeDevice:
    index: int
    uuid: str
    name: str = "NVIDIA Fake A100"
    util_percent: int = 0
    mem_total_bytes: int = 80 * 1024**3
    mem_used_bytes: int = 0

    def line(self) -> str:
        return (f"device {self.index} {self.uuid} {self.util_percent} "
                f"{self.mem_total_bytes} {self.mem_used_bytes} {self.name}")


def default_uuid(index: int) -> str:
    """A UUID shaped like NVML's ("GPU-" + 8-4-4-4-12 hex digits)."""
    return f"GPU-fa4e{index:04x}-0000-4000-8000-{index:012x}"


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class FakeNvml:
    """The state of the stand-in GPUs, kept in ``state_path`` (+ ``state_path.d/``).

    Devices and faults live in the main file; processes in one file per PID under the
    ``.d`` directory, the same place the stand-in trainer writes its own.
    """

    def __init__(self, state_path: Path, library: Path) -> None:
        self.state_path = Path(state_path)
        self.library = Path(library)
        self.procs_dir = Path(f"{self.state_path}.d")
        self.procs_dir.mkdir(parents=True, exist_ok=True)
        self.call_log = self.state_path.with_name(self.state_path.name + ".calls")
        self.devices: dict[int, FakeDevice] = {}
        self.faults: list[str] = []
        self.write()

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a process that should load the stand-in through pynvml."""
        env = dict(os.environ if base is None else base)
        env["LD_LIBRARY_PATH"] = str(self.library.parent)
        env[STATE_ENV] = str(self.state_path)
        env[CALL_LOG_ENV] = str(self.call_log)
        return env

    def set_device(self, index: int, **fields: object) -> FakeDevice:
        """Adds or changes device ``index``; ``fields`` are FakeDevice fields."""
        base = self.devices.get(index) or FakeDevice(index=index, uuid=default_uuid(index))
        dev = replace(base, **fields)  # type: ignore[arg-type]
        self.devices[index] = dev
        self.write()
        return dev

    def add_fault(self, fault: str) -> None:
        """``fault`` is the text after ``fault``, e.g. ``"gpu_lost 0"`` or
        ``"block nvmlDeviceGetUtilizationRates"``."""
        self.faults.append(fault)
        self.write()

    def clear_faults(self) -> None:
        self.faults.clear()
        self.write()

    def set_proc(self, pid: int, device_index: int, sm_util_percent: int,
                 used_mem_bytes: int = 1 << 30) -> None:
        _write_atomic(self.procs_dir / str(pid),
                      f"proc {pid} {device_index} {sm_util_percent} {used_mem_bytes}\n")

    def remove_proc(self, pid: int) -> None:
        try:
            (self.procs_dir / str(pid)).unlink()
        except FileNotFoundError:
            pass

    def calls(self) -> list[str]:
        """NVML entry points called so far, in order (from the library's call log)."""
        try:
            return self.call_log.read_text().split()
        except FileNotFoundError:
            return []

    def write(self) -> None:
        lines = ["# fluxgymd fake NVML state"]
        lines += [d.line() for _, d in sorted(self.devices.items())]
        lines += [f"fault {f}" for f in self.faults]
        _write_atomic(self.state_path, "\n".join(lines) + "\n")
