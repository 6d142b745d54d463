"""Stall forensics: what a run was doing when it stopped showing life (SPEC section 6)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil

from . import proctree
from .atomic import write_atomic
from .status import utc_now_iso


def collect_stacks(root_pid: int, stacks_dir: Path, wait_s: float = 3.0) -> str:
    """SIGUSR1 every Python process of the tree (the trainer hook dumps all threads'
    stacks into STACKS_DIR/stacks-PID.txt) and return what they wrote this time."""
    pids = proctree.python_pids(root_pid)
    offsets: dict[Path, int] = {}
    for dump in stacks_dir.glob("stacks-*.txt") if stacks_dir.is_dir() else []:
        offsets[dump] = dump.stat().st_size
    for pid in pids:
        try:
            os.kill(pid, signal.SIGUSR1)
        except (ProcessLookupError, PermissionError):
            pass
    # wait until every signalled process has written something, or the deadline passes
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        grown = [
            pid for pid in pids
            if (p := stacks_dir / f"stacks-{pid}.txt").exists() and p.stat().st_size > offsets.get(p, 0)
        ]
        if len(grown) == len(pids):
            time.sleep(0.2)  # let the dumps finish: they are written thread by thread
            break
        time.sleep(0.05)
    parts = []
    for pid in pids:
        p = stacks_dir / f"stacks-{pid}.txt"
        text = ""
        if p.exists():
            with open(p, "rb") as f:
                f.seek(offsets.get(p, 0))
                text = f.read().decode("utf-8", "replace")
        parts.append(f"--- pid {pid} ---\n{text or '(no stack received: hook not loaded or process stuck in the kernel)'}\n")
    return "".join(parts) if parts else "(no Python processes in the tree)\n"


def process_table(root_pid: int) -> str:
    rows = []
    for p in proctree.tree(root_pid):
        try:
            with p.oneshot():
                t = p.cpu_times()
                rows.append(
                    f"{p.pid:>7} {p.status():<10} cpu {t.user + t.system:8.1f}s "
                    f"rss {p.memory_info().rss // (1 << 20):6d}M  {' '.join(p.cmdline())[:200]}"
                )
        except psutil.Error:
            continue
    return "\n".join(rows) + "\n"


def write_stall_report(
    stalls_dir: Path, *, name: str, attempt: int, why: str, gpu_text: str, root_pid: int,
    stacks_dir: Path, last_lines: list[str],
) -> Path:
    stalls_dir.mkdir(parents=True, exist_ok=True)
    stamp = utc_now_iso().replace(":", "")
    path = stalls_dir / f"{stamp}.txt"
    body = (
        f"fluxgymd stall report\nrun: {name}\nattempt: {attempt}\ntime: {utc_now_iso()}\n"
        f"why: {why}\n\n== GPU ==\n{gpu_text}\n\n== processes ==\n{process_table(root_pid)}\n"
        f"== Python stacks (faulthandler, all threads) ==\n{collect_stacks(root_pid, stacks_dir)}\n"
        f"== last {len(last_lines)} log lines ==\n" + "\n".join(last_lines) + "\n"
    )
    write_atomic(path, body.encode("utf-8", "replace"))
    return path
