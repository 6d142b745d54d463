"""Where things live on a box (SPEC section 2). Pure path arithmetic, no I/O."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

DEFAULT_HOME = Path("/srv/fluxgym")


def fluxgym_home(env: Mapping[str, str] | None = None) -> Path:
    source: Mapping[str, str] = os.environ if env is None else env
    return Path(source.get("FLUXGYM_HOME") or DEFAULT_HOME)


@dataclass(frozen=True)
class RunPaths:
    home: Path
    name: str

    @property
    def outputs(self) -> Path:
        return self.home / "outputs"

    @property
    def run_dir(self) -> Path:
        return self.outputs / self.name

    @property
    def run_toml(self) -> Path:
        return self.run_dir / "run.toml"

    @property
    def box_toml(self) -> Path:
        return self.home / "fluxgym.toml"

    @property
    def train_sh(self) -> Path:
        return self.run_dir / "train.sh"

    @property
    def training_log(self) -> Path:
        return self.run_dir / "training.log"

    @property
    def status_json(self) -> Path:
        return self.run_dir / "status.json"

    @property
    def ledger_json(self) -> Path:
        # fluxgymd's own memory of absolute progress; dot-file so FluxGym's UI ignores it
        return self.run_dir / ".fluxgymd-ledger.json"

    @property
    def stalls_dir(self) -> Path:
        return self.run_dir / "stalls"
