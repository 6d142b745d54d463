"""fluxgymd.logsink: real pipes, real child processes, real files (SPEC 7)."""
from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from fluxgymd.errors import ConfigError, ExitCode
from fluxgymd.logsink import (
    FrameCoalescer,
    LogSink,
    StreamTokenizer,
    Token,
    TokenKind,
    classify_priority,
    journal_line,
)

DEADLINE_S = 60.0


def wait_for(cond: Callable[[], bool], timeout_s: float = DEADLINE_S, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        time.sleep(0.01)


class JournalPipe:
    """Stands in for journald's stream: a pipe whose reader can be held back."""

    def __init__(self, paused: bool = False) -> None:
        self.read_fd, self.fd = os.pipe()
        self.data = bytearray()
        self._go = threading.Event()
        if not paused:
            self._go.set()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._go.wait()
        while chunk := os.read(self.read_fd, 65536):
            self.data += chunk
        os.close(self.read_fd)

    def resume(self) -> None:
        self._go.set()

    def close(self) -> bytes:
        os.close(self.fd)
        self._go.set()
        self._thread.join(DEADLINE_S)
        return bytes(self.data)


def run_child(sink: LogSink, code: str) -> subprocess.Popen[bytes]:
    """Start ``python -c code`` with stdout+stderr in one pipe drained by ``sink``."""
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=write_fd, stderr=write_fd
    )
    os.close(write_fd)
    sink.attach(read_fd)
    return proc


def strip_prefix(line: bytes) -> bytes:
    if line[:1] == b"<" and line[2:3] == b">" and line[1:2].isdigit():
        return line[3:]
    return line


def digest(lines: list[bytes]) -> str:
    return hashlib.sha256(b"\n".join(lines)).hexdigest()


FRAME = b"steps:  45%%|####5     | %d/50000 [00:01<00:02,  4.50it/s, avr_loss=0.123]"


# ----------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("line", "in_tb", "expected"),
    [
        ("epoch 1/16", False, (None, False)),
        ("Traceback (most recent call last):", False, (3, True)),
        ('  File "train.py", line 3, in <module>', True, (3, True)),
        ("    main()", True, (3, True)),
        ("RuntimeError: CUDA error: device-side assert", True, (3, False)),
        ("[rank0]: Traceback (most recent call last):", False, (3, True)),
        ("[rank0]:   File \"x.py\", line 1", True, (3, True)),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate", False, (3, False)),
        ("train.sh: line 3: 4242 Killed    python train.py", False, (3, False)),
        ("flux_train_network.py: error: unrecognized arguments: --foo", False, (3, False)),
        ("ERROR: something broke", False, (3, False)),
        ("ValueError: bad", False, (3, False)),
        ("/x/y.py:12: FutureWarning: `x` is deprecated", False, (4, False)),
        ("WARNING: low disk", False, (4, False)),
        ("  warnings.warn(", False, (4, False)),
        ("2024-08-30 10:00:00 INFO     loading model Error: not really  train.py:12", False, (None, False)),
        ("2024-08-30 10:00:00 WARNING  cache is stale      train.py:12", False, (4, False)),
        ("                    ERROR    could not save       train.py:99", False, (3, False)),
        ("                    DEBUG    detail               train.py:99", False, (7, False)),
        ("[08/30/24 10:00:00] CRITICAL oh no", False, (2, False)),
        ("steps:  45%|████▌     | 9/20 [00:01<00:02,  4.50it/s, avr_loss=0.123]", False, (None, False)),
        ("", True, (3, True)),
    ],
)
def test_classify_priority(line: str, in_tb: bool, expected: tuple[int | None, bool]) -> None:
    assert classify_priority(line, in_tb) == expected
    assert classify_priority(line.encode(), in_tb) == expected


def test_journal_line_prefix_and_escape() -> None:
    assert journal_line(b"boom\n", 3) == b"<3>boom\n"
    assert journal_line(b"<5>looks like a priority\n", None) == b"<6><5>looks like a priority\n"
    assert journal_line(b"<b>html</b>\n", None) == b"<b>html</b>\n"
    assert journal_line(b"plain\n", None) == b"plain\n"


