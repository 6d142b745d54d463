"""PID 1 bootstrap of a SystemdBox: prepare the fresh namespaces, then become systemd.

Run by ``unshare --fork --pid --mount ... --mount-proc`` (see tests/systemd_box.py), so this
process is PID 1 of a new PID namespace with its own copy of the mount table. It

1. makes every mount private, so nothing done here propagates back to the host;
2. puts fresh tmpfs on /run, /tmp, /var/tmp and /var/log/journal (the host's /tmp is never
   seen, let alone cleaned, by the box), its own tmpfs on /sys/fs/cgroup (host hierarchies
   moved in) and on /dev (a few nodes recreated), and makes /sys and /proc/sys read-only:
   tmpfs and devtmpfs superblocks are shared with the host, so anything systemd would
   write or remount there would otherwise reach the host;
3. moves itself into the cgroups named on the command line (one per line of
   ``CGROUP_DIR``), so the box's systemd treats that subtree as its root and never touches
   the host's cgroups;
4. execs systemd with the environment it was given (SYSTEMD_UNIT_PATH etc.).

argv: ``_box_init.py SYSTEMD_BIN TARGET [CGROUP_PROCS_FILE ...]``. All commands run as argv
lists: no shell.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TMPFS_DIRS: tuple[str, ...] = ("/run", "/tmp", "/var/tmp", "/var/log/journal")
# Device nodes recreated in the box's own /dev (plus any nvidia* ones, for GPU boxes).
# /dev/kmsg and /dev/console are left out on purpose: the box must not write the host's
# kernel log or console.
DEV_NODES: tuple[str, ...] = ("null", "zero", "full", "random", "urandom", "tty")
CGROUP_ROOT = "/sys/fs/cgroup"
STAGE = "/run/.box-stage"


def _mount(*argv: str) -> None:
    subprocess.run(["mount", *argv], check=True)


def _submounts(parent: str) -> list[str]:
    """Mount points directly below `parent`, in mount order (from /proc/self/mountinfo)."""
    points: list[str] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mountpoint = line.split()[4].replace("\\040", " ")
        if os.path.dirname(mountpoint) == parent and mountpoint not in points:
            points.append(mountpoint)
    return points


def _private_cgroup_root() -> None:
    """Give the box its own tmpfs at /sys/fs/cgroup, with the host's hierarchies moved in.

    The host's /sys/fs/cgroup tmpfs is one superblock shared by every mount namespace:
    systemd in a container adds controller directories and symlinks there and finally
    remounts it read-only, which would hit the host. The cgroup hierarchies themselves
    stay the real ones (moved, not copied).
    """
    names = [os.path.basename(p) for p in _submounts(CGROUP_ROOT)]
    links = {e.name: os.readlink(e.path) for e in os.scandir(CGROUP_ROOT) if e.is_symlink()}
    os.makedirs(STAGE, exist_ok=True)
    for name in names:
        os.mkdir(f"{STAGE}/{name}")
        _mount("--move", f"{CGROUP_ROOT}/{name}", f"{STAGE}/{name}")
    _mount("-t", "tmpfs", "-o", "mode=0755,nosuid,nodev,noexec", "tmpfs", CGROUP_ROOT)
    for name in names:
        os.mkdir(f"{CGROUP_ROOT}/{name}")
        _mount("--move", f"{STAGE}/{name}", f"{CGROUP_ROOT}/{name}")
        os.rmdir(f"{STAGE}/{name}")
    for name, target in links.items():
        os.symlink(target, f"{CGROUP_ROOT}/{name}")
    os.rmdir(STAGE)


def _private_dev() -> None:
    """Give the box its own small /dev: socket units add /dev/log, systemd chmods console."""
    nodes: dict[str, os.stat_result] = {}
    for name in DEV_NODES:
        nodes[name] = os.stat(f"/dev/{name}")
    for entry in Path("/dev").glob("nvidia*"):
        if entry.is_char_device():
            nodes[entry.name] = entry.stat()
    caps = Path("/dev/nvidia-caps")
    cap_nodes = {e.name: e.stat() for e in caps.iterdir() if e.is_char_device()} if caps.is_dir() else {}
    _mount("-t", "tmpfs", "-o", "mode=0755,nosuid,strictatime", "tmpfs", "/dev")
    for name, st in nodes.items():
        os.mknod(f"/dev/{name}", st.st_mode, st.st_rdev)
        os.chmod(f"/dev/{name}", st.st_mode & 0o7777)
    if cap_nodes:
        os.mkdir("/dev/nvidia-caps", 0o755)
        for name, st in cap_nodes.items():
            os.mknod(f"/dev/nvidia-caps/{name}", st.st_mode, st.st_rdev)
            os.chmod(f"/dev/nvidia-caps/{name}", st.st_mode & 0o7777)
    os.mkdir("/dev/shm", 0o1777)
    os.chmod("/dev/shm", 0o1777)
    _mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", "/dev/shm")  # multiprocessing
    os.mkdir("/dev/pts", 0o755)
    _mount("-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=0620", "devpts", "/dev/pts")
    for name, target in (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"/dev/{name}")


def _hold_kept_paths() -> list[tuple[str, int]]:
    """Open the paths in BOX_KEEP_PATHS (the checkout, the interpreter) that a fresh tmpfs
    is about to hide, e.g. a CI clone under /tmp; they are bound back after the mounts."""
    held = []
    for path in filter(None, os.environ.pop("BOX_KEEP_PATHS", "").split(os.pathsep)):
        if any(path == d or path.startswith(d + "/") for d in TMPFS_DIRS) and os.path.isdir(path):
            held.append((path, os.open(path, os.O_PATH | os.O_DIRECTORY)))
    return held


def _restore_kept_paths(held: list[tuple[str, int]]) -> None:
    for path, fd in held:
        os.makedirs(path, exist_ok=True)  # inside the box's fresh tmpfs
        # --no-canonicalize: resolving /proc/self/fd/N to a path would find the new, empty dir
        subprocess.run(["mount", "--no-canonicalize", "--rbind", f"/proc/self/fd/{fd}", path], check=True,
                       pass_fds=(fd,))
        os.close(fd)


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        sys.exit("usage: _box_init.py SYSTEMD_BIN TARGET [CGROUP_PROCS_FILE ...]")
    systemd_bin, target, cgroup_procs = argv[1], argv[2], argv[3:]
    if os.getpid() != 1:
        sys.exit(f"_box_init.py: must be PID 1 of a fresh PID namespace, am PID {os.getpid()}")
    _mount("--make-rprivate", "/")
    # Per-mount read-only flags (bind remounts) touch only this namespace's mounts.
    _mount("--bind", "/proc/sys", "/proc/sys")
    _mount("-o", "remount,bind,ro", "/proc/sys")
    kept = _hold_kept_paths()
    for path in TMPFS_DIRS:
        if Path(path).is_dir():  # only mount over what exists: never create dirs on the host
            _mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev" if "tmp" in path else "mode=0755,nosuid,nodev",
                   "tmpfs", path)
    _restore_kept_paths(kept)
    os.mkdir("/run/lock", 0o1777)
    _private_cgroup_root()
    _mount("-o", "remount,bind,ro", "/sys")
    _private_dev()
    for procs in cgroup_procs:
        with open(procs, "w", encoding="ascii") as f:
            f.write("0")  # "0" = the writing process itself, whatever PID namespace it is in
    os.execve(systemd_bin, [systemd_bin, "--system", f"--unit={target}"], dict(os.environ))


if __name__ == "__main__":
    main(sys.argv)
