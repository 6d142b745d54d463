"""The throwaway systemd box itself, systemd behaviours fluxgymd relies on, and the real
unit template loaded and run by a real systemd."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from systemd_box import UNIT_SOURCE_DIR, SystemdBox, box_unavailable_reason, install_fluxgym_units, pids_in_namespace

pytestmark = pytest.mark.systemd

PYTHON = sys.executable  # the venv's python; sdnotify is installed there
MAX_EXPOSURE = 4.5


def write_script(box: SystemdBox, name: str, text: str) -> Path:
    path = box.workdir / "scripts" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def host_state() -> dict[str, object]:
    """What a box could leak into: mounts (incl. superblock flags), /dev, /sys/fs/cgroup."""
    mounts = sorted(line.split(" ", 4)[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())
    return {
        "mounts": mounts,
        "dev": sorted(os.listdir("/dev")),
        "cgroup_root": sorted(os.listdir("/sys/fs/cgroup")),
    }


# ---------------------------------------------------------------------- the box itself

def test_boot_runs_journald_and_nothing_from_the_host(systemd_box: SystemdBox) -> None:
    box = systemd_box
    assert box.run_in("cat", "/proc/1/comm").stdout.strip() == "systemd"
    assert box.show("systemd-journald.service", "ActiveState")["ActiveState"] == "active"
    state = box.run_in("systemctl", "is-system-running", check=False).stdout.strip()
    assert state in ("running", "degraded"), state
    units = box.systemctl("list-units", "--all", "--plain", "--no-legend").stdout
    # Nothing from /lib/systemd/system may run: tmpfiles would wipe the host's /tmp.
    assert "systemd-tmpfiles" not in units
    assert "getty" not in units
    box.run_in("logger", "-t", "boxprobe", "hello from the box")
    found = box.wait_for(
        lambda: [e for e in box.journal(None, "-t", "boxprobe") if e.get("MESSAGE") == "hello from the box"],
        timeout_s=10, what="logger line in the box journal",
    )
    assert found[0]["SYSLOG_IDENTIFIER"] == "boxprobe"


def test_kill_leaves_nothing_behind(work_dir: Path) -> None:
    if reason := box_unavailable_reason():
        pytest.skip(reason)
    host_tmp = Path(tempfile.mkdtemp(prefix="fluxgym-box-marker-"))
    marker = host_tmp / "marker"
    marker.write_text("still here")
    before = host_state()
    box = SystemdBox(work_dir / "box")
    try:
        box.start()
        # The box has its own /tmp: the host's marker is invisible inside.
        assert box.run_in("test", "-e", str(marker), check=False).returncode != 0
        box.install_unit("sleeper.service", "[Service]\nExecStart=/bin/sleep infinity\n")
        box.daemon_reload()
        box.systemctl("start", "sleeper.service")
        box.wait_unit_state("sleeper.service", active_state="active", timeout_s=10)
        assert len(box.namespace_pids()) >= 3  # systemd, journald, sleep
        ns = box.pid_namespace
        assert ns is not None
        cgroups = box.cgroup_dirs()
        assert any(d.is_dir() for d in cgroups)
    finally:
        box.kill()
    assert pids_in_namespace(ns) == []
    assert marker.read_text() == "still here"
    assert host_state() == before
    assert [d for d in cgroups if d.exists()] == []
    box.kill()  # idempotent
    marker.unlink()
    host_tmp.rmdir()


# ---------------------------------------------------------------------- systemd behaviours

WATCHDOG_SCRIPT = """\
import time
import sdnotify

n = sdnotify.SystemdNotifier(debug=True)
n.notify("READY=1")
n.notify("WATCHDOG_USEC=1500000")  # narrow the unit's 30 s ceiling to 1.5 s, as fluxgymd does
for _ in range(3):
    n.notify("WATCHDOG=1")
    time.sleep(0.3)
print("stopped pinging", flush=True)
while True:
    time.sleep(60)
