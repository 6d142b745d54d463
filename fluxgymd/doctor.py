"""`fluxgym doctor`: one line per check of what a run needs on this box, each with a fix."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

MIN_SYSTEMD = 236  # WATCHDOG_USEC= from the service (systemd 236)
MIN_FREE_GB = 20.0  # a FLUX LoRA state is several GB; a few of them plus the model


class Level(str, Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str
    fix: str | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["level"] = self.level.value
        return d


def _systemd() -> Check:
    from .systemctl import systemd_version

    version = systemd_version()
    if version is None:
        return Check("systemd", Level.FAIL, "systemctl not found", f"fluxgymd needs systemd >= {MIN_SYSTEMD}")
    if version < MIN_SYSTEMD:
        return Check("systemd", Level.FAIL, f"systemd {version}", f"upgrade to systemd >= {MIN_SYSTEMD}")
    if not os.path.isdir("/run/systemd/system"):
        return Check("systemd", Level.WARN, f"systemd {version} installed but not running as PID 1",
                     "services only run where systemd is the init system")
    extra = "" if version >= 249 else " (no OnSuccess=: only failures notify)"
    return Check("systemd", Level.OK, f"systemd {version} running{extra}")


def _unit(user_unit: bool) -> Check:
    from .systemctl import show

    props = show("doctor-probe", user=user_unit, props=("LoadState", "FragmentPath", "DropInPaths"))
    if not props:
        return Check("unit", Level.WARN, "systemd could not be asked about fluxgym-train@.service",
                     "run doctor where systemd runs (and as root for the system manager)")
    if props.get("LoadState") != "loaded":
        return Check("unit", Level.FAIL, f"fluxgym-train@.service not loadable ({props.get('LoadState')})",
                     "run `sudo fluxgym install`")
    dropins = props.get("DropInPaths", "")
    if "10-fluxgym-install.conf" not in dropins:
        return Check("unit", Level.WARN, f"{props.get('FragmentPath')} without the install drop-in",
                     "run `sudo fluxgym install`")
    return Check("unit", Level.OK, f"{props.get('FragmentPath')} + {dropins}")


def _gpus() -> list[Check]:
    from .gpu import NvmlStatus, inventory

    try:
        inv = inventory()
    except Exception as e:  # doctor must report, not crash
        return [Check("nvml", Level.FAIL, f"NVML query failed: {e}", "check the NVIDIA driver (nvidia-smi)")]
    if inv.status is NvmlStatus.NO_LIBRARY:
        return [Check("nvml", Level.WARN, "no NVML (libnvidia-ml.so.1): liveness runs on training progress alone",
                      "install the NVIDIA driver for GPU liveness")]
    if inv.status is not NvmlStatus.OK and not inv.gpus:
        return [Check("nvml", Level.FAIL, f"NVML: {inv.detail or inv.status.value}",
                      "check the NVIDIA driver: nvidia-smi, dmesg for Xid errors")]
    checks = [Check("nvml", Level.OK, f"driver {inv.driver_version}, {len(inv.gpus)} GPU(s)")]
    for g in inv.gpus:
        ok = g.status is NvmlStatus.OK
        checks.append(Check(f"gpu {g.index}", Level.OK if ok else Level.FAIL,
                            f"{g.name} {g.uuid} util {g.util_percent}%",
                            None if ok else f"{g.detail}: check `nvidia-smi`, dmesg for Xid errors"))
    checks.append(_nvidia_uvm())
    return checks


def _nvidia_uvm() -> Check:
    try:
        devices = Path("/proc/devices").read_text()
    except OSError:
        devices = ""
    if "nvidia-uvm" in devices:
        return Check("nvidia-uvm", Level.OK, "module loaded")
    return Check("nvidia-uvm", Level.FAIL, "nvidia-uvm not loaded: the unit's DeviceAllow= cannot grant it",
                 "echo nvidia-uvm > /etc/modules-load.d/nvidia-uvm.conf && modprobe nvidia-uvm")


def _sd_scripts(home: Path) -> Check:
    from .fluxgym_gen import TRAINER_SCRIPT

    script = home / TRAINER_SCRIPT
    if script.is_file():
        return Check("sd-scripts", Level.OK, str(script.parent))
    return Check("sd-scripts", Level.FAIL, f"{script} missing", "run scripts/install-sd-scripts")


def _venv_bins(home: Path) -> list[Path]:
    """Where the wrapper's PATH looks first: FluxGym's venv, then fluxgymd's own."""
    return [home / "env" / "bin", home / "venv" / "bin", Path(sys.executable).parent]


