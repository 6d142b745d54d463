"""The stand-in trainer, run for real: processes, accelerate checkpoints, files on disk."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import psutil
import pytest
from safetensors import safe_open

from fluxgymd.standin.cli import parse_args
from fluxgymd.standin.faults import FaultBook, FaultKind, parse_fault
from fluxgymd.standin.plan import InitialStepError, plan_steps, start_point
from fluxgymd.standin.records import read_step_record

REPO = Path(__file__).resolve().parents[1]
NAME = "demo"
STATE_FILES = {"train_state.json", "model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"}
RUN_TIMEOUT_S = 180.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def standin_argv(out: Path, *extra: str, epochs: int = 5, bpe: int = 4) -> list[str]:
    return [
        "--pretrained_model_name_or_path", "/nonexistent/flux1-dev.sft",  # FluxGym flags: ignored
        "--network_dim", "4", "--mixed_precision", "bf16", "--sample_prompts=/nonexistent/p.txt",
        "--output_dir", str(out), "--output_name", NAME, "--seed", "42",
        "--max_train_epochs", str(epochs), "--save_every_n_epochs", "1", "--save_state",
        "--standin_batches_per_epoch", str(bpe), "--standin_step_seconds", "0.005",
        *extra,
    ]


def run_standin(out: Path, *extra: str, epochs: int = 5, bpe: int = 4) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "fluxgymd.standin", *standin_argv(out, *extra, epochs=epochs, bpe=bpe)]
    return subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def step_counts(out: Path) -> Counter[int]:
    return Counter(r["abs_step"] for r in read_step_record(out / ".standin-steps.jsonl"))


def train_state(state_dir: Path) -> dict[str, int]:
    return json.loads((state_dir / "train_state.json").read_text())


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


# --- pure kohya arithmetic ------------------------------------------------------------------

def test_plan_matches_kohya_formulas() -> None:
    plan = plan_steps(batches_per_epoch=10, gradient_accumulation_steps=3, max_train_epochs=4, max_train_steps=None)
    assert (plan.steps_per_epoch, plan.max_train_steps, plan.num_train_epochs) == (4, 16, 4)
    by_steps = plan_steps(batches_per_epoch=8, gradient_accumulation_steps=1, max_train_epochs=None, max_train_steps=20)
    assert (by_steps.max_train_steps, by_steps.num_train_epochs) == (20, 3)
    default = plan_steps(batches_per_epoch=8, gradient_accumulation_steps=1, max_train_epochs=None, max_train_steps=None)
    assert default.max_train_steps == 1600


def test_start_point_plain_resume_restarts_global_step_at_zero() -> None:
    plan = plan_steps(4, 1, 5, None)
    sp = start_point(plan, None, None, steps_from_state=8, skip_until_initial_step=False, resuming=True)
    assert (sp.epoch_to_start, sp.initial_step, sp.global_step, sp.progress_total) == (2, 0, 0, 20)


def test_start_point_initial_epoch_overrides_state_and_skip_path() -> None:
    plan = plan_steps(4, 1, 5, None)
    sp = start_point(plan, 4, None, steps_from_state=4, skip_until_initial_step=False, resuming=True)
    assert sp.ignored_state_steps and sp.epoch_to_start == 3
    skip = start_point(plan, None, 10, steps_from_state=None, skip_until_initial_step=True, resuming=False)
    # kohya: epoch_to_start 2, in-epoch remainder 2 becomes both initial_step and global_step
    assert (skip.epoch_to_start, skip.initial_step, skip.global_step, skip.progress_total) == (2, 2, 2, 18)


def test_start_point_assertion_message_is_kohyas() -> None:
    with pytest.raises(InitialStepError, match=r"max_train_steps should be greater than initial step .*: 20 vs 20"):
        start_point(plan_steps(4, 1, 5, None), None, None, 20, False, True)


def test_cli_accepts_unknown_flags_and_parses_faults() -> None:
    args = parse_args(["--output_dir", "/o", "--network_dim", "4", "--optimizer_type=adamw8bit",
                       "--fault", "crash@3", "--fault", "die-saving@8", "--fault-every-attempt"])
    assert args.ignored_flags == ("--network_dim", "--optimizer_type")
    assert [(f.kind, f.step) for f in args.faults] == [(FaultKind.CRASH, 3), (FaultKind.DIE_SAVING, 8)]
    assert args.fault_every_attempt and args.step_record == Path("/o/.standin-steps.jsonl")
    with pytest.raises(ValueError, match="unknown kind 'explode'"):
        parse_fault("explode@3")


def test_fault_book_fires_once_across_attempts_unless_told(tmp_path: Path) -> None:
    marker = tmp_path / "fired.json"
    faults = (parse_fault("crash@3"), parse_fault("die-saving@5"))
    book = FaultBook(faults, marker, every_attempt=False)
    fault = book.before_step(3)
    assert fault is not None and book.before_step(2) is None
    assert book.reached(FaultKind.DIE_SAVING, 4) is None and book.reached(FaultKind.DIE_SAVING, 6) is not None
    book.mark_fired(fault)
    assert FaultBook(faults, marker, every_attempt=False).before_step(3) is None  # a new attempt
    assert FaultBook(faults, marker, every_attempt=True).before_step(3) == fault


# --- real runs ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("clean") / "out"
    nvml = out.parent / "nvml"
    proc = run_standin(out, "--save_every_n_steps", "5", "--standin_nvml_dir", str(nvml), epochs=3)
    return out, proc


def test_clean_run_writes_kohya_states_and_final_model(clean_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, proc = clean_run
    assert proc.returncode == 0, proc.stderr
    for state, expected in [(f"{NAME}-000001-state", (1, 4)), (f"{NAME}-000002-state", (2, 8)),
                            (f"{NAME}-step00000005-state", (2, 5)), (f"{NAME}-step00000010-state", (3, 10)),
                            (f"{NAME}-state", (3, 12))]:
        assert STATE_FILES <= {p.name for p in (out / state).iterdir()}, state
        ts = train_state(out / state)
        assert (ts["current_epoch"], ts["current_step"]) == expected, state
    # no epoch model or state for the last epoch: kohya saves only when epoch+1 < num_train_epochs
    assert not (out / f"{NAME}-000003-state").exists() and not (out / f"{NAME}-000003.safetensors").exists()
    for model in (f"{NAME}-000001.safetensors", f"{NAME}-step00000010.safetensors", f"{NAME}.safetensors"):
        assert (out / model).is_file(), model
    with safe_open(str(out / f"{NAME}.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_epoch"], meta["ss_steps"]) == ("3", "12")
    assert step_counts(out) == Counter(range(1, 13))
    assert list((out.parent / "nvml").iterdir()) == []  # the fake NVML reading goes at exit


def test_clean_run_prints_kohya_progress(clean_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, proc = clean_run
    for line in ["running training / 学習開始", "  num batches per epoch / 1epochのバッチ数: 4",
                 "  num epochs / epoch数: 3", "  gradient accumulation steps / 勾配を合計するステップ数 = 1",
                 "  total optimization steps / 学習ステップ数: 12", "epoch 2/3",
                 f"saving checkpoint: {out / NAME}-000001.safetensors"]:
        assert line in proc.stdout.splitlines(), line
    assert "steps: 100%|" in proc.stderr and "12/12 [" in proc.stderr and "avr_loss=" in proc.stderr
    for message in ["saving state at epoch 2", "saving state at step 10", "saving last state.", "model saved.",
                    "ignoring flags it does not use: --pretrained_model_name_or_path --network_dim"]:
        assert message in proc.stderr, message


def test_resume_past_the_end_fails_kohyas_assertion(clean_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = clean_run
    proc = run_standin(out, "--resume", str(out / f"{NAME}-state"), epochs=3)
    assert proc.returncode == 1
    assert "AssertionError: max_train_steps should be greater than initial step" in proc.stderr
    assert "12 vs 12" in proc.stderr


@pytest.mark.slow
def test_two_plain_resumes_overtrain_like_kohya(tmp_path: Path) -> None:
    out = tmp_path / "out"
    faults = ("--fault", "crash@9", "--fault", "crash@13", "--save_every_n_steps", "3")
    first = run_standin(out, *faults)
    assert first.returncode == 1 and "RuntimeError: stand-in fault: crash at step 9" in first.stderr
    second = run_standin(out, *faults, "--resume", str(out / f"{NAME}-000002-state"))
    assert second.returncode == 1 and "crash at step 13" in second.stderr
    # kohya's bug: global_step restarted at 0, so the epoch-3 state records 4 steps, not 12
    assert train_state(out / f"{NAME}-000003-state") == {"current_epoch": 3, "current_step": 4}
    # and step states are named by the relative count: absolute step 11 saved as "step00000003"
    assert train_state(out / f"{NAME}-step00000003-state") == {"current_epoch": 3, "current_step": 3}
    third = run_standin(out, *faults, "--resume", str(out / f"{NAME}-000003-state"))
    assert third.returncode == 0, third.stderr
    assert (out / f"{NAME}.safetensors").is_file()
    counts = step_counts(out)
    assert {s: counts[s] for s in range(1, 21)} == {s: (2 if 5 <= s <= 12 else 1) for s in range(1, 21)}


@pytest.mark.slow
def test_resumes_with_initial_epoch_train_each_step_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    faults = ("--fault", "crash@9", "--fault", "crash@13")
    assert run_standin(out, *faults).returncode == 1
    second = run_standin(out, *faults, "--resume", str(out / f"{NAME}-000002-state"), "--initial_epoch", "3")
    assert second.returncode == 1 and "crash at step 13" in second.stderr
    third = run_standin(out, *faults, "--resume", str(out / f"{NAME}-000003-state"), "--initial_epoch", "4")
    assert third.returncode == 0, third.stderr
    assert "steps from the state is ignored because initial_step is specified" in third.stderr
    assert step_counts(out) == Counter(range(1, 21))
    assert sorted(json.loads((out / ".standin-faults-fired.json").read_text())["fired"]) == ["crash@13", "crash@9"]


def test_skip_until_initial_step_trains_the_remaining_batches(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_standin(out, "--initial_step", "6", "--skip_until_initial_step", epochs=3)
    assert proc.returncode == 0, proc.stderr
    records = read_step_record(out / ".standin-steps.jsonl")
    assert [(r["epoch"], r["batch"], r["abs_step"]) for r in records] == [
        (2, 2, 7), (2, 3, 8), (3, 0, 9), (3, 1, 10), (3, 2, 11), (3, 3, 12)]


def test_die_saving_leaves_a_state_without_random_states(tmp_path: Path) -> None:
    out, nvml = tmp_path / "out", tmp_path / "nvml"
    proc = run_standin(out, "--fault", "die-saving@5", "--standin_nvml_dir", str(nvml))
    assert proc.returncode == -signal.SIGKILL
    assert STATE_FILES <= {p.name for p in (out / f"{NAME}-000001-state").iterdir()}
    partial = {p.name for p in (out / f"{NAME}-000002-state").iterdir()}
    assert {"train_state.json", "model.safetensors", "optimizer.bin", "scheduler.bin"} <= partial
    assert "random_states_0.pkl" not in partial
    assert not (out / f"{NAME}.safetensors").exists()
    # a SIGKILLed process cannot clean up: its last reading (stepping) stays behind
    (reading,) = list(nvml.iterdir())
    assert reading.read_text().split()[:1] + reading.read_text().split()[3:4] == ["proc", "97"]


def test_exit_no_model_exits_zero_without_final_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_standin(out, "--fault", "exit-no-model@1", epochs=2)
    assert proc.returncode == 0, proc.stderr
    assert not (out / f"{NAME}.safetensors").exists() and not (out / f"{NAME}-state").exists()
    assert step_counts(out) == Counter(range(1, 9))


@pytest.mark.parametrize(("kind", "util"), [("hang-idle", "0"), ("hang-spin", "100")])
def test_hangs_stop_progress_in_a_named_function(tmp_path: Path, kind: str, util: str) -> None:
    out, nvml, hook = tmp_path / "out", tmp_path / "nvml", tmp_path / "hook"
    hook.mkdir()
    # what fluxgymd's trainer hook does: all-thread stacks on SIGUSR1
    (hook / "sitecustomize.py").write_text(
        "import faulthandler, signal\nfaulthandler.register(signal.SIGUSR1, all_threads=True)\n")
    env = _env()
    env["PYTHONPATH"] = str(hook) + os.pathsep + env["PYTHONPATH"]
    stderr_path = tmp_path / "stderr"
    argv = [sys.executable, "-m", "fluxgymd.standin",
            *standin_argv(out, "--fault", f"{kind}@3", "--standin_nvml_dir", str(nvml))]
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for(lambda: (out / ".standin-faults-fired.json").exists(), "the fault to fire")
        reading = nvml / str(proc.pid)
        wait_for(lambda: reading.exists() and reading.read_text().split()[3] == util, f"NVML util {util}")
        ps = psutil.Process(proc.pid)
        cpu_at_fire = sum(ps.cpu_times()[:2])
        if kind == "hang-spin":
            wait_for(lambda: sum(ps.cpu_times()[:2]) - cpu_at_fire > 1.0, "a busy core")
        else:
            wait_for(lambda: ps.status() == psutil.STATUS_SLEEPING, "the process to sleep")
        os.kill(proc.pid, signal.SIGUSR1)
        function = "standin_hang_spin" if kind == "hang-spin" else "standin_hang_idle"
        wait_for(lambda: function in stderr_path.read_text(), f"{function} in the stack dump")
        assert proc.poll() is None
        if kind == "hang-idle":  # idle means idle: far less CPU than the time it has been hanging
            assert sum(ps.cpu_times()[:2]) - cpu_at_fire < 0.5
        assert step_counts(out) == Counter([1, 2])
    finally:
        proc.kill()
        proc.wait(timeout=RUN_TIMEOUT_S)


def test_flood_prints_lines_and_frames_then_the_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "fluxgymd.standin", "--output_dir", str(out), "--output_name", NAME,
            "--standin_flood", "3000", "--standin_flood_frames", "40"]
    # bytes: text mode would turn the \r of the frames into newlines
    proc = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, timeout=RUN_TIMEOUT_S)
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, stderr
    flood = [line for line in stdout.split("\n") if line.startswith("flood line ")]
    assert [int(line.split()[2]) for line in flood] == list(range(1, 3001))
    assert stderr.count("\rsteps: ") == 40 and "40/40 [" in stderr
    windows = [json.loads(line) for line in (out / ".standin-flood-rate.jsonl").read_text().splitlines()]
    assert sum(w["lines"] for w in windows) == 3000
    assert (out / f"{NAME}.safetensors").is_file()


@pytest.mark.slow
def test_accelerate_launch_module_crash_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
              "-m", "fluxgymd.standin"]
    env = _env()
    env["HF_HOME"] = str(tmp_path / "hf")  # no accelerate config file anywhere
    first = subprocess.run([*launch, *standin_argv(out, "--fault", "crash@6", epochs=2)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert first.returncode != 0 and "stand-in fault: crash at step 6" in first.stderr
    second = subprocess.run(
        [*launch, *standin_argv(out, "--fault", "crash@6", "--resume", str(out / f"{NAME}-000001-state"),
                                "--initial_epoch", "2", epochs=2)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert second.returncode == 0, second.stderr
    assert "running training / 学習開始" in second.stdout
    assert (out / f"{NAME}.safetensors").is_file()
    assert step_counts(out) == Counter([1, 2, 3, 4, 5, 5, 6, 7, 8])  # step 5 was lost to the crash
