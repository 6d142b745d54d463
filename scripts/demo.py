"""The demo: fluxgym-train@demo under the real unit, one injected idle hang, then the
watchdog kill, the restart, the resume and the verified model (about two minutes).

Runs under this machine's systemd when it is PID 1 (units go to /run/systemd/system, gone
at reboot), otherwise under a throwaway systemd booted in fresh namespaces (tests/systemd_box.py).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from service_helpers import standin_argv, toml_list  # noqa: E402
from systemd_box import checkout_dropin_lines  # noqa: E402

VENV_BIN = Path(sys.executable).parent
NAME = "demo"
UNIT = f"fluxgym-train@{NAME}.service"


def say(text: str) -> None:
    print(f"\n\033[1m>>> {text}\033[0m" if sys.stdout.isatty() else f"\n>>> {text}", flush=True)


class RealSystemd:
    """This machine's own systemd (PID 1)."""

    unit_dir = Path("/run/systemd/system")

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=check)

    def run_in(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, "-p", ",".join(props)).stdout
        return dict(line.partition("=")[::2] for line in out.splitlines())

    def kill(self) -> None:
        pass


def make_run(home: Path) -> Path:
    run_dir = home / "outputs" / NAME
    run_dir.mkdir(parents=True)
    argv = standin_argv(NAME, run_dir, "--fault", "hang-idle@20", epochs=6, batches=8, step_s=0.15,
                        accelerate=True)
    (run_dir / "run.toml").write_text(
        "# the stand-in trainer, launched through accelerate as FluxGym launches kohya\n"
        f"[train]\ncommand = {toml_list(argv)}\nworkdir = {json.dumps(str(REPO))}\n\n"
        "# short windows so the demo's hang is caught quickly\n"
        "[watchdog]\nstall_timeout = \"15s\"\npoll_interval = \"2s\"\n"
    )
    return run_dir


def main() -> int:
    home = REPO / ".work" / "demo-home"
    shutil.rmtree(home, ignore_errors=True)
    (home / "outputs").mkdir(parents=True)
    run_dir = make_run(home)
    fluxgym = str(VENV_BIN / "fluxgym")

    if os.path.isdir("/run/systemd/system") and os.environ.get("FLUXGYM_DEMO_BOX") != "1":
        say("using this machine's systemd (PID 1); units go to /run/systemd/system")
        box = RealSystemd()
        unit_dir = box.unit_dir
    else:
        from systemd_box import SystemdBox, box_unavailable_reason

        reason = box_unavailable_reason()
        if reason:
            print(f"demo: cannot boot a throwaway systemd here: {reason}", file=sys.stderr)
            return 1
        say("systemd is not PID 1 here: booting a throwaway systemd in fresh namespaces")
        box = SystemdBox(REPO / ".work" / "demo-box")
        shutil.rmtree(REPO / ".work" / "demo-box", ignore_errors=True)
        box.start()
        unit_dir = box.unit_dir
    try:
        say(f"fluxgym install --home {home} --user root  (unit template + drop-in)")
        out = box.run_in(fluxgym, "install", "--home", str(home), "--user", "root",
                         "--unit-dir", str(unit_dir), check=False)
        print(out.stdout + out.stderr, end="")
        extra = checkout_dropin_lines()
        if extra:  # a checkout under /tmp: the unit's PrivateTmp=yes would hide it
            dropin = unit_dir / "fluxgym-train@.service.d" / "50-demo-checkout.conf"
            dropin.write_text(f"[Service]\n{extra}")
        box.systemctl("daemon-reload")
        say(f"systemctl start {UNIT}   (stand-in trainer; it will hang idle at step 20)")
        box.systemctl("start", "--no-block", UNIT)
        follow_until_done(box, run_dir)
        say(f"journalctl -u {UNIT} (systemd's view)")
        j = box.run_in("journalctl", "-u", UNIT, "--no-pager", "-o", "short-precise", check=False).stdout
        for line in j.splitlines():
            if any(k in line for k in ("Watchdog", "restart", "Started", "Deactivated", "fluxgymd:", "Failed")):
                print("  " + line)
        say("stall forensics written before systemd fired")
        for report in sorted((run_dir / "stalls").glob("*.txt")):
            text = report.read_text()
            print(f"  {report}")
            for line in text.splitlines():
                if "standin_hang_idle" in line or line.startswith("why:"):
                    print("    " + line.strip())
        say(f"fluxgym checkpoints {NAME}")
        print(box.run_in("env", f"FLUXGYM_HOME={home}", fluxgym, "checkpoints", NAME, check=False).stdout, end="")
        say(f"fluxgym verify {NAME}")
        v = box.run_in("env", f"FLUXGYM_HOME={home}", fluxgym, "verify", NAME, check=False)
        print(v.stdout + v.stderr, end="")
        return 0 if v.returncode == 0 else 1
    finally:
        box.kill()


def follow_until_done(box, run_dir: Path, timeout_s: float = 600) -> None:
    """Print training.log's banners and key lines as they come, plus unit state changes."""
    log = run_dir / "training.log"
    pos = 0
    last_state = None
    deadline = time.monotonic() + timeout_s
    keys = ("====", "epoch ", "saving state", "model saved", "fault")
    while time.monotonic() < deadline:
        if log.exists():
            with open(log, "rb") as f:
                f.seek(pos)
                chunk = f.read()
            # only whole lines; the rest waits for the next round
            cut = chunk.rfind(b"\n") + 1
            pos += cut
            for raw in chunk[:cut].decode(errors="replace").splitlines():
                line = raw.strip()
                if any(k in line for k in keys) or line.startswith("steps:"):
                    print("  log | " + line, flush=True)
        props = box.show(UNIT, "ActiveState", "SubState", "Result", "StatusText")
        state = (props.get("ActiveState"), props.get("SubState"), props.get("Result"))
        if state != last_state:
            print(f"  unit | {state[0]}/{state[1]} result={state[2]}  {props.get('StatusText', '')}", flush=True)
            last_state = state
        if state[0] in ("inactive", "failed") and state[1] != "auto-restart" and log.exists():
            return
        time.sleep(0.5)  # a display refresh rate, not synchronisation
    raise SystemExit("demo: the run did not finish in time")


if __name__ == "__main__":
    sys.exit(main())
