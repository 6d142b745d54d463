"""`fluxgym install`: the unit templates plus drop-ins with this box's specifics.

The templates are never edited; home, user, group and the absolute ExecStart= go in
`<unit>.d/10-fluxgym-install.conf`. Writing is idempotent: files whose content is already
right are left alone and reported as unchanged, and daemon-reload only runs when something
changed, so installing twice changes nothing.
"""
from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_atomic
from .errors import FluxgymError

UNITS = ("fluxgym-train@.service", "fluxgym-notify@.service")
DROPIN_NAME = "10-fluxgym-install.conf"
ON_SUCCESS_MIN_SYSTEMD = 249  # OnSuccess= appeared in systemd 249


def unit_sources() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "systemd", Path(sys.prefix) / "share" / "fluxgymd" / "systemd"):
        if (candidate / UNITS[0]).is_file():
            return candidate
    raise FluxgymError(
        f"unit templates not found in {here.parent / 'systemd'} nor {Path(sys.prefix) / 'share/fluxgymd/systemd'}"
    )


def entry_point(name: str) -> Path:
    """Absolute path of a console script of this installation (the venv's bin/)."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return candidate
    found = shutil.which(name)
    if found is None:
        raise FluxgymError(f"{name} entry point not found next to {sys.executable} nor on PATH")
    return Path(found)


@dataclass(frozen=True)
class Account:
    user: str
    group: str


def _check_path(home: Path) -> None:
    # unit files split on whitespace and expand % specifiers: refuse what would need quoting
    bad = [c for c in " \t\n\"'%\\;" if c in str(home)]
    if bad:
        raise FluxgymError(f"home {home}: contains {bad[0]!r}, which a unit file cannot hold unquoted; choose another path")


def box_metrics_dir(home: Path) -> Path | None:
    """fluxgym.toml's [metrics] prometheus_dir: the sandboxed wrapper must be allowed to write it."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    try:
        doc = tomllib.loads((home / "fluxgym.toml").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise FluxgymError(f"{home / 'fluxgym.toml'}: cannot read: {e}") from e
    value = doc.get("metrics", {}).get("prometheus_dir") if isinstance(doc.get("metrics"), dict) else None
    return Path(value) if isinstance(value, str) and value else None


def train_dropin(home: Path, account: Account | None, fluxgymd: Path, on_success: bool,
                 metrics_dir: Path | None = None) -> str:
    """The train unit's drop-in (pure)."""
    _check_path(home)
    if metrics_dir is not None:
        _check_path(metrics_dir)
    lines = [
        "# written by `fluxgym install`; run it again instead of editing",
        "[Unit]",
        f"RequiresMountsFor={home}",
    ]
    if on_success:
        # a completed run may notify too; `fluxgym notify` decides (notify.on_success)
        lines.append("OnSuccess=fluxgym-notify@%n.service")
    lines += [
        "",
        "[Service]",
        "ExecStart=",
        f"ExecStart={fluxgymd} run %I",
        f"Environment=FLUXGYM_HOME={home}",
        f"ReadWritePaths={home}",
    ]
    if metrics_dir is not None:
        lines.append(f"ReadWritePaths=-{metrics_dir}")  # Prometheus textfile directory
    if account:
        lines += [f"User={account.user}", f"Group={account.group}"]
    return "\n".join(lines) + "\n"


def notify_dropin(home: Path, account: Account | None, fluxgym: Path) -> str:
    """The notify unit's drop-in (pure). %i: the train unit's name, still escaped."""
    _check_path(home)
    lines = [
        "# written by `fluxgym install`; run it again instead of editing",
        "[Service]",
        "ExecStart=",
        f"ExecStart={fluxgym} --home {home} notify %i",
        f"Environment=FLUXGYM_HOME={home}",
        f"ReadWritePaths=-{home}",
    ]
    if account:
        lines += [f"User={account.user}", f"Group={account.group}"]
    return "\n".join(lines) + "\n"


def _put(path: Path, text: str, did: list[str]) -> bool:
    """Write PATH unless it already holds TEXT; True when it changed."""
    try:
        if path.read_text(encoding="utf-8") == text:
            did.append(f"unchanged {path}")
            return False
    except FileNotFoundError:
        pass
    except OSError as e:
        raise FluxgymError(f"{path}: cannot read: {e.strerror}") from e
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text.encode("utf-8"), mode=0o644)
    except OSError as e:
        raise FluxgymError(f"{path}: cannot write: {e.strerror} (run as root, or use --user-unit)") from e
    did.append(f"wrote {path}")
    return True


