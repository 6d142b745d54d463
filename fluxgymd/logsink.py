"""The trainer's output path: one pipe in, journald (stdout) and ``training.log`` out (SPEC 7).

Guarantees
    * The pipe is always drained: a reader thread does nothing but ``os.read`` into a bounded
      in-memory queue, so the trainer never blocks on a full pipe because of a slow journal.
    * Ordered: the trainer's stdout and stderr share one pipe; lines and wrapper markers
      (:meth:`LogSink.write_marker`) reach both sinks in the order they were read/queued.
    * Lossless for ordinary lines.  tqdm ``\\r`` frames are coalesced to at most one progress
      line per ``progress_interval_s`` in both sinks (the first frame shows at once, newer
      frames replace a held one, a held frame is written when due, before the next ordinary
      line if it is due by then, when the bar ends with ``\\n``, at a marker and at EOF), so
      the last frame of a burst is always kept; a frame overtaken by lines that arrive before
      it is due is written after them.  A line printed right after a frame (``\\r<frame>line``)
      is split off as an ordinary line; non-tqdm text overwritten by ``\\r`` is kept as a line.
    * journald never slows the trainer: journal writes happen in their own thread from a spool
      that never blocks its producer.  The spool keeps up to ``journal_mem_bytes`` in memory and
      past that appends to an unlinked spill file in the run dir, read back in order once the
      journal resumes (bounded memory *and* lossless; only a spill that cannot be written, disk
      full, drops journal lines, which training.log still has, and says so in the journal).
    * training.log is opened ``O_APPEND|O_NOFOLLOW`` (a symlink there is refused with
      :class:`~fluxgymd.errors.ConfigError`, its target untouched), rotated at a line boundary
      past ``rotate_bytes`` to ``training.log.1`` which a low-priority background thread gzips to
      ``training.log.1.gz`` (older ones shift to ``.2.gz`` ... ``.{keep}.gz``).
    * Disk full / IO errors on training.log: one priority-err line in the journal, the journal
      keeps getting everything, missed file output is kept in memory up to ``file_backlog_bytes``
      (the oldest blocks beyond that are counted as lost), the file is retried every
      ``retry_s``; when it works again a ``==== training.log gap ... ====`` line marks where
      and when lines were lost (or, if the backlog kept everything, that nothing was lost).
    * Memory: reader queue <= ``read_queue_bytes`` (4 MiB; only a disk too slow to take it
      makes the reader wait, never the journal), journal memory <= ``journal_mem_bytes``
      (4 MiB), file backlog <= ``file_backlog_bytes`` (4 MiB), lines > 1 MiB are split.

Journal stream format: when stdout is journald's stream socket (``JOURNAL_STREAM`` matches,
or ``journal_prefix=True``), lines get ``<3>`` (tracebacks, errors), ``<4>`` (warnings) or the
level of kohya's Rich log column; a line that itself starts with ``<digit`` gets ``<6>`` so
journald does not read it as a priority.  Prefixes never go into training.log.

Public API
    classify_priority(line, in_traceback) -> (priority | None, in_traceback)   pure
    journal_line(line, priority) -> bytes                                       pure
    StreamTokenizer   bytes -> Lines / Frame / FinalFrame tokens                pure
    FrameCoalescer    progress-frame rate limiting                              pure
    LogSink(log_path, *, journal_fd=1, ...)
        .attach(fd)             drain a pipe (the sink owns and closes fd)
        .write_marker(text, priority=None)   banner / end marker into both sinks, in order
        .note(text, priority=None)           a wrapper line for the journal only
        .wait_drained(timeout_s) -> bool     after the child exits: everything written?
        .close(timeout_s=5.0)
        .stats() -> SinkStats    .last_lines(n) -> list[str]
"""
from __future__ import annotations

import collections
import errno
import gzip
import os
import re
import select
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Callable, Deque, Iterable, Union

from fluxgymd.errors import ConfigError
from fluxgymd.journal import stream_is_journal

__all__ = [
    "classify_priority",
    "journal_line",
    "TokenKind",
    "Token",
    "StreamTokenizer",
    "FrameCoalescer",
    "SinkStats",
    "LogSink",
]

KiB = 1024
MiB = 1024 * KiB

# --------------------------------------------------------------------------------------
# Priority classification (pure)
# --------------------------------------------------------------------------------------

PRI_CRIT, PRI_ERR, PRI_WARNING, PRI_NOTICE, PRI_INFO, PRI_DEBUG = 2, 3, 4, 5, 6, 7

_TRACEBACK_START = b"Traceback (most recent call last):"
# torch.distributed / torchrun prefix every line of a rank's output with "[rank0]: ".
_RANK_PREFIX = re.compile(rb"\[(?:rank|default)\d+\]:\s?")
# kohya's RichHandler: "2024-08-30 10:00:00 INFO     msg" (datefmt "%Y-%m-%d %H:%M:%S"), rich's
# default "[08/30/24 10:00:00] INFO", or the time column blanked when unchanged (spaces).
_LEVEL_COLUMN = re.compile(
    rb"(?:\[?\d{2,4}[-/]\d\d[-/]\d\d[ T]\d\d:\d\d:\d\d(?:[.,]\d+)?\]?\s+|\s{8,})"
    rb"(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s"
)
_LEVEL_PRIORITY: dict[bytes, int | None] = {
    b"DEBUG": PRI_DEBUG,
    b"INFO": None,
    b"WARNING": PRI_WARNING,
    b"ERROR": PRI_ERR,
    b"CRITICAL": PRI_CRIT,
}
_ERR_WORDS = (
    b"ERROR",
    b"Error:",
    b"error:",
    b"CUDA out of memory",
    b"Killed",
    b"CRITICAL",
    b"During handling of the above exception",
    b"The above exception was the direct cause",
)
_WARN_WORDS = (b"WARNING", b"Warning:", b"warn")
# Substrings that cover every rule above; a block without any of them needs no per-line look.
_CANDIDATE_NEEDLES = (
    b"RROR",
    b"rror",
    b"arn",
    b"ARN",
    b"Traceback",
    b"Killed",
    b"CUDA",
    b"CRITICAL",
    b"DEBUG",
    b"above exception",
    b"\n<",
)


