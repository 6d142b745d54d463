"""The two deadlocks. Their function names show up in faulthandler stack dumps on purpose."""
from __future__ import annotations

import threading
from typing import NoReturn


def standin_hang_idle() -> NoReturn:
    """Block forever using no CPU, like a process stuck waiting on a dead peer."""
    never = threading.Event()
    while True:
        never.wait(3600.0)


def standin_hang_spin() -> NoReturn:
    """Spin one core at 100% forever making no progress, like an NCCL busy-wait."""
    n = 0
    while True:
        n = (n * 1103515245 + 12345) & 0xFFFFFFFF
