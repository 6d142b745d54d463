"""What `fluxgym ls/status/checkpoints/verify` show: files of a run plus its unit's state."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .checkpoints import Checkpoint, best
from .config import load_config
from .errors import FluxgymError
from .ledger import load_ledger
from .paths import RunPaths
from .resume import TrainerTarget, trainer_target
from .runner import base_argv, final_model_problem, find_states


def run_names(home: Path) -> list[str]:
    outputs = home / "outputs"
    if not outputs.is_dir():
        return []
    return sorted(
        p.name for p in outputs.iterdir()
        if p.is_dir() and ((p / "run.toml").is_file() or (p / "train.sh").is_file())
    )


def read_status(paths: RunPaths) -> dict:
    try:
        return json.loads(paths.status_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


@dataclass(frozen=True)
class RunFiles:
    paths: RunPaths
    target: TrainerTarget | None
    checkpoints: list[Checkpoint]
    problem: str | None  # why the config could not be read


def run_files(paths: RunPaths) -> RunFiles:
    try:
        cfg = load_config(paths)
        argv, source = base_argv(cfg)
        target = trainer_target(argv, cfg.train.workdir, source)
    except FluxgymError as e:
        return RunFiles(paths, None, [], str(e))
    ledger = load_ledger(paths.ledger_json)
    return RunFiles(paths, target, sorted(find_states(target, ledger), key=lambda c: c.name), None)


def age_s(iso: str | None) -> float | None:
    if not iso:
        return None
    import datetime as dt

    try:
        t = dt.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc).timestamp()
    except ValueError:
        return None
    return max(time.time() - t, 0.0)


def row(paths: RunPaths, unit: dict[str, str]) -> dict:
    """One run as `ls`/`status --json` report it (documented in docs/cli.md)."""
    st = read_status(paths)
    files = run_files(paths)
    newest = best(files.checkpoints)
    return {
        "name": paths.name,
        "unit": {
            "active_state": unit.get("ActiveState"),
            "sub_state": unit.get("SubState"),
            "result": unit.get("Result"),
            "restarts": int(unit["NRestarts"]) if unit.get("NRestarts", "").isdigit() else None,
        },
        "status": st.get("status"),
        "reason": st.get("reason"),
        "epoch": st.get("epoch"),
        "epochs": st.get("epochs"),
        "step": st.get("step"),
        "steps": st.get("steps"),
        "loss": st.get("loss"),
        "it_per_s": st.get("it_per_s"),
        "eta_s": st.get("eta_s"),
        "gpu_percent": st.get("gpu_percent"),
        "attempt": st.get("attempt"),
        "newest_checkpoint": newest.name if newest else None,
        "last_progress_age_s": age_s(st.get("last_progress_at")),
        "config_problem": files.problem,
    }


def verify(paths: RunPaths) -> tuple[bool, str]:
    """(True, path) only for a completed run whose final model is valid."""
    files = run_files(paths)
    if files.target is None:
        return False, files.problem or "unreadable configuration"
    ledger = load_ledger(paths.ledger_json)
    problem = final_model_problem(files.target, ledger.first_start_epoch_s)
    if problem:
        return False, problem
    st = read_status(paths)
    if st.get("status") not in (None, "completed"):
        return False, f"status is {st.get('status')}, not completed"
    return True, str(files.target.final_model)