"""


def test_watchdog_kills_and_restarts_a_silent_notify_service(systemd_box: SystemdBox) -> None:
    box = systemd_box
    script = write_script(box, "wd.py", WATCHDOG_SCRIPT)
    box.install_unit(
        "wd.service",
        "[Service]\nType=notify\nNotifyAccess=main\nWatchdogSec=30s\n"
        f"ExecStart={PYTHON} {script}\nRestart=on-failure\nRestartSec=200ms\n",
    )
    box.daemon_reload()
    box.systemctl("start", "wd.service")
    props = box.wait_unit_state("wd.service", timeout_s=30, NRestarts="2")
    assert int(props["NRestarts"]) == 2
    box.wait_for(
        lambda: sum("Watchdog timeout" in m for m in box.journal_messages("wd.service")) >= 2,
        timeout_s=10, what="two watchdog timeouts in the journal",
    )
    messages = box.journal_messages("wd.service")
    assert any(re.search(r"Failed with result 'watchdog'", m) for m in messages), messages
    assert messages.count("stopped pinging") >= 2
    box.systemctl("stop", "wd.service")


def test_restart_prevent_exit_status_stops_restarts(systemd_box: SystemdBox) -> None:
    box = systemd_box
    for code in (75, 78):
        box.install_unit(
            f"exit{code}.service",
            "[Unit]\nStartLimitIntervalSec=0\n"
            f"[Service]\nExecStart={PYTHON} -c 'import sys; sys.exit({code})'\n"
            "Restart=on-failure\nRestartSec=100ms\nRestartPreventExitStatus=66 78 79\n",
        )
    box.daemon_reload()
    box.systemctl("start", "exit75.service", "exit78.service")
    # Control: 75 is restarted again and again...
    box.wait_for(lambda: int(box.show("exit75.service", "NRestarts")["NRestarts"]) >= 2,
                 timeout_s=20, what="exit75.service to be restarted twice")
    box.systemctl("stop", "exit75.service")
    # ...78 ends failed at once.
    props = box.wait_unit_state("exit78.service", active_state="failed", timeout_s=20)
    full = box.show("exit78.service", "NRestarts", "ExecMainStatus", "Result")
    assert full["ExecMainStatus"] == "78"
    assert full["Result"] == "exit-code"
    assert full["NRestarts"] == "0", props


def test_priority_prefixes_become_journal_priorities(systemd_box: SystemdBox) -> None:
    box = systemd_box
    script = write_script(
        box, "prio.py",
        "print('<3>Traceback: boom', flush=True)\n"
        "print('<4>warning: careful', flush=True)\n"
        "print('plain line', flush=True)\n"
        "import sys; sys.stdout.buffer.write(b'<3>bad byte \\xff end\\n')\n",
    )
    box.install_unit("prio.service", f"[Service]\nType=oneshot\nExecStart={PYTHON} {script}\n")
    box.daemon_reload()
    box.systemctl("start", "prio.service")  # oneshot: returns when the script has exited

    def entries() -> dict[str, str] | None:
        found = {str(e.get("MESSAGE")): str(e.get("PRIORITY")) for e in box.journal("prio.service")}
        return found if "plain line" in found and any("bad byte" in m for m in found) else None

    found = box.wait_for(entries, timeout_s=10, what="prio.service lines in the journal")
    assert found["Traceback: boom"] == "3"
    assert found["warning: careful"] == "4"
    assert found["plain line"] == "6"
    bad = next(m for m in found if "bad byte" in m)  # non-UTF-8 arrives as a byte array
    assert found[bad] == "3" and bad.endswith("end")
    warnings = box.journal_messages("prio.service", "-p", "warning")
    assert "Traceback: boom" in warnings and "plain line" not in warnings


# ---------------------------------------------------------------------- the real unit

def _unit_file_complaints(box: SystemdBox) -> list[str]:
    """PID 1's messages about any unit file or drop-in in the box (parse errors name the file)."""
    unit_dir = str(box.unit_dir)
    return [m for m in box.journal_messages(None, "_PID=1") if unit_dir in m]


def test_complaint_check_catches_a_bad_setting(systemd_box: SystemdBox) -> None:
    box = systemd_box
    box.install_unit("bad.service", "[Service]\nExecStart=/bin/true\nWatchdogSecs=5\nKillMode=sometimes\n")
    box.daemon_reload()
    assert box.show("bad.service", "LoadState")["LoadState"] == "loaded"
    complaints = box.wait_for(lambda: _unit_file_complaints(box), timeout_s=10, what="parse warnings")
    assert any("WatchdogSecs" in m for m in complaints), complaints


def test_real_train_unit_loads_cleanly_with_test_dropin(systemd_box: SystemdBox, work_dir: Path) -> None:
    box = systemd_box
    home = work_dir / "home"
    home.mkdir()
    fluxgymd = Path(sys.prefix) / "bin" / "fluxgymd"  # may not exist yet: loading must not care
    install_fluxgym_units(box, home, fluxgymd)
    unit = "fluxgym-train@my\\x2dlora.service"
    props = box.show(
        unit, "LoadState", "Type", "NotifyAccess", "WatchdogUSec", "Restart", "RestartUSec",
        "RestartPreventExitStatus", "KillMode", "KillSignal", "TimeoutStopUSec", "User",
        "DevicePolicy", "DeviceAllow", "ProtectSystem", "ReadWritePaths", "ExecStart",
        "SyslogIdentifier", "OnFailure", "StartLimitBurst", "Environment", "CapabilityBoundingSet",
    )
    assert props["LoadState"] == "loaded"
    assert props["Type"] == "notify"
    assert props["NotifyAccess"] == "main"
    assert props["WatchdogUSec"] == "infinity"  # shown only while running; see the run test
    assert props["Restart"] == "on-failure"
    assert props["RestartUSec"] == "1s"  # the test drop-in's
    assert set(props["RestartPreventExitStatus"].split()) == {"66", "78", "79"}
    assert props["KillMode"] == "control-group"
    assert props["KillSignal"] == "15"
    assert props["User"] == "root"  # the test drop-in's
    assert props["DevicePolicy"] == "closed"
    assert "char-nvidia* rw" in props["DeviceAllow"]
    assert props["ProtectSystem"] == "strict"
    assert str(home) in props["ReadWritePaths"].split()
    assert f"path={fluxgymd} ; argv[]={fluxgymd} run my-lora ;" in props["ExecStart"]
    assert "/usr/bin/env" not in props["ExecStart"]  # the drop-in replaced, not appended
    assert props["SyslogIdentifier"] == "fluxgym-my-lora"
    # systemctl show quotes values holding backslashes, and doubles them.
    on_failure = props["OnFailure"].strip('"').replace("\\\\", "\\")
    assert on_failure == "fluxgym-notify@fluxgym-train@my\\x2dlora.service.service"
    assert f"FLUXGYM_HOME={home}" in props["Environment"]
    assert props["CapabilityBoundingSet"] == ""
    notify = box.show("fluxgym-notify@fluxgym-train@x.service.service", "LoadState")
    assert notify["LoadState"] == "loaded"
    assert _unit_file_complaints(box) == []


