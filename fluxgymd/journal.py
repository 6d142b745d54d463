"""The wrapper's own messages: one line each, with a journald priority prefix under systemd.

journald reads `<N>` at the start of a stream line as its priority (SyslogLevelPrefix=yes,
the default); on a terminal the prefix would be noise, so it is only added when stderr is
the journal stream systemd gave us (JOURNAL_STREAM names its device and inode).
"""
from __future__ import annotations

import os
import sys
from enum import IntEnum
from typing import Protocol


class Priority(IntEnum):
    ERR = 3
    WARNING = 4
    NOTICE = 5
    INFO = 6


def stream_is_journal(fd: int) -> bool:
    """FD is the journald stream systemd gave us (JOURNAL_STREAM names its device:inode)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return st.st_dev == dev and st.st_ino == ino


_JOURNAL = stream_is_journal(sys.stderr.fileno())


class _Sink(Protocol):
    def write_marker(self, text: str, priority: int | None = None) -> None: ...


# While an attempt runs, the wrapper's own lines go through the log sink: in order with the
# trainer's output, into training.log too, and never blocking on a frozen journal.
_sink: _Sink | None = None


def attach_sink(sink: _Sink | None) -> None:
    global _sink
    _sink = sink


def log(priority: Priority, message: str) -> None:
    text = " ".join(message.splitlines()) or "-"
    if _sink is not None:
        _sink.write_marker(f"fluxgymd: {text}", int(priority))
        return
    prefix = f"<{int(priority)}>" if _JOURNAL else ""
    try:
        os.write(sys.stderr.fileno(), f"{prefix}fluxgymd: {text}\n".encode("utf-8", "replace"))
    except OSError:
        pass  # a dead journal must not take the wrapper down with it


def err(message: str) -> None:
    log(Priority.ERR, message)


def warning(message: str) -> None:
    log(Priority.WARNING, message)


def info(message: str) -> None:
    log(Priority.INFO, message)


def wait_consumed(timeout_s: float = 30.0) -> None:
    """Before the wrapper exits, let journald read what is still queued in its stream socket.

    journald attributes a line to the unit by looking up the sending process; lines it reads
    after the process is gone miss `_SYSTEMD_UNIT` and vanish from `journalctl -u`. SIOCOUTQ
    tells how much of our stream journald has not read yet. Not a socket (a terminal, a
    file): nothing to wait for.
    """
    import fcntl
    import struct
    import termios
    import time

    deadline = time.monotonic() + timeout_s
    for fd in (1, 2):
        while True:
            try:
                raw = fcntl.ioctl(fd, termios.TIOCOUTQ, struct.pack("i", 0))  # = SIOCOUTQ
            except OSError:
                break
            if struct.unpack("i", raw)[0] == 0 or time.monotonic() >= deadline:
                break
            time.sleep(0.02)  # journald is reading; nothing to be notified of
