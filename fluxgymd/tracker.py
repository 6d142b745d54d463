"""Thread-safe holder of the current attempt's progress, fed line by line from the log sink."""
from __future__ import annotations

import threading
import time

from .progress import Progress, parse_line


class ProgressTracker:
    def __init__(self, offset_steps: int = 0, clock=time.monotonic) -> None:
        self._lock = threading.Lock()
        self._p = Progress(attempt_offset_steps=offset_steps)
        self._clock = clock
        self._last_advance_s: float | None = None
        self._last_advance_wall: float | None = None
        self._advances = 0  # monotonically increasing count of step advances

    def feed(self, line: str, is_frame: bool = False) -> None:
        """Called from the sink's reader thread for every line and tqdm frame: keep it cheap."""
        with self._lock:
            before = self._p.bar_n
            self._p = parse_line(self._p, line)
            after = self._p.bar_n
            if after is not None and after > (before or 0):
                self._last_advance_s = self._clock()
                self._last_advance_wall = time.time()
                self._advances += 1

    def snapshot(self) -> tuple[Progress, float | None, float | None, int]:
        """(progress, last advance monotonic s, last advance wall-clock s, advance counter)."""
        with self._lock:
            return self._p, self._last_advance_s, self._last_advance_wall, self._advances
