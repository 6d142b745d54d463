"""Wrapper start-up cost: from `fluxgymd run NAME` exec to READY=1 (issue 2).

Runs the real wrapper with a trivial trainer (`true`-like Python that exits at once is not
needed: READY=1 is sent right after the launch) under a fake NOTIFY_SOCKET this script
listens on, and times exec -> READY=1 (config, checkpoint scan, ledger, launch included). Prints median
and spread over N runs.

    .venv/bin/python bench/bench_startup.py [--runs 10]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def one_run(home: Path) -> float:
    sock_path = home / "notify.sock"
    if sock_path.exists():
        sock_path.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(sock_path))
    s.settimeout(30)
    env = dict(os.environ, FLUXGYM_HOME=str(home), NOTIFY_SOCKET=str(sock_path))
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(VENV_BIN / "fluxgymd"), "run", "b"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ready_s = None
    try:
        while ready_s is None:
            msg = s.recv(4096).decode(errors="replace")
            if "READY=1" in msg.split("\n"):
                ready_s = time.perf_counter() - t0
    finally:
        proc.wait(timeout=60)
        s.close()
    return ready_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        run_dir = home / "outputs" / "b"
        run_dir.mkdir(parents=True)
        trainer = [sys.executable, "-c", "import sys; sys.exit(0)", "--output_dir", str(run_dir), "--output_name", "b"]
        (run_dir / "run.toml").write_text(f"[train]\ncommand = {json.dumps(trainer)}\n")
        times = []
        for _ in range(args.runs):
            # each run ends as a failed attempt (no model): remove the ledger so none gives up
            for f in (run_dir / ".fluxgymd-ledger.json",):
                f.unlink(missing_ok=True)
            times.append(one_run(home))
    print(f"fluxgymd exec -> READY=1: median {statistics.median(times) * 1000:.0f} ms "
          f"(min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}, n={len(times)})")


if __name__ == "__main__":
    main()
