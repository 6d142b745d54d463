"""Small file helpers: atomic replace for files others read mid-write, durable appends."""
from __future__ import annotations

import os
from pathlib import Path

from fluxgymd.atomic import write_atomic


def atomic_write_text(path: Path, text: str) -> None:
    """Readers never see half a file (the temp name starts with "." so the stand-in NVML skips it)."""
    write_atomic(path, text.encode("utf-8"))


def append_line_durably(path: Path, line: str) -> None:
    """Append one line and fsync, so a SIGKILL right after still leaves it on disk."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
