"""Throughput and memory of the log path (SPEC 7).  Prints numbers; asserts nothing.

    .venv/bin/python bench/bench_logsink.py                 # 200 MB flood
    .venv/bin/python bench/bench_logsink.py --size-mb 1000  # the 1 GB flood of the issue
    .venv/bin/python bench/bench_logsink.py --stall-journal-s 10   # journald "SIGSTOPped"

A child process writes ``--size-mb`` of ~100-byte lines (``--producer lines``: one
``sys.stdout.write`` per line, like a trainer's prints; ``--producer blocks``: 1 MiB writes,
the fastest a producer can go).  It runs twice:

* direct: the child's stdout is a file (the floor);
* sink:   a separate "wrapper" process runs LogSink on the child's pipe, training.log in a
          temp dir, journal = a pipe into a drain process (stand-in for journald, optionally
          SIGSTOPped for ``--stall-journal-s`` mid-flood).

Reported: the child's own wall time in both runs and their ratio (target <= 1.05: the
trainer is not slowed), the time until the sink had written everything, and the wrapper
process's peak RSS (target < 40 MB).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PRODUCER = r"""
import sys, time
size, mode, frames = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
line = "2024-08-30 10:00:00 INFO     step {:09d} loss=0.1234 lr=1e-4 " + "x" * 40 + "\n"
t0 = time.monotonic()
if mode == "blocks":
    block = "".join(line.format(i) for i in range(10_000)).encode()
    out = sys.stdout.buffer
    for _ in range(max(1, size // len(block))):
        out.write(block)
    out.flush()
else:
    w = sys.stdout.write
    per_line = len(line.format(0))
    for i in range(max(1, size // per_line)):
        w(line.format(i))
        if frames and i % 4 == 0:
            w(f"\rsteps:  45%|####5     | {i}/99999 [00:01<00:02,  4.50it/s, avr_loss=0.123]")
    sys.stdout.flush()
sys.stderr.write(f"{time.monotonic() - t0}\n")
"""

DRAIN = "import os\nwhile os.read(0, 1 << 20): pass\n"


def producer_argv(args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-c", PRODUCER, str(args.size_mb * 1_000_000), args.producer,
        "1" if args.frames else "0",
    ]


def run_direct(args: argparse.Namespace, workdir: Path) -> float:
    target = workdir / "direct.log"
    with open(target, "wb") as out:
        done = subprocess.run(producer_argv(args), stdout=out, stderr=subprocess.PIPE, check=True)
    target.unlink()
    return float(done.stderr.decode().strip().splitlines()[-1])


def run_sink_role(args: argparse.Namespace) -> None:
    """The 'wrapper' process: LogSink between the child and the journal stand-in."""
    sys.path.insert(0, str(ROOT))
    from fluxgymd.logsink import LogSink

    workdir = Path(args.workdir)
    drain = subprocess.Popen([sys.executable, "-c", DRAIN], stdin=subprocess.PIPE)
    assert drain.stdin is not None
    journal_fd = drain.stdin.fileno()
    sink = LogSink(workdir / "training.log", journal_fd=journal_fd, journal_prefix=True,
                   rotate_bytes=args.rotate_mb * 1_000_000)
    read_fd, write_fd = os.pipe()
    from fluxgymd.supervisor import widen_pipe

    widen_pipe(write_fd)  # as the wrapper does for the trainer's pipe
    t0 = time.monotonic()
    child = subprocess.Popen(producer_argv(args), stdout=write_fd, stderr=subprocess.PIPE)
    os.close(write_fd)
    sink.attach(read_fd)
    if args.stall_journal_s > 0:
        time.sleep(0.5)  # mid-flood
        os.kill(drain.pid, signal.SIGSTOP)
        time.sleep(args.stall_journal_s)
        os.kill(drain.pid, signal.SIGCONT)
    _, err = child.communicate()
    child_s = float(err.decode().strip().splitlines()[-1])
    child_exit_s = time.monotonic() - t0
    drained = sink.wait_drained(600)
    total_s = time.monotonic() - t0
    sink.close()
    stats = sink.stats()
    drain.stdin.close()
    drain.wait()
    print(json.dumps({
        "child_s": child_s,
        "child_exit_s": child_exit_s,
        "drained": drained,
        "sink_total_s": total_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "lines": stats.lines,
        "journal_spilled_mb": stats.journal_spilled_bytes / 1e6,
        "rotations": stats.rotations,
        "progress_lines": stats.progress_lines,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--producer", choices=["lines", "blocks"], default="lines")
    parser.add_argument("--frames", action="store_true", help="a tqdm frame every 4 lines")
    parser.add_argument("--stall-journal-s", type=float, default=0.0)
    parser.add_argument("--rotate-mb", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--role", default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "sink":
        run_sink_role(args)
        return
    workdir = Path(tempfile.mkdtemp(prefix="bench-logsink-"))
    try:
        for _ in range(args.repeat):
            direct_s = run_direct(args, workdir)
            argv = [sys.executable, __file__, "--role", "sink", "--workdir", str(workdir),
                    "--size-mb", str(args.size_mb), "--producer", args.producer,
                    "--stall-journal-s", str(args.stall_journal_s),
                    "--rotate-mb", str(args.rotate_mb)] + (["--frames"] if args.frames else [])
            result = json.loads(subprocess.run(argv, capture_output=True, check=True).stdout)
            for leftover in workdir.iterdir():
                leftover.unlink()
            print(
                f"flood {args.size_mb} MB ({args.producer}{', frames' if args.frames else ''}"
                f"{f', journal stopped {args.stall_journal_s:g}s' if args.stall_journal_s else ''}):"
                f" child direct {direct_s:.2f}s, child via sink {result['child_s']:.2f}s,"
                f" ratio {result['child_s'] / direct_s:.3f} (target <= 1.05);"
                f" sink done after {result['sink_total_s']:.2f}s"
                f" (ratio {result['sink_total_s'] / direct_s:.3f});"
                f" peak RSS {result['peak_rss_mb']:.1f} MB (target < 40);"
                f" journal spilled {result['journal_spilled_mb']:.1f} MB;"
                f" rotations {result['rotations']}; lines {result['lines']}"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
