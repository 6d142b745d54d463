"""Building the trainer's argv for one attempt (pure).

kohya resumes with `--resume DIR`, reads current_step from the state's train_state.json and
restarts its step counter at 0, so a state written after a resume holds a relative count and
a second resume from it re-trains old epochs (sd-scripts #1999, #2248). fluxgymd therefore
always tells kohya the absolute position explicitly:
  epoch state at absolute epoch E -> --initial_epoch E+1 (kohya: start at epoch E+1, no skip)
  step state at absolute step S   -> --initial_step S --skip_until_initial_step
                                     (kohya: skip S batches, then train the rest)
Either way kohya's own step counter starts at `kohya_step_base` less than the absolute step,
which is what a step-state name written during the attempt must be offset by.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoints import Checkpoint, StateKind
from .errors import ConfigError
from .trainsh import get_flag, has_flag, with_flag, without_flag

_RESUME_FLAGS = (("resume", True), ("initial_epoch", True), ("initial_step", True),
                 ("skip_until_initial_step", False))


@dataclass(frozen=True)
class TrainerTarget:
    output_dir: Path
    output_name: str
    save_state: bool

    @property
    def final_model(self) -> Path:
        return self.output_dir / f"{self.output_name}.safetensors"


def trainer_target(argv: list[str], workdir: Path, source: str) -> TrainerTarget:
    """Where the trainer writes: kohya's --output_dir (relative to its cwd) and --output_name."""
    out_dir = get_flag(argv, "output_dir")
    out_name = get_flag(argv, "output_name")
    if not out_dir:
        raise ConfigError(f"{source}: the trainer command has no --output_dir: fluxgymd needs it to find checkpoints")
    if not out_name:
        raise ConfigError(f"{source}: the trainer command has no --output_name: fluxgymd needs it to find checkpoints")
    if "/" in out_name:
        raise ConfigError(f"{source}: --output_name {out_name!r} must be a plain name, not a path")
    p = Path(out_dir)
    return TrainerTarget(
        output_dir=p if p.is_absolute() else workdir / p,
        output_name=out_name,
        save_state=has_flag(argv, "save_state"),
    )


@dataclass(frozen=True)
class ResumePlan:
    argv: list[str]
    resumed_from: Checkpoint | None
    start_abs_step: int  # absolute steps already done
    kohya_step_base: int  # absolute step = kohya_step_base + kohya's global_step this attempt

    def describe(self) -> str:
        cp = self.resumed_from
        if cp is None:
            return "fresh start"
        if cp.kind is StateKind.EPOCH:
            return f"resumed from {cp.name} (epoch {cp.abs_epoch}, step {cp.abs_step})"
        return f"resumed from {cp.name} (step {cp.abs_step})"


def plan_attempt(argv: list[str], best: Checkpoint | None, steps_per_epoch: int | None) -> ResumePlan:
    if best is None:
        # a user's own --resume in the script still applies on a first start
        return ResumePlan(list(argv), None, 0, 0)
    out = list(argv)
    for flag, takes_value in _RESUME_FLAGS:
        out = without_flag(out, flag, takes_value=takes_value)
    out = with_flag(out, "resume", str(best.path))
    if best.kind is StateKind.EPOCH and best.abs_epoch is not None:
        out = with_flag(out, "initial_epoch", str(best.abs_epoch + 1))
        start = best.abs_step if best.abs_step is not None else 0
        return ResumePlan(out, best, start, start)
    if best.kind is StateKind.STEP and best.abs_step is not None:
        out = with_flag(out, "initial_step", str(best.abs_step))
        out = with_flag(out, "skip_until_initial_step", None)
        base = (best.abs_step // steps_per_epoch) * steps_per_epoch if steps_per_epoch else 0
        return ResumePlan(out, best, best.abs_step, base)
    # unknown absolute position: let kohya read train_state.json (right for a first-attempt state)
    return ResumePlan(out, best, best.current_step or 0, 0)
