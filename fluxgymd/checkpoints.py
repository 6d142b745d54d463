"""kohya checkpoint states: discovery and validation (I/O) plus ranking (pure).

kohya names states after --output_name (library/train_util.py): NAME-{epoch:06d}-state at
epoch ends, NAME-step{step:08d}-state every N steps, NAME-state at the end of training.
accelerate's save_state writes the model, optimizer, scheduler and finally
random_states_0.pkl, so a state without that file was interrupted mid-save.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterable, Mapping

from .safetensors_check import safetensors_problem


class StateKind(Enum):
    EPOCH = "epoch"
    STEP = "step"
    LAST = "last"  # NAME-state: written at the end; kohya refuses to resume from it


@dataclass(frozen=True)
class StateName:
    kind: StateKind
    number: int | None  # epoch (absolute) or kohya's step count in the name


def parse_state_name(dirname: str, output_name: str) -> StateName | None:
    """Which kohya state DIRNAME is for OUTPUT_NAME, or None when it is not one of its states."""
    if not dirname.startswith(output_name + "-"):
        return None
    rest = dirname[len(output_name) + 1 :]
    if rest == "state":
        return StateName(StateKind.LAST, None)
    m = re.fullmatch(r"(\d{6,})-state", rest)
    if m:
        return StateName(StateKind.EPOCH, int(m.group(1)))
    m = re.fullmatch(r"step(\d{8,})-state", rest)
    if m:
        return StateName(StateKind.STEP, int(m.group(1)))
    return None


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    kind: StateKind
    number: int | None
    problem: str | None  # None: complete and usable as a resume target
    current_epoch: int | None = None  # from train_state.json (kohya: absolute epoch in progress)
    current_step: int | None = None  # from train_state.json (kohya: RELATIVE to its attempt)
    abs_step: int | None = None  # absolute optimizer steps done, when known
    abs_epoch: int | None = None  # absolute epochs completed, when known

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def usable(self) -> bool:
        return self.problem is None and self.kind is not StateKind.LAST


REQUIRED_FILES = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl")


def state_problem(path: Path) -> tuple[str | None, dict | None]:
    """(None, train_state) when PATH is a complete accelerate state, else (reason, whatever parsed)."""
    train_state = None
    ts = path / "train_state.json"
    try:
        train_state = json.loads(ts.read_text(encoding="utf-8"))
        if not isinstance(train_state, dict) or not isinstance(train_state.get("current_step"), int):
            return "train_state.json lacks current_step", None
    except FileNotFoundError:
        return "train_state.json missing", None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "train_state.json unreadable", None
    if (path / "model.safetensors").exists():
        p = safetensors_problem(path / "model.safetensors")
        if p:
            return f"model.safetensors {p}", train_state
    elif not (path / "pytorch_model.bin").is_file():
        return "model weights missing", train_state
    for f in REQUIRED_FILES:
        try:
            if (path / f).stat().st_size == 0:
                return f"{f} empty", train_state
        except FileNotFoundError:
            # random_states_0.pkl is accelerate's last write: its absence means an interrupted save
            why = " (save was interrupted)" if f == "random_states_0.pkl" else ""
            return f"{f} missing{why}", train_state
    return None, train_state


def scan_states(output_dir: Path, output_name: str) -> list[Checkpoint]:
    """Every state directory of OUTPUT_NAME in OUTPUT_DIR, checked; never modifies anything."""
    found: list[Checkpoint] = []
    try:
        entries = list(output_dir.iterdir())
    except FileNotFoundError:
        return []
    for entry in entries:
        parsed = parse_state_name(entry.name, output_name)
        if parsed is None or not entry.is_dir():
            continue
        problem, ts = state_problem(entry)
        found.append(
            Checkpoint(
                path=entry,
                kind=parsed.kind,
                number=parsed.number,
                problem=problem,
                current_epoch=_int_or_none((ts or {}).get("current_epoch")),
                current_step=_int_or_none((ts or {}).get("current_step")),
            )
        )
    return found


def _int_or_none(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


# --- pure policy ----------------------------------------------------------------------------

def with_absolute_progress(
    cp: Checkpoint, steps_per_epoch: int | None, ledger_steps: Mapping[str, int]
) -> Checkpoint:
    """Fill abs_step/abs_epoch. Epoch states name their absolute epoch; a step state's name
    and train_state.json hold kohya's count relative to the attempt that wrote it, so the
    ledger (which knows each attempt's offset) is preferred, and the raw count is only
    trusted when no ledger entry exists (a state of a first attempt)."""
    from dataclasses import replace

    if cp.kind is StateKind.EPOCH and cp.number is not None:
        abs_step = cp.number * steps_per_epoch if steps_per_epoch else ledger_steps.get(cp.name)
        return replace(cp, abs_epoch=cp.number, abs_step=abs_step)
    if cp.kind is StateKind.STEP:
        abs_step = ledger_steps.get(cp.name, cp.number)
        abs_epoch = abs_step // steps_per_epoch if (steps_per_epoch and abs_step is not None) else None
        return replace(cp, abs_step=abs_step, abs_epoch=abs_epoch)
    return cp


def progress_key(cp: Checkpoint) -> tuple[float, float]:
    """Sort key by training progress, never mtime. With absolute steps known that is exact;
    otherwise epochs completed first (an epoch-end state beats a mid-epoch one of that epoch)."""
    if cp.abs_step is not None:
        return (float(cp.abs_step), 0.0)
    if cp.kind is StateKind.EPOCH and cp.number is not None:
        return (-1.0, float(cp.number))
    # step state without a known absolute count: kohya's current_epoch is absolute
    epoch = (cp.current_epoch or 1) - 1
    return (-1.0, epoch + 0.5)


def rank(checkpoints: Iterable[Checkpoint]) -> list[Checkpoint]:
    """Usable resume targets, best (most progress) first."""
    return sorted((c for c in checkpoints if c.usable), key=progress_key, reverse=True)


def best(checkpoints: Iterable[Checkpoint]) -> Checkpoint | None:
    ranked = rank(checkpoints)
    return ranked[0] if ranked else None