def test_coalescer_rate_limits_and_keeps_last_frame() -> None:
    c = FrameCoalescer(interval_s=5.0)
    assert c.frame(0.0, b"f1") == [b"f1"]  # the first frame shows at once
    assert c.frame(1.0, b"f2") == []
    assert c.frame(2.0, b"f3") == []
    assert c.tick(4.9) == []
    assert c.due_s() == 5.0
    assert c.tick(5.0) == [b"f3"]  # a slow step still shows progress
    assert c.frame(6.0, b"f4") == []
    assert c.line(7.0) == []  # lines between frames do not defeat the rate limit
    assert c.held == b"f4"
    assert c.line(10.0) == [b"f4"]  # due: the held frame goes before the line, in order
    assert c.line(10.5) == []
    assert c.frame(15.1, b"f5") == [b"f5"]
    assert c.frame(15.2, b"f6") == []
    assert c.final(15.3, b"f7") == [b"f7"]  # the burst's last frame replaces the held one
    assert c.frame(15.4, b"f8") == []
    assert c.flush(15.5) == [b"f8"]  # end of stream / marker: nothing held back
    assert c.frames == 8
    assert c.coalesced == 2  # f2 and f6 never became a line


def test_coalescer_does_not_repeat_a_shown_frame() -> None:
    c = FrameCoalescer(interval_s=5.0)
    assert c.frame(0.0, b"same") == [b"same"]
    assert c.frame(1.0, b"same") == []  # a redraw of what is shown: nothing new
    assert c.held is None
    assert c.line(6.0) == []
    assert c.frame(6.5, b"other") == [b"other"]
    assert c.frame(7.0, b"other") == []
    assert c.frame(8.0, b"third") == []
    assert c.frame(9.0, b"other") == []  # held again, but it is what the log already shows
    assert c.flush(9.5) == []


def test_tokenizer_splits_lines_frames_and_glued_lines() -> None:
    t = StreamTokenizer()
    frame = FRAME % 7
    out = t.feed(b"plain\r\nloading...\r" + frame + b"\r" + frame.replace(b"7/", b"8/"))
    assert out == [
        Token(TokenKind.LINES, b"plain\nloading...\n"),
        Token(TokenKind.FRAME, frame),
    ]
    # Paused in the middle of a frame: idle() reports it once, the \r does not repeat it.
    assert t.idle() == Token(TokenKind.FRAME, frame.replace(b"7/", b"8/"))
    assert t.idle() is None
    assert t.feed(b"\rline printed over the bar\n") == [
        Token(TokenKind.LINES, b"line printed over the bar\n")
    ]
    assert t.feed(b"\r" + frame + b"epoch 2/16\n") == [
        Token(TokenKind.FRAME, frame),
        Token(TokenKind.LINES, b"epoch 2/16\n"),
    ]
    assert t.feed(b"\r" + frame + b"\n") == [Token(TokenKind.FINAL, frame)]
    assert t.feed(b"\r     \r") == []
    assert t.feed(b"no end") == []
    assert t.finish() == [Token(TokenKind.LINES, b"no end\n")]


def test_tokenizer_bounds_a_line_without_end() -> None:
    t = StreamTokenizer(max_line_bytes=1000)
    assert t.feed(b"x" * 600) == []
    assert t.feed(b"y" * 600) == [Token(TokenKind.LINES, b"x" * 600 + b"y" * 600 + b"\n")]
    assert t.pending == b""


# ----------------------------------------------------------------------------- the sink


FLOOD_CHILD = r"""
import sys
w = sys.stdout.write
pad = "x" * 40
for i in range(200_000):
    w(f"line {i} {pad}\n")
    if i % 4 == 0:
        # a tqdm frame; the next print lands right after it, as on a terminal
        w(f"\rsteps:  45%|####5     | {i // 4}/50000 [00:01<00:02,  4.50it/s, avr_loss=0.123]")
sys.stdout.flush()
print("Traceback (most recent call last):", file=sys.stderr)
print('  File "train.py", line 1, in <module>', file=sys.stderr)
print("RuntimeError: boom", file=sys.stderr, flush=True)
"""


def expected_flood() -> list[bytes]:
    pad = b"x" * 40
    lines = [b"line %d %s" % (i, pad) for i in range(200_000)]
    return lines + [
        b"Traceback (most recent call last):",
        b'  File "train.py", line 1, in <module>',
        b"RuntimeError: boom",
    ]


