"""fluxgym-notify@.service: run the box's [notify] command for a run that failed (or completed)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .config import load_config
from .errors import FluxgymError
from .logfollow import tail_lines
from .paths import RunPaths
from .runinfo import read_status


def run_name_of_unit(unit: str) -> str:
    """fluxgym-train@NAME.service -> NAME (the instance is a validated run name: no escapes)."""
    prefix, suffix = "fluxgym-train@", ".service"
    if not (unit.startswith(prefix) and unit.endswith(suffix)):
        raise FluxgymError(f"{unit}: not a fluxgym-train@ unit")
    return unit[len(prefix) : -len(suffix)]


def notify(home: Path, unit: str) -> None:
    from .systemctl import show

    name = run_name_of_unit(unit)
    paths = RunPaths(home, name)
    cfg = load_config(paths)
    if cfg.notify.command is None:
        return  # nothing configured: not an error
    st = read_status(paths)
    result = show(name).get("Result", "")
    env = dict(os.environ)
    env.update({
        "FLUXGYM_RUN": name,
        "FLUXGYM_UNIT": unit,
        "FLUXGYM_RESULT": result,
        "FLUXGYM_STATUS": str(st.get("status") or ""),
        "FLUXGYM_REASON": str(st.get("reason") or ""),
        "FLUXGYM_LOG_TAIL": "\n".join(tail_lines(paths.training_log, 20)),
    })
    cp = subprocess.run(list(cfg.notify.command), env=env, timeout=120)
    if cp.returncode != 0:
        raise FluxgymError(f"notify command {cfg.notify.command[0]} exited with {cp.returncode}")
