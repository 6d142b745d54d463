"""fluxgym-notify@.service: run the box's [notify] command for a run that ended.

The train unit's `OnFailure=` (and, as installed by `fluxgym install` on systemd >= 249,
`OnSuccess=`) starts `fluxgym-notify@<train unit>.service`, whose ExecStart is
`fluxgym notify %i`. systemd (>= 251) hands the triggering unit's result to it in
`MONITOR_SERVICE_RESULT`, `MONITOR_EXIT_CODE`, `MONITOR_EXIT_STATUS`, `MONITOR_UNIT`; older
managers are asked with `systemctl show`.

The command (`[notify] command = [...]` in fluxgym.toml or run.toml) gets:
  * environment: FLUXGYM_RUN, FLUXGYM_UNIT, FLUXGYM_RESULT, FLUXGYM_EXIT_STATUS,
    FLUXGYM_STATUS, FLUXGYM_REASON, FLUXGYM_LOG_TAIL (last lines of training.log);
  * placeholders in its arguments: {run} {unit} {result} {status} {reason} {exit_status};
  * on stdin, the same as one JSON object (`curl --data-binary @-` posts it as is).
A success only notifies when `notify.on_success = true` and status.json says `completed`
(a `systemctl stop` also ends with result success: nobody needs a message for that).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from .config import load_config
from .errors import FluxgymError
from .logfollow import tail_lines
from .names import validate_name
from .paths import RunPaths
from .runinfo import read_status

LOG_TAIL_LINES = 20
COMMAND_TIMEOUT_S = 100.0  # inside the notify unit's TimeoutStartSec=2min
_PREFIX, _SUFFIX = "fluxgym-train@", ".service"


def unescape_instance(text: str) -> str:
    """What systemd's %I does to an instance: `\\xNN` escapes decoded, `-` becomes `/`."""
    raw = bytearray()
    i = 0
    while i < len(text):
        m = re.match(r"\\x([0-9a-fA-F]{2})", text[i:])
        if m:
            raw.append(int(m.group(1), 16))
            i += 4
            continue
        raw += b"/" if text[i] == "-" else text[i].encode()
        i += 1
    return raw.decode("utf-8", "replace")


def run_name_of_unit(unit: str) -> str:
    """fluxgym-train@my\\x2dlora.service -> my-lora (validated)."""
    if not (unit.startswith(_PREFIX) and unit.endswith(_SUFFIX)) or len(unit) <= len(_PREFIX) + len(_SUFFIX):
        raise FluxgymError(f"{unit!r}: not a fluxgym-train@NAME.service unit")
    return validate_name(unescape_instance(unit[len(_PREFIX) : -len(_SUFFIX)]))


@dataclass(frozen=True)
class Event:
    run: str
    unit: str
    result: str  # systemd's Result=: success, exit-code, signal, watchdog, start-limit-hit...
    exit_status: str | None
    status: str | None  # status.json's status
    reason: str | None
    log_tail: tuple[str, ...]

    @property
    def succeeded(self) -> bool:
        return self.result == "success"

    def env(self) -> dict[str, str]:
        return {
            "FLUXGYM_RUN": self.run, "FLUXGYM_UNIT": self.unit, "FLUXGYM_RESULT": self.result,
            "FLUXGYM_EXIT_STATUS": self.exit_status or "", "FLUXGYM_STATUS": self.status or "",
            "FLUXGYM_REASON": self.reason or "", "FLUXGYM_LOG_TAIL": "\n".join(self.log_tail),
        }

    def to_json(self) -> dict:
        d = asdict(self)
        d["log_tail"] = list(self.log_tail)
        return d


def should_notify(event: Event, on_success: bool) -> bool:
    """Failures always; successes only when asked for and the training really completed (pure)."""
    if not event.succeeded:
        return True
    return on_success and event.status == "completed"


def expand(argv: tuple[str, ...], event: Event) -> list[str]:
    """Substitute the known {placeholders} only: JSON bodies with other braces stay intact (pure)."""
    values = {"run": event.run, "unit": event.unit, "result": event.result, "status": event.status or "",
              "reason": event.reason or "", "exit_status": event.exit_status or ""}
    out = []
    for arg in argv:
        for k, v in values.items():
            arg = arg.replace("{" + k + "}", v)
        out.append(arg)
    return out


def build_event(home: Path, unit: str, env: Mapping[str, str]) -> Event:
    name = run_name_of_unit(unit)
    paths = RunPaths(home, name)
    result = env.get("MONITOR_SERVICE_RESULT")
    exit_status = env.get("MONITOR_EXIT_STATUS")
    if not result:
        from .systemctl import show

        props = show(name)
        result = props.get("Result") or "unknown"
        exit_status = exit_status or props.get("ExecMainStatus")
    st = read_status(paths)
    return Event(
        run=name, unit=unit, result=result, exit_status=exit_status or None,
        status=st.get("status") if isinstance(st.get("status"), str) else None,
        reason=st.get("reason") if isinstance(st.get("reason"), str) else None,
        log_tail=tuple(tail_lines(paths.training_log, LOG_TAIL_LINES)),
    )


def notify(home: Path, unit: str, env: Mapping[str, str] | None = None) -> str:
    """Run the configured command for UNIT's end; returns one line saying what happened."""
    env = dict(os.environ if env is None else env)
    event = build_event(home, unit, env)
    cfg = load_config(RunPaths(home, event.run))
    if cfg.notify.command is None:
        return f"{event.unit} ended ({event.result}); no [notify] command configured"
    if not should_notify(event, cfg.notify.on_success):
        return f"{event.unit} ended ({event.result}, status {event.status}); not notifying"
    argv = expand(cfg.notify.command, event)
    try:
        cp = subprocess.run(argv, env={**env, **event.env()}, input=json.dumps(event.to_json()) + "\n",
                            text=True, timeout=COMMAND_TIMEOUT_S, capture_output=True)
    except FileNotFoundError:
        raise FluxgymError(f"notify command {argv[0]!r} not found") from None
    except subprocess.TimeoutExpired:
        raise FluxgymError(f"notify command {argv[0]} did not finish within {COMMAND_TIMEOUT_S:.0f}s") from None
    if cp.returncode != 0:
        tail = (cp.stderr.strip().splitlines() or [""])[-1]
        raise FluxgymError(f"notify command {argv[0]} exited with {cp.returncode}" + (f": {tail}" if tail else ""))
    return f"{event.unit} ended ({event.result}); notified with {argv[0]}"
