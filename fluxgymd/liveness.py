"""When to ping the systemd watchdog (SPEC section 6). Pure: samples and times in, verdict out.

The run is alive when
  (a) it is starting up (no step yet this attempt, within startup_timeout) and its process
      tree uses CPU, IO or GPU: model loading and latent caching are silent but busy; or
  (b) its own GPU work is busy or a step advanced since the last sample, AND the last step
      advance is younger than progress_timeout: a spin deadlock (100% GPU, no steps) is
      caught after progress_timeout, an idle deadlock after stall_timeout.
GPU readings that are unknown (no NVML, hung or lost GPU) simply do not count: liveness
then runs on progress alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Verdict(Enum):
    ALIVE_STARTUP = "starting up"
    ALIVE_STEPPING = "steps advancing"
    ALIVE_GPU = "GPU busy"
    IDLE = "no sign of life"
    STARTUP_EXPIRED = "no first step within startup_timeout"
    NO_PROGRESS = "no step progress within progress_timeout"

    @property
    def alive(self) -> bool:
        return self in (Verdict.ALIVE_STARTUP, Verdict.ALIVE_STEPPING, Verdict.ALIVE_GPU)


@dataclass(frozen=True)
class Sample:
    now_s: float  # monotonic
    attempt_start_s: float
    last_step_advance_s: float | None  # when the step counter last moved this attempt
    step_advanced: bool  # since the previous sample
    cpu_busy: bool  # tree used CPU since the previous sample
    io_busy: bool  # tree read or wrote since the previous sample
    gpu_busy: bool | None  # own GPU work busy; None = unknown


@dataclass(frozen=True)
class Limits:
    startup_timeout_s: float
    progress_timeout_s: float


def decide(s: Sample, limits: Limits) -> Verdict:
    if s.last_step_advance_s is None:
        if s.now_s - s.attempt_start_s >= limits.startup_timeout_s:
            return Verdict.STARTUP_EXPIRED
        if s.cpu_busy or s.io_busy or s.gpu_busy:
            return Verdict.ALIVE_STARTUP
        return Verdict.IDLE
    if s.now_s - s.last_step_advance_s >= limits.progress_timeout_s:
        return Verdict.NO_PROGRESS
    if s.step_advanced:
        return Verdict.ALIVE_STEPPING
    if s.gpu_busy:
        return Verdict.ALIVE_GPU
    return Verdict.IDLE


@dataclass(frozen=True)
class StallClock:
    """Tracks how long the run has gone without life, to write forensics before systemd fires."""

    last_alive_s: float
    forensics_taken: bool = False

    def after(self, now_s: float, verdict: Verdict) -> "StallClock":
        if verdict.alive:
            return StallClock(last_alive_s=now_s, forensics_taken=False)
        return self

    def forensics_due(self, now_s: float, stall_timeout_s: float, poll_interval_s: float) -> bool:
        """True once per stall, at ~80% of the window (earlier if the next poll would be too late)."""
        if self.forensics_taken:
            return False
        dead_s = now_s - self.last_alive_s
        threshold = min(0.8 * stall_timeout_s, stall_timeout_s - poll_interval_s * 1.5)
        return dead_s >= max(threshold, poll_interval_s)
