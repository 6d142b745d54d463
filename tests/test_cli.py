"""`fluxgym` without systemd: real runs of the real wrapper and stand-in trainer make the
status.json, ledger, checkpoints and training.log the tools read; `--json` is checked
against the schema documented in docs/cli.md."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from fluxgymd.cli import main as cli
from fluxgymd.fluxgym_gen import RunSpec, render_dataset_toml, render_train_sh
from fluxgymd.metrics import prom_path, render_prom, write_prom
from fluxgymd.notify import Event, expand, run_name_of_unit, should_notify, unescape_instance
from fluxgymd.status import RunStatus, StatusDoc, status_line
from fluxgymd.systemctl import parse_show

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
FIXTURES = Path(__file__).parent / "fixtures" / "fluxgym"

# --- the documented --json schema (docs/cli.md), checked by a tiny validator -----------------
INT, NUM, STR, BOOL = (int,), (int, float), (str,), (bool,)
OPT = type(None)
UNIT_SCHEMA = {
    "name": STR, "load_state": (str, OPT), "active_state": (str, OPT), "sub_state": (str, OPT),
    "result": (str, OPT), "n_restarts": (int, OPT), "exec_main_status": (int, OPT),
}
RUN_SCHEMA: dict[str, Any] = {
    "schema": INT, "name": STR, "run_dir": STR, "unit": UNIT_SCHEMA,
    "status": (str, OPT), "status_stale": BOOL, "reason": (str, OPT), "attempt": (int, OPT),
    "attempts_without_progress": (int, OPT), "epoch": (int, OPT), "epochs": (int, OPT),
    "step": (int, OPT), "steps": (int, OPT), "loss": (int, float, OPT), "it_per_s": (int, float, OPT),
    "eta_s": (int, float, OPT), "gpu_percent": (int, OPT), "newest_checkpoint": (str, OPT),
    "newest_checkpoint_step": (int, OPT), "last_progress_at": (str, OPT),
    "last_progress_age_s": (int, float, OPT), "updated_at": (str, OPT), "config_problem": (str, OPT),
}
LS_SCHEMA = {"schema": INT, "home": STR, "runs": [RUN_SCHEMA]}
CHECKPOINT_SCHEMA = {
    "name": STR, "path": STR, "kind": STR, "epoch": (int, OPT), "step": (int, OPT), "usable": BOOL,
    "problem": (str, OPT), "resume_target": BOOL,
}
CHECKPOINTS_SCHEMA = {"schema": INT, "name": STR, "checkpoints": [CHECKPOINT_SCHEMA]}
DOCTOR_SCHEMA = [{"name": STR, "level": STR, "detail": STR, "fix": (str, OPT)}]
STATUS_VALUES = {s.value for s in RunStatus}


def validate(value: Any, schema: Any, where: str = "$") -> None:
    """Exact keys, JSON types (bool is not an int), lists of one item schema."""
    if isinstance(schema, dict):
        assert isinstance(value, dict), f"{where}: expected an object, got {value!r}"
        assert set(value) == set(schema), f"{where}: keys differ: {set(value) ^ set(schema)}"
        for k, sub in schema.items():
            validate(value[k], sub, f"{where}.{k}")
    elif isinstance(schema, list):
        assert isinstance(value, list), f"{where}: expected a list"
        for i, item in enumerate(value):
            validate(item, schema[0], f"{where}[{i}]")
    else:
        ok = isinstance(value, schema) and not (isinstance(value, bool) and bool not in schema)
        assert ok, f"{where}: {value!r} is not {schema}"


# --- real runs ---------------------------------------------------------------------------------

def write_run(home: Path, name: str, *standin: str, epochs: int = 2, batches: int = 3,
              step_s: float = 0.01) -> Path:
    d = home / "outputs" / name
    d.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "fluxgymd.standin", "--output_dir", str(d), "--output_name", name,
            "--max_train_epochs", str(epochs), "--save_every_n_epochs", "1", "--save_state",
            "--standin_batches_per_epoch", str(batches), "--standin_step_seconds", str(step_s), *standin]
    (d / "run.toml").write_text(
        f"[train]\ncommand = {json.dumps(argv)}\nworkdir = {json.dumps(str(REPO))}\n"
        "[watchdog]\nstall_timeout = \"20s\"\npoll_interval = \"1s\"\n"
    )
    return d


def run_wrapper(home: Path, name: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_"))}
    env["FLUXGYM_HOME"] = str(home)
    return subprocess.run([str(VENV_BIN / "fluxgymd"), "run", name], env=env, capture_output=True,
                          timeout=180).returncode


NOTIFY_SCRIPT = (
    "import json, os, sys; p = os.path.join(os.environ['FLUXGYM_HOME'], 'notified.jsonl');"
    "e = {k: v for k, v in os.environ.items() if k.startswith('FLUXGYM_')};"
    "e['argv'] = sys.argv[1:]; e['stdin'] = json.loads(sys.stdin.read());"
    "open(p, 'a').write(json.dumps(e) + '\\n')"
)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`done` completed in one attempt; `broken` died while saving its epoch-2 state
    (attempt 1 failed), then `fixed` is the same kind of run restarted once and completed."""
    h = tmp_path_factory.mktemp("fluxhome")
    (h / "fluxgym.toml").write_text(
        f"[notify]\ncommand = {json.dumps([sys.executable, '-c', NOTIFY_SCRIPT, '{run}', '{result}'])}\n"
    )
    write_run(h, "done", step_s=0.4)  # slow enough for the wrapper to publish progress mid-run
    assert run_wrapper(h, "done") == 0
    write_run(h, "broken", "--fault", "die-saving@6", epochs=3)
    assert run_wrapper(h, "broken") == 75
    write_run(h, "fixed", "--fault", "crash@5", epochs=2)
    assert run_wrapper(h, "fixed") == 75
    assert run_wrapper(h, "fixed") == 0
    return h


