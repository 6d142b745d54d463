"""Thin, argv-only calls to systemctl (never through a shell).

The CLI runs wherever systemctl talks to the right manager: on a box that is the system
manager (or the user's with ``user=True``); in the tests `fluxgym` itself runs inside the
throwaway systemd, so nothing here needs a test-only knob.
"""
from __future__ import annotations

import shutil
import subprocess
from typing import Iterable

from .errors import FluxgymError
from .names import unit_name

SHOW_PROPS = ("Id", "ActiveState", "SubState", "Result", "NRestarts", "ExecMainStatus", "LoadState")
TIMEOUT_S = 15.0  # a wedged manager must not hang `fluxgym ls`


def _base(user: bool) -> list[str]:
    exe = shutil.which("systemctl")
    if exe is None:
        raise FluxgymError("systemctl not found: fluxgymd needs systemd")
    return [exe, "--no-pager", "--no-ask-password"] + (["--user"] if user else [])


def parse_show(text: str, count: int) -> list[dict[str, str]]:
    """`systemctl show A B ...` prints one KEY=VALUE block per unit, blank-line separated (pure)."""
    blocks: list[dict[str, str]] = [{}]
    for line in text.splitlines():
        if not line.strip():
            if blocks[-1]:
                blocks.append({})
            continue
        k, sep, v = line.partition("=")
        if sep:
            blocks[-1][k] = v
    blocks = [b for b in blocks if b]
    return blocks if len(blocks) == count else []


def show_many(names: Iterable[str], user: bool = False,
              props: tuple[str, ...] = SHOW_PROPS) -> dict[str, dict[str, str]]:
    """Unit properties of runs, one systemctl call for all; {} per run when systemd cannot
    be asked (not booted, no bus, no permission): `ls` still shows the files' view."""
    names = list(names)
    if not names:
        return {}
    empty: dict[str, dict[str, str]] = {n: {} for n in names}
    try:
        cp = subprocess.run(
            _base(user) + ["show", *(unit_name(n) for n in names), "-p", ",".join(props)],
            capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL,
        )
    except (FluxgymError, OSError, subprocess.TimeoutExpired):
        return empty
    if cp.returncode != 0:
        return empty
    blocks = parse_show(cp.stdout, len(names))
    return dict(zip(names, blocks)) if blocks else empty


def show(name: str, user: bool = False, props: tuple[str, ...] = SHOW_PROPS) -> dict[str, str]:
    return show_many([name], user, props)[name]


def control(verb: str, name: str, user: bool = False, no_block: bool = False) -> None:
    """start/stop/restart/enable a run's unit (escaped instance name); one line on failure."""
    argv = _base(user) + [verb] + (["--no-block"] if no_block else []) + [unit_name(name)]
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    except subprocess.TimeoutExpired:
        raise FluxgymError(f"systemctl {verb} {unit_name(name)}: no answer within 120 s") from None
    if cp.returncode != 0:
        msg = (cp.stderr.strip().splitlines() or [f"exit status {cp.returncode}"])[0]
        raise FluxgymError(f"systemctl {verb} {unit_name(name)}: {msg}")


def daemon_reload(user: bool = False) -> None:
    cp = subprocess.run(_base(user) + ["daemon-reload"], capture_output=True, text=True,
                        stdin=subprocess.DEVNULL, timeout=120)
    if cp.returncode != 0:
        msg = (cp.stderr.strip().splitlines() or [f"exit status {cp.returncode}"])[0]
        raise FluxgymError(f"systemctl daemon-reload: {msg}")


def systemd_version() -> int | None:
    """The installed systemd's version number (252), or None without systemctl."""
    exe = shutil.which("systemctl")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=TIMEOUT_S).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return int(out[1]) if len(out) > 1 and out[1].isdigit() else None
