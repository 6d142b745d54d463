"""The log path under the real systemd and journald (issue 5): lossless, ordered, and never
the reason the trainer waits."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time

import pytest

from service_helpers import Runs, unit

pytestmark = pytest.mark.systemd

FLOOD_RE = re.compile(r"^flood line (\d{6}) ")


@pytest.fixture(scope="module")
def runs(systemd_box_module, module_home):
    return Runs(systemd_box_module, module_home)


def flood_numbers(text: str) -> list[int]:
    return [int(m.group(1)) for line in text.splitlines() if (m := FLOOD_RE.match(line))]


def digest(numbers: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, numbers)).encode()).hexdigest()


def journal_text(runs: Runs, name: str, until_flood_line: int | None = None) -> str:
    """The unit's journal; with UNTIL_FLOOD_LINE, wait until journald has ingested that far
    (it reads the stream's backlog after the unit is gone), or give up after a deadline."""
    def read() -> str:
        return runs.box.run_in("journalctl", "-u", unit(name), "-o", "cat", "--no-pager", timeout_s=300).stdout
    if until_flood_line is None:
        return read()
    # every flood line up to UNTIL_FLOOD_LINE visible, not just the last one: under load
    # journald can show the end of a burst before it has indexed all of it
    try:
        return runs.box.wait_for(
            lambda: (t := read()) if len(flood_numbers(t)) >= until_flood_line else None,
            timeout_s=240, interval_s=2.0, what=f"journald to show flood lines 1..{until_flood_line}")
    except Exception:
        return read()  # the assertion on its content says what is missing


def test_flood_every_line_in_order_in_file_and_journal(runs):
    lines = 200_000
    runs.create("flood", "--standin_flood", str(lines), "--standin_flood_frames", "50000")
    runs.start("flood")
    props = runs.wait_settled("flood", timeout_s=600)
    assert props["Result"] == "success"
    expected = list(range(1, lines + 1))
    in_file = flood_numbers(runs.log("flood"))
    assert len(in_file) == lines and digest(in_file) == digest(expected)
    in_journal = flood_numbers(journal_text(runs, "flood", lines))
    assert len(in_journal) == lines and digest(in_journal) == digest(expected)
    # 50,000 \r frames became a handful of progress lines, the last frame kept
    progress = [l for l in runs.log("flood").splitlines() if l.startswith("steps:")]
    assert 1 <= len(progress) < 1000
    assert progress[-1].startswith("steps: 100%") and "50000/50000" in progress[-1]


def test_frozen_journald_does_not_slow_the_trainer(runs):
    box = runs.box
    rate = 20_000  # lines/s the trainer holds unless its writes block
    lines = 20 * rate
    runs.create("frozen", "--standin_flood", str(lines), "--standin_flood_rate", str(rate))
    runs.start("frozen")
    rate_file = runs.run_dir("frozen") / ".standin-flood-rate.jsonl"

    def windows() -> list[dict]:
        try:
            return [json.loads(l) for l in rate_file.read_text().splitlines() if l.strip()]
        except (OSError, ValueError):
            return []

    box.wait_for(lambda: len(windows()) >= 6, timeout_s=120, what="3 s of flood")
    jpid = box.run_in("pidof", "systemd-journald").stdout.split()[0]
    box.run_in("kill", "-STOP", jpid)
    try:
        stopped_at = windows()[-1]["t"]
        # hold journald frozen while the flood covers 10 s more (the rate file is the clock)
        box.wait_for(lambda: windows() and windows()[-1]["t"] >= stopped_at + 10, timeout_s=60,
                     what="10 s of flood with journald frozen")
        resumed_at = windows()[-1]["t"]
    finally:
        box.run_in("kill", "-CONT", jpid)
    props = runs.wait_settled("frozen", timeout_s=600)
    assert props["Result"] == "success"
    w = windows()
    before = [x["lines"] for x in w if x["t"] <= stopped_at][1:]  # skip the start-up window
    during = [x["lines"] for x in w if stopped_at < x["t"] <= resumed_at]
    assert before and during
    rate_before = sum(before) / len(before)
    rate_during = sum(during) / len(during)
    assert rate_during >= 0.95 * rate_before, (rate_before, rate_during)
    expected = list(range(1, lines + 1))
    assert flood_numbers(runs.log("frozen")) == expected
    assert flood_numbers(journal_text(runs, "frozen", lines)) == expected


def test_symlink_at_training_log_is_refused(runs):
    d = runs.create("symlink")
    target = d / "precious.txt"
    target.write_text("do not touch\n")
    (d / "training.log").symlink_to(target)
    runs.start("symlink")
    props = runs.wait_settled("symlink", timeout_s=60)
    assert props["ActiveState"] == "failed" and props["ExecMainStatus"] == "78"
    assert target.read_text() == "do not touch\n"
    errs = [str(e["MESSAGE"]) for e in runs.journal("symlink", "-p", "err")
            if e.get("SYSLOG_IDENTIFIER", "").startswith("fluxgym-")]
    assert len(errs) == 1 and "training.log" in errs[0]


def test_disk_full_run_continues_and_log_marks_the_gap(work_dir):
    """outputs/NAME on a small tmpfs that fills up: the trainer keeps running, the journal
    gets everything and says what happened, training.log catches up and marks its gap."""
    from systemd_box import SystemdBox

    name, lines = "diskfull", 150_000  # 13.5 MB at 6000 lines/s: 25 s
    home = work_dir / "home"
    mnt = home / "outputs" / name
    mnt.mkdir(parents=True)
    # mounted before the box boots, so the box's mount namespace holds a copy of it
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    box = SystemdBox(work_dir / "box")
    try:
        box.start()
        runs = Runs(box, home)
        # the trainer's own files (checkpoints, model) live on a disk with room
        runs.create(name, "--standin_flood", str(lines), "--standin_flood_rate", "6000",
                    output_dir=home / "checkpoints")  # inside ReadWritePaths=
        log = mnt / "training.log"
        runs.start(name)
        try:
            box.wait_for(lambda: log.exists() and log.stat().st_size > 2_000_000, timeout_s=60,
                         what="training.log to grow")
        except Exception:
            print("\n".join(str(e.get("MESSAGE"))[:300] for e in runs.journal(name)[:30]))
            raise
        filler = mnt / "filler"
        with open(filler, "wb") as f:  # fill the disk to the last block
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        box.wait_for(lambda: any("training.log" in str(e.get("MESSAGE")) for e in runs.journal(name, "-p", "err")),
                     timeout_s=60, what="the disk-full error in the journal", interval_s=1.0)
        # keep the disk full while the trainer prints 10 s more: more than the sink may hold
        rate_file = home / "checkpoints" / ".standin-flood-rate.jsonl"

        def flood_clock() -> float:
            rows = [json.loads(l) for l in rate_file.read_text().splitlines() if l.strip()]
            return rows[-1]["t"] if rows else 0.0

        full_at = flood_clock()
        box.wait_for(lambda: flood_clock() >= full_at + 10, timeout_s=60, what="10 s of flood on a full disk")
        filler.unlink()  # space returns
        props = runs.wait_settled(name, timeout_s=300)
        text = log.read_text(errors="replace")
        why = "\n".join(str(e.get("MESSAGE"))[:200] for e in runs.journal(name)
                        if not str(e.get("MESSAGE")).startswith("flood line"))[-6000:]
        assert props["Result"] == "success" and runs.status(name)["status"] == "completed", why
        gap = re.search(r"^==== training.log gap: (\d+) lines \(\d+ bytes\) lost between (\S+) and (\S+)", text, re.M)
        assert gap, "no gap marker"
        assert flood_numbers(journal_text(runs, name, lines)) == list(range(1, lines + 1))
        in_file = flood_numbers(text)
        # ordered, exactly the lines the marker does not account for, caught up to the end
        assert in_file == sorted(in_file) and in_file[-1] == lines
        missing = sorted(set(range(1, lines + 1)) - set(in_file))
        assert missing and missing == list(range(missing[0], missing[-1] + 1))  # one hole, where it said
        # the marker counts every lost line: the flood's plus the wrapper's own lines of that time
        assert len(missing) <= int(gap.group(1)) <= len(missing) + 10
    finally:
        box.kill()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def all_log_lines(run_dir) -> list[str]:
    """training.log with its rotated predecessors (.N.gz oldest first), as lines."""
    import gzip

    parts = []
    rotated = sorted(run_dir.glob("training.log.*"), key=lambda p: -int(p.name.split(".")[2]))
    for p in rotated:
        data = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        parts.append(data.decode(errors="replace"))
    parts.append((run_dir / "training.log").read_text(errors="replace"))
    return "".join(parts).splitlines()


def test_logs_follow_across_watchdog_restart_and_rotation(runs):
    name = "follow"
    d = runs.create(name, "--fault", "hang-idle@12", watchdog={"stall_timeout": "6s"}, epochs=6)
    with open(d / "run.toml", "a") as f:
        f.write('[logs]\nrotate_size = 4096\nkeep = 50\n')  # rotate many times on a small run
    fluxgym = [str(sys.executable.rsplit("/", 1)[0] + "/fluxgym"), "--home", str(runs.home)]
    follower = subprocess.Popen(fluxgym + ["logs", "-f", "-n", "0", name], stdout=subprocess.PIPE)
    try:
        runs.start(name)
        props = runs.wait_settled(name)
        assert props["Result"] == "success" and runs.restarts(name) == 1
        # read (raw, non-blocking) until the follower has shown the run's last line
        fd = follower.stdout.fileno()
        os.set_blocking(fd, False)
        buf = bytearray()

        def seen_end() -> bool:
            try:
                while chunk := os.read(fd, 1 << 16):
                    buf.extend(chunk)
            except BlockingIOError:
                pass
            return re.search(rb"^==== attempt 2 completed", bytes(buf), re.M) is not None

        runs.box.wait_for(seen_end, timeout_s=60, what="the follower to show the end of the run")
        got = bytes(buf).decode(errors="replace").splitlines()
    finally:
        follower.terminate()
        follower.wait(timeout=10)
    assert len(list(d.glob("training.log.*"))) >= 2, "no rotation happened"
    expected = all_log_lines(d)
    assert got == expected
    assert sum(l.startswith("==== attempt") and "·" in l and "fresh start" in l for l in got) == 1
