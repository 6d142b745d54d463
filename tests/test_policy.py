"""Pure policy, tested with plain values: durations, names, progress parsing, liveness,
resume planning, checkpoint ranking, the give-up rule."""
from __future__ import annotations

from pathlib import Path

import pytest

from fluxgymd.checkpoints import Checkpoint, StateKind, parse_state_name, rank, with_absolute_progress
from fluxgymd.durations import format_duration, parse_duration_s
from fluxgymd.errors import ConfigError
from fluxgymd.ledger import Attempt, Ledger, attempts_without_progress
from fluxgymd.liveness import Limits, Sample, StallClock, Verdict, decide
from fluxgymd.names import escape_instance, validate_name
from fluxgymd.progress import Progress, parse_line
from fluxgymd.resume import plan_attempt
from fluxgymd.status import RunStatus, StatusDoc, status_line


@pytest.mark.parametrize("text,seconds", [
    (300, 300.0), (2.5, 2.5), ("5min", 300.0), ("1h 30min", 5400.0), ("90s", 90.0),
    ("20min", 1200.0), ("500ms", 0.5), ("1d", 86400.0), ("45", 45.0), ("1h30m", 5400.0),
])
def test_durations(text, seconds):
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize("bad", ["", "5 parsecs", "abc", -1, True, [1], "5min x"])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration_s(bad)


def test_format_duration():
    assert format_duration(41 * 60) == "41m"
    assert format_duration(37) == "37s"
    assert format_duration(2 * 3600 + 5 * 60) == "2h05m"


@pytest.mark.parametrize("name", ["mylora", "a", "My.Lora_v2-final", "0" * 64])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "-x", ".hidden", "a/b", "a b", "x" * 65, "ü", "a@b"])
def test_invalid_names(name):
    with pytest.raises(ConfigError, match="invalid run name"):
        validate_name(name)


def test_escape_instance():
    assert escape_instance("my.lora_1") == "my.lora_1"
    assert escape_instance("a-b") == "a\\x2db"


KOHYA_LINES = [
    "  num batches per epoch / 1epochのバッチ数: 8",
    "  num epochs / epoch数: 4",
    "  gradient accumulation steps / 勾配を合計するステップ数 = 1",
    "  total optimization steps / 学習ステップ数: 32",
    "",
    "epoch 3/4",
    "steps:  28%|██▊       | 9/32 [00:01<00:02,  4.50it/s, avr_loss=0.123]",
]


def test_progress_parse_kohya_banner_and_bar():
    p = Progress(attempt_offset_steps=16)
    for line in KOHYA_LINES:
        p = parse_line(p, line)
    assert (p.batches_per_epoch, p.epochs, p.total_steps, p.steps_per_epoch) == (8, 4, 32, 8)
    assert p.epoch == 3 and p.bar_n == 9 and p.abs_step == 25
    assert p.loss == pytest.approx(0.123) and p.it_per_s == pytest.approx(4.5)
    assert p.eta_s == pytest.approx((32 - 25) / 4.5)


def test_progress_parse_seconds_per_iteration_and_noise():
    p = parse_line(Progress(), "steps:   3%|▎         | 1/32 [00:12<06:12, 12.00s/it, avr_loss=0.5]")
    assert p.it_per_s == pytest.approx(1 / 12)
    assert parse_line(p, "some unrelated line with steps: in it") is p
    assert parse_line(p, "2024-08-30 10:00:00 INFO     model saved.").finished_saving


LIMITS = Limits(startup_timeout_s=1200, progress_timeout_s=1800)


def S(now, last_adv=None, adv=False, cpu=False, io=False, gpu=None, start=0.0):
    return Sample(now_s=now, attempt_start_s=start, last_step_advance_s=last_adv, step_advanced=adv,
                  cpu_busy=cpu, io_busy=io, gpu_busy=gpu)


@pytest.mark.parametrize("sample,verdict", [
    # start-up: silent but busy loading is alive, for up to startup_timeout
    (S(10, cpu=True), Verdict.ALIVE_STARTUP),
    (S(900, io=True), Verdict.ALIVE_STARTUP),
    (S(10, gpu=True), Verdict.ALIVE_STARTUP),
    (S(10), Verdict.IDLE),
    (S(1200, cpu=True), Verdict.STARTUP_EXPIRED),
    # stepping
    (S(2000, last_adv=1999, adv=True), Verdict.ALIVE_STEPPING),
    # idle deadlock: no steps, GPU idle -> no ping (stall_timeout then kills)
    (S(2000, last_adv=1900, gpu=False, cpu=True), Verdict.IDLE),
    # long silent GPU phase (sampling, saving) inside progress_timeout
    (S(2000, last_adv=1000, gpu=True), Verdict.ALIVE_GPU),
    # spin deadlock: GPU 100% but no step for progress_timeout
    (S(4000, last_adv=2000, gpu=True), Verdict.NO_PROGRESS),
    # NVML unknown: progress alone decides
    (S(2000, last_adv=1999, adv=True, gpu=None), Verdict.ALIVE_STEPPING),
    (S(2000, last_adv=1900, gpu=None, cpu=True), Verdict.IDLE),
    # CPU alone does not keep a run alive after start-up: a CPU spin hang must die
    (S(2000, last_adv=1990, cpu=True, io=True), Verdict.IDLE),
])
def test_liveness_table(sample, verdict):
    assert decide(sample, LIMITS) is verdict


