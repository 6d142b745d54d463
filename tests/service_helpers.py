"""Driving real runs of the stand-in trainer under a throwaway systemd (tests only)."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from systemd_box import REPO_ROOT, SystemdBox, install_fluxgym_units

VENV_BIN = Path(sys.executable).parent
FLUXGYMD = VENV_BIN / "fluxgymd"
FINAL_STATES = {"completed", "failed", "stopped"}


def unit(name: str) -> str:
    return f"fluxgym-train@{name}.service"


def standin_argv(name: str, run_dir: Path, *extra: str, epochs: int = 4, batches: int = 5,
                 step_s: float = 0.05, accelerate: bool = False, output_dir: Path | None = None) -> list[str]:
    """The stand-in as FluxGym would launch kohya: through `accelerate launch`, or directly."""
    launcher = (
        [str(VENV_BIN / "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", "-m"]
        if accelerate else [sys.executable, "-m"]
    )
    return launcher + [
        "fluxgymd.standin", "--output_dir", str(output_dir or run_dir), "--output_name", name,
        "--max_train_epochs", str(epochs), "--save_every_n_epochs", "1", "--save_state",
        "--standin_batches_per_epoch", str(batches), "--standin_step_seconds", str(step_s), *extra,
    ]


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


@dataclass
class Runs:
    box: SystemdBox
    home: Path
    extra_unit: str = ""

    def __post_init__(self) -> None:
        (self.home / "outputs").mkdir(parents=True, exist_ok=True)
        install_fluxgym_units(self.box, self.home, FLUXGYMD, self.extra_unit)

    def run_dir(self, name: str) -> Path:
        return self.home / "outputs" / name

    def create(self, name: str, *standin: str, watchdog: dict[str, Any] | None = None,
               restart: dict[str, Any] | None = None, env: dict[str, str] | None = None,
               accelerate: bool = False, epochs: int = 4, batches: int = 5, step_s: float = 0.05,
               raw_toml: str | None = None, output_dir: Path | None = None) -> Path:
        d = self.run_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        if raw_toml is not None:
            (d / "run.toml").write_text(raw_toml)
            return d
        argv = standin_argv(name, d, *standin, epochs=epochs, batches=batches, step_s=step_s,
                            accelerate=accelerate, output_dir=output_dir)
        wd = {"stall_timeout": "8s", "poll_interval": "1s", **(watchdog or {})}
        lines = ["[train]", f"command = {toml_list(argv)}", f"workdir = {json.dumps(str(REPO_ROOT))}"]
        if env:
            lines.append("env = { " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in env.items()) + " }")
        lines.append("[watchdog]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in wd.items()]
        if restart:
            lines.append("[restart]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in restart.items()]
        (d / "run.toml").write_text("\n".join(lines) + "\n")
        return d

    def start(self, name: str) -> None:
        self.box.systemctl("start", "--no-block", unit(name))

    def status(self, name: str) -> dict[str, Any]:
        try:
            return json.loads((self.run_dir(name) / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait_settled(self, name: str, timeout_s: float = 240.0) -> dict[str, str]:
        """Until the unit is inactive or failed for good (not between restarts)."""
        def settled() -> dict[str, str] | None:
            props = self.box.show(unit(name), "ActiveState", "SubState", "Result", "NRestarts",
                                  "ExecMainStatus", "ExecMainCode")
            if props.get("ActiveState") in ("inactive", "failed") and props.get("SubState") != "auto-restart":
                return {**props, "_name": name}
            return None
        return self.box.wait_for(settled, timeout_s=timeout_s, what=f"{unit(name)} to settle")

    def restarts(self, name: str) -> int:
        """Automatic restarts systemd scheduled (NRestarts is reset once the unit is dead)."""
        return sum("Scheduled restart job" in str(e.get("MESSAGE")) for e in self.journal(name))

    def log(self, name: str) -> str:
        return (self.run_dir(name) / "training.log").read_text(errors="replace")

    def steps_trained(self, name: str) -> list[int]:
        rec = self.run_dir(name) / ".standin-steps.jsonl"
        return [json.loads(l)["abs_step"] for l in rec.read_text().splitlines() if l.strip()]

    def journal(self, name: str, *args: str) -> list[dict[str, Any]]:
        return self.box.journal(unit(name), *args)
