"""`fluxgym doctor`: one line per check of what a run needs on this box, each with a fix."""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Check:
    name: str
    level: str  # ok | warn | fail
    detail: str
    fix: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _systemd() -> Check:
    exe = shutil.which("systemctl")
    if exe is None:
        return Check("systemd", "fail", "systemctl not found", "fluxgymd needs systemd (>= 236 for WATCHDOG_USEC)")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.split()
    version = int(out[1]) if len(out) > 1 and out[1].isdigit() else 0
    running = os.path.isdir("/run/systemd/system")
    if version and version < 236:
        return Check("systemd", "fail", f"systemd {version}", "upgrade to systemd >= 236")
    if not running:
        return Check("systemd", "warn", f"systemd {version} installed but not running as PID 1",
                     "services only run where systemd is the init system")
    return Check("systemd", "ok", f"systemd {version} running")


def _unit() -> Check:
    for d in ("/etc/systemd/system", str(Path.home() / ".config/systemd/user")):
        if (Path(d) / "fluxgym-train@.service").is_file():
            dropin = Path(d) / "fluxgym-train@.service.d" / "10-fluxgym-install.conf"
            if not dropin.is_file():
                return Check("unit", "warn", f"template in {d} without the install drop-in", "run `fluxgym install`")
            return Check("unit", "ok", f"installed in {d}")
    return Check("unit", "fail", "fluxgym-train@.service not installed", "run `sudo fluxgym install`")


def _gpus() -> list[Check]:
    from .gpu import NvmlStatus, inventory

    try:
        inv = inventory()
    except Exception as e:  # doctor must report, not crash
        return [Check("nvml", "fail", f"NVML query failed: {e}", "check the NVIDIA driver (nvidia-smi)")]
    if inv.status is NvmlStatus.NO_LIBRARY:
        return [Check("nvml", "warn", "no NVML (libnvidia-ml.so.1): liveness will run on training progress alone",
                      "install the NVIDIA driver for GPU liveness")]
    if inv.status is not NvmlStatus.OK and not inv.gpus:
        return [Check("nvml", "fail", f"NVML: {inv.detail or inv.status.value}",
                      "check the NVIDIA driver: nvidia-smi, dmesg for Xid errors")]
    checks = [Check("nvml", "ok", f"driver {inv.driver_version}, {len(inv.gpus)} GPU(s)")]
    for g in inv.gpus:
        lvl = "ok" if g.status is NvmlStatus.OK else "fail"
        checks.append(Check(f"gpu {g.index}", lvl, f"{g.name} {g.uuid} util {g.util_percent}%",
                            None if lvl == "ok" else f"{g.detail}: check `nvidia-smi`, dmesg for Xid errors"))
    return checks


def _sd_scripts(home: Path) -> Check:
    script = home / "sd-scripts" / "flux_train_network.py"
    if script.is_file():
        return Check("sd-scripts", "ok", str(script.parent))
    return Check("sd-scripts", "fail", f"{script} missing", "run scripts/install-sd-scripts")


def _python_env(home: Path) -> Check:
    for venv in (home / "env", home / "venv"):
        acc = venv / "bin" / "accelerate"
        if acc.is_file():
            return Check("accelerate", "ok", str(acc))
    acc = shutil.which("accelerate")
    if acc:
        return Check("accelerate", "ok", acc)
    return Check("accelerate", "fail", "accelerate not found in FLUXGYM_HOME/env, venv or PATH",
                 "install sd-scripts' requirements into FLUXGYM_HOME/env")


def _models(home: Path) -> Check:
    missing = [d for d in ("unet", "clip", "vae") if not (home / "models" / d).is_dir()]
    if missing:
        return Check("models", "warn", f"{home}/models lacks {', '.join(missing)}",
                     "download the base models as FluxGym does (models/unet, models/clip, models/vae)")
    return Check("models", "ok", str(home / "models"))


def _disk(home: Path) -> Check:
    target = home / "outputs" if (home / "outputs").is_dir() else home
    if not target.exists():
        return Check("disk", "fail", f"{target} does not exist", f"mkdir -p {home}/outputs")
    free_gb = shutil.disk_usage(target).free / 1e9
    if free_gb < 20:
        return Check("disk", "warn", f"{free_gb:.1f} GB free in {target}", "free space: each state is GBs")
    return Check("disk", "ok", f"{free_gb:.0f} GB free in {target}")


def _perms(home: Path) -> Check:
    outputs = home / "outputs"
    if outputs.is_dir() and not os.access(outputs, os.W_OK):
        return Check("permissions", "warn", f"{outputs} not writable by this user",
                     "chown -R fluxgym: the outputs directory (the service user writes there)")
    return Check("permissions", "ok", f"{outputs} writable" if outputs.is_dir() else "nothing to check yet")


def run_checks(home: Path) -> list[Check]:
    return [_systemd(), _unit(), *_gpus(), _sd_scripts(home), _python_env(home), _models(home),
            _disk(home), _perms(home)]
