"""`fluxgymd run NAME`: one start of a run, the eight steps of SPEC section 5.

Returns normally only when the run is complete or was stopped (exit 0); every other end
raises a FluxgymError whose exit code tells systemd what to do (75 restart, 66/78/79 not).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from . import journal
from .checkpoints import Checkpoint, best, scan_states, with_absolute_progress
from .config import RunConfig, load_config
from .errors import AlreadyRunning, AttemptFailed, ConfigError, GaveUp, MissingInputError
from .inputs import check_inputs
from .ledger import GAVE_UP, Attempt, Ledger, attempts_without_progress, end_last_attempt, load_ledger, save_ledger
from .liveness import Limits, Verdict
from .names import unit_name, validate_name
from .paths import RunPaths, fluxgym_home
from .resume import ResumePlan, TrainerTarget, plan_attempt, trainer_target
from .safetensors_check import safetensors_problem
from .status import RunStatus, StatusDoc, iso_from_epoch, status_line, utc_now_iso, write_status
from .supervisor import AttemptEnd, Outcome, PollReport, Supervisor, trainer_env
from .tracker import ProgressTracker
from .trainsh import load_train_sh

KILL_GRACE_S = 20.0  # must stay well inside the unit's TimeoutStopSec


class _Notifier:
    """sd_notify, or nothing when not under systemd (a run from a terminal)."""

    def __init__(self) -> None:
        self._n = None
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify

            self._n = sdnotify.SystemdNotifier()

    def notify(self, state: str) -> None:
        # sdnotify encodes latin-1, which systemd rejects as not UTF-8 clean: send UTF-8 ourselves
        sock = getattr(self._n, "socket", None)
        if sock is not None:
            try:
                sock.sendall(state.encode("utf-8", "replace"))
            except OSError:
                pass  # systemd gone: nothing to tell


def hook_dir(home: Path) -> Path | None:
    """The trainer-side sitecustomize: the box's sd-scripts/ place first, else this checkout's."""
    for candidate in (home / "sd-scripts" / "fluxgymd_hook",
                      Path(__file__).resolve().parent.parent / "sd-scripts" / "fluxgymd_hook",
                      Path(sys.prefix) / "share" / "fluxgymd" / "fluxgymd_hook"):
        if (candidate / "sitecustomize.py").is_file():
            return candidate
    return None


def base_argv(cfg: RunConfig) -> tuple[list[str], str]:
    """The user's trainer argv (never modified on disk) and the file it came from."""
    if cfg.train.command is not None:
        return list(cfg.train.command), str(cfg.paths.run_toml)
    assert cfg.train.script is not None
    if not cfg.train.script.is_file():
        raise ConfigError(f"{cfg.paths.run_toml}: train.script {cfg.train.script} does not exist")
    return load_train_sh(cfg.train.script), str(cfg.train.script)


def final_model_problem(target: TrainerTarget, first_start_s: float | None) -> str | None:
    """None when the final model exists, parses, and was written during this run."""
    problem = safetensors_problem(target.final_model)
    if problem:
        return f"{target.final_model.name}: {problem}"
    if first_start_s is not None and target.final_model.stat().st_mtime < first_start_s - 1:
        return f"{target.final_model.name} is older than the run's first start"
    return None


def find_states(target: TrainerTarget, ledger: Ledger) -> list[Checkpoint]:
    return [
        with_absolute_progress(c, ledger.steps_per_epoch, ledger.state_abs_steps)
        for c in scan_states(target.output_dir, target.output_name)
    ]


def record_new_states(ledger: Ledger, target: TrainerTarget, since_s: float | None, base: int) -> Ledger:
    """Give step states written by the last attempt their absolute step (kohya names them
    with its relative count). Epoch states name their absolute epoch and need no entry."""
    from .checkpoints import StateKind

    known = dict(ledger.state_abs_steps)
    for c in scan_states(target.output_dir, target.output_name):
        if c.kind is not StateKind.STEP or c.number is None:
            continue
        try:
            # kohya's relative names repeat across attempts and accelerate overwrites the
            # directory's files in place: train_state.json's mtime says which attempt wrote it
            mtime = (c.path / "train_state.json").stat().st_mtime
        except OSError:
            continue
        if since_s is None or mtime >= since_s - 1:
            known[c.name] = base + c.number
    return replace(ledger, state_abs_steps=known)