def classify_priority(line: str | bytes, in_traceback: bool) -> tuple[int | None, bool]:
    """Journal priority of one output line (no line end) and the traceback state after it.

    ``None`` means no prefix (journald's default, info).  A traceback runs from
    ``Traceback (most recent call last):`` over indented lines to the first unindented line
    (the exception), all of it priority err.
    """
    raw = line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line
    raw = raw.rstrip(b"\r\n")
    m = _RANK_PREFIX.match(raw)
    body = raw[m.end():] if m else raw
    if body.startswith(_TRACEBACK_START):
        return PRI_ERR, True
    if in_traceback:
        if not body.strip() or body[:1] in (b" ", b"\t"):
            return PRI_ERR, True
        return PRI_ERR, False  # the exception line closes the traceback
    lm = _LEVEL_COLUMN.match(body)
    if lm:
        return _LEVEL_PRIORITY[lm.group(1)], False
    for word in _ERR_WORDS:
        if word in body:
            return PRI_ERR, False
    for word in _WARN_WORDS:
        if word in body:
            return PRI_WARNING, False
    return None, False


def journal_line(line: bytes, priority: int | None) -> bytes:
    """``line`` (ending in ``\\n``) as written to journald's stream with SyslogLevelPrefix."""
    if priority is not None:
        return b"<%d>" % priority + line
    if line[:1] == b"<" and line[1:2].isdigit():
        return b"<6>" + line  # escape: otherwise journald takes "<5>..." as a priority
    return line


# The same rules, lowercased: one lower() copy and these scans cost less than the exact
# needles above, and almost every block of a flood has none of them (the fast path).
_PREFILTER_LOWER = (
    b"rror",
    b"warn",
    b"traceback",
    b"killed",
    b"cuda",
    b"critical",
    b"debug",
    b"above exception",
)


def _might_need_prefix(block: bytes) -> bool:
    if b"<" in block and (block[:1] == b"<" or b"\n<" in block):  # memchr first: cheap
        return True
    low = block.lower()
    return any(needle in low for needle in _PREFILTER_LOWER)


# --------------------------------------------------------------------------------------
# Tokenizer: bytes -> ordinary lines and tqdm frames (pure)
# --------------------------------------------------------------------------------------


class TokenKind(Enum):
    LINES = "lines"  # one or more complete ordinary lines, each ending in b"\n"
    FRAME = "frame"  # a \r frame (text after a \r, overwritten by the next \r)
    FINAL = "final"  # a progress frame after \r ended by \n: a burst's last, stays visible


@dataclass(frozen=True)
class Token:
    kind: TokenKind
    data: bytes


_TERMINATOR = re.compile(rb"[\r\n]")
# tqdm's frame: "{desc}: {pct}%|{bar}| {n}/{total} [{elapsed}<{left}, {rate}{postfix}]"; with
# an unknown total "{desc}: {n}it [{elapsed}, {rate}]".
_PROGRESS_FRAME = re.compile(rb"\d+%\||\d+(?:/\d+)?(?:it)? \[\d")
_FRAME_THEN_TEXT = re.compile(rb"(.*?\d+(?:/\d+)?(?:it)? \[\d[^\]]*\])(.*)\Z", re.DOTALL)


