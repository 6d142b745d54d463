"""`fluxgym` under a real systemd (issue 6): `fluxgym install` then `fluxgym start` runs a
stand-in training; `ls`, `status`, `checkpoints` show it while running, after a watchdog
restart, after completion and after a failure; a failed run starts the notify unit with the
right name and result. `fluxgym` itself runs inside the box, so it talks to the box's
systemd exactly as it would on a real machine."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from service_helpers import standin_argv, toml_list
from systemd_box import REPO_ROOT, SystemdBox, checkout_dropin_lines
from test_cli import CHECKPOINTS_SCHEMA, LS_SCHEMA, RUN_SCHEMA, validate

pytestmark = pytest.mark.systemd

VENV_BIN = Path(sys.executable).parent
FLUXGYM = str(VENV_BIN / "fluxgym")
NOTIFY_SCRIPT = (
    "import json, os, sys; p = os.path.join(os.environ['FLUXGYM_HOME'], 'notified.jsonl');"
    "e = {k: v for k, v in os.environ.items() if k.startswith('FLUXGYM_')};"
    "e['stdin'] = json.loads(sys.stdin.read()); open(p, 'a').write(json.dumps(e) + '\\n')"
)


class Cli:
    def __init__(self, box: SystemdBox, home: Path) -> None:
        self.box, self.home = box, home

    def __call__(self, *args: str, check: bool = True) -> Any:
        r = self.box.run_in(FLUXGYM, "--home", str(self.home), *args, check=False, timeout_s=60)
        if check:
            assert r.returncode == 0, f"fluxgym {' '.join(args)}: {r.returncode}: {r.stderr}"
        return r

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json").stdout)

    def status(self, name: str) -> dict[str, Any]:
        doc = self.json("status", name)
        validate(doc, RUN_SCHEMA)
        return doc

    def wait(self, name: str, pred: Any, what: str, timeout_s: float = 120.0) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def check() -> dict[str, Any] | None:
            nonlocal last
            last = self.status(name)
            return last if pred(last) else None

        try:
            return self.box.wait_for(check, timeout_s, what, interval_s=0.3)
        except Exception as e:
            raise AssertionError(f"{e}; last status {json.dumps(last)}") from None

    def notified(self) -> list[dict[str, Any]]:
        p = self.home / "notified.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def settled(doc: dict[str, Any]) -> bool:
    u = doc["unit"]
    return u["active_state"] in ("inactive", "failed") and u["sub_state"] != "auto-restart"


@pytest.fixture(scope="module")
def cli(systemd_box_module: SystemdBox, module_home: Path) -> Cli:
    box = systemd_box_module
    home = module_home
    (home / "outputs").mkdir()
    (home / "fluxgym.toml").write_text(
        f"[notify]\ncommand = {toml_list([sys.executable, '-c', NOTIFY_SCRIPT])}\n"
    )
    c = Cli(box, home)
    first = c("install", "--home", str(home), "--user", "root", "--unit-dir", str(box.unit_dir)).stdout
    assert sum(line.startswith("wrote ") for line in first.splitlines()) == 4, first
    assert "ran systemctl daemon-reload" in first
    again = c("install", "--home", str(home), "--user", "root", "--unit-dir", str(box.unit_dir)).stdout
    assert all(line.startswith(("unchanged", "note:")) for line in again.splitlines()), again
    # test-only: restart quickly (a real box keeps the template's 10 s)
    box.install_dropin("fluxgym-train@.service", "50-test.conf",
                       f"[Service]\nRestartSec=1\n{checkout_dropin_lines()}")
    if checkout_dropin_lines():
        box.install_dropin("fluxgym-notify@.service", "50-test.conf", f"[Service]\n{checkout_dropin_lines()}")
    box.daemon_reload()
    props = box.show("fluxgym-train@x.service", "ExecStart", "User", "Environment", "OnSuccess")
    assert str(VENV_BIN / "fluxgymd") in props["ExecStart"] and props["User"] == "root"
    assert f"FLUXGYM_HOME={home}" in props["Environment"]
    assert props["OnSuccess"] == "fluxgym-notify@fluxgym-train@x.service.service"
    return c


def create(c: Cli, name: str, *standin: str, epochs: int = 4, step_s: float = 0.3,
           watchdog: dict[str, str] | None = None, extra: str = "") -> None:
    d = c.home / "outputs" / name
    d.mkdir()
    wd = {"stall_timeout": "8s", "poll_interval": "1s", **(watchdog or {})}
    (d / "run.toml").write_text(
        f"[train]\ncommand = {toml_list(standin_argv(name, d, *standin, epochs=epochs, step_s=step_s))}\n"
        f"workdir = {json.dumps(str(REPO_ROOT))}\n[watchdog]\n"
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in wd.items()) + extra
    )


def test_start_running_then_completed(cli: Cli) -> None:
    create(cli, "clean", extra="[notify]\non_success = true\n")
    out = cli("start", "clean").stdout
    assert "started fluxgym-train@clean.service" in out
    run = cli.wait("clean", lambda d: d["status"] == "running" and (d["step"] or 0) >= 3, "clean to run")
    assert run["unit"]["active_state"] == "active" and run["unit"]["sub_state"] == "running"
    assert run["attempt"] == 1 and run["steps"] == 20 and run["last_progress_age_s"] < 60
    assert not run["status_stale"]
    ls = cli.json("ls")
    validate(ls, LS_SCHEMA)
    assert [r["name"] for r in ls["runs"]] == ["clean"]
    table = cli("ls").stdout
    assert "active/running" in table and "running" in table
    done = cli.wait("clean", lambda d: settled(d) and d["status"] == "completed", "clean to complete")
    assert done["unit"]["active_state"] == "inactive" and done["unit"]["result"] == "success"
    assert (done["step"], done["attempt"], done["newest_checkpoint"]) == (20, 1, "clean-000003-state")
    cps = cli.json("checkpoints", "clean")
    validate(cps, CHECKPOINTS_SCHEMA)
    assert [(c["name"], c["epoch"], c["step"], c["usable"]) for c in cps["checkpoints"]] == [
        ("clean-000001-state", 1, 5, True), ("clean-000002-state", 2, 10, True),
        ("clean-000003-state", 3, 15, True), ("clean-state", None, None, False)]
    assert cli("verify", "clean").returncode == 0
    # on_success: the notify unit (OnSuccess= from the install drop-in) reports completion
    got = cli.box.wait_for(lambda: [e for e in cli.notified() if e["FLUXGYM_RUN"] == "clean"],
                           timeout_s=30, what="success notification")
    assert got[0]["FLUXGYM_RESULT"] == "success" and got[0]["FLUXGYM_STATUS"] == "completed"


def test_watchdog_restart_is_visible(cli: Cli) -> None:
    create(cli, "hang", "--fault", "hang-idle@8", epochs=6, watchdog={"stall_timeout": "6s"})
    cli("start", "hang")
    again = cli.wait("hang", lambda d: d["attempt"] == 2 and d["status"] == "running"
                     and d["unit"]["active_state"] == "active", "attempt 2 to run", timeout_s=180)
    assert again["unit"]["n_restarts"] >= 1
    assert again["newest_checkpoint"] in ("hang-000001-state", "hang-000002-state")
    assert again["step"] >= 5  # absolute: attempt 2 resumed from epoch 1 (step 5), never back to 0
    row = next(r for r in cli.json("ls")["runs"] if r["name"] == "hang")
    assert row["attempt"] == 2
    done = cli.wait("hang", lambda d: settled(d) and d["status"] == "completed", "hang to complete", timeout_s=180)
    assert done["attempt"] == 2 and done["step"] == 30 and done["unit"]["result"] == "success"
    # on_success is off for this run: nothing reported
    assert not [e for e in cli.notified() if e["FLUXGYM_RUN"] == "hang"]


def test_failed_run_notifies_with_name_and_result(cli: Cli) -> None:
    # a dash needs escaping in the instance name: fluxgym-train@give\x2dup.service
    create(cli, "give-up", "--fault", "crash@3", "--fault-every-attempt", step_s=0.05,
           extra="[restart]\nmax_attempts_without_progress = 1\n")
    out = cli("start", "give-up", check=False)
    failed = cli.wait("give-up", lambda d: settled(d) and d["status"] == "failed", "give-up to fail")
    assert failed["unit"]["name"] == "fluxgym-train@give\\x2dup.service"
    assert failed["unit"]["active_state"] == "failed" and failed["unit"]["result"] == "exit-code"
    assert failed["unit"]["exec_main_status"] == 79 and "no progress" in failed["reason"]
    assert failed["newest_checkpoint"] is None and failed["attempt"] == 1, out.stderr
    got = cli.box.wait_for(lambda: [e for e in cli.notified() if e["FLUXGYM_RUN"] == "give-up"],
                           timeout_s=30, what="failure notification")
    e = got[0]
    assert e["FLUXGYM_UNIT"] == "fluxgym-train@give\\x2dup.service"
    assert e["FLUXGYM_RESULT"] == "exit-code" and e["FLUXGYM_EXIT_STATUS"] == "79"
    assert e["FLUXGYM_STATUS"] == "failed" and "stand-in fault" in e["FLUXGYM_LOG_TAIL"]
    assert e["stdin"]["run"] == "give-up"
    table = cli("ls").stdout
    assert any(line.startswith("give-up") and "failed/failed (exit-code)" in line for line in table.splitlines())


def test_stop_and_errors(cli: Cli) -> None:
    create(cli, "stopme", epochs=20)
    cli("start", "stopme")
    cli.wait("stopme", lambda d: (d["step"] or 0) >= 1, "stopme to step")
    assert "stopped fluxgym-train@stopme.service" in cli("stop", "stopme").stdout
    st = cli.status("stopme")
    assert st["status"] == "stopped" and st["unit"]["active_state"] == "inactive"
    # systemctl refuses: one line naming the unit
    r = cli("start", "--user-unit", "stopme", check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("fluxgym: systemctl start fluxgym-train@stopme.service: ")
    r = cli("start", "ghost", check=False)
    assert r.returncode == 66 and "no run 'ghost'" in r.stderr


def test_hand_typed_spelling_of_a_dashed_name_is_seen_and_stopped(cli: Cli) -> None:
    # a person types `systemctl start fluxgym-train@my-run` (not the escaped my\x2drun)
    create(cli, "my-run", epochs=20)
    cli.box.systemctl("start", "--no-block", "fluxgym-train@my-run.service")
    run = cli.wait("my-run", lambda d: d["unit"]["active_state"] == "active" and (d["step"] or 0) >= 1,
                   "my-run to step under its hand-typed unit")
    assert run["unit"]["name"] == "fluxgym-train@my-run.service"
    r = cli("start", "my-run", check=False)
    assert r.returncode != 0 and "already running as fluxgym-train@my-run.service" in r.stderr
    cli("stop", "my-run")
    st = cli.status("my-run")
    assert st["status"] == "stopped" and st["unit"]["active_state"] == "inactive"
