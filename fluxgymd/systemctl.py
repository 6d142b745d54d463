"""Thin, argv-only calls to systemctl/journalctl (never through a shell)."""
from __future__ import annotations

import shutil
import subprocess

from .errors import FluxgymError
from .names import unit_name

SHOW_PROPS = ("ActiveState", "SubState", "Result", "NRestarts", "ExecMainStatus", "LoadState", "StatusText")


def _base(user: bool) -> list[str]:
    exe = shutil.which("systemctl")
    if exe is None:
        raise FluxgymError("systemctl not found: fluxgymd needs systemd")
    return [exe] + (["--user"] if user else [])


def show(name: str, user: bool = False, props: tuple[str, ...] = SHOW_PROPS) -> dict[str, str]:
    """systemctl show of a run's unit; {} when systemd cannot be asked (not booted, no bus)."""
    try:
        cp = subprocess.run(
            _base(user) + ["show", unit_name(name), "-p", ",".join(props)],
            capture_output=True, text=True, timeout=10,
        )
    except (FluxgymError, OSError, subprocess.TimeoutExpired):
        return {}
    if cp.returncode != 0:
        return {}
    out = {}
    for line in cp.stdout.splitlines():
        k, _, v = line.partition("=")
        out[k] = v
    return out


def control(verb: str, name: str, user: bool = False) -> None:
    """start/stop/restart/enable a run's unit; one clear line on failure."""
    cp = subprocess.run(_base(user) + [verb, unit_name(name)], capture_output=True, text=True)
    if cp.returncode != 0:
        msg = (cp.stderr.strip().splitlines() or [f"exit status {cp.returncode}"])[-1]
        raise FluxgymError(f"systemctl {verb} {unit_name(name)}: {msg}")


def daemon_reload(user: bool = False) -> None:
    cp = subprocess.run(_base(user) + ["daemon-reload"], capture_output=True, text=True)
    if cp.returncode != 0:
        raise FluxgymError(f"systemctl daemon-reload: {cp.stderr.strip() or cp.returncode}")