FAKE_FLUXGYMD = """\
#!{python}
# Stand-in for `fluxgymd run NAME`: probes the sandbox, reports, exits with {code}.
import json, os, sys
import sdnotify

home = os.environ["FLUXGYM_HOME"]
report = {{"argv": sys.argv[1:], "home_writable": False, "outside_writable": True,
          "notify_socket": bool(os.environ.get("NOTIFY_SOCKET")),
          "watchdog_usec": os.environ.get("WATCHDOG_USEC")}}
with open(os.path.join(home, "probe.txt"), "w") as f:
    f.write("ok")
report["home_writable"] = True
try:
    open({outside!r}, "w").close()
except OSError as e:
    report["outside_writable"] = False
    report["outside_error"] = e.strerror
sdnotify.SystemdNotifier().notify("READY=1")
with open(os.path.join(home, "report.json.tmp"), "w") as f:
    json.dump(report, f)
os.replace(os.path.join(home, "report.json.tmp"), os.path.join(home, "report.json"))
print("<3>fake fluxgymd giving up", flush=True)
sys.exit({code})
"""


def test_real_train_unit_runs_sandboxed_and_stays_failed_on_78(systemd_box: SystemdBox, work_dir: Path) -> None:
    box = systemd_box
    home = work_dir / "home"
    home.mkdir()
    outside = work_dir / "outside.txt"  # writable on the host, read-only in the unit
    fake = work_dir / "fake-fluxgymd"
    fake.write_text(FAKE_FLUXGYMD.format(python=PYTHON, code=78, outside=str(outside)))
    fake.chmod(0o755)
    install_fluxgym_units(box, home, fake)
    unit = "fluxgym-train@demo.service"
    box.systemctl("start", unit, check=False)  # start fails: the main process exits 78
    props = box.wait_unit_state(unit, active_state="failed", timeout_s=30)
    details = box.show(unit, "ExecMainStatus", "NRestarts")
    assert details["ExecMainStatus"] == "78"
    assert details["NRestarts"] == "0", props
    report = json.loads((home / "report.json").read_text())
    assert report["argv"] == ["run", "demo"]
    assert report["home_writable"] is True
    assert report["outside_writable"] is False, report
    assert report["notify_socket"] is True  # the wrapper (main process) gets the socket
    assert report["watchdog_usec"] == str(30 * 60 * 10**6)  # WatchdogSec=30min reaches it
    assert not outside.exists()
    lines = box.journal(None, "-t", "fluxgym-demo")
    assert any(e.get("MESSAGE") == "fake fluxgymd giving up" and e.get("PRIORITY") == "3" for e in lines)
    # OnFailure= fired the notify unit (its `fluxgym` is not installed here, so it fails).
    notify = "fluxgym-notify@fluxgym-train@demo.service.service"
    seen = box.wait_for(
        lambda: (p := box.show(notify, "ActiveState", "ExecMainStartTimestampMonotonic"))
        ["ExecMainStartTimestampMonotonic"] not in ("", "0") and p,
        timeout_s=20, what=f"{notify} to run",
    )
    assert seen


def _exposure(unit_file: Path) -> float:
    r = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", unit_file.name],
        cwd=unit_file.parent, capture_output=True, text=True, check=False,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", r.stdout)
    assert m, f"no exposure line in systemd-analyze output: {r.stdout[-500:]} {r.stderr}"
    return float(m.group(1))


@pytest.mark.parametrize("name", ["fluxgym-train@.service", "fluxgym-notify@.service"])
def test_unit_exposure_score(name: str) -> None:
    if not Path("/usr/bin/systemd-analyze").exists():
        pytest.skip("needs systemd-analyze")
    score = _exposure(UNIT_SOURCE_DIR / name)
    assert score <= MAX_EXPOSURE, f"{name}: exposure {score} > {MAX_EXPOSURE}"
