"""fluxgymd.logfollow: tail and tail -F over real files written by the real LogSink."""
from __future__ import annotations

import gzip
import os
import threading
import time
from pathlib import Path
from typing import Callable

from fluxgymd.logfollow import follow, journalctl_argv, tail_lines
from fluxgymd.logsink import LogSink

DEADLINE_S = 60.0


def wait_for(cond: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Follower:
    """Runs follow() in a thread and collects what it yields."""

    def __init__(self, path: Path, from_lines: int = 10) -> None:
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(path, from_lines), daemon=True
        )
        self._thread.start()

    def _run(self, path: Path, from_lines: int) -> None:
        for line in follow(path, from_lines=from_lines, stop=self._stop.is_set, poll_s=0.02):
            self.lines.append(line)

    def wait_count(self, n: int) -> None:
        wait_for(lambda: len(self.lines) >= n, f"{n} followed lines (have {len(self.lines)})")

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(DEADLINE_S)
        assert not self._thread.is_alive()
        return self.lines


def test_tail_lines(tmp_path: Path) -> None:
    log = tmp_path / "training.log"
    assert tail_lines(log, 5) == []  # no log yet
    log.write_bytes(b"".join(b"line %d\n" % i for i in range(100_000)))
    assert tail_lines(log, 3) == ["line 99997", "line 99998", "line 99999"]
    assert tail_lines(log, 0) == []
    log.write_bytes(b"a\nb\nno newline \xff")
    assert tail_lines(log, 2) == ["b", "no newline \ufffd"]
    assert tail_lines(log, 10) == ["a", "b", "no newline \ufffd"]


def test_tail_lines_reaches_into_the_rotated_file(tmp_path: Path) -> None:
    log = tmp_path / "training.log"
    (tmp_path / "training.log.1.gz").write_bytes(gzip.compress(b"old 1\nold 2\nold 3\n"))
    log.write_bytes(b"new 1\n")
    assert tail_lines(log, 3) == ["old 2", "old 3", "new 1"]
    (tmp_path / "training.log.1").write_bytes(b"plain 1\n")  # rotation not compressed yet
    assert tail_lines(log, 2) == ["plain 1", "new 1"]


def test_follow_waits_for_the_file_and_survives_rotation(tmp_path: Path) -> None:
    log = tmp_path / "training.log"
    follower = Follower(log)  # the file does not exist yet
    journal_r, journal_w = os.pipe()
    drain = threading.Thread(target=lambda: [None for _ in iter(lambda: os.read(journal_r, 65536), b"")])
    drain.start()
    expected: list[str] = []
    # rotate_bytes small, so every batch of lines crosses one rotation; the follower is at
    # the end of the old file when the batch lands, as `fluxgym logs -f` normally is.
    sink = LogSink(log, journal_fd=journal_w, rotate_bytes=20_000, keep=100)
    for batch in range(12):
        for i in range(1000):
            text = f"batch {batch} line {i:04d}"
            sink.write_marker(text)
            expected.append(text)
        follower.wait_count(len(expected))
    sink.close()
    os.close(journal_w)
    drain.join()
    got = follower.stop()
    assert sink.stats().rotations >= 10
    assert got == expected  # every line once, in order, none from before a rotation lost


def test_follow_starts_with_the_last_lines_and_handles_truncation(tmp_path: Path) -> None:
    log = tmp_path / "training.log"
    log.write_bytes(b"".join(b"old %d\n" % i for i in range(50)))
    follower = Follower(log, from_lines=3)
    follower.wait_count(3)
    with open(log, "ab") as out:
        out.write(b"".join(b"more %d\n" % i for i in range(200)))
    follower.wait_count(203)
    # Truncate in place; what comes next is shorter than before, so the follower sees the
    # file shrink (as tail -F does) and starts again at 0.
    with open(log, "wb") as out:
        out.write(b"after truncate 0\n")
    follower.wait_count(204)
    with open(log, "ab") as out:
        out.write(b"".join(b"after truncate %d\n" % i for i in range(1, 500)))
        out.write(b"partial")
    follower.wait_count(703)
    got = follower.stop()
    assert got == (
        ["old 47", "old 48", "old 49"]
        + [f"more {i}" for i in range(200)]
        + [f"after truncate {i}" for i in range(500)]
        + ["partial"]  # an unterminated last line is given when following stops
    )


def test_follow_from_zero_lines_and_appends_across_attempts(tmp_path: Path) -> None:
    log = tmp_path / "training.log"
    log.write_bytes(b"attempt 1 line\n")
    follower = Follower(log, from_lines=0)
    for attempt in (2, 3):  # each `fluxgymd run` opens its own sink on the same file
        journal_r, journal_w = os.pipe()
        sink = LogSink(log, journal_fd=journal_w)
        sink.write_marker(f"==== attempt {attempt} ====")
        sink.write_marker(f"attempt {attempt} line")
        sink.close()
        os.close(journal_w)
        os.close(journal_r)
    follower.wait_count(4)
    assert follower.stop() == [
        "==== attempt 2 ====", "attempt 2 line", "==== attempt 3 ====", "attempt 3 line"]


def test_journalctl_argv() -> None:
    assert journalctl_argv("fluxgym-train@cat.service", lines=20, follow=True) == [
        "journalctl", "--unit", "fluxgym-train@cat.service", "--lines", "20", "--no-pager",
        "--follow",
    ]
