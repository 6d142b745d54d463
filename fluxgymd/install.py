"""`fluxgym install`: the unit templates plus a drop-in with this box's specifics.

The template is never edited; home, user and the absolute ExecStart= go in
fluxgym-train@.service.d/10-fluxgym-install.conf. Writing is idempotent: files whose
content is already right are left alone and reported as unchanged.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

from .atomic import write_atomic
from .errors import FluxgymError

UNITS = ("fluxgym-train@.service", "fluxgym-notify@.service")
DROPIN_NAME = "10-fluxgym-install.conf"


def unit_sources() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "units", here.parent / "systemd"):
        if (candidate / UNITS[0]).is_file():
            return candidate
    raise FluxgymError("unit templates not found next to the fluxgymd package (expected systemd/)")


def entry_point(name: str) -> Path:
    """Absolute path of a console script of this installation (the venv's bin/)."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return candidate
    found = shutil.which(name)
    if found is None:
        raise FluxgymError(f"{name} entry point not found next to {sys.executable} nor on PATH")
    return Path(found)


def train_dropin(home: Path, user: str | None, fluxgymd: Path) -> str:
    lines = [
        "# written by `fluxgym install`; run it again instead of editing",
        "[Unit]",
        f"RequiresMountsFor={home}",
        "",
        "[Service]",
        "ExecStart=",
        f"ExecStart={fluxgymd} run %I",
        f"Environment=FLUXGYM_HOME={home}",
        f"ReadWritePaths={home}",
    ]
    if user:
        lines += [f"User={user}", f"Group={user}"]
    return "\n".join(lines) + "\n"


def notify_dropin(home: Path, user: str | None, fluxgym: Path) -> str:
    lines = [
        "# written by `fluxgym install`; run it again instead of editing",
        "[Service]",
        "ExecStart=",
        f"ExecStart={fluxgym} --home {home} notify %I",
        f"Environment=FLUXGYM_HOME={home}",
    ]
    if user:
        lines += [f"User={user}", f"Group={user}"]
    return "\n".join(lines) + "\n"


def _put(path: Path, text: str, did: list[str]) -> None:
    try:
        if path.read_text() == text:
            did.append(f"unchanged {path}")
            return
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode(), mode=0o644)
    did.append(f"wrote {path}")


def ensure_user(user: str, home: Path, did: list[str]) -> None:
    try:
        pwd.getpwnam(user)
        did.append(f"user {user} exists")
        return
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise FluxgymError(f"user {user} does not exist and useradd is not available to create it")
    nologin = next((p for p in ("/usr/sbin/nologin", "/sbin/nologin") if os.path.exists(p)), "/bin/false")
    cp = subprocess.run([useradd, "--system", "--user-group", "--home-dir", str(home), "--no-create-home",
                         "--shell", nologin, user], capture_output=True, text=True)
    if cp.returncode != 0:
        raise FluxgymError(f"useradd {user}: {cp.stderr.strip() or cp.returncode}")
    did.append(f"created system user {user}")


def install(*, home: Path, user: str, user_unit: bool, unit_dir: Path | None, reload: bool) -> list[str]:
    did: list[str] = []
    home = home.expanduser().resolve()
    if unit_dir is None:
        unit_dir = (Path.home() / ".config/systemd/user") if user_unit else Path("/etc/systemd/system")
    src = unit_sources()
    if not user_unit:
        ensure_user(user, home, did)
    svc_user = None if user_unit else user  # a user manager cannot switch users
    for unit in UNITS:
        _put(unit_dir / unit, (src / unit).read_text(), did)
    _put(unit_dir / f"{UNITS[0]}.d" / DROPIN_NAME, train_dropin(home, svc_user, entry_point("fluxgymd")), did)
    _put(unit_dir / f"{UNITS[1]}.d" / DROPIN_NAME, notify_dropin(home, svc_user, entry_point("fluxgym")), did)
    if not home.is_dir():
        did.append(f"note: {home} does not exist yet (create it, with outputs/, owned by {user})")
    if reload:
        from .systemctl import daemon_reload

        daemon_reload(user=user_unit)
        did.append("systemctl " + ("--user " if user_unit else "") + "daemon-reload")
    return did