def instance_to_name(instance: str) -> str:
    """The unit passes %I (unescaped): `fluxgym start my-lora` starts fluxgym-train@my\\x2dlora
    and %I gives "my-lora", but a hand-typed `systemctl start fluxgym-train@my-lora` gives
    "my/lora". Names never contain "/", so mapping it back makes both spellings work."""
    return instance.replace("/", "-")


class Run:
    def __init__(self, name: str, home: Path | None = None) -> None:
        self.name = validate_name(instance_to_name(name))
        self.paths = RunPaths(home or fluxgym_home(), self.name)
        self.notifier = _Notifier()
        self.status = StatusDoc(name=self.name, status=RunStatus.STARTING)
        self._last_status_line = ""
        self._gpu_problem: str | None = None
        self._status_error: str | None = None
        self._prom_dir: Path | None = None
        self._prom_error: str | None = None
        self._ledger_error: str | None = None

    # --- status --------------------------------------------------------------------------
    def publish(self, **changes: object) -> None:
        self.status = replace(self.status, updated_at=utc_now_iso(), **changes)  # type: ignore[arg-type]
        try:
            write_status(self.paths.status_json, self.status)
            if self._status_error:
                journal.info(f"{self.paths.status_json} is writable again")
                self._status_error = None
        except OSError as e:
            if e.strerror != self._status_error:  # once per failure, not once per poll
                journal.err(f"cannot write {self.paths.status_json}: {e.strerror}; retrying at each poll")
                self._status_error = e.strerror
        if self._prom_dir is not None:
            from .metrics import write_prom

            try:
                write_prom(self._prom_dir, self.name, self.status)
                self._prom_error = None
            except OSError as e:
                if e.strerror != self._prom_error:
                    journal.err(f"cannot write metrics into {self._prom_dir}: {e.strerror}")
                    self._prom_error = e.strerror
        line = status_line(self.status)
        if line != self._last_status_line:
            self.notifier.notify(f"STATUS={line}")
            self._last_status_line = line

    # --- the eight steps -----------------------------------------------------------------
    def start(self) -> None:
        cfg = load_config(self.paths)  # 1. config (78)
        self._lock()
        self._prom_dir = cfg.metrics.prometheus_dir
        argv, source = base_argv(cfg)
        target = trainer_target(argv, cfg.train.workdir, source)
        env = trainer_env(
            dict(os.environ), dict(cfg.train.env), hook_dir(self.paths.home), self._path_prefix(cfg)
        )
        if cfg.train.gpus and "CUDA_VISIBLE_DEVICES" not in dict(cfg.train.env):
            env["CUDA_VISIBLE_DEVICES"] = ",".join(cfg.train.gpus)
        stacks_dir = self.paths.stalls_dir / ".stacks"
        env["FLUXGYMD_STACKS_DIR"] = str(stacks_dir)
        env["FLUXGYMD_RUN"] = self.name
        check_inputs(argv, cfg.train.workdir, env.get("PATH", os.defpath), source)  # 66
        if not target.save_state:
            journal.warning(f"{source}: no --save_state: a restart cannot resume and starts over")

        # narrow systemd's window to ours before any slow step
        self.notifier.notify(f"WATCHDOG_USEC={int(cfg.watchdog.stall_timeout_s * 1e6)}")
        self.notifier.notify("WATCHDOG=1")

        ledger = load_ledger(self.paths.ledger_json)
        now_wall = time.time()
        if ledger.first_start is None:
            ledger = replace(ledger, first_start=utc_now_iso(), first_start_epoch_s=now_wall)
        if ledger.attempts:  # the last attempt may have died without a word (SIGKILL)
            last = ledger.attempts[-1]
            ledger = record_new_states(ledger, target, _iso_to_epoch(last.started_at), last.kohya_step_base)
            if last.result is None:
                ledger = end_last_attempt(ledger, "killed", utc_now_iso())
        self.status = replace(self.status, first_start=ledger.first_start)

        # 2. checkpoints
        states = find_states(target, ledger)
        for c in sorted(states, key=lambda c: c.name):
            if c.problem:
                journal.warning(f"skipping checkpoint {c.path}: {c.problem} (left on disk untouched)")
        chosen = best(states)

        # 3. already complete?
        if final_model_problem(target, ledger.first_start_epoch_s) is None:
            journal.info(f"{target.final_model} is complete and valid: nothing to train")
            self.notifier.notify("READY=1")  # Type=notify: exiting 0 before READY=1 is a protocol failure
            self._save_ledger(ledger)
            self.publish(status=RunStatus.COMPLETED, reason=None, best_checkpoint=chosen.name if chosen else None,
                         epoch=ledger.total_epochs, epochs=ledger.total_epochs,
                         step=ledger.total_steps, steps=ledger.total_steps,
                         attempt=ledger.attempts[-1].number if ledger.attempts else None)
            return

        best_abs = chosen.abs_step if (chosen and chosen.abs_step is not None) else 0
        streak = attempts_without_progress(ledger, best_abs)
        limit = cfg.restart.max_attempts_without_progress
        if streak >= limit:
            self._give_up(ledger, streak, limit, chosen)

        # 4. argv
        plan = plan_attempt(argv, chosen, ledger.steps_per_epoch)
        number = ledger.next_attempt_number
        ledger = replace(
            ledger,
            attempts=ledger.attempts
            + (Attempt(number=number, started_at=utc_now_iso(), start_abs_step=plan.start_abs_step,
                       resumed_from=chosen.name if chosen else None, kohya_step_base=plan.kohya_step_base),),
        )
        self._save_ledger(ledger)
        self._attempt(cfg, plan, env, target, ledger, number, streak, stacks_dir)

    def _lock(self) -> None:
        """One wrapper per run: the two spellings of an instance name are two units, and a
        second one must not train into the same folder. Held until the process exits."""
        import fcntl

        path = self.paths.run_dir / ".fluxgymd.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(
                f"run {self.name} is already being supervised by another fluxgymd (lock {path}); "
                f"use `fluxgym status {self.name}`"
            ) from None
        self._lock_fd = fd

    def _save_ledger(self, ledger: Ledger) -> None:
        """A full disk must not end the run: the ledger is rewritten at the next chance, and
        without it resume falls back to what the checkpoints themselves say."""
        try:
            save_ledger(self.paths.ledger_json, ledger)
            self._ledger_error = None
        except OSError as e:
            if e.strerror != self._ledger_error:
                journal.err(f"cannot write {self.paths.ledger_json}: {e.strerror}; progress records may lag")
                self._ledger_error = e.strerror

    def _path_prefix(self, cfg: RunConfig) -> list[str]:
        """FluxGym's own venv (env/) first, then the interpreter running fluxgymd."""
        prefix = [str(p) for p in (self.paths.home / "env" / "bin", self.paths.home / "venv" / "bin") if p.is_dir()]
        return prefix + [str(Path(sys.executable).parent)]

    def _give_up(self, ledger: Ledger, streak: int, limit: int, chosen: Checkpoint | None) -> None:
        reason = f"{streak} attempts in a row made no progress (max_attempts_without_progress = {limit})"
        # systemd does not restart after 79, so the next start is a person's: it counts afresh
        if ledger.attempts:
            last = ledger.attempts[-1]
            ledger = replace(ledger, attempts=ledger.attempts[:-1] + (
                replace(last, result=GAVE_UP, ended_at=last.ended_at or utc_now_iso()),))
        self._save_ledger(ledger)
        self.publish(status=RunStatus.FAILED, reason=reason, attempts_without_progress=streak,
                     best_checkpoint=chosen.name if chosen else None)
        raise GaveUp(f"run {self.name}: giving up: {reason}; fix the cause, then `fluxgym restart {self.name}`")

    def _attempt(
        self, cfg: RunConfig, plan: ResumePlan, env: dict[str, str], target: TrainerTarget,
        ledger: Ledger, number: int, streak: int, stacks_dir: Path,
    ) -> None:
        from .gpuprobe import GpuProbe
        from .logsink import LogSink

        tracker = ProgressTracker(offset_steps=plan.start_abs_step)
        sink = LogSink(
            self.paths.training_log,
            journal_fd=sys.stdout.fileno(),
            rotate_bytes=cfg.logs.rotate_bytes,
            keep=cfg.logs.keep,
            progress_interval_s=cfg.logs.progress_interval_s,
            on_line=tracker.feed,
            unit_name=unit_name(self.name),
        )
        probe = GpuProbe(cfg.train.gpus, cfg.watchdog.gpu_busy_percent, env)
        started_wall = time.time()
        journal.attach_sink(sink)
        sink.write_marker(f"==== attempt {number} · {plan.describe()} · {utc_now_iso()} ====")
        journal.info(f"attempt {number}: {plan.describe()}: {' '.join(plan.argv)}")
        self.publish(
            status=RunStatus.STARTING, reason=None, attempt=number, started_at=utc_now_iso(),
            resumed_from=plan.resumed_from.name if plan.resumed_from else None,
            best_checkpoint=plan.resumed_from.name if plan.resumed_from else None,
            step=plan.start_abs_step or None, attempts_without_progress=streak,
        )

        def on_poll(report: PollReport) -> None:
            p, _, last_wall, _ = tracker.snapshot()
            self._note_gpu_problem(report.gpu_problem)
            self.publish(
                status=RunStatus.RUNNING if p.abs_step is not None or p.epoch is not None else RunStatus.STARTING,
                epoch=p.epoch, epochs=p.epochs, step=p.abs_step if p.abs_step is not None else self.status.step,
                steps=p.total_steps, loss=p.loss, it_per_s=p.it_per_s, eta_s=p.eta_s,
                gpu_percent=report.gpu_percent, gpu=report.gpu_text,
                last_progress_at=iso_from_epoch(last_wall) or self.status.last_progress_at,
            )

        def on_forensics(pid: int, verdict: Verdict, report: PollReport) -> None:
            from .forensics import write_stall_report

            try:
                path = write_stall_report(
                    self.paths.stalls_dir, name=self.name, attempt=number,
                    why=f"{verdict.value} for {cfg.watchdog.stall_timeout_s * 0.8:.0f}s+ of a "
                        f"{cfg.watchdog.stall_timeout_s:.0f}s window",
                    gpu_text=probe.last_detail(), root_pid=pid, stacks_dir=stacks_dir,
                    last_lines=sink.last_lines(50),
                )
                why = "" if verdict is Verdict.IDLE else f" ({verdict.value})"
                journal.warning(f"no sign of life for {cfg.watchdog.stall_timeout_s * 0.8:.0f}s{why}: "
                                f"stacks and readings in {path}")
            except OSError as e:
                journal.err(f"could not write stall forensics: {e}")

        sup = Supervisor(
            plan.argv, env, cfg.train.workdir,
            limits=Limits(cfg.watchdog.startup_timeout_s, cfg.watchdog.progress_timeout_s),
            stall_timeout_s=cfg.watchdog.stall_timeout_s,
            poll_interval_s=cfg.watchdog.poll_interval_s,
            kill_grace_s=KILL_GRACE_S,
            notifier=self.notifier,
            gpu_probe=probe,
            tracker=tracker,
            attach_output=sink.attach,
            on_poll=on_poll,
            on_forensics=on_forensics,
            on_started=lambda pid: self.publish(pid=pid),
        )
        try:
            end = sup.run()
            sink.wait_drained(timeout_s=30.0)
        finally:
            probe.close()
        try:
            self._finish(cfg, end, tracker, sink, target, ledger, number, started_wall, plan)
        finally:
            journal.attach_sink(None)
            sink.close()

    def _note_gpu_problem(self, problem: str | None) -> None:
        if problem != self._gpu_problem:
            if problem:
                journal.err(f"GPU monitoring: {problem}; liveness now runs on training progress alone")
            elif self._gpu_problem:
                journal.info("GPU monitoring recovered")
            self._gpu_problem = problem

    def _finish(
        self, cfg: RunConfig, end: AttemptEnd, tracker: ProgressTracker, sink, target: TrainerTarget,
        ledger: Ledger, number: int, started_wall: float, plan: ResumePlan,
    ) -> None:
        p, _, _, _ = tracker.snapshot()
        spe = p.steps_per_epoch or ledger.steps_per_epoch
        ledger = replace(
            ledger, steps_per_epoch=spe, total_steps=p.total_steps or ledger.total_steps,
            total_epochs=p.epochs or ledger.total_epochs,
        )
        ledger = record_new_states(ledger, target, started_wall, plan.kohya_step_base)
        states = find_states(target, ledger)
        chosen = best(states)
        best_name = chosen.name if chosen else None
        now = utc_now_iso()

        if end.outcome is Outcome.STOPPED:
            sink.write_marker(f"==== attempt {number} stopped (systemctl stop) · {now} ====")
            self._save_ledger(end_last_attempt(ledger, "stopped", now))
            self.publish(status=RunStatus.STOPPED, reason="stopped by request", best_checkpoint=best_name)
            return

        if end.outcome is Outcome.EXITED and end.returncode == 0:
            problem = final_model_problem(target, ledger.first_start_epoch_s)
            if problem is None:
                sink.write_marker(f"==== attempt {number} completed · model {target.final_model} verified · {now} ====")
                self._save_ledger(end_last_attempt(ledger, "completed", now))
                _, _, last_wall, _ = tracker.snapshot()
                self.publish(
                    status=RunStatus.COMPLETED, reason=None, best_checkpoint=best_name, eta_s=None,
                    step=p.total_steps or self.status.step, steps=p.total_steps or self.status.steps,
                    epoch=p.epochs or self.status.epoch, epochs=p.epochs or self.status.epochs,
                    loss=p.loss if p.loss is not None else self.status.loss,
                    last_progress_at=iso_from_epoch(last_wall) or self.status.last_progress_at,
                )
                journal.info(f"run completed: {target.final_model} verified")
                return
            reason = f"trainer exited 0 without a valid final model ({problem})"
            result = "failed-attempt"
        elif end.outcome is Outcome.STALLED:
            why = end.verdict.value if end.verdict else "no sign of life"
            reason = f"watchdog: {why} for {cfg.watchdog.stall_timeout_s:.0f}s"
            result = "stalled"
        else:
            rc = end.returncode
            reason = (f"trainer killed by signal {-rc}" if rc is not None and rc < 0
                      else f"trainer exited with status {rc}")
            result = "failed-attempt"

        ledger = end_last_attempt(ledger, result, now)
        self._save_ledger(ledger)
        best_abs = chosen.abs_step if (chosen and chosen.abs_step is not None) else 0
        streak = attempts_without_progress(ledger, best_abs)
        limit = cfg.restart.max_attempts_without_progress
        sink.write_marker(f"==== attempt {number} {result}: {reason} · {now} ====")
        if streak >= limit:
            self._give_up(ledger, streak, limit, chosen)
        status = RunStatus.STALLED if result == "stalled" else RunStatus.FAILED_ATTEMPT
        self.publish(status=status, reason=reason, best_checkpoint=best_name, attempts_without_progress=streak)
        raise AttemptFailed(f"run {self.name}: attempt {number} {result}: {reason}")


def _iso_to_epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    import datetime as dt

    try:
        return dt.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc).timestamp()
    except ValueError:
        return None


def run(name: str) -> None:
    """Entry point of `fluxgymd run NAME`; raises FluxgymError with the exit code on failure."""
    runner = Run(name)
    try:
        runner.start()
    except (ConfigError, MissingInputError) as e:
        # status.json should say why the run will not start, not just "failed"
        if runner.paths.run_dir.is_dir() and not runner.paths.status_json.is_symlink():
            runner.publish(status=RunStatus.FAILED, reason=str(e))
        raise
