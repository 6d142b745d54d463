"""Run names: the systemd instance name and the outputs/ folder name (SPEC section 5.1)."""
from __future__ import annotations

import re

from .errors import ConfigError

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_name(name: str) -> str:
    """Return NAME unchanged, or raise ConfigError explaining the rule it breaks."""
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"invalid run name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return name


def unit_name(name: str) -> str:
    """The systemd unit of a run. Valid names need no systemd-escape, but keep it explicit."""
    return f"fluxgym-train@{escape_instance(name)}.service"


def escape_instance(name: str) -> str:
    """systemd-escape for an instance string (what `systemd-escape` does, without forking it)."""
    out = []
    for i, ch in enumerate(name):
        if ch.isascii() and (ch.isalnum() or ch in ":_" or (ch == "." and i > 0)):
            out.append(ch)
        elif ch == "/":
            out.append("-")
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)
