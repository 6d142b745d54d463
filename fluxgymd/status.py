"""status.json (machine-readable, atomic) and systemd's one-line STATUS= (SPEC sections 1, 2).

status.json schema (version 1), all keys always present, null when unknown:
  schema: 1, name, status (RunStatus value), reason, attempt, pid, first_start, started_at,
  updated_at (UTC ISO), epoch, epochs, step (absolute), steps, loss, it_per_s, eta_s,
  gpu_percent, gpu (short text), last_progress_at (UTC ISO), resumed_from, best_checkpoint,
  attempts_without_progress
"""
from __future__ import annotations

import datetime as _dt
import re
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

from .atomic import write_json_atomic
from .durations import format_duration

SCHEMA_VERSION = 1


class RunStatus(str, Enum):
    STARTING = "starting"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED_ATTEMPT = "failed-attempt"  # systemd restarts
    STALLED = "stalled"  # watchdog fired; systemd restarts
    STOPPED = "stopped"
    FAILED = "failed"  # gave up or bad input: no restart


def utc_now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_from_epoch(t: float | None) -> str | None:
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class StatusDoc:
    name: str
    status: RunStatus
    reason: str | None = None
    attempt: int | None = None
    pid: int | None = None
    first_start: str | None = None
    started_at: str | None = None
    updated_at: str | None = None
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    steps: int | None = None
    loss: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    gpu_percent: int | None = None
    gpu: str | None = None
    last_progress_at: str | None = None
    resumed_from: str | None = None
    best_checkpoint: str | None = None
    attempts_without_progress: int | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["status"] = self.status.value
        d["schema"] = SCHEMA_VERSION
        return d


def write_status(path: Path, doc: StatusDoc) -> None:
    write_json_atomic(path, doc.to_json())


def status_line(doc: StatusDoc, max_len: int = 99) -> str:
    """`epoch 3/16 · step 450/1200 · loss 0.123 · GPU 97% · ETA 41m`, under 100 characters."""
    parts: list[str] = []
    if doc.status not in (RunStatus.RUNNING,):
        parts.append(doc.status.value + (f": {doc.reason}" if doc.reason else ""))
    if doc.epoch is not None:
        parts.append(f"epoch {doc.epoch}/{doc.epochs}" if doc.epochs else f"epoch {doc.epoch}")
    if doc.step is not None:
        parts.append(f"step {doc.step}/{doc.steps}" if doc.steps else f"step {doc.step}")
    if doc.loss is not None:
        parts.append(f"loss {doc.loss:.3f}")
    if doc.gpu:
        parts.append(doc.gpu)
    if doc.eta_s is not None and doc.status is RunStatus.RUNNING:
        parts.append(f"ETA {format_duration(doc.eta_s)}")
    if not parts:
        parts.append("starting")
    # one line: a newline would start a new sd_notify assignment
    line = " · ".join(re.sub(r"\s+", " ", part).strip() for part in parts)
    return line if len(line) <= max_len else line[: max_len - 1] + "…"
