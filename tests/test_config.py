"""run.toml / fluxgym.toml loading with real files."""
from __future__ import annotations

from pathlib import Path

import pytest

from fluxgymd.config import load_config
from fluxgymd.errors import ConfigError, ExitCode
from fluxgymd.paths import RunPaths


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "outputs" / "r").mkdir(parents=True)
    return tmp_path


def write(home: Path, text: str, name: str = "outputs/r/run.toml") -> Path:
    p = home / name
    p.write_text(text)
    return p


def test_full_config_and_defaults(home):
    write(home, """
[train]
command = ["accelerate", "launch", "x.py"]
env = { CUDA_VISIBLE_DEVICES = "1" }
gpus = ["1", 2]
[watchdog]
stall_timeout = "5min"
startup_timeout = "1h 30min"
poll_interval = 2
""")
    write(home, "[watchdog]\ngpu_busy_percent = 7\nprogress_timeout = \"10min\"\n", "fluxgym.toml")
    cfg = load_config(RunPaths(home, "r"))
    assert cfg.train.command == ("accelerate", "launch", "x.py")
    assert cfg.train.workdir == home and cfg.train.gpus == ("1", "2")
    assert dict(cfg.train.env) == {"CUDA_VISIBLE_DEVICES": "1"}
    w = cfg.watchdog
    assert (w.stall_timeout_s, w.startup_timeout_s, w.poll_interval_s) == (300, 5400, 2)
    assert (w.gpu_busy_percent, w.progress_timeout_s) == (7, 600)  # box-wide defaults
    assert cfg.restart.max_attempts_without_progress == 3


def test_train_sh_adopted_without_run_toml(home):
    (home / "outputs/r/train.sh").write_text("accelerate launch x.py\n")
    cfg = load_config(RunPaths(home, "r"))
    assert cfg.train.script == home / "outputs/r/train.sh" and cfg.train.command is None


@pytest.mark.parametrize("text,needle", [
    ("[train]\ncommand = [\"a\"]\nbogus = 1\n", "unknown key train.bogus"),
    ("[trian]\n", "unknown section [trian]"),
    ("[train]\ncommand = \"accelerate launch\"\n", "train.command: expected a non-empty list"),
    ("[train]\ncommand = [\"a\"]\nscript = \"train.sh\"\n", "exclusive"),
    ("[train]\ncommand = [\"a\"]\n[watchdog]\nstall_timeout = \"5 parsecs\"\n", "watchdog.stall_timeout"),
    ("[train]\ncommand = [\"a\"]\n[watchdog]\ngpu_busy_percent = 101\n", "watchdog.gpu_busy_percent"),
    ("[train]\ncommand = [\"a\"]\n[watchdog]\nstall_timeout = 5\npoll_interval = 5\n", "twice"),
    ("[train]\ncommand = [\"a\"]\n[restart]\nmax_attempts_without_progress = 0\n", "max_attempts_without_progress"),
    ("[train\n", "invalid TOML"),
    ("", "no trainer"),
])
def test_errors_name_file_and_key(home, text, needle):
    path = write(home, text)
    with pytest.raises(ConfigError) as e:
        load_config(RunPaths(home, "r"))
    assert needle in str(e.value)
    assert str(path) in str(e.value) or "outputs/r" in str(e.value)
    assert "\n" not in str(e.value) and e.value.exit_code == ExitCode.BAD_CONFIG


def test_missing_run(tmp_path):
    with pytest.raises(ConfigError, match="no such run"):
        load_config(RunPaths(tmp_path, "nope"))


def test_box_toml_cannot_set_trainer(home):
    write(home, "[train]\ncommand = [\"a\"]\n", "fluxgym.toml")
    write(home, "[train]\ncommand = [\"a\"]\n")
    with pytest.raises(ConfigError, match="fluxgym.toml"):
        load_config(RunPaths(home, "r"))
