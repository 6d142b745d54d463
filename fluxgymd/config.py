"""run.toml / fluxgym.toml loading and validation (SPEC section 3).

Box-wide defaults in FLUXGYM_HOME/fluxgym.toml are overlaid key by key by the run's own
outputs/NAME/run.toml. Every problem raises ConfigError naming the file, the key and what
was expected.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .durations import parse_duration_s
from .errors import ConfigError
from .paths import RunPaths


@dataclass(frozen=True)
class TrainConfig:
    script: Path | None  # absolute path of a FluxGym train.sh, or None
    command: tuple[str, ...] | None  # explicit argv, or None
    workdir: Path
    env: tuple[tuple[str, str], ...] = ()
    gpus: tuple[str, ...] | None = None  # None: CUDA_VISIBLE_DEVICES or all


@dataclass(frozen=True)
class WatchdogConfig:
    stall_timeout_s: float = 300.0
    startup_timeout_s: float = 1200.0
    progress_timeout_s: float = 1800.0
    gpu_busy_percent: int = 5
    poll_interval_s: float = 5.0


@dataclass(frozen=True)
class RestartConfig:
    max_attempts_without_progress: int = 3


@dataclass(frozen=True)
class LogConfig:
    rotate_bytes: int = 256 * 1024 * 1024
    keep: int = 5
    progress_interval_s: float = 5.0


@dataclass(frozen=True)
class NotifyConfig:
    command: tuple[str, ...] | None = None  # run by fluxgym-notify@.service
    on_success: bool = False


@dataclass(frozen=True)
class MetricsConfig:
    prometheus_dir: Path | None = None  # node_exporter textfile collector dir


@dataclass(frozen=True)
class RunConfig:
    name: str
    paths: RunPaths
    train: TrainConfig
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    restart: RestartConfig = field(default_factory=RestartConfig)
    logs: LogConfig = field(default_factory=LogConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


# --- schema -------------------------------------------------------------------------------

def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError("expected a non-empty string")
    return v


def _argv(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
        raise ValueError("expected a non-empty list of strings, e.g. [\"accelerate\", \"launch\", ...]")
    return tuple(v)


def _env(v: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(v, dict):
        raise ValueError("expected a table of strings, e.g. { CUDA_VISIBLE_DEVICES = \"0\" }")
    out = []
    for k, x in v.items():
        if not isinstance(x, (str, int)) or isinstance(x, bool):
            raise ValueError(f"expected a string value for {k}")
        if not k or "=" in k or "\0" in k:
            raise ValueError(f"invalid variable name {k!r}")
        out.append((k, str(x)))
    return tuple(out)


def _gpus(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in v):
        raise ValueError("expected a list of GPU indices or UUIDs, e.g. [\"0\"] or [\"GPU-8c1e...\"]")
    return tuple(str(x) for x in v)


def _duration(v: Any) -> float:
    s = parse_duration_s(v)
    if s <= 0:
        raise ValueError("expected a positive duration")
    return s


def _percent(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 100:
        raise ValueError("expected an integer percentage from 0 to 100")
    return v


def _positive_int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError("expected a whole number of at least 1")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("expected true or false")
    return v


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _size(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    if isinstance(v, str):
        t = v.strip().lower().removesuffix("b").removesuffix("i")
        unit = t[-1:] if t[-1:] in _SIZE_UNITS else ""
        num = t[: len(t) - len(unit)] if unit else t
        if num.isdigit() and int(num) > 0:
            return int(num) * _SIZE_UNITS[unit]
    raise ValueError("expected a size in bytes or like \"256M\", \"1G\"")


Schema = dict[str, dict[str, Callable[[Any], Any]]]
_SCHEMA: Schema = {
    "train": {"script": _str, "command": _argv, "workdir": _str, "env": _env, "gpus": _gpus},
    "watchdog": {
        "stall_timeout": _duration,
        "startup_timeout": _duration,
        "progress_timeout": _duration,
        "gpu_busy_percent": _percent,
        "poll_interval": _duration,
    },
    "restart": {"max_attempts_without_progress": _positive_int},
    "logs": {"rotate_size": _size, "keep": _positive_int, "progress_interval": _duration},
    "notify": {"command": _argv, "on_success": _bool},
    "metrics": {"prometheus_dir": _str},
}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e


def _validate(path: Path, doc: dict[str, Any]) -> dict[tuple[str, str], tuple[Any, Path]]:
    """Flatten to {(section, key): (value, file)}; unknown sections/keys and bad values raise."""
    out: dict[tuple[str, str], tuple[Any, Path]] = {}
    for section, table in doc.items():
        if section not in _SCHEMA:
            raise ConfigError(f"{path}: unknown section [{section}] (expected one of {', '.join(_SCHEMA)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section} must be a table [{section}]")
        for key, value in table.items():
            check = _SCHEMA[section].get(key)
            if check is None:
                raise ConfigError(
                    f"{path}: unknown key {section}.{key} (expected one of {', '.join(_SCHEMA[section])})"
                )
            try:
                out[(section, key)] = (check(value), path)
            except ValueError as e:
                raise ConfigError(f"{path}: {section}.{key}: {e}") from e
    return out


def load_config(paths: RunPaths) -> RunConfig:
    """Load and validate a run's configuration; raises ConfigError (exit 78)."""
    if not paths.run_dir.is_dir():
        raise ConfigError(
            f"{paths.run_dir}: no such run (create it with `fluxgym new {paths.name}` or `fluxgym import`)"
        )
    box = _validate(paths.box_toml, _read_toml(paths.box_toml))
    run_doc = _read_toml(paths.run_toml)
    run = _validate(paths.run_toml, run_doc)
    # the trainer choice is per run: a box-wide script/command makes no sense
    for key in ("script", "command"):
        if ("train", key) in box:
            raise ConfigError(f"{paths.box_toml}: train.{key} belongs in a run's run.toml, not fluxgym.toml")
    merged = {**box, **run}

    def get(section: str, key: str, default: Any = None) -> Any:
        item = merged.get((section, key))
        return default if item is None else item[0]

    script, command = get("train", "script"), get("train", "command")
    if script is not None and command is not None:
        raise ConfigError(f"{paths.run_toml}: train.script and train.command are exclusive: keep one")
    if script is None and command is None:
        if paths.train_sh.is_file():
            script = "train.sh"  # a FluxGym output folder adopted as is
        else:
            where = paths.run_toml if paths.run_toml.exists() else paths.run_dir
            raise ConfigError(f"{where}: no trainer: set train.script or train.command in run.toml")
    script_path = None
    if script is not None:
        script_path = Path(script) if Path(script).is_absolute() else paths.run_dir / script
    workdir = Path(get("train", "workdir", str(paths.home)))
    if not workdir.is_absolute():
        workdir = paths.home / workdir

    wd = WatchdogConfig(
        stall_timeout_s=get("watchdog", "stall_timeout", WatchdogConfig.stall_timeout_s),
        startup_timeout_s=get("watchdog", "startup_timeout", WatchdogConfig.startup_timeout_s),
        progress_timeout_s=get("watchdog", "progress_timeout", WatchdogConfig.progress_timeout_s),
        gpu_busy_percent=get("watchdog", "gpu_busy_percent", WatchdogConfig.gpu_busy_percent),
        poll_interval_s=get("watchdog", "poll_interval", WatchdogConfig.poll_interval_s),
    )
    if wd.poll_interval_s * 2 > wd.stall_timeout_s:
        src = merged.get(("watchdog", "stall_timeout"), (None, paths.run_toml))[1]
        raise ConfigError(
            f"{src}: watchdog.stall_timeout ({wd.stall_timeout_s:g}s) must be at least twice "
            f"watchdog.poll_interval ({wd.poll_interval_s:g}s)"
        )
    metrics_dir = get("metrics", "prometheus_dir")
    if metrics_dir is not None and not Path(metrics_dir).is_absolute():
        src = merged[("metrics", "prometheus_dir")][1]
        raise ConfigError(f"{src}: metrics.prometheus_dir: expected an absolute path, got {metrics_dir!r}")
    return RunConfig(
        name=paths.name,
        paths=paths,
        train=TrainConfig(
            script=script_path,
            command=command,
            workdir=workdir,
            env=get("train", "env", ()),
            gpus=get("train", "gpus"),
        ),
        watchdog=wd,
        restart=RestartConfig(
            max_attempts_without_progress=get(
                "restart", "max_attempts_without_progress", RestartConfig.max_attempts_without_progress
            )
        ),
        logs=LogConfig(
            rotate_bytes=get("logs", "rotate_size", LogConfig.rotate_bytes),
            keep=get("logs", "keep", LogConfig.keep),
            progress_interval_s=get("logs", "progress_interval", LogConfig.progress_interval_s),
        ),
        notify=NotifyConfig(command=get("notify", "command"), on_success=get("notify", "on_success", False)),
        metrics=MetricsConfig(prometheus_dir=Path(metrics_dir) if metrics_dir else None),
    )
