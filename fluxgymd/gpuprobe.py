"""Adapter from the NVML choke point (gpu.py) to what liveness needs: is OUR work busy?"""
from __future__ import annotations

from .gpu import GpuMonitor, GpuSample, NvmlStatus, describe

# statuses worth an err line: the GPU or NVML broke (a plain machine without NVML is not news)
_PROBLEMS = {NvmlStatus.GPU_LOST, NvmlStatus.TIMED_OUT, NvmlStatus.NO_DRIVER, NvmlStatus.ERROR}


class GpuProbe:
    def __init__(self, gpus: tuple[str, ...] | None, busy_percent: int, trainer_env: dict[str, str]) -> None:
        # no explicit selection: the GPUs the TRAINER sees (its CUDA_VISIBLE_DEVICES), not ours
        self._monitor = GpuMonitor(gpus, environ=trainer_env)
        self._busy_percent = busy_percent
        self._last: GpuSample | None = None

    def __call__(self, pids: tuple[int, ...]) -> tuple[bool | None, int | None, str | None, str | None]:
        s = self._monitor.sample(pids)
        self._last = s
        # per-process samples of our own PIDs are the truth; device level only when NVML
        # cannot attribute work to processes (unsupported, or our PIDs invisible to it)
        percent = s.own_sm_percent if s.own_sm_percent is not None else s.device_busy_percent
        busy = None if percent is None else percent >= self._busy_percent
        problem = describe(s) if s.status in _PROBLEMS else None
        text = None if s.status is NvmlStatus.NO_LIBRARY else describe(s)
        return busy, percent, text, problem

    def last_detail(self) -> str:
        if self._last is None:
            return "no GPU sample taken"
        return f"{describe(self._last)}\n{self._last!r}"

    def close(self) -> None:
        self._monitor.close()