def test_flood_of_lines_and_frames_reaches_both_sinks_in_order(tmp_path: Path) -> None:
    journal = JournalPipe()
    frames_seen = [0]

    def on_line(text: str, is_frame: bool) -> None:
        frames_seen[0] += is_frame

    sink = LogSink(tmp_path / "training.log", journal_fd=journal.fd, journal_prefix=True,
                   on_line=on_line)
    sink.write_marker("==== attempt 1 ====")
    proc = run_child(sink, FLOOD_CHILD)
    assert proc.wait(DEADLINE_S) == 0
    assert sink.wait_drained(DEADLINE_S)
    sink.write_marker("==== attempt 1 failed: exit 1 ====", priority=3)
    sink.close()
    jdata = journal.close()

    expected = expected_flood()
    file_lines = (tmp_path / "training.log").read_bytes().split(b"\n")
    assert file_lines.pop() == b""
    assert file_lines[0] == b"==== attempt 1 ===="
    assert file_lines[-1] == b"==== attempt 1 failed: exit 1 ===="
    ordinary = [ln for ln in file_lines[1:-1] if not ln.startswith(b"steps:")]
    assert len(ordinary) == len(expected)
    assert digest(ordinary) == digest(expected)
    assert not any(b"\r" in ln or ln.startswith(b"<3>") for ln in file_lines)
    progress = [ln for ln in file_lines if ln.startswith(b"steps:")]
    assert 1 <= len(progress) < 1000  # 50,000 frames coalesced, not dropped wholesale

    jlines = jdata.split(b"\n")
    assert jlines.pop() == b""
    assert [strip_prefix(ln) for ln in jlines] == file_lines  # same lines, same order
    tb = jlines.index(b"<3>Traceback (most recent call last):")
    assert jlines[tb : tb + 3] == [
        b"<3>Traceback (most recent call last):",
        b'<3>  File "train.py", line 1, in <module>',
        b"<3>RuntimeError: boom",
    ]
    # A frame overtaken by lines stays held until due or the end: it may follow them.
    assert all(ln.startswith(b"steps:") for ln in jlines[tb + 3 : -1])
    assert jlines[-1] == b"<3>==== attempt 1 failed: exit 1 ===="
    assert sum(ln.startswith(b"<") for ln in jlines) == 4  # nothing else got a priority
    assert progress[-1] == FRAME % 49_999  # the last frame is never lost
    stats = sink.stats()
    assert stats.frames == frames_seen[0] == 50_000
    assert stats.frames_coalesced == 50_000 - stats.progress_lines
    assert stats.lines == len(expected) + 2


def test_stalled_journal_does_not_hold_up_the_trainer(tmp_path: Path) -> None:
    journal = JournalPipe(paused=True)  # nobody reads: the pipe (64 KiB) fills at once
    sink = LogSink(tmp_path / "training.log", journal_fd=journal.fd, journal_prefix=True,
                   journal_mem_bytes=128 * 1024)
    proc = run_child(
        sink,
        """
        import sys
        for i in range(100_000):
            sys.stdout.write(f"line {i} " + "y" * 60 + "\\n")
        """,
    )
    # The functional property: the child wrote ~7 MB and exited although the journal took
    # nothing beyond one pipe buffer.
    expected = b"".join(b"line %d %s\n" % (i, b"y" * 60) for i in range(100_000))
    assert proc.wait(DEADLINE_S) == 0
    wait_for(lambda: sink.stats().bytes_read == len(expected), what="sink read everything")
    wait_for(lambda: (tmp_path / "training.log").stat().st_size == len(expected),
             what="training.log complete while the journal is stalled")
    assert len(journal.data) == 0
    assert sink.stats().journal_spilled_bytes > 0  # past memory: the spill file took it
    assert not any(p.name == ".journal-spill" for p in tmp_path.iterdir())  # unlinked
    journal.resume()
    assert sink.wait_drained(DEADLINE_S)
    sink.close()
    jdata = journal.close()
    assert jdata == expected  # nothing lost, in order, after the journal resumed
    assert (tmp_path / "training.log").read_bytes() == expected
    assert sink.stats().journal_dropped_lines == 0


def test_non_utf8_long_lines_and_missing_final_newline(tmp_path: Path) -> None:
    journal = JournalPipe()
    texts: list[str] = []
    sink = LogSink(tmp_path / "training.log", journal_fd=journal.fd, journal_prefix=False,
                   on_line=lambda text, frame: texts.append(text))
    long_line = b"L" * 300_000
    proc = run_child(
        sink,
        f"""
        import sys
        out = sys.stdout.buffer
        out.write(b"caf\\xe9 \\xff\\xfe bytes\\n")
        out.write(b"L" * {len(long_line)} + b"\\n")
        out.write(b"<4>not a priority\\n")
        out.write(b"last words without newline")
        """,
    )
    assert proc.wait(DEADLINE_S) == 0
    assert sink.wait_drained(DEADLINE_S)
    sink.close()
    jdata = journal.close()
    expected = (
        b"caf\xe9 \xff\xfe bytes\n" + long_line + b"\n<4>not a priority\nlast words without newline\n"
    )
    assert (tmp_path / "training.log").read_bytes() == expected
    assert jdata == expected  # not a journal stream: no prefixes, no escapes
    assert texts[0] == "caf\ufffd \ufffd\ufffd bytes"
    assert texts[-1] == "last words without newline"
    assert sink.last_lines(2) == ["<4>not a priority", "last words without newline"]


