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


def unit_spellings(name: str) -> list[str]:
    """The run's unit, systemd-escaped (what fluxgym uses), then the spelling a person types:
    `systemctl start fluxgym-train@my-lora` is another unit than fluxgym-train@my\\x2dlora,
    running the same run (the wrapper's lock keeps them from training at once)."""
    escaped, raw = unit_name(name), f"fluxgym-train@{name}.service"
    return [escaped] if raw == escaped else [escaped, raw]


def pick_block(blocks: list[dict[str, str]]) -> dict[str, str]:
    """Of a run's spellings, the one that is doing something, else the escaped one (pure)."""
    for b in blocks:
        if b.get("ActiveState") not in (None, "", "inactive"):
            return b
    return blocks[0]


def show_many(names: Iterable[str], user: bool = False,
              props: tuple[str, ...] = SHOW_PROPS) -> dict[str, dict[str, str]]:
    """Unit properties of runs, one systemctl call for all; {} per run when systemd cannot
    be asked (not booted, no bus, no permission): `ls` still shows the files' view."""
    names = list(names)
    if not names:
        return {}
    empty: dict[str, dict[str, str]] = {n: {} for n in names}
    units = [(n, u) for n in names for u in unit_spellings(n)]
    try:
        cp = subprocess.run(
            _base(user) + ["show", *(u for _, u in units), "-p", ",".join(props)],
            capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL,
        )
    except (FluxgymError, OSError, subprocess.TimeoutExpired):
        return empty
    if cp.returncode != 0:
        return empty
    blocks = parse_show(cp.stdout, len(units))
    if not blocks:
        return empty
    per_name: dict[str, list[dict[str, str]]] = {n: [] for n in names}
    for (n, _), b in zip(units, blocks):
        per_name[n].append(b)
    return {n: pick_block(bs) for n, bs in per_name.items()}


def show(name: str, user: bool = False, props: tuple[str, ...] = SHOW_PROPS) -> dict[str, str]:
    return show_many([name], user, props)[name]


def control(verb: str, name: str, user: bool = False, no_block: bool = False) -> None:
    """start/stop/restart/enable a run's unit (escaped instance name); one line on failure.
    `stop` stops every spelling of the run's unit; `start` refuses while another spelling
    runs it; `restart` moves a run from a hand-typed spelling to the escaped one."""
    units = [unit_name(name)]
    others = unit_spellings(name)[1:]
    if others and verb in ("start", "restart"):
        active = [u for u, b in zip(others, [show_unit(u, user) for u in others])
                  if b.get("ActiveState") not in (None, "", "inactive", "failed")]
        if active and verb == "start":
            raise FluxgymError(f"run {name} is already running as {active[0]}")
        if active:
            _run(_base(user) + ["stop", *active], "stop", active[0])
    if verb == "stop":
        units = unit_spellings(name)
    _run(_base(user) + [verb] + (["--no-block"] if no_block else []) + units, verb, units[0])


def show_unit(unit: str, user: bool = False) -> dict[str, str]:
    try:
        cp = subprocess.run(_base(user) + ["show", unit, "-p", "ActiveState"], capture_output=True,
                            text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (FluxgymError, OSError, subprocess.TimeoutExpired):
        return {}
    blocks = parse_show(cp.stdout, 1) if cp.returncode == 0 else []
    return blocks[0] if blocks else {}


def _run(argv: list[str], verb: str, unit: str) -> None:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    except subprocess.TimeoutExpired:
        raise FluxgymError(f"systemctl {verb} {unit}: no answer within 120 s") from None
    if cp.returncode != 0:
        msg = (cp.stderr.strip().splitlines() or [f"exit status {cp.returncode}"])[0]
        raise FluxgymError(f"systemctl {verb} {unit}: {msg}")


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
