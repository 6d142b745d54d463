"""The step record: one durable JSON line per trained optimizer step, for tests to count."""
from __future__ import annotations

import json
import os
from pathlib import Path

from fluxgymd.standin.fsio import append_line_durably


class StepRecorder:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._pid = os.getpid()
        path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, epoch: int, batch: int, abs_step: int) -> None:
        """``epoch`` absolute 1-based, ``batch`` 0-based index within the epoch."""
        line = json.dumps({"attempt_pid": self._pid, "epoch": epoch, "batch": batch, "abs_step": abs_step})
        append_line_durably(self._path, line)


def read_step_record(path: Path) -> list[dict[str, int]]:
    """All records in order; a missing file means no step was trained."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
