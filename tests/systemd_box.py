"""A real, throwaway systemd (PID 1 + journald) in fresh namespaces, for tests.

Why: the unit template, the watchdog, restarts and journald priorities are only believable
when a real systemd runs them. The host's systemd is not PID 1 here (and must never be
touched), so each box boots its own ``/lib/systemd/systemd --system`` inside
``unshare --fork --pid --mount --uts --ipc --mount-proc``:

* ``SYSTEMD_UNIT_PATH`` points at the box's own unit directory only, so none of the host's
  units run (a systemd seeing /lib/systemd/system would start systemd-tmpfiles and wipe
  the host's /tmp). The directory holds the box target, copies of journald's service and
  sockets, and empty stand-ins for the well-known targets default dependencies name.
* ``SYSTEMD_GENERATOR_PATH``/``SYSTEMD_ENVIRONMENT_GENERATOR_PATH`` point at an empty
  directory: no host generator (fstab, getty, sysv...) runs.
* /run, /tmp, /var/tmp and /var/log/journal are fresh tmpfs inside the box
  (tests/_box_init.py). Hence everything a test hands to the box (units' scripts,
  FLUXGYM_HOME, venv) must live outside /tmp, e.g. under /work/main/.work/.
* PID 1 is moved into a fresh cgroup ``fluxgym-box-<id>`` (name=systemd and cgroup2
  hierarchies), which the box's systemd takes as its root; it is removed after the kill.
* The box dies by SIGKILL to its PID 1 (PID 1 ignores SIGTERM), which makes the kernel kill
  every process of the PID namespace; the mount namespace (and its tmpfs) goes with the
  last process. ``unshare --kill-child`` plus a parent-death signal on unshare make the box
  die with the test process even if the test runner itself is killed.

API (all commands run as argv lists via ``nsenter -t PID -a``; no shell)::

    with SystemdBox(workdir) as box:          # start() on enter, kill() on exit
        box.pid                                # host PID of the box's systemd
        box.install_unit("x.service", text)    # then box.daemon_reload()
        box.install_dropin("x@.service", "50-test.conf", text)
        box.systemctl("start", "x.service", check=True) -> CompletedProcess[str]
        box.show("x.service", "ActiveState", "NRestarts") -> dict[str, str]
        box.journal("x.service", "-p", "warning") -> list[dict[str, Any]]  # journalctl -o json
        box.wait_for(lambda: ..., timeout_s=10, what="x to be active") -> value
        box.wait_unit_state("x.service", active_state="active", timeout_s=10) -> dict[str, str]
        box.run_in("cat", "/proc/1/comm") -> CompletedProcess[str]
        box.journal_messages("x.service") -> list[str]
        box.pid_namespace, box.namespace_pids(), box.cgroup_dirs()   # for leak checks
        box.boot_s, box.teardown_s             # measured seconds (print them, never assert)
        box.kill()                             # idempotent; waits until nothing is left

``install_fluxgym_units(box, home, fluxgymd_bin, extra="")`` installs the project's real
``systemd/fluxgym-train@.service`` and ``fluxgym-notify@.service`` plus a test drop-in.
``box_unavailable_reason()`` says why a box cannot run here (None when it can).
``reap_stale_cgroups()`` removes empty box cgroups of test processes that were SIGKILLed
(every start() calls it). Failures raise ``BoxError`` naming what did not happen.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

REPO_ROOT = Path(__file__).resolve().parent.parent
UNIT_SOURCE_DIR = REPO_ROOT / "systemd"
SYSTEMD_BIN = Path("/lib/systemd/systemd")
HOST_UNIT_DIR = Path("/lib/systemd/system")
BOX_TARGET = "fluxgym-box.target"
_INIT_SCRIPT = Path(__file__).resolve().parent / "_box_init.py"

# Units copied verbatim from the host: journald and the sockets it is activated by.
JOURNALD_UNITS: tuple[str, ...] = (
    "systemd-journald.service",
    "systemd-journald.socket",
    "systemd-journald-dev-log.socket",
)
# Empty stand-ins so DefaultDependencies= and common Wants=/After= resolve to loaded units.
EMPTY_TARGETS: tuple[str, ...] = (
    "sysinit.target",
    "basic.target",
    "sockets.target",
    "timers.target",
    "paths.target",
    "slices.target",
    "local-fs.target",
    "local-fs-pre.target",
    "swap.target",
    "shutdown.target",
    "multi-user.target",
    "default.target",
    "network.target",
    "network-online.target",
    "network-pre.target",
    "nss-user-lookup.target",
    "remote-fs.target",
    "time-sync.target",
)

T = TypeVar("T")
PR_SET_PDEATHSIG = 1


class BoxError(RuntimeError):
    """The box failed to boot, answer or die; the message names what and how."""


def box_unavailable_reason() -> str | None:
    """Why no box can be booted on this machine, or None when it can."""
    if os.geteuid() != 0:
        return "systemd box needs root (unshare of PID/mount namespaces)"
    if not os.access(SYSTEMD_BIN, os.X_OK):
        return f"systemd box needs {SYSTEMD_BIN}"
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"systemd box needs the {tool} command (util-linux)"
    for unit in JOURNALD_UNITS:
        if not (HOST_UNIT_DIR / unit).is_file():
            return f"systemd box needs {HOST_UNIT_DIR / unit}"
    return None


def _set_parent_death_kill() -> None:
    """preexec_fn: unshare dies with the test process (and --kill-child takes the box along)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass(frozen=True)