class StreamTokenizer:
    """Splits a byte stream into ordinary lines and ``\\r`` progress frames.

    A frame is tqdm-looking text after a ``\\r``; everything else is an ordinary line,
    including text that starts a line and ends at ``\\r`` (``foo\\r\\n``, ``loading...\\r<bar>``)
    and other overwritten text (lossless beats tidy).  Whitespace after a ``\\r`` (tqdm
    clearing its bar) is dropped.  An unterminated frame is reported by :meth:`idle` (the caller saw no new bytes
    for a while: a slow step) and not reported again when its ``\\r`` arrives.
    """

    def __init__(self, max_line_bytes: int = MiB) -> None:
        self._max_line_bytes = max_line_bytes
        self._tail = b""
        self._tail_after_cr = False
        self._tentative: bytes | None = None

    @property
    def pending(self) -> bytes:
        return self._tail

    def feed(self, data: bytes) -> list[Token]:
        buf = self._tail + data if self._tail else data
        if not self._tail_after_cr and b"\r" not in buf:
            cut = buf.rfind(b"\n") + 1
            out = [Token(TokenKind.LINES, buf[:cut])] if cut else []
            self._tail = buf[cut:]
            if cut:
                self._tentative = None
            return out + self._split_long_tail()
        out: list[Token] = []
        lines: list[bytes] = []  # ordinary lines not yet in a token (runs kept whole)
        pos = 0
        after_cr = self._tail_after_cr
        while True:
            if not after_cr:
                # Ordinary text: every line up to the next \r in one piece.
                cr = buf.find(b"\r", pos)
                if cr == -1:
                    cut = buf.rfind(b"\n", pos) + 1
                    if cut > pos:
                        lines.append(buf[pos:cut])
                        pos = cut
                        self._tentative = None
                    break
                nl = buf.rfind(b"\n", pos, cr)
                if nl != -1:
                    lines.append(buf[pos : nl + 1])
                    pos = nl + 1
                    self._tentative = None
                if cr > pos:  # "foo\r\n", "loading...\r<bar>": the text stays a line
                    lines.append(buf[pos:cr] + b"\n")
                    self._tentative = None
                pos, after_cr = cr + 1, True
                continue
            # After a \r: one token up to the next \r or \n.
            match = _TERMINATOR.search(buf, pos)
            if match is None:
                break
            end = match.start()
            text = buf[pos:end]
            is_cr = buf[end] == 13
            if text.strip():
                is_frame = _PROGRESS_FRAME.search(text) is not None
                if is_cr and not is_frame:
                    lines.append(text + b"\n")  # overwritten non-progress text is kept
                else:
                    if lines:
                        out.append(Token(TokenKind.LINES, b"".join(lines)))
                        lines = []
                    if is_cr:
                        if text != self._tentative:
                            out.append(Token(TokenKind.FRAME, text))
                    else:
                        out.extend(self._visible_line(text))
                self._tentative = None
            pos, after_cr = end + 1, is_cr
        if lines:
            out.append(Token(TokenKind.LINES, b"".join(lines)))
        self._tail = buf[pos:]
        self._tail_after_cr = after_cr
        return out + self._split_long_tail()

    def _visible_line(self, text: bytes) -> list[Token]:
        """Text after a \r that ends the line: tqdm's last frame, a line printed over the
        bar (``<frame>line``: split, so the line stays an ordinary line), or a message after
        tqdm cleared its bar."""
        m = _FRAME_THEN_TEXT.match(text)
        if m and m.group(2).strip():
            frame, rest = m.group(1), m.group(2)
            head = [Token(TokenKind.FRAME, frame)] if frame != self._tentative else []
            return head + [Token(TokenKind.LINES, rest + b"\n")]
        if _PROGRESS_FRAME.search(text):
            return [Token(TokenKind.FINAL, text)]
        return [Token(TokenKind.LINES, text + b"\n")]

    def idle(self) -> Token | None:
        """The frame currently on screen, once, if the stream paused in the middle of one."""
        if (
            self._tail_after_cr
            and self._tail != self._tentative
            and _PROGRESS_FRAME.search(self._tail) is not None
        ):
            self._tentative = self._tail
            return Token(TokenKind.FRAME, self._tail)
        return None

    def finish(self) -> list[Token]:
        """End of stream (or a marker): the unterminated rest as a line or final frame."""
        tail, after_cr = self._tail, self._tail_after_cr
        self._tail, self._tail_after_cr, self._tentative = b"", False, None
        if not tail:
            return []
        if after_cr:
            return self._visible_line(tail) if tail.strip() else []
        return [Token(TokenKind.LINES, tail + b"\n")]

    def _split_long_tail(self) -> list[Token]:
        # A line without end longer than the bound is cut, so memory stays bounded.
        if len(self._tail) <= self._max_line_bytes:
            return []
        return self.finish()


# --------------------------------------------------------------------------------------
# Progress frame coalescing (pure)
# --------------------------------------------------------------------------------------


class FrameCoalescer:
    """At most one progress line per ``interval_s``; the last frame of a burst always kept.

    Feed it frames and the arrival of ordinary lines with a monotonic ``now_s``; every method
    returns the progress lines to write at that point, in order.
    """

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._held: bytes | None = None
        self._last_emit_s: float | None = None
        self._last_emitted: bytes | None = None
        self.frames = 0
        self.coalesced = 0

    @property
    def held(self) -> bytes | None:
        return self._held

    def frame(self, now_s: float, text: bytes) -> list[bytes]:
        self.frames += 1
        if self._held is None and text == self._last_emitted:
            self.coalesced += 1
            return []
        if self._held is not None:
            self.coalesced += 1  # replaced before anyone saw it
        if self._last_emit_s is None or now_s - self._last_emit_s >= self.interval_s:
            self._held = None
            return [self._emit(now_s, text)]
        self._held = text
        return []

    def final(self, now_s: float, text: bytes) -> list[bytes]:
        """The burst's last frame (text after \\r ended by \\n): replaces the held frame."""
        self.frames += 1
        held, self._held = self._held, None
        if held is not None and held != text:
            self.coalesced += 1
        if text == self._last_emitted:  # e.g. shown already while the bar sat idle
            self.coalesced += 1
            return []
        return [self._emit(now_s, text)]

    def line(self, now_s: float, *, force: bool = False) -> list[bytes]:
        """An ordinary line comes next.  A held frame that is due goes first (in order);
        one that is not stays held (the bar is redrawn after the line, a newer frame usually
        replaces it) so a trainer printing between frames still gets one progress line per
        interval; ``force`` (markers, end of stream) always writes it first."""
        held = self._held
        if held is None:
            return []
        due = self.due_s()
        if not force and due is not None and now_s < due:
            return []
        self._held = None
        if held == self._last_emitted:
            self.coalesced += 1
            return []
        return [self._emit(now_s, held)]

    def tick(self, now_s: float) -> list[bytes]:
        due = self.due_s()
        if due is None or now_s < due:
            return []
        held, self._held = self._held, None
        assert held is not None
        return [self._emit(now_s, held)]

    def flush(self, now_s: float) -> list[bytes]:
        return self.line(now_s, force=True)

    def due_s(self) -> float | None:
        """When :meth:`tick` will emit the held frame (None: nothing held)."""
        if self._held is None:
            return None
        if self._last_emit_s is None:
            return float("-inf")
        return self._last_emit_s + self.interval_s

    def _emit(self, now_s: float, text: bytes) -> bytes:
        self._last_emit_s = now_s
        self._last_emitted = text
        return text


