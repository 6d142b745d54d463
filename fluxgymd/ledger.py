"""The run's absolute-progress ledger: fluxgymd's memory across attempts.

kohya restarts its step counter at 0 on every resume, so its step-state names and
train_state.json are relative to the attempt that wrote them (sd-scripts #1999, #2248).
The ledger records, per attempt, the absolute step it started from, and per state the
absolute step it holds, so resumes and the give-up rule work on absolute progress.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .atomic import write_json_atomic

GAVE_UP = "gave-up"  # result of the attempt after which a run gave up (exit 79)


@dataclass(frozen=True)
class Attempt:
    number: int
    started_at: str  # UTC ISO time
    start_abs_step: int  # absolute progress of the best checkpoint at start (0: from scratch)
    resumed_from: str | None = None
    kohya_step_base: int = 0  # absolute step = base + kohya's own (relative) global_step
    result: str | None = None  # completed, failed-attempt, stalled, stopped, ...
    ended_at: str | None = None


@dataclass(frozen=True)
class Ledger:
    first_start: str | None = None
    first_start_epoch_s: float | None = None
    steps_per_epoch: int | None = None
    total_steps: int | None = None
    total_epochs: int | None = None
    attempts: tuple[Attempt, ...] = ()
    state_abs_steps: dict[str, int] = field(default_factory=dict)

    @property
    def next_attempt_number(self) -> int:
        return (self.attempts[-1].number + 1) if self.attempts else 1


def load_ledger(path: Path) -> Ledger:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Ledger()
    except (OSError, ValueError):
        # a damaged ledger must not stop a run: fall back to what checkpoints say
        return Ledger()
    try:
        return Ledger(
            first_start=raw.get("first_start"),
            first_start_epoch_s=raw.get("first_start_epoch_s"),
            steps_per_epoch=raw.get("steps_per_epoch"),
            total_steps=raw.get("total_steps"),
            total_epochs=raw.get("total_epochs"),
            attempts=tuple(Attempt(**a) for a in raw.get("attempts", [])),
            state_abs_steps={str(k): int(v) for k, v in raw.get("state_abs_steps", {}).items()},
        )
    except (TypeError, ValueError):
        return Ledger()


def save_ledger(path: Path, ledger: Ledger) -> None:
    d = asdict(ledger)
    d["attempts"] = [asdict(a) for a in ledger.attempts]
    write_json_atomic(path, d)


def end_last_attempt(ledger: Ledger, result: str, ended_at: str) -> Ledger:
    if not ledger.attempts:
        return ledger
    last = replace(ledger.attempts[-1], result=result, ended_at=ended_at)
    return replace(ledger, attempts=ledger.attempts[:-1] + (last,))


def attempts_without_progress(ledger: Ledger, current_best_abs_step: int) -> int:
    """How many of the most recent attempts ended without moving the best checkpoint.

    Attempt j made progress iff the best checkpoint when attempt j+1 started (or now, for the
    last one) is beyond where attempt j started."""
    starts = [a.start_abs_step for a in ledger.attempts] + [current_best_abs_step]
    streak = 0
    for j in range(len(ledger.attempts) - 1, -1, -1):
        if ledger.attempts[j].result in ("completed", GAVE_UP):
            break  # a finished run, or a give-up a person has since restarted: count afresh
        if starts[j + 1] > starts[j]:
            break
        streak += 1
    return streak
