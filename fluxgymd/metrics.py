"""Prometheus export for node_exporter's textfile collector (optional: `[metrics] prometheus_dir`).

Each wrapper writes only its own run's file, `<dir>/fluxgym-<NAME>.prom`: several runs
(several wrapper processes) never write the same file, so no locking is needed, and each
write is atomic (temp file not ending in `.prom`, fsync, rename), so the collector never
reads half a file. node_exporter reads every `*.prom` in the directory and merges metric
families across files (their HELP/TYPE lines are identical by construction).

    render_prom(rows) -> str                       pure: status documents -> exposition text
    write_prom(dir, name, status_doc) -> Path      one run's file, atomically
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .atomic import write_atomic
from .names import validate_name
from .status import RunStatus, StatusDoc

PREFIX = "fluxgym_run_"


@dataclass(frozen=True)
class _Gauge:
    name: str
    help: str
    value: Callable[[Mapping[str, Any]], float | None]


def _iso_s(key: str) -> Callable[[Mapping[str, Any]], float | None]:
    def get(doc: Mapping[str, Any]) -> float | None:
        from .runinfo import iso_to_epoch_s

        return iso_to_epoch_s(doc.get(key))
    return get


def _field(key: str) -> Callable[[Mapping[str, Any]], float | None]:
    def get(doc: Mapping[str, Any]) -> float | None:
        v = doc.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return get


GAUGES: tuple[_Gauge, ...] = (
    _Gauge("step", "Absolute optimizer steps done (across restarts).", _field("step")),
    _Gauge("steps", "Planned optimizer steps of the whole run.", _field("steps")),
    _Gauge("epoch", "Current epoch.", _field("epoch")),
    _Gauge("epochs", "Planned epochs.", _field("epochs")),
    _Gauge("loss", "Last average loss reported by the trainer.", _field("loss")),
    _Gauge("iterations_per_second", "Training speed reported by the trainer.", _field("it_per_s")),
    _Gauge("eta_seconds", "Estimated time to the end of training.", _field("eta_s")),
    _Gauge("gpu_utilization_percent", "GPU utilisation of the run (NVML), percent.", _field("gpu_percent")),
    _Gauge("attempt", "Number of the current (or last) attempt; 1 = never restarted.", _field("attempt")),
    _Gauge("attempts_without_progress", "Recent attempts in a row that saved no new checkpoint.",
           _field("attempts_without_progress")),
    _Gauge("last_progress_timestamp_seconds", "Unix time of the last training step seen.",
           _iso_s("last_progress_at")),
    _Gauge("updated_timestamp_seconds", "Unix time the wrapper last updated this run's status.",
           _iso_s("updated_at")),
)


def _label(value: str) -> str:
    """A label value escaped as the exposition format requires."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    if v != v:
        return "NaN"
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v))


def _as_mapping(doc: StatusDoc | Mapping[str, Any]) -> Mapping[str, Any]:
    return doc.to_json() if isinstance(doc, StatusDoc) else doc


def render_prom(rows: Iterable[StatusDoc | Mapping[str, Any]]) -> str:
    """Exposition text for status documents (status.json dicts or StatusDoc); a sample is
    left out when its value is unknown, never written as a fake 0."""
    docs = [_as_mapping(r) for r in rows]
    out: list[str] = []
    name = f"{PREFIX}status"
    out += [f"# HELP {name} Run status from status.json: 1 for the current one.", f"# TYPE {name} gauge"]
    for d in docs:
        run = _label(str(d.get("name")))
        for s in RunStatus:
            out.append(f'{name}{{run="{run}",status="{s.value}"}} {1 if d.get("status") == s.value else 0}')
    for g in GAUGES:
        samples = [(str(d.get("name")), g.value(d)) for d in docs]
        samples = [(r, v) for r, v in samples if v is not None]
        if not samples:
            continue
        out += [f"# HELP {PREFIX}{g.name} {g.help}", f"# TYPE {PREFIX}{g.name} gauge"]
        out += [f'{PREFIX}{g.name}{{run="{_label(r)}"}} {_number(v)}' for r, v in samples]
    return "\n".join(out) + "\n"


def prom_path(directory: Path, name: str) -> Path:
    return Path(directory) / f"fluxgym-{validate_name(name)}.prom"


def write_prom(directory: Path, name: str, status_doc: StatusDoc | Mapping[str, Any]) -> Path:
    """Replace `<directory>/fluxgym-<name>.prom` atomically; raises OSError (callers log it:
    metrics must never stop a training)."""
    path = prom_path(directory, name)
    write_atomic(path, render_prom([status_doc]).encode("utf-8"), mode=0o644)
    return path