# --------------------------------------------------------------------------------------
# Journal spool: never blocks its producer; memory first, then an unlinked spill file
# --------------------------------------------------------------------------------------


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _JournalSpool:
    _WRITE_MAX = 256 * KiB
    _SPILL_READ = MiB

    def __init__(self, fd: int, spill_dir: Path, mem_bytes: int, prefix: bool) -> None:
        self._fd = fd
        self._spill_dir = spill_dir
        self._mem_bound = mem_bytes
        self._prefix = prefix
        self._cond = threading.Condition()
        self._mem: Deque[bytes] = collections.deque()
        self._mem_bytes = 0
        self._spill_fd: int | None = None
        self._spilling = False
        self._spill_written = 0
        self._spill_read = 0
        self._writing = False
        self._broken = False
        self._closing = False
        self.spilled_bytes = 0
        self.dropped_lines = 0
        self.dropped_bytes = 0
        self._unreported_drop = (0, 0)
        self._thread = threading.Thread(target=self._run, name="logsink-journal", daemon=True)
        self._thread.start()

    def put(self, data: bytes) -> None:
        if not data:
            return
        with self._cond:
            if self._broken:
                self._count_drop(data)
                return
            if not self._spilling and self._mem_bytes + len(data) <= self._mem_bound:
                self._mem.append(data)
                self._mem_bytes += len(data)
                self._cond.notify_all()
                return
            self._spilling = True
            try:
                if self._spill_fd is None:
                    self._spill_fd = self._open_spill()
                _write_all(self._spill_fd, data)
            except OSError:
                # The spill cannot take it (disk full): the journal loses these lines;
                # training.log still has them and the journal is told once it catches up.
                self._count_drop(data)
                return
            self._spill_written += len(data)
            self.spilled_bytes += len(data)
            self._cond.notify_all()

    def idle(self) -> bool:
        with self._cond:
            return self._broken or (
                not self._mem and not self._spilling and not self._writing
            )

    def close(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self.idle() and time.monotonic() < deadline:
                self._cond.wait(0.05)
            self._closing = True
            self._cond.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._spill_fd is not None and not self._thread.is_alive():
            os.close(self._spill_fd)
            self._spill_fd = None

    def _count_drop(self, data: bytes) -> None:
        lines = data.count(b"\n")
        self.dropped_lines += lines
        self.dropped_bytes += len(data)
        lines0, bytes0 = self._unreported_drop
        self._unreported_drop = (lines0 + lines, bytes0 + len(data))

    def _open_spill(self) -> int:
        path = self._spill_dir / ".journal-spill"
        fd = os.open(
            path,
            os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_APPEND,
            0o600,
        )
        os.unlink(path)  # nobody else needs to see it; nothing is left behind after a crash
        return fd

    def _next_block(self) -> bytes | None:
        """Oldest unwritten bytes (memory before spill, which is newer); None when closing."""
        with self._cond:
            while True:
                if self._mem:
                    parts, size = [], 0
                    while self._mem and size < self._WRITE_MAX:
                        part = self._mem.popleft()
                        parts.append(part)
                        size += len(part)
                    self._mem_bytes -= size
                    self._writing = True
                    return b"".join(parts)
                if self._spilling:
                    if self._spill_read < self._spill_written:
                        assert self._spill_fd is not None
                        n = min(self._SPILL_READ, self._spill_written - self._spill_read)
                        block = os.pread(self._spill_fd, n, self._spill_read)
                        self._spill_read += len(block)
                        self._writing = True
                        return block
                    self._spilling = False  # caught up: back to memory, spill emptied
                    if self._spill_fd is not None:
                        os.ftruncate(self._spill_fd, 0)
                    self._spill_written = self._spill_read = 0
                lines, size = self._unreported_drop
                if lines or size:
                    self._unreported_drop = (0, 0)
                    self._writing = True
                    note = (
                        f"fluxgymd: the journal fell behind and {lines} lines ({size} bytes) "
                        "could not be kept for it; training.log has them\n"
                    ).encode()
                    return journal_line(note, PRI_WARNING if self._prefix else None)
                self._writing = False
                self._cond.notify_all()
                if self._closing:
                    return None
                self._cond.wait()

    def _run(self) -> None:
        while True:
            block = self._next_block()
            if block is None:
                return
            try:
                self._write_blocking(block)
            except OSError:
                with self._cond:
                    # The stream is gone (journald restarted?): keep training.log going.
                    self._broken = True
                    self._count_drop(block)
                    self._mem.clear()
                    self._mem_bytes = 0
                    self._spilling = False
                    self._writing = False
                    self._cond.notify_all()
                return

    def _write_blocking(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:  # someone made the fd non-blocking: wait for room
                select.select([], [self._fd], [], 1.0)
                continue
            view = view[n:]


def _write_all(fd: int, data: bytes) -> int:
    """Write everything; on error the exception carries ``.written`` (bytes that made it)."""
    view = memoryview(data)
    done = 0
    while done < len(data):
        try:
            n = os.write(fd, view[done:])
        except OSError as err:
            err.written = done  # type: ignore[attr-defined]
            raise
        done += n
    return done


# --------------------------------------------------------------------------------------
# training.log: O_APPEND|O_NOFOLLOW, rotation with background gzip, disk-full backlog
# --------------------------------------------------------------------------------------


def _open_log(path: Path) -> int:
    try:
        return os.open(
            path,
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o640,
        )
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ConfigError(
                f"{path} is a symlink; refusing to write the training log through it"
            ) from None
        raise ConfigError(f"cannot open {path}: {err.strerror}") from None


def _rotated(path: Path, index: int, gz: bool = True) -> Path:
    return path.with_name(f"{path.name}.{index}{'.gz' if gz else ''}")


def _gzip_file(src: Path, dst: Path) -> None:
    """src -> dst.gz atomically, then remove src; runs at low CPU priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except OSError:
        pass
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640
        )
        with open(src, "rb") as fin, os.fdopen(fd, "wb") as raw:
            with gzip.GzipFile(filename=src.name, mode="wb", fileobj=raw, compresslevel=6) as gz:
                while block := fin.read(MiB):
                    gz.write(block)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, dst)
        os.unlink(src)
    except OSError:
        # Disk full while compressing: keep the plain file; the next start retries.
        try:
            os.unlink(tmp)
        except OSError:
            pass


class _LogFile:
    _DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})

    def __init__(
        self,
        path: Path,
        *,
        rotate_bytes: int,
        keep: int,
        backlog_bytes: int,
        retry_s: float,
        unit_hint: str,
        report: Callable[[str, int], None],
    ) -> None:
        self.path = path
        self._rotate_bytes = rotate_bytes
        self._keep = keep
        self._backlog_bound = backlog_bytes
        self._retry_s = retry_s
        self._unit_hint = unit_hint
        self._report = report
        self._fd: int | None = _open_log(path)
        self._size = os.fstat(self._fd).st_size
        self._at_line_start = self._ends_with_newline()
        self._gzip: threading.Thread | None = None
        self.rotations = 0
        self.disk_errors = 0
        self.gap_lines = 0
        self.gap_bytes = 0
        # Failure episode state.
        self._failing_since: float | None = None
        self._failure: str = ""
        self._next_retry_s = 0.0
        self._backlog: Deque[tuple[float, bytes]] = collections.deque()
        self._backlog_size = 0
        self._lost_lines = 0
        self._lost_bytes = 0
        self._lost_first: float | None = None
        self._lost_last: float | None = None
        self._recover_rotation_leftovers()

    def _ends_with_newline(self) -> bool:
        if self._size == 0:
            return True
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return True
        try:
            return os.pread(fd, 1, self._size - 1) in (b"\n", b"")
        finally:
            os.close(fd)

    def _recover_rotation_leftovers(self) -> None:
        plain, gz = _rotated(self.path, 1, gz=False), _rotated(self.path, 1)
        tmp = gz.with_name(gz.name + ".tmp")
        if os.path.lexists(tmp):
            os.unlink(tmp)
        if os.path.lexists(plain) and not os.path.islink(plain):
            if os.path.lexists(gz):
                os.unlink(plain)  # the .gz was installed atomically, so it is complete
            else:
                self._start_gzip(plain, gz)

    @property
    def failing(self) -> bool:
        return self._failing_since is not None

    def write(self, data: bytes, now_s: float) -> None:
        if not data:
            return
        if self._failing_since is not None:
            self._buffer(data)
            self.tick(now_s)
            return
        self._write(data)

    def tick(self, now_s: float) -> None:
        if self._failing_since is not None and now_s >= self._next_retry_s:
            self._next_retry_s = now_s + self._retry_s
            self._recover()

    def next_retry_s(self) -> float | None:
        return self._next_retry_s if self._failing_since is not None else None

    def close(self) -> None:
        if self._failing_since is not None:
            self._recover()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._gzip is not None:
            self._gzip.join()

    # -- internals

    def _write(self, data: bytes) -> None:
        while data:
            # Rotate at the last line end that fits, so files stay near rotate_bytes.
            room = self._rotate_bytes - self._size
            cut = len(data)
            if cut > room:
                cut = data.rfind(b"\n", 0, max(room, 0)) + 1 or data.find(b"\n") + 1 or cut
            if not self._write_piece(data[:cut]):
                self._buffer(data[cut:])
                return
            data = data[cut:]
            if self._size >= self._rotate_bytes and self._at_line_start:
                self._rotate()
                if self._failing_since is not None:
                    self._buffer(data)
                    return

    def _write_piece(self, data: bytes) -> bool:
        try:
            if self._fd is None:
                self._fd = _open_log(self.path)
                self._size = os.fstat(self._fd).st_size
            _write_all(self._fd, data)
        except (OSError, ConfigError) as err:
            written = getattr(err, "written", 0)
            self._size += written
            if written:
                self._at_line_start = data[written - 1 : written] == b"\n"
            self._fail(err)
            self._buffer(data[written:])
            return False
        self._size += len(data)
        self._at_line_start = data.endswith(b"\n")
        return True

    def _fail(self, err: Exception) -> None:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        self.disk_errors += 1
        self._failing_since = time.time()
        self._failure = reason
        self._next_retry_s = time.monotonic() + self._retry_s
        self._report(
            f"fluxgymd: cannot write {self.path}: {reason}; the journal still gets every line, "
            f"the file is retried every {self._retry_s:g}s",
            PRI_ERR,
        )

    def _buffer(self, data: bytes) -> None:
        """Keep what the file missed; past the bound the oldest lines become the gap."""
        if not data:
            return
        self._backlog.append((time.time(), data))
        self._backlog_size += len(data)
        excess = self._backlog_size - self._backlog_bound
        while excess > 0 and self._backlog:
            ts, old = self._backlog[0]
            if len(old) <= excess:
                cut = len(old)
            else:  # drop whole lines only, so what is kept starts at a line start
                nl = old.find(b"\n", excess - 1)
                cut = len(old) if nl == -1 else nl + 1
            dropped = old[:cut]
            if cut == len(old):
                self._backlog.popleft()
            else:
                self._backlog[0] = (ts, old[cut:])
            self._backlog_size -= cut
            excess -= cut
            self._lost_lines += dropped.count(b"\n")
            self._lost_bytes += cut
            if self._lost_first is None:
                self._lost_first = ts
            self._lost_last = ts

    def _recover(self) -> None:
        """Retry the file: gap marker (if lines were lost), then the backlog, in order.

        A retry that fails leaves everything as it was (same episode, no new warning)."""
        assert self._failing_since is not None
        since, reason = self._failing_since, self._failure
        had_gap = bool(self._lost_lines or self._lost_bytes)
        head = b""
        if had_gap:
            assert self._lost_first is not None and self._lost_last is not None
            head = (b"" if self._at_line_start else b"\n") + (
                f"==== training.log gap: {self._lost_lines} lines ({self._lost_bytes} bytes) "
                f"lost between {_utc(self._lost_first)} and {_utc(self._lost_last)} "
                f"({reason}); {self._unit_hint} has them ====\n"
            ).encode()
        try:
            if self._fd is not None:
                os.close(self._fd)  # reopen: the file may have been replaced meanwhile
                self._fd = None
            self._fd = _open_log(self.path)
            self._size = os.fstat(self._fd).st_size
            if head:
                _write_all(self._fd, head)
        except (OSError, ConfigError) as err:
            written = getattr(err, "written", 0)
            if not written:
                return
            head = head[:written]  # a cut marker is still a marker; the rest is dropped
        if head:
            self._size += len(head)
            self._at_line_start = head.endswith(b"\n")
            self.gap_lines += self._lost_lines
            self.gap_bytes += self._lost_bytes
            self._lost_lines = self._lost_bytes = 0
            self._lost_first = self._lost_last = None
        while self._backlog:
            ts, block = self._backlog[0]
            try:
                _write_all(self._fd, block)
            except OSError as err:
                written = getattr(err, "written", 0)
                self._size += written
                if written:
                    self._backlog[0] = (ts, block[written:])
                    self._backlog_size -= written
                    self._at_line_start = block[written - 1 : written] == b"\n"
                return
            self._backlog.popleft()
            self._backlog_size -= len(block)
            self._size += len(block)
            self._at_line_start = block.endswith(b"\n")
        self._failing_since = None
        self._report(f"fluxgymd: {self.path} is writable again", PRI_NOTICE)
        if not had_gap:
            self._write(
                (b"" if self._at_line_start else b"\n")
                + f"==== training.log was not writable from {_utc(since)} to {_utc_now()} "
                f"({reason}); no line was lost ====\n".encode()
            )
        elif self._size >= self._rotate_bytes and self._at_line_start:
            self._rotate()

    def _rotate(self) -> None:
        if self._gzip is not None:
            self._gzip.join()  # the previous .1 must be compressed before it shifts
            self._gzip = None
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        try:
            oldest = _rotated(self.path, self._keep)
            if os.path.lexists(oldest):
                os.unlink(oldest)
            for index in range(self._keep - 1, 0, -1):
                src = _rotated(self.path, index)
                if os.path.lexists(src):
                    os.rename(src, _rotated(self.path, index + 1))
            plain = _rotated(self.path, 1, gz=False)
            os.rename(self.path, plain)
            self.rotations += 1
            self._start_gzip(plain, _rotated(self.path, 1))
            self._fd = _open_log(self.path)
            self._size = 0
            self._at_line_start = True
        except (OSError, ConfigError) as err:
            self._fail(err)

    def _start_gzip(self, src: Path, dst: Path) -> None:
        self._gzip = threading.Thread(
            target=_gzip_file, args=(src, dst), name="logsink-gzip", daemon=True
        )
        self._gzip.start()


# --------------------------------------------------------------------------------------
# LogSink
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SinkStats:
    bytes_read: int
    lines: int  # ordinary lines written (markers included)
    frames: int  # \r frames seen
    frames_coalesced: int  # frames that never became a progress line
    progress_lines: int
    disk_errors: int  # failure episodes of training.log
    file_gap_lines: int  # lines training.log lost for good (backlog overflow)
    file_gap_bytes: int
    rotations: int
    journal_spilled_bytes: int
    journal_dropped_lines: int


@dataclass(frozen=True)
class _Marker:
    text: str
    priority: int | None


class _Eof:
    pass


_Item = Union[bytes, _Marker, _Eof]
OnLine = Callable[[str, bool], None]


class LogSink:
    """Tees one pipe to the journal and training.log; see the module docstring."""

    _READ_BYTES = 64 * KiB
    _BATCH_BYTES = MiB
    _IDLE_FRAME_S = 0.25  # no new bytes this long: the half-written frame is the one on screen
    _RING_BYTES = 256 * KiB

    def __init__(
        self,
        log_path: Path,
        *,
        journal_fd: int = 1,
        rotate_bytes: int = 64 * MiB,
        keep: int = 5,
        progress_interval_s: float = 5.0,
        on_line: OnLine | None = None,
        journal_prefix: bool | None = None,
        unit_name: str | None = None,
        spill_dir: Path | None = None,
        read_queue_bytes: int = 4 * MiB,
        journal_mem_bytes: int = 4 * MiB,
        file_backlog_bytes: int = 4 * MiB,
        retry_s: float = 3.0,
    ) -> None:
        if keep < 1 or rotate_bytes < 1:
            raise ConfigError(f"log rotation needs keep >= 1 and rotate_bytes >= 1 for {log_path}")
        self._prefix = stream_is_journal(journal_fd) if journal_prefix is None else journal_prefix
        self._on_line = on_line
        self._read_bound = read_queue_bytes
        unit_hint = f"journalctl -u {unit_name}" if unit_name else "the journal"
        self._file = _LogFile(
            Path(log_path),
            rotate_bytes=rotate_bytes,
            keep=keep,
            backlog_bytes=file_backlog_bytes,
            retry_s=retry_s,
            unit_hint=unit_hint,
            report=self._report,
        )
        self._journal = _JournalSpool(
            journal_fd, Path(spill_dir or Path(log_path).parent), journal_mem_bytes, self._prefix
        )
        self._tokens = StreamTokenizer()
        self._coalescer = FrameCoalescer(progress_interval_s)
        self._in_traceback = False
        self._cond = threading.Condition()
        self._queue: Deque[_Item] = collections.deque()
        self._queued_bytes = 0
        self._readers_active = 0
        self._eof_pending = 0  # EOFs queued but not yet processed
        self._busy = False  # the processor holds a batch it has not written yet
        self._last_data_s = time.monotonic()
        # the _last_data_s whose idle frame was already looked at: an unfinished tqdm frame
        # stays pending between steps, and must not make the thread spin every 10 ms
        self._idle_checked_for_s = float("-inf")
        self._stopping = False
        self._ring: Deque[bytes] = collections.deque()
        self._ring_size = 0
        self._ring_lock = threading.Lock()
        self._bytes_read = 0
        self._lines = 0
        self._progress_lines = 0
        self._processor = threading.Thread(target=self._process_loop, name="logsink", daemon=True)
        self._processor.start()

    # -- public

    def attach(self, fd: int) -> None:
        """Start draining ``fd`` (a pipe's read end); the sink closes it at EOF."""
        with self._cond:
            self._readers_active += 1
        threading.Thread(
            target=self._read_loop, args=(fd,), name="logsink-reader", daemon=True
        ).start()

    def write_marker(self, text: str, priority: int | None = None) -> None:
        """A wrapper line (attempt banner, end marker) into both sinks after what was read."""
        self._enqueue(_Marker(text.rstrip("\n"), priority))

    def note(self, text: str, priority: int | None = None) -> None:
        """A wrapper line for the journal only (not training.log), through the same writer
        so it can never land inside a trainer line; written at once, not after the queue."""
        self._report(text.rstrip("\n"), priority)

    def wait_drained(self, timeout_s: float) -> bool:
        """True once every pipe hit EOF and all of it (and markers) reached both sinks.

        A failing training.log does not hold this up (its backlog waits for the disk).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            with self._cond:
                done = (
                    not self._queue
                    and self._readers_active == 0
                    and self._eof_pending == 0
                    and not self._busy
                )
            if done and self._journal.idle():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(0.02, remaining))  # internal wait on our own threads, not a test

    def close(self, timeout_s: float = 5.0) -> None:
        """Write out what was queued, close training.log, give the journal up to timeout_s."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._processor.join(max(0.0, deadline - time.monotonic()))
        self._journal.close(max(0.1, deadline - time.monotonic()))

    def stats(self) -> SinkStats:
        return SinkStats(
            bytes_read=self._bytes_read,
            lines=self._lines,
            frames=self._coalescer.frames,
            frames_coalesced=self._coalescer.coalesced,
            progress_lines=self._progress_lines,
            disk_errors=self._file.disk_errors,
            file_gap_lines=self._file.gap_lines,
            file_gap_bytes=self._file.gap_bytes,
            rotations=self._file.rotations,
            journal_spilled_bytes=self._journal.spilled_bytes,
            journal_dropped_lines=self._journal.dropped_lines,
        )

    def last_lines(self, n: int) -> list[str]:
        """The last ``n`` lines that went to training.log (for stall forensics)."""
        with self._ring_lock:
            text = b"".join(self._ring)
        lines = text.decode("utf-8", "replace").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return lines[-n:] if n > 0 else []

    # -- reader thread: nothing but os.read into the bounded queue

    def _read_loop(self, fd: int) -> None:
        try:
            while True:
                with self._cond:
                    while self._queued_bytes >= self._read_bound:
                        self._cond.wait()  # only a disk slower than the trainer gets here
                try:
                    data = os.read(fd, self._READ_BYTES)
                except OSError:
                    data = b""  # EIO on a dead pty and the like: treat as EOF
                if not data:
                    break
                with self._cond:
                    self._queue.append(data)
                    self._queued_bytes += len(data)
                    self._bytes_read += len(data)
                    self._cond.notify_all()
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
            with self._cond:
                self._eof_pending += 1
                self._readers_active -= 1
                self._queue.append(_Eof())
                self._cond.notify_all()

    def _enqueue(self, item: _Item) -> None:
        with self._cond:
            self._queue.append(item)
            self._cond.notify_all()

    # -- processor thread: tokenize, classify, coalesce, write

    def _next_wakeup_s(self, now_s: float) -> float:
        timeout = 0.5
        due = self._coalescer.due_s()
        if due is not None:
            timeout = min(timeout, max(0.0, due - now_s))
        if self._tokens.pending and self._idle_checked_for_s < self._last_data_s:
            timeout = min(timeout, max(0.01, self._last_data_s + self._IDLE_FRAME_S - now_s))
        retry = self._file.next_retry_s()
        if retry is not None:
            timeout = min(timeout, max(0.0, retry - now_s))
        return max(timeout, 0.005)

    def _take_batch(self) -> list[_Item] | None:
        """Queued items, bytes runs joined; None when stopping with nothing left."""
        with self._cond:
            if not self._queue:
                if self._stopping:
                    return None
                self._cond.wait(self._next_wakeup_s(time.monotonic()))
            items: list[_Item] = []
            run: list[bytes] = []
            size = 0
            while self._queue and size < self._BATCH_BYTES:
                item = self._queue.popleft()
                if isinstance(item, bytes):
                    run.append(item)
                    size += len(item)
                    continue
                if run:
                    items.append(b"".join(run))
                    run = []
                items.append(item)
            if run:
                items.append(b"".join(run))
            self._queued_bytes -= size
            self._busy = bool(items)
            self._cond.notify_all()
            return items

    def _process_loop(self) -> None:
        try:
            while True:
                items = self._take_batch()
                if items is None:
                    break
                now = time.monotonic()
                fparts: list[bytes] = []
                jparts: list[bytes] = []
                for item in items:
                    if isinstance(item, bytes):
                        self._last_data_s = now
                        # One prefilter for the whole batch: most floods need no prefix.
                        check = self._prefix and (
                            self._in_traceback or _might_need_prefix(self._tokens.pending + item)
                        )
                        self._handle_tokens(
                            self._tokens.feed(item), now, fparts, jparts, check_prefix=check
                        )
                    elif isinstance(item, _Marker):
                        self._handle_tokens(self._tokens.finish(), now, fparts, jparts)
                        self._progress(self._coalescer.flush(now), fparts, jparts)
                        line = item.text.encode("utf-8", "surrogateescape") + b"\n"
                        self._lines += 1
                        fparts.append(line)
                        jparts.append(journal_line(line, item.priority) if self._prefix else line)
                    else:  # EOF of one pipe: its unterminated rest and held frame go out
                        self._handle_tokens(self._tokens.finish(), now, fparts, jparts)
                        self._progress(self._coalescer.flush(now), fparts, jparts)
                if not items:
                    if now - self._last_data_s >= self._IDLE_FRAME_S:
                        self._idle_checked_for_s = self._last_data_s
                        token = self._tokens.idle()
                        if token is not None:
                            self._handle_tokens([token], now, fparts, jparts)
                    self._progress(self._coalescer.tick(now), fparts, jparts)
                else:
                    self._progress(self._coalescer.tick(now), fparts, jparts)
                self._flush(fparts, jparts, now)
                with self._cond:
                    self._eof_pending -= sum(isinstance(i, _Eof) for i in items)
                    self._busy = False
        finally:
            now = time.monotonic()
            fparts, jparts = [], []
            self._handle_tokens(self._tokens.finish(), now, fparts, jparts)
            self._progress(self._coalescer.flush(now), fparts, jparts)
            self._flush(fparts, jparts, now)
            self._file.close()

    def _flush(self, fparts: list[bytes], jparts: list[bytes], now_s: float) -> None:
        if jparts:
            self._journal.put(b"".join(jparts))
        if fparts:
            data = b"".join(fparts)
            self._remember(data)
            self._file.write(data, now_s)
        else:
            self._file.tick(now_s)

    def _remember(self, data: bytes) -> None:
        with self._ring_lock:
            self._ring.append(data[-self._RING_BYTES :])
            self._ring_size += min(len(data), self._RING_BYTES)
            while self._ring_size - len(self._ring[0]) >= self._RING_BYTES:
                self._ring_size -= len(self._ring.popleft())

    def _progress(self, texts: Iterable[bytes], fparts: list[bytes], jparts: list[bytes]) -> None:
        for text in texts:
            line = text + b"\n"
            self._progress_lines += 1
            fparts.append(line)
            jparts.append(journal_line(line, None) if self._prefix else line)

    def _handle_tokens(
        self,
        tokens: list[Token],
        now_s: float,
        fparts: list[bytes],
        jparts: list[bytes],
        *,
        check_prefix: bool = True,
    ) -> None:
        for token in tokens:
            kind, data = token.kind, token.data
            if kind is TokenKind.LINES:
                self._progress(self._coalescer.line(now_s), fparts, jparts)
                self._lines += data.count(b"\n")
                fparts.append(data)
                jparts.append(self._journal_block(data) if check_prefix else data)
                if self._on_line is not None:
                    for raw in data.split(b"\n")[:-1]:
                        self._on_line(raw.decode("utf-8", "replace"), False)
                continue
            if self._on_line is not None:
                self._on_line(data.decode("utf-8", "replace"), True)
            if kind is TokenKind.FRAME:
                self._progress(self._coalescer.frame(now_s, data), fparts, jparts)
            else:
                self._progress(self._coalescer.final(now_s, data), fparts, jparts)

    def _journal_block(self, block: bytes) -> bytes:
        """``block`` (complete lines) with priority prefixes, touching only lines that need one."""
        if not self._prefix or (not self._in_traceback and not _might_need_prefix(block)):
            return block
        starts = {0} if block[:1] == b"<" else set()
        for needle in _CANDIDATE_NEEDLES:
            i = block.find(needle)
            while i != -1:
                if needle == b"\n<":
                    i += 1
                line_start = block.rfind(b"\n", 0, i) + 1
                starts.add(line_start)
                line_end = block.find(b"\n", i)
                i = block.find(needle, line_end) if line_end != -1 else -1
        candidates = sorted(starts)
        out: list[bytes] = []
        pos, ci, size = 0, 0, len(block)
        while pos < size:
            if self._in_traceback:
                start = pos
            else:
                while ci < len(candidates) and candidates[ci] < pos:
                    ci += 1
                if ci == len(candidates):
                    break
                start = candidates[ci]
            end = block.find(b"\n", start) + 1 or size
            out.append(block[pos:start])
            line = block[start:end]
            priority, self._in_traceback = classify_priority(line, self._in_traceback)
            out.append(journal_line(line, priority))
            pos = end
        out.append(block[pos:])
        return b"".join(out)

    def _report(self, message: str, priority: int | None) -> None:
        """A line of the sink's own, to the journal only (training.log may be what failed)."""
        line = message.encode() + b"\n"
        self._journal.put(journal_line(line, priority) if self._prefix else line)
