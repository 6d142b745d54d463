"""Fault injection: ``--fault KIND@STEP``, each firing once across attempts (marker file).

STEP is the absolute 1-based optimizer step. hang-idle, hang-spin and crash fire just before
that step is trained; exit-no-model fires at the end of training if the run trained STEP or
later; die-saving fires in the first state save made after training step STEP or later.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from fluxgymd.standin.fsio import atomic_write_text

FIRED_MARKER_NAME = ".standin-faults-fired.json"


class FaultKind(Enum):
    HANG_IDLE = "hang-idle"
    HANG_SPIN = "hang-spin"
    CRASH = "crash"
    EXIT_NO_MODEL = "exit-no-model"
    DIE_SAVING = "die-saving"


# kinds that fire exactly at their step, before it is trained
BEFORE_STEP_KINDS = frozenset({FaultKind.HANG_IDLE, FaultKind.HANG_SPIN, FaultKind.CRASH})


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    step: int

    @property
    def spec(self) -> str:
        return f"{self.kind.value}@{self.step}"


def parse_fault(text: str) -> Fault:
    kind_text, sep, step_text = text.partition("@")
    kinds = ", ".join(k.value for k in FaultKind)
    if not sep:
        raise ValueError(f"fault {text!r}: expected KIND@STEP with KIND one of {kinds}")
    try:
        kind = FaultKind(kind_text)
    except ValueError:
        raise ValueError(f"fault {text!r}: unknown kind {kind_text!r}, expected one of {kinds}") from None
    try:
        step = int(step_text)
    except ValueError:
        raise ValueError(f"fault {text!r}: step {step_text!r} is not an integer") from None
    if step < 1:
        raise ValueError(f"fault {text!r}: step must be >= 1 (absolute, 1-based)")
    return Fault(kind, step)


class FaultBook:
    """Which faults are armed; remembers fired ones in ``output_dir/.standin-faults-fired.json``."""

    def __init__(self, faults: tuple[Fault, ...], marker: Path, every_attempt: bool) -> None:
        self._faults = faults
        self._marker = marker
        self._every_attempt = every_attempt
        self._fired: set[str] = set(self._read_marker())

    def _read_marker(self) -> list[str]:
        try:
            data = json.loads(self._marker.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        fired = data.get("fired", []) if isinstance(data, dict) else []
        return [str(x) for x in fired]

    def _armed(self, fault: Fault) -> bool:
        return self._every_attempt or fault.spec not in self._fired

    def before_step(self, abs_step: int) -> Fault | None:
        for fault in self._faults:
            if fault.kind in BEFORE_STEP_KINDS and fault.step == abs_step and self._armed(fault):
                return fault
        return None

    def reached(self, kind: FaultKind, last_abs_step: int) -> Fault | None:
        """An armed fault of ``kind`` whose step the run has trained (``last_abs_step >= step``)."""
        for fault in self._faults:
            if fault.kind is kind and last_abs_step >= fault.step and self._armed(fault):
                return fault
        return None

    def mark_fired(self, fault: Fault) -> None:
        """Persist before acting: the act may kill us, and the next attempt must not repeat it."""
        self._fired.add(fault.spec)
        self._marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._marker, json.dumps({"fired": sorted(self._fired)}) + "\n")
