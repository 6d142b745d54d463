"""The service spine end to end: the real unit under a real systemd, the real wrapper, the
real stand-in trainer (issue 2), and resume correctness across restarts (issue 3)."""
from __future__ import annotations

import re
from collections import Counter

import psutil
import pytest

from service_helpers import Runs, unit
from fluxgymd.safetensors_check import safetensors_problem

pytestmark = pytest.mark.systemd


@pytest.fixture(scope="module")
def runs(systemd_box_module, module_home):
    return Runs(systemd_box_module, module_home)


def banners(log: str) -> list[str]:
    return re.findall(r"^==== attempt \d+ · .*$", log, flags=re.M)


def test_clean_run_completes_through_accelerate_launch(runs):
    runs.create("clean", accelerate=True)
    runs.start("clean")
    props = runs.wait_settled("clean")
    assert props["ActiveState"] == "inactive" and props["Result"] == "success"
    assert runs.restarts(props["_name"]) == 0
    st = runs.status("clean")
    assert st["status"] == "completed" and st["step"] == 20 and st["steps"] == 20
    assert safetensors_problem(runs.run_dir("clean") / "clean.safetensors") is None
    assert sorted(runs.steps_trained("clean")) == list(range(1, 21))
    log = runs.log("clean")
    assert len(banners(log)) == 1 and "fresh start" in banners(log)[0]
    assert re.search(r"^==== attempt 1 completed · model .*clean.safetensors verified", log, re.M)


def test_crash_restarts_resumes_and_completes(runs):
    runs.create("crash", "--fault", "crash@12")
    runs.start("crash")
    props = runs.wait_settled("crash")
    assert props["Result"] == "success" and runs.restarts(props["_name"]) == 1
    log = runs.log("crash")
    b = banners(log)
    assert len(b) == 2 and "resumed from crash-000002-state (epoch 2" in b[1]
    assert "stand-in fault: crash at step 12" in log
    # both attempts' output, in order, in one file: the traceback, its end marker, then the resume
    assert log.index("Traceback") < log.index("failed-attempt") < log.index(b[1])
    # kohya's epoch lines of attempt 2 continue where the state left off
    assert re.findall(r"^epoch (\d)/4$", log, re.M) == ["1", "2", "3", "3", "4"]
    counts = Counter(runs.steps_trained("crash"))
    assert set(counts) == set(range(1, 21))
    assert [s for s, n in counts.items() if n > 1] == [11]  # trained before the crash, redone after
    assert runs.status("crash")["status"] == "completed"
    # the crash reached the journal as an error
    errs = [e["MESSAGE"] for e in runs.journal("crash", "-p", "err")]
    assert any("RuntimeError: stand-in fault" in str(m) for m in errs)


def test_watchdog_kills_idle_hang_then_resumes(runs):
    runs.create("hang", "--fault", "hang-idle@8", watchdog={"stall_timeout": "6s"})
    runs.start("hang")
    props = runs.wait_settled("hang")
    assert props["Result"] == "success" and runs.restarts(props["_name"]) == 1
    msgs = [str(e.get("MESSAGE")) for e in runs.journal("hang")]
    assert any("Watchdog timeout" in m for m in msgs), msgs[-20:]
    stalls = list((runs.run_dir("hang") / "stalls").glob("*.txt"))
    assert stalls, "no forensics written"
    report = stalls[0].read_text()
    assert "standin_hang_idle" in report
    log = runs.log("hang")
    assert "resumed from hang-000001-state" in banners(log)[1]
    assert re.search(r"^==== attempt 1 stalled: watchdog", log, re.M)
    assert runs.status("hang")["status"] == "completed"


def test_config_error_fails_with_78_and_one_err_line(runs):
    runs.create("badcfg", raw_toml="[train]\ncommand = [\"x\"]\n[watchdog]\nstall_timeout = \"5 parsecs\"\n")
    runs.start("badcfg")
    props = runs.wait_settled("badcfg", timeout_s=60)
    assert props["ActiveState"] == "failed" and props["ExecMainStatus"] == "78"
    assert runs.restarts(props["_name"]) == 0
    errs = [str(e["MESSAGE"]) for e in runs.journal("badcfg", "-p", "err")
            if e.get("SYSLOG_IDENTIFIER", "").startswith("fluxgym-")]
    assert len(errs) == 1 and "run.toml" in errs[0] and "watchdog.stall_timeout" in errs[0]


def test_stop_mid_run_leaves_no_process(runs):
    runs.create("stop", step_s=0.3, epochs=20)
    runs.start("stop")
    runs.box.wait_for(lambda: runs.status("stop").get("step"), timeout_s=120, what="first step")
    trainer_pid = runs.status("stop")["pid"]
    cgroup = runs.box.show(unit("stop"), "ControlGroup")["ControlGroup"]
    runs.box.systemctl("stop", unit("stop"))
    props = runs.box.show(unit("stop"), "ActiveState", "Result")
    assert props["ActiveState"] == "inactive" and props["Result"] == "success"
    assert runs.status("stop")["status"] == "stopped"
    # nothing of the run survives, in the cgroup or by PID
    procs = runs.box.run_in("systemd-cgls", "--no-pager", cgroup, check=False).stdout
    assert "fluxgymd.standin" not in procs
    assert not any("fluxgymd.standin" in " ".join(p.cmdline()) for p in psutil.process_iter()
                   if p.pid == trainer_pid) if psutil.pid_exists(trainer_pid) else True
    assert re.search(r"^==== attempt 1 stopped", runs.log("stop"), re.M)


