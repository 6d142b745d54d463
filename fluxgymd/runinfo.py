"""What `fluxgym ls/status/checkpoints/verify` show: a run's files plus its unit's state.

The JSON shapes built here are the documented, stable `--json` output (docs/cli.md,
schema 1): keys are only ever added, never renamed or retyped.
"""
from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .checkpoints import Checkpoint, best
from .config import load_config
from .errors import FluxgymError
from .ledger import Ledger, load_ledger
from .names import unit_name
from .paths import RunPaths
from .resume import TrainerTarget, trainer_target

JSON_SCHEMA_VERSION = 1
# Unit states in which a wrapper may legitimately be writing status.json.
_LIVE_UNIT_STATES = frozenset({"active", "activating", "deactivating", "reloading"})
_LIVE_STATUSES = frozenset({"starting", "running"})


def run_names(home: Path) -> list[str]:
    outputs = home / "outputs"
    if not outputs.is_dir():
        return []
    return sorted(
        p.name for p in outputs.iterdir()
        if p.is_dir() and ((p / "run.toml").is_file() or (p / "train.sh").is_file())
    )


def read_status(paths: RunPaths) -> dict[str, Any]:
    try:
        doc = json.loads(paths.status_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


@dataclass(frozen=True)
class RunFiles:
    paths: RunPaths
    target: TrainerTarget | None
    ledger: Ledger
    checkpoints: list[Checkpoint]
    problem: str | None  # why the config could not be read


def run_files(paths: RunPaths) -> RunFiles:
    from .runner import base_argv, find_states

    ledger = load_ledger(paths.ledger_json)
    try:
        cfg = load_config(paths)
        argv, source = base_argv(cfg)
        target = trainer_target(argv, cfg.train.workdir, source)
    except FluxgymError as e:
        return RunFiles(paths, None, ledger, [], str(e))
    return RunFiles(paths, target, ledger, sorted(find_states(target, ledger), key=lambda c: c.name), None)


def iso_to_epoch_s(iso: object) -> float | None:
    if not isinstance(iso, str) or not iso:
        return None
    try:
        return _dt.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.timezone.utc).timestamp()
    except ValueError:
        return None


def _int(v: object) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.isdigit():
        return int(v)
    return None


def _num(v: object) -> float | int | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _str(v: object) -> str | None:
    return v if isinstance(v, str) and v else None


def unit_json(name: str, props: Mapping[str, str]) -> dict[str, Any]:
    """The `unit` object: systemctl show's view, all null when systemd could not be asked."""
    return {
        "name": _str(props.get("Id")) or unit_name(name),  # the spelling that is active
        "load_state": _str(props.get("LoadState")),
        "active_state": _str(props.get("ActiveState")),
        "sub_state": _str(props.get("SubState")),
        "result": _str(props.get("Result")),
        # systemd resets NRestarts once the unit is dead; `attempt` below survives that
        "n_restarts": _int(props.get("NRestarts")),
        "exec_main_status": _int(props.get("ExecMainStatus")),
    }


def row(paths: RunPaths, unit: Mapping[str, str], now_s: float | None = None,
        files: RunFiles | None = None) -> dict[str, Any]:
    """One run as `ls --json` / `status --json` report it (docs/cli.md)."""
    now_s = time.time() if now_s is None else now_s
    st = read_status(paths)
    files = files or run_files(paths)
    newest = best(files.checkpoints)
    u = unit_json(paths.name, unit)
    ledger_attempt = files.ledger.attempts[-1].number if files.ledger.attempts else None
    status = _str(st.get("status"))
    progress_s = iso_to_epoch_s(st.get("last_progress_at"))
    # a wrapper that was SIGKILLed (or a box that rebooted) leaves "running" behind
    stale = bool(status in _LIVE_STATUSES and u["active_state"] is not None
                 and u["active_state"] not in _LIVE_UNIT_STATES)
    return {
        "schema": JSON_SCHEMA_VERSION,
        "name": paths.name,
        "run_dir": str(paths.run_dir),
        "unit": u,
        "status": status,
        "status_stale": stale,
        "reason": _str(st.get("reason")),
        "attempt": _int(st.get("attempt")) or ledger_attempt,
        "attempts_without_progress": _int(st.get("attempts_without_progress")),
        "epoch": _int(st.get("epoch")),
        "epochs": _int(st.get("epochs")),
        "step": _int(st.get("step")),
        "steps": _int(st.get("steps")),
        "loss": _num(st.get("loss")),
        "it_per_s": _num(st.get("it_per_s")),
        "eta_s": _num(st.get("eta_s")),
        "gpu_percent": _int(st.get("gpu_percent")),
        "newest_checkpoint": newest.name if newest else None,
        "newest_checkpoint_step": newest.abs_step if newest else None,
        "last_progress_at": _str(st.get("last_progress_at")),
        "last_progress_age_s": None if progress_s is None else round(max(now_s - progress_s, 0.0), 1),
        "updated_at": _str(st.get("updated_at")),
        "config_problem": files.problem,
    }


def checkpoint_rows(files: RunFiles) -> list[dict[str, Any]]:
    """`checkpoints --json`: every state dir, in progress order, with why it is not usable."""
    from .checkpoints import progress_key

    top = best(files.checkpoints)
    out = []
    for c in sorted(files.checkpoints, key=lambda c: (c.kind.value == "last", progress_key(c), c.name)):
        problem = c.problem
        if problem is None and not c.usable:
            problem = "end-of-training state (NAME-state): kohya does not resume from it"
        out.append({
            "name": c.name,
            "path": str(c.path),
            "kind": c.kind.value,
            "epoch": c.abs_epoch,
            "step": c.abs_step,
            "usable": c.usable,
            "problem": problem,
            "resume_target": top is not None and c.name == top.name,
        })
    return out


def verify(paths: RunPaths) -> tuple[bool, str]:
    """(True, path) only for a completed run whose final model is valid."""
    from .runner import final_model_problem

    files = run_files(paths)
    if files.target is None:
        return False, files.problem or "unreadable configuration"
    problem = final_model_problem(files.target, files.ledger.first_start_epoch_s)
    if problem:
        return False, problem
    st = read_status(paths)
    if st.get("status") not in (None, "completed"):
        return False, f"status is {st.get('status')}, not completed"
    return True, str(files.target.final_model)
