"""The trainer's process tree: usage sampling and a kill that leaves nothing behind."""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import psutil


def tree(root_pid: int) -> list[psutil.Process]:
    """ROOT and all its descendants (orphans reparent to us: we are a child subreaper)."""
    try:
        root = psutil.Process(root_pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        procs = []
    seen = {p.pid for p in procs}
    try:
        # grandchildren whose parent died were reparented to this process (the subreaper)
        for p in psutil.Process(os.getpid()).children(recursive=True):
            if p.pid not in seen:
                procs.append(p)
                seen.add(p.pid)
    except psutil.Error:
        pass
    return procs


@dataclass(frozen=True)
class Usage:
    cpu_s: float  # user+system CPU seconds of the tree
    io_bytes: int  # bytes read+written (syscall level, so cached IO counts)
    pids: tuple[int, ...]


def sample_usage(root_pid: int) -> Usage:
    cpu = 0.0
    io = 0
    pids = []
    for p in tree(root_pid):
        try:
            with p.oneshot():
                t = p.cpu_times()
                cpu += t.user + t.system
                try:
                    c = p.io_counters()
                    io += c.read_chars + c.write_chars
                except (psutil.AccessDenied, AttributeError):
                    pass
            pids.append(p.pid)
        except psutil.Error:
            continue
    return Usage(cpu_s=cpu, io_bytes=io, pids=tuple(pids))


def python_pids(root_pid: int) -> list[int]:
    out = []
    for p in tree(root_pid):
        try:
            if "python" in p.name().lower() or any("python" in a for a in p.cmdline()[:1]):
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


def set_child_subreaper() -> None:
    """Orphaned grandchildren reparent to us instead of PID 1, so a kill can still find them."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_CHILD_SUBREAPER = 36
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def signal_tree(root_pid: int, pgid: int | None, sig: int) -> None:
    if pgid is not None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for p in tree(root_pid):
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def kill_tree(root_pid: int, pgid: int | None, grace_s: float) -> None:
    """TERM the whole tree, KILL whatever is left after GRACE_S; returns when all are gone."""
    victims = tree(root_pid)
    signal_tree(root_pid, pgid, signal.SIGTERM)
    _, alive = psutil.wait_procs(victims, timeout=grace_s)
    # children may have forked while dying: look again
    alive = list({p.pid: p for p in alive + tree(root_pid)}.values())
    if alive:
        signal_tree(root_pid, pgid, signal.SIGKILL)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
    reap_children()


def reap_children() -> None:
    """Collect exit statuses of reparented orphans so no zombie outlives the wrapper."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return