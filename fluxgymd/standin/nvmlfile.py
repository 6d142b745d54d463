"""A fake per-process NVML reading, for supervisors tested without a GPU.

``DIR/<pid>`` holds one line ``proc <pid> <gpu_index> <sm_util_percent> <used_mem_bytes>``,
replaced atomically whenever the reading changes and removed when the process exits (a
SIGKILLed process leaves it behind: readers must check that the pid is alive).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType

from fluxgymd.standin.fsio import atomic_write_text

UTIL_STEPPING_PERCENT = 97
UTIL_IDLE_PERCENT = 0
UTIL_SPIN_PERCENT = 100
USED_MEM_BYTES = 700 * 1024 * 1024


class NvmlFile:
    def __init__(self, directory: Path | None, gpu_index: int) -> None:
        self._dir = directory
        self._gpu_index = gpu_index
        self._pid = os.getpid()
        self._util: int | None = None
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            _install_sigterm_cleanup(self)

    @property
    def path(self) -> Path | None:
        return None if self._dir is None else self._dir / str(self._pid)

    def set_util(self, util_percent: int) -> None:
        path = self.path
        if path is None or util_percent == self._util:
            return
        self._util = util_percent
        atomic_write_text(path, f"proc {self._pid} {self._gpu_index} {util_percent} {USED_MEM_BYTES}\n")

    def remove(self) -> None:
        path = self.path
        if path is None:
            return
        self._util = None
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _install_sigterm_cleanup(nvml: NvmlFile) -> None:
    """Remove the reading on SIGTERM, then die of SIGTERM as kohya would (no Python cleanup)."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        nvml.remove()
        sys.stdout.flush()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
