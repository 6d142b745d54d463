"""One attempt: launch the trainer, watch it, ping systemd while it lives, end it cleanly.

Signal handlers only record what happened (and wake the loop through a pipe); the loop in
`Supervisor.run` does all the acting. The trainer runs in its own session and process
group with NOTIFY_SOCKET and WATCHDOG_* removed, so only the wrapper talks to systemd.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Protocol

from . import journal, proctree
from .liveness import Limits, Sample, StallClock, Verdict, decide
from .tracker import ProgressTracker

STRIPPED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM",
                "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
# CPU seconds per second of wall time below which the tree counts as idle (a sleeping
# Python process with a few threads still burns a little)
CPU_BUSY_FRACTION = 0.05


class Outcome(Enum):
    EXITED = "exited"  # the trainer ended by itself (returncode tells how)
    STALLED = "stalled"  # systemd's watchdog signal arrived
    STOPPED = "stopped"  # SIGTERM/SIGINT: systemctl stop


@dataclass(frozen=True)
class AttemptEnd:
    outcome: Outcome
    returncode: int | None
    verdict: Verdict | None  # the last liveness verdict (why it stalled)


class Notifier(Protocol):
    def notify(self, state: str) -> None: ...


@dataclass(frozen=True)
class PollReport:
    """What the loop saw at one poll, for status.json and STATUS=."""

    verdict: Verdict
    gpu_text: str | None
    gpu_percent: int | None
    gpu_problem: str | None  # NVML trouble to surface, e.g. "GPU 0 lost"


class GpuProbeFn(Protocol):
    def __call__(self, pids: tuple[int, ...]) -> tuple[bool | None, int | None, str | None, str | None]:
        """(own GPU busy or None if unknown, GPU %, short text, problem text or None)."""


class Supervisor:
    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        workdir: Path,
        *,
        limits: Limits,
        stall_timeout_s: float,
        poll_interval_s: float,
        kill_grace_s: float,
        notifier: Notifier,
        gpu_probe: GpuProbeFn,
        tracker: ProgressTracker,
        attach_output: Callable[[int], None],
        on_poll: Callable[[PollReport], None],
        on_forensics: Callable[[int, Verdict, PollReport], None],
        on_started: Callable[[int], None],
    ) -> None:
        self.argv = argv
        self.env = env
        self.workdir = workdir
        self.limits = limits
        self.stall_timeout_s = stall_timeout_s
        self.poll_interval_s = poll_interval_s
        self.kill_grace_s = kill_grace_s
        self.notifier = notifier
        self.gpu_probe = gpu_probe
        self.tracker = tracker
        self.attach_output = attach_output
        self.on_poll = on_poll
        self.on_forensics = on_forensics
        self.on_started = on_started
        self._signals: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None

    # --- signals: record only ------------------------------------------------------------
    def _record(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def _install_signals(self) -> tuple[int, int]:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGABRT):
            signal.signal(sig, self._record)
        return r, w

    # --- the attempt ---------------------------------------------------------------------
    def launch(self) -> subprocess.Popen[bytes]:
        out_r, out_w = os.pipe()
        widen_pipe(out_w)
        try:
            proc = subprocess.Popen(
                self.argv,
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=out_w,  # one pipe keeps stdout and stderr in the order they were written
                start_new_session=True,  # own process group: one killpg reaches it all
                close_fds=True,
            )
        finally:
            os.close(out_w)
        self.attach_output(out_r)
        return proc

    def run(self) -> AttemptEnd:
        wake_r, wake_w = self._install_signals()
        proctree.set_child_subreaper()
        self.proc = proc = self.launch()
        pgid = proc.pid  # start_new_session: the child leads its own group
        self.notifier.notify(f"READY=1\nMAINPID={os.getpid()}")
        self.on_started(proc.pid)
        try:
            pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            pidfd = None

        start_s = time.monotonic()
        clock = StallClock(last_alive_s=start_s)
        prev_usage = proctree.sample_usage(proc.pid)
        prev_advances = 0
        prev_t = start_s
        verdict: Verdict | None = None
        next_poll_s = start_s  # poll at once: the first ping goes out right after READY
        try:
            while True:
                timeout_s = max(0.0, next_poll_s - time.monotonic())
                fds = [wake_r] + ([pidfd] if pidfd is not None else [])
                try:
                    select.select(fds, [], [], timeout_s if pidfd is not None else min(timeout_s, 0.5))
                except InterruptedError:
                    pass
                try:
                    while os.read(wake_r, 512):
                        pass
                except (BlockingIOError, OSError):
                    pass

                for sig in self._drain_signals():
                    if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                        journal.info(f"stop requested ({signal.Signals(sig).name}): stopping the trainer")
                        self.notifier.notify("STOPPING=1")
                        proctree.kill_tree(proc.pid, pgid, self.kill_grace_s)
                        proc.wait()
                        return AttemptEnd(Outcome.STOPPED, proc.returncode, verdict)
                    if sig in (signal.SIGUSR1, signal.SIGABRT):
                        # systemd's WatchdogSignal: it gave up on us
                        proctree.kill_tree(proc.pid, pgid, min(self.kill_grace_s, 5.0))
                        proc.wait()
                        return AttemptEnd(Outcome.STALLED, proc.returncode, verdict)

                if proc.poll() is not None:
                    # the group may hold stragglers (DataLoader workers): they go with it
                    proctree.kill_tree(proc.pid, pgid, self.kill_grace_s)
                    return AttemptEnd(Outcome.EXITED, proc.returncode, verdict)

                now = time.monotonic()
                if now < next_poll_s:
                    continue
                next_poll_s = now + self.poll_interval_s

                usage = proctree.sample_usage(proc.pid)
                dt = max(now - prev_t, 1e-3)
                cpu_busy = (usage.cpu_s - prev_usage.cpu_s) / dt >= CPU_BUSY_FRACTION
                io_busy = usage.io_bytes > prev_usage.io_bytes + 4096
                prev_usage, prev_t = usage, now
                gpu_busy, gpu_percent, gpu_text, gpu_problem = self.gpu_probe(usage.pids)
                _, last_adv_s, _, advances = self.tracker.snapshot()
                verdict = decide(
                    Sample(
                        now_s=now,
                        attempt_start_s=start_s,
                        last_step_advance_s=last_adv_s,
                        step_advanced=advances > prev_advances,
                        cpu_busy=cpu_busy,
                        io_busy=io_busy,
                        gpu_busy=gpu_busy,
                    ),
                    self.limits,
                )
                prev_advances = advances
                if verdict.alive:
                    self.notifier.notify("WATCHDOG=1")
                    if clock.forensics_taken:
                        journal.info(f"the run shows life again ({verdict.value}): nothing was killed")
                clock = clock.after(now, verdict)
                report = PollReport(verdict, gpu_text, gpu_percent, gpu_problem)
                self.on_poll(report)
                if clock.forensics_due(now, self.stall_timeout_s, self.poll_interval_s):
                    clock = StallClock(last_alive_s=clock.last_alive_s, forensics_taken=True)
                    self.on_forensics(proc.pid, verdict, report)
        finally:
            signal.set_wakeup_fd(-1)
            for fd in (wake_r, wake_w) + ((pidfd,) if pidfd is not None else ()):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _drain_signals(self) -> list[int]:
        got, self._signals = self._signals, []
        return got


PIPE_BYTES = 1 << 20


def widen_pipe(fd: int) -> None:
    """A 1 MiB pipe (the unprivileged maximum) instead of 64 KiB: the trainer's bursts fit
    without blocking it, and the reader wakes far less often."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except OSError:
        pass  # an older kernel or a lower pipe-max-size: the default pipe still works


def trainer_env(
    base: dict[str, str], extra: dict[str, str], hook_dir: Path | None, path_prefix: list[str]
) -> dict[str, str]:
    """The trainer's environment: ours minus systemd's notify/watchdog plumbing, plus run.toml's."""
    env = {k: v for k, v in base.items() if k not in STRIPPED_ENV}
    env.setdefault("COLUMNS", "250")  # wide enough that Rich does not wrap kohya's log lines
    env["PYTHONUNBUFFERED"] = "1"  # progress must reach us when printed, not when a buffer fills
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA's GPU numbers = NVML's indices
    if path_prefix:
        env["PATH"] = os.pathsep.join(path_prefix + [env.get("PATH", os.defpath)])
    env.update(extra)
    if hook_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(hook_dir)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env