def test_journal_escapes_lines_that_look_like_priorities(tmp_path: Path) -> None:
    journal = JournalPipe()
    sink = LogSink(tmp_path / "training.log", journal_fd=journal.fd, journal_prefix=True)
    proc = run_child(sink, "print('<4>fake'); print('ok'); print('<x> fine')")
    assert proc.wait(DEADLINE_S) == 0
    assert sink.wait_drained(DEADLINE_S)
    sink.close()
    assert journal.close() == b"<6><4>fake\nok\n<x> fine\n"
    assert (tmp_path / "training.log").read_bytes() == b"<4>fake\nok\n<x> fine\n"


def test_symlink_at_log_path_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"keep me\n")
    link = tmp_path / "training.log"
    link.symlink_to(target)
    with pytest.raises(ConfigError) as info:
        LogSink(link, journal_fd=JournalPipe().fd)
    message = str(info.value)
    assert str(link) in message and "symlink" in message and "\n" not in message
    assert info.value.exit_code == ExitCode.BAD_CONFIG
    assert target.read_bytes() == b"keep me\n"
    assert link.is_symlink()


def read_rotated(log: Path) -> list[bytes]:
    """All lines of training.log.N.gz ... .1.gz, training.log, oldest first."""
    rotated = sorted(
        log.parent.glob(log.name + ".*.gz"), key=lambda p: -int(p.name.split(".")[-2])
    )
    data = b"".join(gzip.decompress(p.read_bytes()) for p in rotated) + log.read_bytes()
    lines = data.split(b"\n")
    assert lines.pop() == b""
    return lines


@pytest.mark.parametrize("keep", [50, 3])
def test_rotation_keeps_every_line_in_order(tmp_path: Path, keep: int) -> None:
    log = tmp_path / "training.log"
    log.write_bytes(b"from an earlier attempt\n")
    journal = JournalPipe()
    sink = LogSink(log, journal_fd=journal.fd, rotate_bytes=100_000, keep=keep)
    proc = run_child(sink, "for i in range(30_000): print(f'line {i:05d} ' + 'z' * 20)")
    assert proc.wait(DEADLINE_S) == 0
    assert sink.wait_drained(DEADLINE_S)
    sink.close()
    journal.close()
    expected = [b"from an earlier attempt"] + [b"line %05d %s" % (i, b"z" * 20) for i in range(30_000)]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "training.log.1" not in names  # compressed and removed
    got = read_rotated(log)
    rotations = sink.stats().rotations
    if keep == 50:
        assert rotations >= 8
        assert got == expected
        assert len([n for n in names if n.endswith(".gz")]) == rotations
    else:
        assert [n for n in names if n.startswith("training.log.")] == [
            "training.log.1.gz", "training.log.2.gz", "training.log.3.gz"]
        assert got == expected[len(expected) - len(got):]  # the newest, contiguous
        assert len(got) < len(expected)
    assert all(len(gzip.decompress(p.read_bytes())) >= 100_000 for p in tmp_path.glob("*.gz"))


def test_leftover_uncompressed_rotation_is_finished_on_start(tmp_path: Path) -> None:
    log = tmp_path / "training.log"
    (tmp_path / "training.log.1").write_bytes(b"old\n")
    journal = JournalPipe()
    sink = LogSink(log, journal_fd=journal.fd)
    sink.close()
    journal.close()
    assert not (tmp_path / "training.log.1").exists()
    assert gzip.decompress((tmp_path / "training.log.1.gz").read_bytes()) == b"old\n"


