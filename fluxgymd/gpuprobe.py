"""Adapter from the NVML choke point (gpu.py) to what liveness needs: is OUR work busy?"""
from __future__ import annotations

from . import journal
from .gpu import GpuMonitor, GpuSample, NvmlStatus, describe

# statuses worth an err line: the GPU or NVML broke (a plain machine without NVML is not news)
_PROBLEMS = {NvmlStatus.GPU_LOST, NvmlStatus.TIMED_OUT, NvmlStatus.NO_DRIVER, NvmlStatus.ERROR}


class GpuProbe:
    def __init__(self, gpus: tuple[str, ...] | None, busy_percent: int, trainer_env: dict[str, str]) -> None:
        # no explicit selection: the GPUs the TRAINER sees (its CUDA_VISIBLE_DEVICES), not ours
        self._monitor = GpuMonitor(gpus, environ=trainer_env)
        self._busy_percent = busy_percent
        self._last: GpuSample | None = None
        # the problem as first seen: its detail may tick ("hung for 2s", "3s"...) and the
        # runner logs an err line whenever the problem text changes
        self._problem: tuple[NvmlStatus, str] | None = None
        self._said_no_nvml = False

    def __call__(self, pids: tuple[int, ...]) -> tuple[bool | None, int | None, str | None, str | None]:
        s = self._monitor.sample(pids)
        self._last = s
        # per-process samples of our own PIDs are the truth; device level only when NVML
        # cannot attribute work to processes (unsupported, or our PIDs invisible to it)
        percent = s.own_sm_percent if s.own_sm_percent is not None else s.device_busy_percent
        busy = None if percent is None else percent >= self._busy_percent
        text = None if s.status is NvmlStatus.NO_LIBRARY else describe(s)
        if s.status is NvmlStatus.NO_LIBRARY and not self._said_no_nvml:
            # a CPU box is not a fault, but the operator should know why there is no GPU %
            self._said_no_nvml = True
            journal.info(f"no GPU readings ({s.detail or 'NVML not available'}); "
                         "liveness runs on training progress and CPU/IO")
        return busy, percent, text, self._problem_text(s)

    def _problem_text(self, s: GpuSample) -> str | None:
        if s.status not in _PROBLEMS:
            self._problem = None
            return None
        if self._problem is None or self._problem[0] is not s.status:
            short = describe(s)
            self._problem = (s.status, f"{short}: {s.detail}" if s.detail and s.detail != short else short)
        return self._problem[1]

    def last_detail(self) -> str:
        if self._last is None:
            return "no GPU sample taken"
        return f"{describe(self._last)}\n{self._last!r}"

    def close(self) -> None:
        self._monitor.close()