def ensure_account(user: str, home: Path, did: list[str]) -> Account:
    """The service account; a system user (with its own group) is created when missing."""
    try:
        pw = pwd.getpwnam(user)
        did.append(f"unchanged user {user} exists")
    except KeyError:
        useradd = shutil.which("useradd")
        if useradd is None:
            raise FluxgymError(f"user {user} does not exist and useradd is not available to create it") from None
        nologin = next((p for p in ("/usr/sbin/nologin", "/sbin/nologin") if os.path.exists(p)), "/bin/false")
        cp = subprocess.run([useradd, "--system", "--user-group", "--home-dir", str(home), "--no-create-home",
                             "--shell", nologin, user], capture_output=True, text=True)
        if cp.returncode != 0:
            msg = (cp.stderr.strip().splitlines() or [f"exit status {cp.returncode}"])[-1]
            raise FluxgymError(f"useradd {user}: {msg}")
        pw = pwd.getpwnam(user)
        did.append(f"created system user {user}")
    try:
        group = grp.getgrgid(pw.pw_gid).gr_name
    except KeyError:
        group = str(pw.pw_gid)
    return Account(user, group)


def default_unit_dir(user_unit: bool) -> Path:
    if user_unit:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        return base / "systemd" / "user"
    return Path("/etc/systemd/system")


def install(*, home: Path, user: str, user_unit: bool, unit_dir: Path | None, reload: bool) -> list[str]:
    """Install units and drop-ins; returns one line per thing done or found already right."""
    from .systemctl import daemon_reload, systemd_version

    did: list[str] = []
    home = home.expanduser().resolve()
    unit_dir = unit_dir or default_unit_dir(user_unit)
    src = unit_sources()
    # a user manager cannot switch users: the run runs as whoever owns that manager
    account = None if user_unit else ensure_account(user, home, did)
    version = systemd_version()
    on_success = version is not None and version >= ON_SUCCESS_MIN_SYSTEMD
    changed = False
    for unit in UNITS:
        changed |= _put(unit_dir / unit, (src / unit).read_text(encoding="utf-8"), did)
    changed |= _put(unit_dir / f"{UNITS[0]}.d" / DROPIN_NAME,
                    train_dropin(home, account, entry_point("fluxgymd"), on_success, box_metrics_dir(home)), did)
    changed |= _put(unit_dir / f"{UNITS[1]}.d" / DROPIN_NAME,
                    notify_dropin(home, account, entry_point("fluxgym")), did)
    if not on_success:
        did.append(f"note: systemd {version or '?'} < {ON_SUCCESS_MIN_SYSTEMD}: only failures notify")
    if not (home / "outputs").is_dir():
        owner = account.user if account else "you"
        did.append(f"note: {home / 'outputs'} does not exist yet: mkdir -p it, owned by {owner}")
    elif account and not user_unit:
        st = (home / "outputs").stat()
        uid = pwd.getpwnam(account.user).pw_uid
        if st.st_uid != uid:
            did.append(f"note: {home / 'outputs'} is not owned by {account.user}: "
                       f"chown -R {account.user}:{account.group} {home / 'outputs'}")
    if reload and changed:
        daemon_reload(user=user_unit)
        did.append("ran systemctl " + ("--user " if user_unit else "") + "daemon-reload")
    elif reload:
        did.append("unchanged: no daemon-reload needed")
    return did