class _CgroupHierarchy:
    mountpoint: Path
    own_path: str  # this process's cgroup inside that hierarchy, e.g. "/" or "/a/b"


def _systemd_cgroup_hierarchies() -> list[_CgroupHierarchy]:
    """The hierarchies systemd keeps its tree in: name=systemd (v1) and the cgroup2 one."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers in ("", "name=systemd"):
            own[controllers] = path
    found: list[_CgroupHierarchy] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fields, post_fields = pre.split(), post.split()
        if len(post_fields) < 3:
            continue
        fstype, options = post_fields[0], post_fields[2].split(",")
        key = "" if fstype == "cgroup2" else ("name=systemd" if fstype == "cgroup" and "name=systemd" in options else None)
        if key is None or key not in own or fields[3] != "/":
            continue
        found.append(_CgroupHierarchy(Path(fields[4]), own.pop(key)))
    return found


def _all_cgroup_mountpoints() -> list[Path]:
    mounts: list[Path] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        if post.split()[:1] in (["cgroup"], ["cgroup2"]):
            mounts.append(Path(pre.split()[4]))
    return mounts


def _rmdir_tree(root: Path) -> bool:
    """rmdir a cgroup subtree bottom-up; True when it is gone."""
    if not root.is_dir():
        return True
    for dirpath, dirnames, _ in os.walk(root, topdown=False):
        for d in dirnames:
            try:
                os.rmdir(os.path.join(dirpath, d))
            except FileNotFoundError:
                pass
            except OSError:
                return False  # still populated: the kernel has not reaped everything yet
    try:
        os.rmdir(root)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


STALE_CGROUP_AGE_S = 120.0


def reap_stale_cgroups(min_age_s: float = STALE_CGROUP_AGE_S) -> list[Path]:
    """Remove empty box cgroups left by boxes whose test process was SIGKILLed.

    Only trees older than `min_age_s` (a booting box's fresh, still empty cgroup is left
    alone) and only empty ones (rmdir refuses populated cgroups) go. Returns what went.
    """
    removed: list[Path] = []
    now = time.time()
    for h in _systemd_cgroup_hierarchies():
        own = h.own_path.strip("/")
        for m in _all_cgroup_mountpoints():
            base = m / own if own else m
            for d in base.glob("fluxgym-box-*"):
                try:
                    old = now - d.stat().st_mtime > min_age_s
                except OSError:
                    continue
                if old and _rmdir_tree(d):
                    removed.append(d)
    return removed


def pids_in_namespace(ns: str) -> list[int]:
    """Host PIDs of the processes whose PID namespace link reads `ns`."""
    pids: list[int] = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.readlink(f"/proc/{entry.name}/ns/pid") == ns:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _journal_value(raw: Any) -> Any:
    """journalctl -o json writes non-UTF-8 fields as byte arrays: decode them leniently."""
    if isinstance(raw, list) and all(isinstance(b, int) for b in raw):
        return bytes(raw).decode("utf-8", "replace")
    return raw


class SystemdBox:
    """One throwaway systemd; see the module docstring. Not thread-safe."""

    def __init__(self, workdir: Path, boot_timeout_s: float = 30.0, log_level: str = "info") -> None:
        self.workdir = Path(workdir).resolve()
        self.unit_dir = self.workdir / "units"
        self.empty_dir = self.workdir / "empty"
        self.console_log = self.workdir / "console.log"
        self.boot_timeout_s = boot_timeout_s
        self.log_level = log_level
        self.cgroup_name = f"fluxgym-box-{uuid.uuid4().hex[:12]}"
        self._cgroup_rels: set[str] = set()  # our cgroup, relative to each hierarchy root
        self._unshare: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self.boot_s: float | None = None  # measured, for bench scripts; never asserted
        self.teardown_s: float | None = None

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> SystemdBox:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    @property
    def pid(self) -> int:
        if self._pid is None:
            raise BoxError("systemd box is not running (call start())")
        return self._pid

    def _write_base_units(self) -> None:
        self.unit_dir.mkdir(parents=True, exist_ok=True)
        self.empty_dir.mkdir(parents=True, exist_ok=True)
        for unit in JOURNALD_UNITS:
            shutil.copyfile(HOST_UNIT_DIR / unit, self.unit_dir / unit)
        for target in EMPTY_TARGETS:
            (self.unit_dir / target).write_text(
                f"[Unit]\nDescription=box stand-in for {target}\nDefaultDependencies=no\n"
            )
        (self.unit_dir / BOX_TARGET).write_text(
            "[Unit]\n"
            "Description=fluxgym test box\n"
            "DefaultDependencies=no\n"
            "Wants=systemd-journald.socket systemd-journald-dev-log.socket systemd-journald.service\n"
            "After=systemd-journald.service\n"
            "AllowIsolate=yes\n"
        )

    def _make_cgroups(self) -> list[str]:
        procs: list[str] = []
        for h in _systemd_cgroup_hierarchies():
            rel = f"{h.own_path.strip('/')}/{self.cgroup_name}".lstrip("/")
            d = h.mountpoint / rel
            try:
                d.mkdir()
            except OSError:
                continue  # not writable here: the box then shares our cgroup, still works
            self._cgroup_rels.add(rel)
            procs.append(str(d / "cgroup.procs"))
        return procs

    def start(self) -> SystemdBox:
        if self._unshare is not None:
            raise BoxError("systemd box already started")
        reason = box_unavailable_reason()
        if reason:
            raise BoxError(reason)
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_base_units()
        reap_stale_cgroups()
        procs = self._make_cgroups()
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "container": "fluxgym-test-box",
            "SYSTEMD_UNIT_PATH": str(self.unit_dir),  # no trailing ':' => no host unit dirs
            "SYSTEMD_GENERATOR_PATH": str(self.empty_dir),
            "SYSTEMD_ENVIRONMENT_GENERATOR_PATH": str(self.empty_dir),
            "SYSTEMD_LOG_LEVEL": self.log_level,
            "SYSTEMD_LOG_TARGET": "journal-or-kmsg",
            "LANG": "C.UTF-8",
            # a checkout (and its venv) that lives under /tmp stays visible in the box
            "BOX_KEEP_PATHS": os.pathsep.join(
                dict.fromkeys([str(REPO_ROOT), os.path.realpath(sys.base_prefix)])
            ),
        }
        argv = [
            "unshare", "--fork", "--pid", "--mount", "--uts", "--ipc", "--mount-proc",
            "--kill-child",
            sys.executable, "-I", str(_INIT_SCRIPT), str(SYSTEMD_BIN), BOX_TARGET, *procs,
        ]
        with open(self.console_log, "ab") as console:
            self._unshare = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                env=env, cwd="/", preexec_fn=_set_parent_death_kill,
            )
        try:
            self._pid = self._wait_child_pid()
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        self.boot_s = time.monotonic() - t0
        return self

    def _wait_child_pid(self) -> int:
        assert self._unshare is not None
        children = Path(f"/proc/{self._unshare.pid}/task/{self._unshare.pid}/children")

        def child() -> int | None:
            if self._unshare is not None and self._unshare.poll() is not None:
                raise BoxError(f"unshare exited with {self._unshare.returncode}; see {self.console_log}")
            try:
                pids = children.read_text().split()
            except FileNotFoundError:
                return None
            return int(pids[0]) if pids else None

        return self.wait_for(child, self.boot_timeout_s, "unshare to fork the box's PID 1")

    def _wait_ready(self) -> None:
        def ready() -> bool:
            assert self._unshare is not None
            if self._unshare.poll() is not None:
                raise BoxError(f"box died while booting (exit {self._unshare.returncode}); see {self.console_log}")
            if self._comm(self.pid) != "systemd":
                return False  # still the bootstrap
            r = self.systemctl("is-active", "systemd-journald.service", BOX_TARGET, check=False, timeout_s=5)
            return r.returncode == 0

        self.wait_for(ready, self.boot_timeout_s, "box systemd and journald to come up")

    @staticmethod
    def _comm(pid: int) -> str | None:
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return None

    @property
    def pid_namespace(self) -> str | None:
        """The box's PID namespace, e.g. 'pid:[4026532301]' (None once its PID 1 is gone)."""
        try:
            return os.readlink(f"/proc/{self.pid}/ns/pid")
        except OSError:
            return None

    def namespace_pids(self) -> list[int]:
        """Host PIDs of every process in the box's PID namespace (empty once it is dead)."""
        ns = self.pid_namespace if self._pid is not None else None
        return pids_in_namespace(ns) if ns else []

    def cgroup_dirs(self) -> list[Path]:
        """Every place the box's cgroup tree may live, in every hierarchy."""
        return [m / rel for rel in sorted(self._cgroup_rels) for m in _all_cgroup_mountpoints()]

    def kill(self, timeout_s: float = 10.0) -> None:
        """SIGKILL the box's PID 1 (the kernel then kills the whole namespace) and clean up."""
        if self._unshare is None:
            return
        t0 = time.monotonic()
        ns = self.pid_namespace if self._pid is not None else None
        if self._pid is not None:
            try:
                os.kill(self._pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            self._unshare.kill()  # died before forking; --kill-child handles a half-born child
        try:
            self._unshare.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._unshare.kill()
            self._unshare.wait(timeout=timeout_s)
        # The kernel reaps the whole namespace before PID 1 can be reaped; check anyway.
        deadline = time.monotonic() + timeout_s
        while ns and pids_in_namespace(ns) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = pids_in_namespace(ns) if ns else []
        # Emptied cgroups may take the kernel a moment to release.
        # systemd mirrors its tree into every v1 hierarchy it uses (devices, memory, pids...).
        pending = set(self.cgroup_dirs())
        while pending and time.monotonic() < deadline:
            pending = {p for p in pending if not _rmdir_tree(p)}
            if pending:
                time.sleep(0.05)
        self._unshare = None
        self.teardown_s = time.monotonic() - t0
        if survivors:
            raise BoxError(f"box processes {survivors} survived SIGKILL of its PID 1")
        if pending:
            raise BoxError(f"could not remove box cgroups {sorted(map(str, pending))}")

    # ----------------------------------------------------------------- commands
    def run_in(self, *argv: str, check: bool = True, timeout_s: float = 30.0,
               input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run argv inside all of the box's namespaces."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_"))}
        env.update({"SYSTEMD_PAGER": "cat", "SYSTEMD_COLORS": "0", "PAGER": "cat", "LANG": "C.UTF-8"})
        r = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-a", *argv],
            capture_output=True, text=True, errors="replace", env=env,
            timeout=timeout_s, input=input_text, stdin=None if input_text is not None else subprocess.DEVNULL,
        )
        if check and r.returncode != 0:
            raise BoxError(f"in box: {' '.join(argv)} exited {r.returncode}: {(r.stderr or r.stdout).strip()}")
        return r

    def systemctl(self, *args: str, check: bool = True, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
        return self.run_in("systemctl", "--no-pager", "--no-ask-password", *args, check=check, timeout_s=timeout_s)

    def daemon_reload(self) -> None:
        self.systemctl("daemon-reload")

    def show(self, unit: str, *props: str) -> dict[str, str]:
        args = ["show", unit]
        if props:
            args.append("--property=" + ",".join(props))
        out = self.systemctl(*args).stdout
        result: dict[str, str] = {}
        for line in out.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                result[key] = value
        return result

    def journal(self, unit: str | None = None, *extra_args: str) -> list[dict[str, Any]]:
        """journalctl -o json entries (all boot), oldest first; byte-array fields decoded."""
        args = ["journalctl", "--no-pager", "-o", "json", "--all"]
        if unit is not None:
            args += ["-u", unit]
        r = self.run_in(*args, *extra_args, check=False)
        if r.returncode != 0 and "No entries" not in r.stderr:
            raise BoxError(f"in box: journalctl {' '.join(args[1:])} exited {r.returncode}: {r.stderr.strip()}")
        entries = []
        for line in r.stdout.splitlines():
            if line.strip():
                entries.append({k: _journal_value(v) for k, v in json.loads(line).items()})
        return entries

    def journal_messages(self, unit: str | None = None, *extra_args: str) -> list[str]:
        return [str(e.get("MESSAGE", "")) for e in self.journal(unit, *extra_args)]

    # ----------------------------------------------------------------- files
    def install_unit(self, name: str, text: str) -> Path:
        path = self.unit_dir / name
        _atomic_write(path, text)
        return path

    def install_dropin(self, unit: str, name: str, text: str) -> Path:
        if not name.endswith(".conf"):
            raise ValueError(f"drop-in {name!r} must end in .conf or systemd ignores it")
        path = self.unit_dir / f"{unit}.d" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, text)
        return path

    # ----------------------------------------------------------------- waiting
    def wait_for(self, predicate: Callable[[], T], timeout_s: float, what: str,
                 interval_s: float = 0.05) -> T:
        """Poll predicate until truthy; return its value, or raise naming `what`."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise BoxError(f"timed out after {timeout_s:g}s waiting for {what}")
            time.sleep(interval_s)

    def wait_unit_state(self, unit: str, active_state: str | None = None, sub_state: str | None = None,
                        timeout_s: float = 30.0, **props: str) -> dict[str, str]:
        """Wait until `unit` shows the given ActiveState/SubState/other properties."""
        want = dict(props)
        if active_state is not None:
            want["ActiveState"] = active_state
        if sub_state is not None:
            want["SubState"] = sub_state
        last: dict[str, str] = {}

        def check() -> dict[str, str] | None:
            nonlocal last
            last = self.show(unit, *want, "ActiveState", "SubState", "Result", "NRestarts")
            return last if all(last.get(k) == v for k, v in want.items()) else None

        try:
            return self.wait_for(check, timeout_s, f"{unit} to reach {want}", interval_s=0.1)
        except BoxError as e:
            raise BoxError(f"{e}; last seen {last}") from None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def checkout_dropin_lines() -> str:
    """Service settings a checkout under /tmp needs: the unit's PrivateTmp=yes would hide the
    venv and FLUXGYM_HOME from the service (a CI clone may well live in /tmp)."""
    under_tmp = any(str(REPO_ROOT).startswith(d + "/") for d in ("/tmp", "/var/tmp"))
    if not under_tmp:
        return ""
    # without PrivateTmp, ProtectSystem=strict leaves /tmp read-only: give the service a
    # TMPDIR of its own rather than opening all of /tmp (which holds the whole checkout)
    tmp = REPO_ROOT / ".work" / "unit-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return f"PrivateTmp=no\nEnvironment=TMPDIR={tmp}\nReadWritePaths={tmp}\n"


def install_fluxgym_units(box: SystemdBox, home: Path, fluxgymd_bin: Path, extra: str = "") -> None:
    """Install the project's real unit templates plus a test drop-in, then daemon-reload.

    The drop-in does what `fluxgym install` does on a real box (absolute ExecStart=,
    FLUXGYM_HOME, ReadWritePaths=) plus test-only changes: root instead of the fluxgym user
    (the test venv lives under /root) and a 1 s RestartSec. `extra` is appended to its
    [Service] section.
    """
    for name in ("fluxgym-train@.service", "fluxgym-notify@.service"):
        box.install_unit(name, (UNIT_SOURCE_DIR / name).read_text())
    box.install_dropin(
        "fluxgym-train@.service",
        "50-test.conf",
        "[Service]\n"
        "ExecStart=\n"
        f"ExecStart={fluxgymd_bin} run %I\n"
        "User=root\n"
        "Group=root\n"
        f"Environment=FLUXGYM_HOME={home}\n"
        f"ReadWritePaths={home}\n"
        "RestartSec=1\n"
        f"{checkout_dropin_lines()}"
        f"{extra}",
    )
    if checkout_dropin_lines():
        box.install_dropin("fluxgym-notify@.service", "50-test.conf", f"[Service]\n{checkout_dropin_lines()}")
    box.daemon_reload()