def test_stall_clock_forensics_once_at_80_percent():
    c = StallClock(last_alive_s=0.0)
    assert not c.forensics_due(200, stall_timeout_s=300, poll_interval_s=5)
    assert c.forensics_due(240, stall_timeout_s=300, poll_interval_s=5)
    taken = StallClock(last_alive_s=0.0, forensics_taken=True)
    assert not taken.forensics_due(250, 300, 5)
    assert taken.after(260, Verdict.ALIVE_STEPPING) == StallClock(260, False)
    assert taken.after(260, Verdict.IDLE) is taken


def cp(name, kind, number, **kw):
    return Checkpoint(path=Path("/o") / name, kind=kind, number=number, problem=kw.pop("problem", None), **kw)


def test_state_names():
    assert parse_state_name("lora-000004-state", "lora").number == 4
    assert parse_state_name("lora-step00000120-state", "lora").kind is StateKind.STEP
    assert parse_state_name("lora-state", "lora").kind is StateKind.LAST
    assert parse_state_name("lora2-000004-state", "lora") is None
    assert parse_state_name("lora-000004", "lora") is None


def test_rank_by_progress_not_name_or_mtime_and_skip_unusable():
    spe = 10
    ledger_steps = {"l-step00000005-state": 45}  # written after a resume at epoch 4: relative 5
    states = [
        cp("l-000004-state", StateKind.EPOCH, 4),
        cp("l-step00000005-state", StateKind.STEP, 5, current_step=5, current_epoch=5),
        cp("l-000008-state", StateKind.EPOCH, 8, problem="random_states_0.pkl missing"),
        cp("l-state", StateKind.LAST, None),
    ]
    ranked = rank(with_absolute_progress(c, spe, ledger_steps) for c in states)
    assert [c.name for c in ranked] == ["l-step00000005-state", "l-000004-state"]
    assert ranked[0].abs_step == 45 and ranked[1].abs_step == 40


def test_rank_without_steps_per_epoch_uses_epochs():
    states = [with_absolute_progress(c, None, {}) for c in (
        cp("l-000002-state", StateKind.EPOCH, 2),
        cp("l-000006-state", StateKind.EPOCH, 6),
        cp("l-000004-state", StateKind.EPOCH, 4),
    )]
    assert [c.number for c in rank(states)] == [6, 4, 2]


ARGV = ["accelerate", "launch", "sd-scripts/flux_train_network.py", "--output_dir", "out",
        "--output_name", "l", "--resume", "old", "--save_state", "--initial_step=3"]


def test_plan_epoch_resume_passes_absolute_epoch():
    best = with_absolute_progress(cp("l-000008-state", StateKind.EPOCH, 8), 10, {})
    plan = plan_attempt(ARGV, best, 10)
    assert plan.argv.count("--resume") == 1 and "old" not in plan.argv
    assert plan.argv[plan.argv.index("--resume") + 1] == "/o/l-000008-state"
    assert plan.argv[plan.argv.index("--initial_epoch") + 1] == "9"
    assert not any(a.startswith("--initial_step") for a in plan.argv)
    assert (plan.start_abs_step, plan.kohya_step_base) == (80, 80)


def test_plan_step_resume_skips_to_absolute_step():
    best = with_absolute_progress(cp("l-step00000005-state", StateKind.STEP, 5), 10, {"l-step00000005-state": 45})
    plan = plan_attempt(ARGV, best, 10)
    assert plan.argv[plan.argv.index("--initial_step") + 1] == "45"
    assert "--skip_until_initial_step" in plan.argv
    assert (plan.start_abs_step, plan.kohya_step_base) == (45, 40)


def test_plan_fresh_start_keeps_argv():
    assert plan_attempt(ARGV, None, None).argv == ARGV


def A(n, start, result="failed-attempt"):
    return Attempt(number=n, started_at="t", start_abs_step=start, result=result)


def test_give_up_counts_trailing_attempts_without_progress():
    led = Ledger(attempts=(A(1, 0), A(2, 40), A(3, 40), A(4, 40)))
    assert attempts_without_progress(led, 40) == 3  # 2, 3, 4 moved nothing
    assert attempts_without_progress(led, 80) == 0  # the last one saved a new state
    assert attempts_without_progress(Ledger(), 0) == 0
    # after a give-up, systemd never restarts: the next start is a person's and counts afresh
    gave_up = Ledger(attempts=(A(1, 0), A(2, 40), A(3, 40, result="gave-up")))
    assert attempts_without_progress(gave_up, 40) == 0


def test_status_line_shape_and_length():
    doc = StatusDoc(name="x", status=RunStatus.RUNNING, epoch=3, epochs=16, step=450, steps=1200,
                    loss=0.123, gpu="GPU 97%", eta_s=41 * 60)
    assert status_line(doc) == "epoch 3/16 · step 450/1200 · loss 0.123 · GPU 97% · ETA 41m"
    long = StatusDoc(name="x", status=RunStatus.FAILED, reason="x" * 300)
    assert len(status_line(long)) < 100


FIXTURES = Path(__file__).parent / "fixtures" / "fluxgym"


@pytest.mark.parametrize("case", sorted(p.name for p in FIXTURES.iterdir() if (p / "train.sh").is_file()))
def test_fluxgym_scripts_get_resume_flags_and_stay_untouched(case):
    import json

    from fluxgymd.trainsh import load_train_sh

    script = FIXTURES / case / "train.sh"
    before = script.read_bytes()
    argv = load_train_sh(script)
    assert argv == json.loads((FIXTURES / case / "argv.json").read_text())
    name = argv[argv.index("--output_name") + 1]
    state = with_absolute_progress(cp(f"{name}-000008-state", StateKind.EPOCH, 8), 10, {})
    plan = plan_attempt(argv, state, 10)
    # exactly the user's argv plus what a resume needs, appended at the end
    assert plan.argv == argv + ["--resume", str(state.path), "--initial_epoch", "9"]
    assert script.read_bytes() == before