def test_three_crashes_train_exactly_the_planned_steps(runs):
    # crashes in epochs 2, 3 and 4: the 2nd and 3rd resumes start from states written by a
    # resumed attempt, whose train_state.json holds kohya's relative step count
    runs.create("thrice", "--fault", "crash@8", "--fault", "crash@14", "--fault", "crash@19",
                restart={"max_attempts_without_progress": 3})
    runs.start("thrice")
    props = runs.wait_settled("thrice", timeout_s=360)
    assert props["Result"] == "success" and runs.restarts(props["_name"]) == 3
    steps = runs.steps_trained("thrice")
    counts = Counter(steps)
    assert set(counts) == set(range(1, 21))
    # only the partial epochs lost to each crash are re-trained (6-7, 11-13, 16-18), nothing else
    assert sorted(s for s, n in counts.items() if n > 1) == [6, 7, 11, 12, 13, 16, 17, 18]
    assert all(n <= 2 for n in counts.values())
    log = runs.log("thrice")
    assert [b.split("·")[1].strip() for b in banners(log)] == [
        "fresh start",
        "resumed from thrice-000001-state (epoch 1, step 5)",
        "resumed from thrice-000002-state (epoch 2, step 10)",
        "resumed from thrice-000003-state (epoch 3, step 15)",
    ]
    assert re.findall(r"^epoch (\d)/4$", log, re.M) == ["1", "2", "2", "3", "3", "4", "4"]


def test_die_saving_resumes_from_previous_state_and_keeps_partial(runs):
    runs.create("diesave", "--fault", "die-saving@15")
    runs.start("diesave")
    props = runs.wait_settled("diesave")
    assert props["Result"] == "success" and runs.restarts(props["_name"]) == 1
    d = runs.run_dir("diesave")
    log = runs.log("diesave")
    assert "resumed from diesave-000002-state" in banners(log)[1]
    warnings = [str(e["MESSAGE"]) for e in runs.journal("diesave", "-p", "warning")]
    assert any("skipping checkpoint" in w and "diesave-000003-state" in w for w in warnings)
    # the partial state is never deleted (the rerun wrote a complete one over it, or it remains)
    assert (d / "diesave-000003-state").is_dir()
    assert sorted(set(runs.steps_trained("diesave"))) == list(range(1, 21))


def test_same_crash_every_attempt_gives_up_with_79(runs):
    runs.create("loop", "--fault", "crash@7", "--fault-every-attempt",
                restart={"max_attempts_without_progress": 2})
    runs.start("loop")
    props = runs.wait_settled("loop")
    assert props["ActiveState"] == "failed" and props["ExecMainStatus"] == "79"
    st = runs.status("loop")
    assert st["status"] == "failed" and "no progress" in st["reason"]
    # attempt 1 saved epoch 1 (progress); attempts 2 and 3 did not: 3 starts, then it stopped
    assert len(banners(runs.log("loop"))) == 3
    assert runs.restarts(props["_name"]) == 2
    # a person starts it again (say, after a fix): it tries afresh instead of giving up at once
    runs.start("loop")
    props = runs.wait_settled("loop")
    assert props["ExecMainStatus"] == "79" and len(banners(runs.log("loop"))) == 5


def test_exit_zero_without_model_is_a_failed_attempt(runs):
    runs.create("nomodel", "--fault", "exit-no-model@20")
    runs.start("nomodel")
    props = runs.wait_settled("nomodel")
    log = runs.log("nomodel")
    assert re.search(r"^==== attempt 1 failed-attempt: trainer exited 0 without a valid final model", log, re.M)
    assert runs.restarts(props["_name"]) == 1 and props["Result"] == "success"
    assert runs.status("nomodel")["status"] == "completed"


def test_resume_from_step_states_written_by_a_resumed_attempt(runs):
    # step states every 3 steps: attempt 2 (resumed at absolute step 6) names its states with
    # kohya's relative count, so "step00000003" is written again meaning absolute step 8, and
    # "step00000009" means absolute step 14. The second resume must start at 14, not 9.
    runs.create("steps", "--save_every_n_steps", "3", "--fault", "crash@8", "--fault", "crash@15")
    runs.start("steps")
    props = runs.wait_settled("steps", timeout_s=300)
    assert props["Result"] == "success" and runs.restarts("steps") == 2
    counts = Counter(runs.steps_trained("steps"))
    assert set(counts) == set(range(1, 21))
    assert [s for s, n in counts.items() if n > 1] == [7]  # only the step lost to the first crash
    b = banners(runs.log("steps"))
    assert "resumed from steps-step00000006-state (step 6)" in b[1]
    assert "resumed from steps-step00000009-state (step 14)" in b[2]


def test_dash_in_name_works_typed_raw_or_escaped(runs):
    # users type `systemctl start fluxgym-train@my-lora`; `fluxgym start` uses systemd-escape
    runs.create("my-lora", epochs=1)
    runs.start("my-lora")  # the raw spelling: %I unescapes "-" to "/", the wrapper maps it back
    props = runs.wait_settled("my-lora")
    assert props["Result"] == "success" and runs.status("my-lora")["status"] == "completed"
    escaped = "fluxgym-train@my\\x2dlora.service"
    runs.box.systemctl("start", escaped)  # already complete: a no-op start that exits 0
    assert runs.box.show(escaped, "Result")["Result"] == "success"