def fluxgym(home: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    r = CliRunner().invoke(cli, ["--home", str(home), *args], env=env, catch_exceptions=False)
    return r


def one_line_error(r: Any) -> str:
    err = r.stderr.strip() if hasattr(r, "stderr") else r.output.strip()
    assert r.exit_code != 0
    assert len(err.splitlines()) == 1 and err.startswith("fluxgym: "), err
    return err


# --- ls / status -------------------------------------------------------------------------------

def test_ls_json_matches_schema_and_the_runs(home: Path) -> None:
    r = fluxgym(home, "ls", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    validate(doc, LS_SCHEMA)
    runs = {x["name"]: x for x in doc["runs"]}
    assert sorted(runs) == ["broken", "done", "fixed"]
    for x in runs.values():
        assert x["status"] in STATUS_VALUES
        # no systemd here: every unit field is null, never guessed
        assert {k: v for k, v in x["unit"].items() if k != "name"} == dict.fromkeys(set(UNIT_SCHEMA) - {"name"})
    done = runs["done"]
    assert done["status"] == "completed" and done["attempt"] == 1
    assert (done["step"], done["steps"], done["epochs"]) == (6, 6, 2)
    assert done["epoch"] == 2
    assert done["newest_checkpoint"] == "done-000001-state" and done["newest_checkpoint_step"] == 3
    assert done["last_progress_age_s"] >= 0 and done["unit"]["name"] == "fluxgym-train@done.service"
    broken = runs["broken"]
    assert broken["status"] == "failed-attempt" and broken["attempt"] == 1
    assert broken["newest_checkpoint"] == "broken-000001-state"  # epoch 2 was cut mid-save
    assert runs["fixed"]["status"] == "completed" and runs["fixed"]["attempt"] == 2


def test_status_one_run_json_and_text(home: Path) -> None:
    r = fluxgym(home, "status", "fixed", "--json")
    validate(json.loads(r.stdout), RUN_SCHEMA)
    text = fluxgym(home, "status", "broken").stdout
    assert "failed-attempt: trainer" in text and "broken-000001-state" in text
    assert "\x1b[" not in text  # no colour when not on a terminal
    table = fluxgym(home, "ls").stdout.splitlines()
    assert table[0].split()[:4] == ["NAME", "UNIT", "RESTARTS", "STATUS"]
    assert [line.split()[0] for line in table[1:]] == ["broken", "done", "fixed"]
    assert "completed" in table[2] and "6/6" in table[2] and "done-000001-state" in table[2]


def test_status_without_name_is_the_table(home: Path) -> None:
    table = fluxgym(home, "status").stdout.splitlines()
    assert table[0].startswith("NAME") and [line.split()[0] for line in table[1:]] == ["broken", "done", "fixed"]
    doc = json.loads(fluxgym(home, "status", "--json").stdout)
    validate(doc, LS_SCHEMA)


# --- checkpoints / verify ----------------------------------------------------------------------

def test_checkpoints_show_usable_and_why_not(home: Path) -> None:
    r = fluxgym(home, "checkpoints", "broken", "--json")
    doc = json.loads(r.stdout)
    validate(doc, CHECKPOINTS_SCHEMA)
    cps = {c["name"]: c for c in doc["checkpoints"]}
    assert cps["broken-000001-state"]["usable"] and cps["broken-000001-state"]["resume_target"]
    assert (cps["broken-000001-state"]["epoch"], cps["broken-000001-state"]["step"]) == (1, 3)
    partial = cps["broken-000002-state"]
    assert not partial["usable"] and not partial["resume_target"]
    assert "save was interrupted" in partial["problem"]
    text = fluxgym(home, "checkpoints", "broken").stdout.splitlines()
    assert text[0].startswith("* broken-000001-state") and "usable" in text[0]
    assert "not usable" in text[1] and "interrupted" in text[1]
    # absolute steps across a restart: fixed resumed from epoch 1 and saved epoch 1 only once
    fixed = json.loads(fluxgym(home, "checkpoints", "fixed", "--json").stdout)["checkpoints"]
    assert [(c["name"], c["epoch"], c["step"], c["usable"]) for c in fixed] == [
        ("fixed-000001-state", 1, 3, True), ("fixed-state", None, None, False)]


def test_verify_exit_codes(home: Path) -> None:
    ok = fluxgym(home, "verify", "done")
    assert ok.exit_code == 0 and "done.safetensors" in ok.stdout
    err = one_line_error(fluxgym(home, "verify", "broken"))
    assert "broken" in err and "not verified" in err
    doc = json.loads(fluxgym(home, "verify", "broken", "--json").stdout)
    assert doc["verified"] is False and doc["name"] == "broken"


def test_logs_tail(home: Path) -> None:
    out = fluxgym(home, "logs", "-n", "3", "fixed").stdout.splitlines()
    assert len(out) == 3 and any(line.startswith("==== attempt 2 completed") for line in out)


# --- errors: one line, nonzero -----------------------------------------------------------------

def test_errors_are_one_line(home: Path) -> None:
    assert "no run 'nope'" in one_line_error(fluxgym(home, "status", "nope"))
    assert fluxgym(home, "checkpoints", "nope").exit_code == 66
    err = one_line_error(fluxgym(home, "status", "../etc"))
    assert "invalid run name" in err
    assert "No such command" in one_line_error(fluxgym(home, "frobnicate"))


@pytest.mark.skipif(os.path.isdir("/run/systemd/system"), reason="a booted systemd would really start it")
def test_systemctl_failure_is_one_line(home: Path) -> None:
    proc = subprocess.run([str(VENV_BIN / "fluxgym"), "--home", str(home), "start", "done"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fluxgym: systemctl start fluxgym-train@done.service: ")


# --- help and completion -----------------------------------------------------------------------

def test_every_command_has_help_with_examples() -> None:
    for name, cmd in cli.commands.items():
        r = CliRunner().invoke(cli, [name, "--help"])
        assert r.exit_code == 0 and "Example" in r.output, name


def test_shell_completion(home: Path) -> None:
    for shell in ("bash", "zsh"):
        src = subprocess.run([str(VENV_BIN / "fluxgym")], env={**os.environ, "_FLUXGYM_COMPLETE": f"{shell}_source"},
                             capture_output=True, text=True, timeout=60)
        assert src.returncode == 0 and "_FLUXGYM_COMPLETE" in src.stdout
    env = {**os.environ, "_FLUXGYM_COMPLETE": "bash_complete", "COMP_WORDS": "fluxgym status f",
           "COMP_CWORD": "2", "FLUXGYM_HOME": str(home)}
    done = subprocess.run([str(VENV_BIN / "fluxgym")], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["plain,fixed"]


# --- new / import ------------------------------------------------------------------------------

def make_box_home(root: Path) -> Path:
    for rel in ("models/unet/flux1-dev.sft", "models/clip/clip_l.safetensors",
                "models/clip/t5xxl_fp16.safetensors", "models/vae/ae.sft", "sd-scripts/flux_train_network.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "photos").mkdir()
    (root / "photos" / "1.png").write_bytes(b"png")
    return root


def test_new_writes_fluxgym_files_and_run_toml(tmp_path: Path) -> None:
    h = make_box_home(tmp_path)
    r = fluxgym(h, "new", "cat", "--dataset", str(h / "photos"), "--trigger", "fluffycat", "--vram", "16G")
    assert r.exit_code == 0, r.output
    d = h / "outputs" / "cat"
    assert sorted(p.name for p in d.iterdir()) == ["dataset.toml", "run.toml", "sample_prompts.txt", "train.sh"]
    spec = RunSpec(name="cat", trigger_word="fluffycat", dataset_dir=h / "photos", vram="16G")
    assert (d / "train.sh").read_text() == render_train_sh(spec, fluxgym_root=h)
    assert (d / "dataset.toml").read_text() == render_dataset_toml(spec, fluxgym_root=h)
    fluxgym_own = render_train_sh(RunSpec(name="cat", trigger_word="fluffycat", dataset_dir=h / "photos",
                                          vram="16G", save_state=False), fluxgym_root=h)
    ours = (d / "train.sh").read_text().splitlines()
    assert [line for line in ours if line not in fluxgym_own.splitlines()] == ["  --save_state \\"]
    # the run is valid for the wrapper and the tools
    doc = json.loads(fluxgym(h, "status", "cat", "--json").stdout)
    assert doc["config_problem"] is None and doc["status"] is None
    # a second `new` refuses to overwrite
    assert fluxgym(h, "new", "cat", "--dataset", str(h / "photos")).exit_code == 78


def test_new_missing_inputs_exit_66_naming_the_path(tmp_path: Path) -> None:
    h = make_box_home(tmp_path)
    err = one_line_error(r := fluxgym(h, "new", "cat", "--dataset", str(h / "nothere"), "--trigger", "x"))
    assert r.exit_code == 66 and str(h / "nothere") in err
    (h / "models/vae/ae.sft").unlink()
    err = one_line_error(r := fluxgym(h, "new", "cat", "--dataset", str(h / "photos"), "--trigger", "x"))
    assert r.exit_code == 66 and str(h / "models/vae/ae.sft") in err and "download" in err
    shutil.rmtree(h / "sd-scripts")
    (h / "models/vae/ae.sft").write_bytes(b"x")
    err = one_line_error(r := fluxgym(h, "new", "cat", "--dataset", str(h / "photos"), "--trigger", "x"))
    assert r.exit_code == 66 and "sd-scripts" in err and "install-sd-scripts" in err
    assert not (h / "outputs" / "cat").exists() or not any((h / "outputs" / "cat").iterdir())


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_import_adopts_fluxgym_folder_unchanged(tmp_path: Path) -> None:
    d = tmp_path / "outputs" / "fluffycat"
    shutil.copytree(FIXTURES / "16g", d)
    before = _digest(d)
    r = fluxgym(tmp_path, "import", str(d))
    assert r.exit_code == 0 and "wrote" in r.stdout
    assert "no --save_state" in r.stderr  # FluxGym's own script: restarts cannot resume
    after = _digest(d)
    assert {k: v for k, v in after.items() if k != "run.toml"} == before
    again = fluxgym(tmp_path, "import", str(d))
    assert again.exit_code == 0 and "nothing to do" in again.stdout and _digest(d) == after
    elsewhere = tmp_path / "other" / "fluffycat"
    shutil.copytree(FIXTURES / "16g", elsewhere)
    assert "point FLUXGYM_HOME" in one_line_error(fluxgym(tmp_path, "import", str(elsewhere)))


# --- install (files only; under systemd: test_cli_service.py) ----------------------------------

def test_install_writes_template_and_dropins_idempotently(tmp_path: Path) -> None:
    units, h = tmp_path / "units", tmp_path / "home"
    (h / "outputs").mkdir(parents=True)
    (h / "fluxgym.toml").write_text('[metrics]\nprometheus_dir = "/var/lib/node-exporter"\n')
    first = fluxgym(tmp_path, "install", "--home", str(h), "--user", "root", "--unit-dir", str(units), "--no-reload")
    assert first.exit_code == 0, first.output
    assert sum(line.startswith("wrote ") for line in first.stdout.splitlines()) == 4
    dropin = (units / "fluxgym-train@.service.d" / "10-fluxgym-install.conf").read_text()
    assert f"ExecStart={VENV_BIN / 'fluxgymd'} run %I" in dropin
    assert f"Environment=FLUXGYM_HOME={h}" in dropin and "User=root" in dropin and "Group=root" in dropin
    assert "OnSuccess=fluxgym-notify@%n.service" in dropin  # systemd 252 here
    assert "ReadWritePaths=-/var/lib/node-exporter" in dropin  # the sandboxed wrapper writes metrics there
    ndropin = (units / "fluxgym-notify@.service.d" / "10-fluxgym-install.conf").read_text()
    assert f"ExecStart={VENV_BIN / 'fluxgym'} --home {h} notify %i" in ndropin
    assert (units / "fluxgym-train@.service").read_text() == (REPO / "systemd" / "fluxgym-train@.service").read_text()
    second = fluxgym(tmp_path, "install", "--home", str(h), "--user", "root", "--unit-dir", str(units), "--no-reload")
    lines = second.stdout.splitlines()
    assert lines and all(line.startswith(("unchanged", "note:")) for line in lines), lines


# --- notify ------------------------------------------------------------------------------------

def test_unit_names_unescape() -> None:
    assert unescape_instance(r"my\x2dlora") == "my-lora"
    assert run_name_of_unit(r"fluxgym-train@my\x2dlora.service") == "my-lora"
    assert run_name_of_unit("fluxgym-train@a.b_c.service") == "a.b_c"
    with pytest.raises(Exception, match="not a fluxgym-train"):
        run_name_of_unit("sshd.service")
    ev = Event("r", "u", "success", "0", "stopped", None, ())
    assert not should_notify(ev, on_success=True)  # a stop is no news
    assert should_notify(Event("r", "u", "success", "0", "completed", None, ()), on_success=True)
    assert not should_notify(Event("r", "u", "success", "0", "completed", None, ()), on_success=False)
    assert should_notify(Event("r", "u", "exit-code", "79", "failed", None, ()), on_success=False)
    assert expand(("-d", '{"text": "{run} {result}"}'), Event("r", "u", "watchdog", None, None, None, ())) == [
        "-d", '{"text": "r watchdog"}']


def test_notify_runs_the_configured_command(home: Path) -> None:
    log = home / "notified.jsonl"
    r = fluxgym(home, "notify", "fluxgym-train@broken.service",
                env={"MONITOR_SERVICE_RESULT": "exit-code", "MONITOR_EXIT_STATUS": "79", "FLUXGYM_HOME": str(home)})
    assert r.exit_code == 0, r.output
    e = json.loads(log.read_text().splitlines()[-1])
    assert e["FLUXGYM_RUN"] == "broken" and e["FLUXGYM_RESULT"] == "exit-code" and e["FLUXGYM_EXIT_STATUS"] == "79"
    assert e["FLUXGYM_STATUS"] == "failed-attempt" and e["argv"] == ["broken", "exit-code"]
    assert "==== attempt 1 failed-attempt" in e["FLUXGYM_LOG_TAIL"]
    assert e["stdin"]["run"] == "broken" and e["stdin"]["log_tail"][-1].startswith("====")
    n = len(log.read_text().splitlines())
    quiet = fluxgym(home, "notify", "fluxgym-train@done.service", env={"MONITOR_SERVICE_RESULT": "success"})
    assert quiet.exit_code == 0 and "not notifying" in quiet.stdout
    assert len(log.read_text().splitlines()) == n


# --- metrics -------------------------------------------------------------------------------------

def parse_prom(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_prometheus_file_per_run_atomic(home: Path, tmp_path: Path) -> None:
    doc = json.loads((home / "outputs" / "done" / "status.json").read_text())
    path = write_prom(tmp_path, "done", doc)
    assert path == prom_path(tmp_path, "done") == tmp_path / "fluxgym-done.prom"
    assert [p.name for p in tmp_path.iterdir()] == ["fluxgym-done.prom"]  # no temp file left
    m = parse_prom(path.read_text())
    assert m['fluxgym_run_step{run="done"}'] == 6 and m['fluxgym_run_epoch{run="done"}'] == 2
    assert m['fluxgym_run_status{run="done",status="completed"}'] == 1
    assert m['fluxgym_run_status{run="done",status="running"}'] == 0
    assert m['fluxgym_run_attempt{run="done"}'] == 1 and m['fluxgym_run_loss{run="done"}'] == doc["loss"]
    assert m['fluxgym_run_last_progress_timestamp_seconds{run="done"}'] > 1.7e9
    assert not any(k.startswith("fluxgym_run_gpu") for k in m)  # unknown is left out, not 0
    text = path.read_text()
    assert text.count("# TYPE fluxgym_run_step gauge") == 1 and text.endswith("\n")
    # two runs' files carry identical HELP/TYPE lines, so the collector merges them
    other = write_prom(tmp_path, "fixed", json.loads((home / "outputs" / "fixed" / "status.json").read_text()))
    help_lines = lambda p: [l for l in p.read_text().splitlines() if l.startswith("# HELP fluxgym_run_step ")]
    assert help_lines(path) == help_lines(other)
    # a StatusDoc renders like its JSON; label values are escaped
    sd = StatusDoc(name='we"ird', status=RunStatus.RUNNING, step=3)
    assert 'fluxgym_run_step{run="we\\"ird"} 3' in render_prom([sd])


# --- STATUS= line ----------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(
    status=st.sampled_from(list(RunStatus)),
    reason=st.one_of(st.none(), st.text(alphabet=st.characters(blacklist_categories=("Cc",)), max_size=300)),
    big=st.integers(min_value=0, max_value=10**12), loss=st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)),
    gpu=st.one_of(st.none(), st.text(alphabet=st.characters(blacklist_categories=("Cc",)), max_size=80)), eta=st.one_of(st.none(), st.floats(min_value=0, max_value=1e9)),
)
def test_status_line_stays_under_100_characters(status, reason, big, loss, gpu, eta) -> None:
    doc = StatusDoc(name="x", status=status, reason=reason, epoch=big, epochs=big, step=big, steps=big,
                    loss=loss, gpu=gpu, eta_s=eta)
    line = status_line(doc)
    assert 0 < len(line) < 100 and "\n" not in line


def test_status_line_is_one_line_for_a_multiline_reason() -> None:
    # sd_notify separates assignments by newlines: a reason's second line would become one
    doc = StatusDoc(name="x", status=RunStatus.FAILED, reason="bad config\nsecond line")
    assert "\n" not in status_line(doc)


def test_status_line_reads_like_the_spec() -> None:
    doc = StatusDoc(name="x", status=RunStatus.RUNNING, epoch=3, epochs=16, step=450, steps=1200, loss=0.123,
                    gpu="GPU 97%", eta_s=41 * 60)
    assert status_line(doc) == "epoch 3/16 · step 450/1200 · loss 0.123 · GPU 97% · ETA 41m"


def test_parse_show_blocks() -> None:
    out = "Id=a\nActiveState=active\n\nId=b\nActiveState=failed\n"
    assert parse_show(out, 2) == [{"Id": "a", "ActiveState": "active"}, {"Id": "b", "ActiveState": "failed"}]
    assert parse_show(out, 3) == []


def test_doctor_json(home: Path) -> None:
    r = fluxgym(home, "doctor", "--json")
    doc = json.loads(r.stdout)
    validate(doc, DOCTOR_SCHEMA)
    by = {c["name"]: c for c in doc}
    assert by["sd-scripts"]["level"] == "fail" and "install-sd-scripts" in by["sd-scripts"]["fix"]
    assert r.exit_code == 1  # a failed check fails the command
    assert all(c["level"] in ("ok", "warn", "fail") for c in doc)
    assert all(c["fix"] for c in doc if c["level"] != "ok")
