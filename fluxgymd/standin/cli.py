"""Command line of the stand-in: the kohya flags it honours plus its own ``--standin_*``.

Every other flag (FluxGym passes dozens) is accepted and ignored, as kohya would parse them.
No torch import here, so parsing is instant.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fluxgymd.standin.faults import Fault, parse_fault


@dataclass(frozen=True)
class StandinArgs:
    output_dir: Path
    output_name: str | None
    max_train_epochs: int | None
    max_train_steps: int | None
    save_every_n_epochs: int | None
    save_every_n_steps: int | None
    save_state: bool
    save_state_on_train_end: bool
    resume: str | None
    initial_epoch: int | None
    initial_step: int | None
    skip_until_initial_step: bool
    seed: int | None
    gradient_accumulation_steps: int
    dataset_config: str | None
    batches_per_epoch: int
    step_seconds: float
    startup_seconds: float
    step_record: Path
    nvml_dir: Path | None
    gpu_index: int
    flood_lines: int | None
    flood_frames: int
    flood_rate: float | None  # lines per second to hold (None: as fast as possible)
    faults: tuple[Fault, ...]
    fault_every_attempt: bool
    ignored_flags: tuple[str, ...]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _fault(text: str) -> Fault:
    try:
        return parse_fault(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: an unknown kohya flag must never be taken as a prefix of ours
    p = argparse.ArgumentParser(prog="python -m fluxgymd.standin", allow_abbrev=False)
    k = p.add_argument_group("kohya flags honoured")
    k.add_argument("--output_dir", required=True)
    k.add_argument("--output_name", default=None)
    k.add_argument("--max_train_epochs", type=_positive_int, default=None)
    k.add_argument("--max_train_steps", type=_positive_int, default=None)
    k.add_argument("--save_every_n_epochs", type=_positive_int, default=None)
    k.add_argument("--save_every_n_steps", type=_positive_int, default=None)
    k.add_argument("--save_state", action="store_true")
    k.add_argument("--save_state_on_train_end", action="store_true")
    k.add_argument("--resume", default=None)
    k.add_argument("--initial_epoch", type=int, default=None)
    k.add_argument("--initial_step", type=int, default=None)
    k.add_argument("--skip_until_initial_step", action="store_true")
    k.add_argument("--seed", type=int, default=None)
    k.add_argument("--save_model_as", default="safetensors", choices=["safetensors"])
    k.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1)
    k.add_argument("--dataset_config", default=None, help="accepted, not read")
    s = p.add_argument_group("stand-in flags")
    s.add_argument("--standin_batches_per_epoch", type=_positive_int, default=8)
    s.add_argument("--standin_step_seconds", type=_non_negative_float, default=0.02)
    s.add_argument("--standin_startup_seconds", type=_non_negative_float, default=0.0)
    s.add_argument("--standin_step_record", default=None)
    s.add_argument("--standin_nvml_dir", default=None)
    s.add_argument("--standin_gpu_index", type=int, default=0)
    s.add_argument("--standin_flood", type=_positive_int, default=None, metavar="LINES")
    s.add_argument("--standin_flood_frames", type=int, default=0, metavar="FRAMES")
    s.add_argument("--standin_flood_rate", type=float, default=None, metavar="LINES_PER_S",
                   help="pace the flood at this many lines per second (a writer that only slows "
                        "down when its output blocks)")
    s.add_argument("--fault", type=_fault, action="append", default=[], metavar="KIND@STEP")
    s.add_argument("--fault-every-attempt", "--fault_every_attempt", dest="fault_every_attempt", action="store_true")
    return p


def parse_args(argv: Sequence[str]) -> StandinArgs:
    ns, unknown = build_parser().parse_known_args(list(argv))
    output_dir = Path(ns.output_dir)
    record = Path(ns.standin_step_record) if ns.standin_step_record else output_dir / ".standin-steps.jsonl"
    ignored = tuple(tok.split("=", 1)[0] for tok in unknown if tok.startswith("-"))
    return StandinArgs(
        output_dir=output_dir,
        output_name=ns.output_name,
        max_train_epochs=ns.max_train_epochs,
        max_train_steps=ns.max_train_steps,
        save_every_n_epochs=ns.save_every_n_epochs,
        save_every_n_steps=ns.save_every_n_steps,
        save_state=ns.save_state,
        save_state_on_train_end=ns.save_state_on_train_end,
        resume=ns.resume,
        initial_epoch=ns.initial_epoch,
        initial_step=ns.initial_step,
        skip_until_initial_step=ns.skip_until_initial_step,
        seed=ns.seed,
        gradient_accumulation_steps=ns.gradient_accumulation_steps,
        dataset_config=ns.dataset_config,
        batches_per_epoch=ns.standin_batches_per_epoch,
        step_seconds=ns.standin_step_seconds,
        startup_seconds=ns.standin_startup_seconds,
        step_record=record,
        nvml_dir=Path(ns.standin_nvml_dir) if ns.standin_nvml_dir else None,
        gpu_index=ns.standin_gpu_index,
        flood_lines=ns.standin_flood,
        flood_frames=ns.standin_flood_frames,
        flood_rate=ns.standin_flood_rate,
        faults=tuple(ns.fault),
        fault_every_attempt=ns.fault_every_attempt,
        ignored_flags=ignored,
    )
