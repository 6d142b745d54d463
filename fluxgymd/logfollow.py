"""Reading training.log for ``fluxgym logs [-f] [-n N] [--journal] NAME`` (SPEC 7, 10).

    tail_lines(path, n) -> list[str]
        The last n lines, reaching into the newest rotated file (training.log.1 or .1.gz)
        when the current one holds fewer.  A missing log gives [].
    follow(path, *, from_lines=10, stop=lambda: False, poll_s=0.2) -> Iterator[str]
        ``tail -F``: the last ``from_lines`` lines, then every line as it is appended,
        across attempts (appends), rotation (rename + new file: the old file is read to its
        end before switching), truncation (start again at 0) and a file that does not exist
        yet.  Every line once, without its line end.  ``stop()`` is asked whenever the reader
        has caught up; when it returns True the generator ends (after yielding a final
        unterminated line, if any).
    journalctl_argv(unit, *, lines, follow) -> list[str]
        The argv for ``--journal`` (the caller passes the already escaped unit name).

Works without systemd: only the file is read.  Limit (shared with ``tail -F``): a
truncation followed, before the next poll, by more bytes than were there before looks like
an append; training.log is never truncated by fluxgymd itself (it rotates by renaming).
"""
from __future__ import annotations

import gzip
import os
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["tail_lines", "follow", "journalctl_argv"]

_BLOCK = 64 * 1024


def _decode(raw: bytes) -> str:
    return raw.rstrip(b"\r").decode("utf-8", "replace")


def _tail_offset(fd: int, size: int, n: int) -> int:
    """Offset where the last ``n`` lines of the first ``size`` bytes of ``fd`` start."""
    if n <= 0 or size == 0:
        return size
    hi = size - 1 if os.pread(fd, 1, size - 1) == b"\n" else size
    count = 0
    while hi > 0:
        lo = max(0, hi - _BLOCK)
        block = os.pread(fd, hi - lo, lo)
        j = len(block)
        while (j := block.rfind(b"\n", 0, j)) != -1:
            count += 1
            if count == n:
                return lo + j + 1
        hi = lo
    return 0


def _split_lines(data: bytes) -> list[str]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [_decode(line) for line in lines]


def _last_lines_of_rotated(path: Path, n: int) -> list[str]:
    plain = path.with_name(path.name + ".1")
    packed = path.with_name(path.name + ".1.gz")
    ring: deque[bytes] = deque(maxlen=n)
    try:
        if plain.is_file():
            with open(plain, "rb") as stream:
                ring.extend(stream)
        elif packed.is_file():
            with gzip.open(packed, "rb") as stream:
                ring.extend(stream)
    except (OSError, EOFError):
        return []  # a half-written rotation: skip rather than fail `fluxgym logs`
    return [_decode(line.rstrip(b"\n")) for line in ring]


def tail_lines(path: Path | str, n: int) -> list[str]:
    """The last ``n`` lines of the log (see module docstring)."""
    path = Path(path)
    if n <= 0:
        return []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        lines: list[str] = []
    else:
        try:
            size = os.fstat(fd).st_size
            start = _tail_offset(fd, size, n)
            lines = _split_lines(os.pread(fd, size - start, start))
        finally:
            os.close(fd)
    if len(lines) < n:
        lines = _last_lines_of_rotated(path, n - len(lines)) + lines
    return lines


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def follow(
    path: Path | str,
    *,
    from_lines: int = 10,
    stop: Callable[[], bool] = lambda: False,
    poll_s: float = 0.2,
) -> Iterator[str]:
    """Yield the log's last ``from_lines`` lines, then follow it like ``tail -F``."""
    path = Path(path)
    fd: int | None = None
    pos = 0
    pending = b""

    def take(data: bytes) -> list[str]:
        nonlocal pending
        data = pending + data
        cut = data.rfind(b"\n") + 1
        pending = data[cut:]
        return _split_lines(data[:cut])

    def open_current() -> int | None:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None

    def drain(fd_: int) -> Iterator[str]:
        nonlocal pos
        while data := os.pread(fd_, _BLOCK, pos):
            pos += len(data)
            yield from take(data)

    fd = open_current()
    if fd is not None:
        size = os.fstat(fd).st_size
        pos = _tail_offset(fd, size, from_lines)
    try:
        while True:
            if fd is not None:
                data = os.pread(fd, _BLOCK, pos)
                if data:
                    pos += len(data)
                    yield from take(data)
                    continue
            try:
                current = _identity(os.stat(path))
            except FileNotFoundError:
                current = None  # between a rotation's rename and the new file: keep the old fd
            if fd is None:
                if current is not None:
                    fd, pos = open_current(), 0
                    continue
            elif current is not None and current != _identity(os.fstat(fd)):
                # Rotated: whatever reached the old file before the rename comes first.
                yield from drain(fd)
                if pending:
                    yield _decode(pending)
                    pending = b""
                os.close(fd)
                fd, pos = open_current(), 0
                continue
            elif os.fstat(fd).st_size < pos:
                if pending:
                    yield _decode(pending)
                    pending = b""
                pos = 0  # truncated in place
                continue
            if stop():
                if pending:
                    yield _decode(pending)
                return
            time.sleep(poll_s)  # polling interval of the follower, like tail -F
    finally:
        if fd is not None:
            os.close(fd)


def journalctl_argv(unit: str, *, lines: int, follow: bool) -> list[str]:
    """``journalctl`` for ``fluxgym logs --journal`` (``unit`` already systemd-escaped)."""
    argv = ["journalctl", "--unit", unit, "--lines", str(lines), "--no-pager"]
    if follow:
        argv.append("--follow")
    return argv