def _python(home: Path) -> Check:
    """The interpreter accelerate will start sd-scripts with (FluxGym's env/ first, as the wrapper)."""
    for d in _venv_bins(home):
        if (d / "python").is_file():
            exe = str(d / "python")
            break
    else:
        found = shutil.which("python3")
        if found is None:
            return Check("python", Level.FAIL, "no python in FLUXGYM_HOME/env, venv, fluxgymd's venv or PATH",
                         "create FluxGym's venv: python3 -m venv env && env/bin/pip install -r sd-scripts/requirements.txt")
        exe = found
    try:
        cp = subprocess.run([exe, "-c", "import torch, sys; print(sys.version.split()[0], torch.__version__)"],
                            capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("python", Level.FAIL, f"{exe}: {e}", "repair the venv")
    if cp.returncode != 0:
        return Check("python", Level.FAIL, f"{exe} cannot import torch",
                     f"{Path(exe).parent}/pip install -r {home}/sd-scripts/requirements.txt")
    py, torch = (cp.stdout.split() + ["?", "?"])[:2]
    return Check("python", Level.OK, f"{exe}: Python {py}, torch {torch}")


def _accelerate(home: Path) -> Check:
    for d in _venv_bins(home):
        if (d / "accelerate").is_file():
            return Check("accelerate", Level.OK, str(d / "accelerate"))
    acc = shutil.which("accelerate")
    if acc:
        return Check("accelerate", Level.OK, acc)
    return Check("accelerate", Level.FAIL, "accelerate not found in FLUXGYM_HOME/env, venv, fluxgymd's venv or PATH",
                 "install sd-scripts' requirements into FLUXGYM_HOME/env")


def _models(home: Path) -> Check:
    from .fluxgym_gen import AE, CLIP_L, FLUXGYM_MODELS, T5XXL

    missing = [p for p in (CLIP_L, T5XXL, AE) if not (home / p).is_file()]
    unets = [m.name for m in FLUXGYM_MODELS.values() if (home / m.unet_path).is_file()]
    if missing:
        return Check("models", Level.WARN, f"missing {', '.join(str(home / p) for p in missing)}",
                     "download them as FluxGym does: clip_l + t5xxl_fp16 from comfyanonymous/flux_text_encoders, "
                     "ae.sft from cocktailpeanut/xulf-dev")
    if not unets:
        return Check("models", Level.WARN, f"no base model in {home / 'models/unet'}",
                     "download flux1-dev.sft from cocktailpeanut/xulf-dev into models/unet")
    return Check("models", Level.OK, f"text encoders, VAE, base models: {', '.join(unets)}")


def _disk(home: Path) -> Check:
    target = home / "outputs" if (home / "outputs").is_dir() else home
    if not target.exists():
        return Check("disk", Level.FAIL, f"{target} does not exist", f"mkdir -p {home}/outputs")
    free_gb = shutil.disk_usage(target).free / 1e9
    if free_gb < MIN_FREE_GB:
        return Check("disk", Level.WARN, f"{free_gb:.1f} GB free in {target}",
                     "free space: each saved state is several GB")
    return Check("disk", Level.OK, f"{free_gb:.0f} GB free in {target}")


def _perms(home: Path) -> Check:
    outputs = home / "outputs"
    if not outputs.is_dir():
        return Check("permissions", Level.WARN, f"{outputs} does not exist", f"mkdir -p {outputs}")
    if not os.access(outputs, os.W_OK):
        return Check("permissions", Level.WARN, f"{outputs} not writable by this user",
                     f"chown -R fluxgym: {outputs} (the service user writes there)")
    return Check("permissions", Level.OK, f"{outputs} writable")


def run_checks(home: Path, user_unit: bool = False) -> list[Check]:
    return [_systemd(), _unit(user_unit), *_gpus(), _sd_scripts(home), _python(home), _accelerate(home),
            _models(home), _disk(home), _perms(home)]