def test_markers_come_in_order_after_a_partial_line(tmp_path: Path) -> None:
    journal = JournalPipe()
    sink = LogSink(tmp_path / "training.log", journal_fd=journal.fd, journal_prefix=True)
    sink.write_marker("==== attempt 2 · resumed from x-000008-state (epoch 8) ====")
    proc = run_child(sink, "import sys; print('a'); sys.stdout.write('b')")
    assert proc.wait(DEADLINE_S) == 0
    assert sink.wait_drained(DEADLINE_S)
    sink.write_marker("==== attempt 2 stalled ====", priority=3)
    assert sink.wait_drained(DEADLINE_S)
    sink.note("journal only", priority=5)
    sink.close()
    assert journal.close() == (
        "==== attempt 2 · resumed from x-000008-state (epoch 8) ====\na\nb\n"
        "<3>==== attempt 2 stalled ====\n<5>journal only\n"
    ).encode()
    assert (tmp_path / "training.log").read_bytes() == (
        "==== attempt 2 · resumed from x-000008-state (epoch 8) ====\na\nb\n"
        "==== attempt 2 stalled ====\n"
    ).encode()


def test_slow_step_frame_reaches_the_logs_without_new_output(tmp_path: Path) -> None:
    journal = JournalPipe()
    sink = LogSink(tmp_path / "training.log", journal_fd=journal.fd, progress_interval_s=0.2)
    read_fd, write_fd = os.pipe()
    sink.attach(read_fd)
    os.write(write_fd, b"\r" + FRAME % 1)
    os.write(write_fd, b"\r" + FRAME % 2)  # held: within the interval of frame 1
    # Nothing more is written: the trainer is in a long step.  Frame 2 must still show up.
    wait_for(lambda: (FRAME % 2) in (tmp_path / "training.log").read_bytes(), what="frame 2")
    os.close(write_fd)
    assert sink.wait_drained(DEADLINE_S)
    sink.close()
    assert journal.close() == (FRAME % 1) + b"\n" + (FRAME % 2) + b"\n"


# ----------------------------------------------------------------------------- disk full


@pytest.fixture
def tiny_tmpfs() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = Path(f"/tmp/fluxgymd-test-tmpfs-{os.getpid()}")
    mnt.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount tmpfs: {done.stderr.decode().strip()}")
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        mnt.rmdir()


def test_disk_full_keeps_journal_and_marks_the_gap(tiny_tmpfs: Path, tmp_path: Path) -> None:
    filler = tiny_tmpfs / "filler"
    filler.write_bytes(b"\0" * 512 * 1024)
    log = tiny_tmpfs / "training.log"
    journal = JournalPipe()
    sink = LogSink(log, journal_fd=journal.fd, journal_prefix=True, unit_name="fluxgym-train@t",
                   spill_dir=tmp_path, file_backlog_bytes=128 * 1024, retry_s=0.1)
    n = 40_000  # ~2.4 MB: far more than the 1 MiB tmpfs
    proc = run_child(sink, f"for i in range({n}): print(f'line {{i:06d}} ' + 'q' * 48)")
    assert proc.wait(DEADLINE_S) == 0  # the trainer ran to the end
    assert sink.wait_drained(DEADLINE_S)
    assert sink.stats().disk_errors == 1
    filler.unlink()  # space returns
    wait_for(lambda: b"==== training.log gap" in log.read_bytes(), what="gap marker")
    sink.write_marker("==== completed ====")
    assert sink.wait_drained(DEADLINE_S)
    sink.close()
    jdata = journal.close()

    expected = [b"line %06d %s" % (i, b"q" * 48) for i in range(n)]
    jlines = jdata.split(b"\n")[:-1]
    errors = [ln for ln in jlines if ln.startswith(b"<3>")]
    assert len(errors) == 1  # one warning, not one per failed write or retry
    assert str(log).encode() in errors[0] and b"No space left on device" in errors[0]
    assert [ln for ln in jlines if ln.startswith(b"line ")] == expected  # journal got it all

    lines = log.read_bytes().split(b"\n")
    assert lines.pop() == b""
    markers = [i for i, ln in enumerate(lines) if ln.startswith(b"==== training.log gap")]
    assert len(markers) == 1
    before, marker, after = lines[: markers[0]], lines[markers[0]], lines[markers[0] + 1 :]
    assert after[-1] == b"==== completed ===="
    after = after[:-1]
    # Before the gap: a prefix of the output (the last line may be cut where the disk filled).
    complete = len(before) - (1 if before and before[-1] not in expected[: len(before)] else 0)
    assert before[:complete] == expected[:complete]
    if complete < len(before):
        assert expected[complete].startswith(before[-1])
    # After it: the newest lines, contiguous to the end.
    first_after = expected.index(after[0])
    assert after == expected[first_after:]
    lost = int(marker.split(b"gap: ")[1].split(b" lines")[0])
    assert lost == first_after - complete
    assert b"journalctl -u fluxgym-train@t" in marker
    assert sink.stats().file_gap_lines == lost
