"""kohya's step arithmetic, as pure functions (train_network.py of sd-scripts).

Everything here mirrors kohya *including its bugs*: after a resume kohya restarts
``global_step`` at 0, so states saved later record relative steps. fluxgymd works around
that from the outside (``--initial_epoch``); the stand-in must misbehave the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

KOHYA_DEFAULT_MAX_TRAIN_STEPS = 1600

# kohya's filename patterns (library/train_util.py)
EPOCH_STATE_NAME = "{}-{:06d}-state"
EPOCH_FILE_NAME = "{}-{:06d}"
STEP_STATE_NAME = "{}-step{:08d}-state"
STEP_FILE_NAME = "{}-step{:08d}"
LAST_STATE_NAME = "{}-state"
DEFAULT_EPOCH_NAME = "epoch"
DEFAULT_STEP_NAME = "at"
DEFAULT_LAST_OUTPUT_NAME = "last"


@dataclass(frozen=True)
class StepPlan:
    """Sizes of the run: what kohya prints in its ``running training`` banner."""

    batches_per_epoch: int  # len(train_dataloader)
    gradient_accumulation_steps: int
    steps_per_epoch: int  # optimizer steps per epoch: ceil(batches / accumulation)
    max_train_steps: int
    num_train_epochs: int
    overridden_by_epochs: bool  # --max_train_epochs given: kohya prints "override steps"


@dataclass(frozen=True)
class StartPoint:
    """Where the epoch loop starts, computed exactly as kohya does after ``load_state``."""

    initial_step: int  # batches still to skip inside the first epoch (skip path), else 0
    epoch_to_start: int  # 0-based index of the first epoch the loop runs
    global_step: int  # kohya's starting global_step: 0, or the in-epoch remainder (skip path)
    progress_total: int  # tqdm total: max_train_steps - initial_step
    ignored_state_steps: bool  # --initial_epoch/--initial_step overrode train_state.json
    notes: tuple[str, ...]  # kohya's log lines for this decision, in order


class InitialStepError(AssertionError):
    """kohya's ``assert args.max_train_steps > initial_step`` (message kept verbatim)."""


def plan_steps(
    batches_per_epoch: int,
    gradient_accumulation_steps: int,
    max_train_epochs: int | None,
    max_train_steps: int | None,
    num_processes: int = 1,
) -> StepPlan:
    if batches_per_epoch < 1:
        raise ValueError(f"batches per epoch must be >= 1, got {batches_per_epoch}")
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    steps = KOHYA_DEFAULT_MAX_TRAIN_STEPS if max_train_steps is None else max_train_steps
    overridden = max_train_epochs is not None
    if max_train_epochs is not None:
        steps = max_train_epochs * math.ceil(batches_per_epoch / num_processes / gradient_accumulation_steps)
    steps_per_epoch = math.ceil(batches_per_epoch / gradient_accumulation_steps)
    return StepPlan(
        batches_per_epoch=batches_per_epoch,
        gradient_accumulation_steps=gradient_accumulation_steps,
        steps_per_epoch=steps_per_epoch,
        max_train_steps=steps,
        num_train_epochs=math.ceil(steps / steps_per_epoch),
        overridden_by_epochs=overridden,
    )


def start_point(
    plan: StepPlan,
    initial_epoch: int | None,
    initial_step_arg: int | None,
    steps_from_state: int | None,
    skip_until_initial_step: bool,
    resuming: bool,
    num_processes: int = 1,
) -> StartPoint:
    """train_network.py: the ``initial_step`` block, then the pre-loop skip block."""
    notes: list[str] = []
    ga = plan.gradient_accumulation_steps
    bpe = plan.batches_per_epoch
    initial_step = 0
    ignored = False
    if initial_epoch is not None or initial_step_arg is not None:
        if steps_from_state is not None:
            ignored = True
            notes.append(
                "steps from the state is ignored because initial_step is specified / "
                "initial_stepが指定されているため、stateからのステップ数は無視されます"
            )
        if initial_step_arg is not None:
            initial_step = initial_step_arg
        else:
            assert initial_epoch is not None
            initial_step = (initial_epoch - 1) * math.ceil(bpe / num_processes / ga)
    elif steps_from_state is not None:
        initial_step = steps_from_state

    if initial_step > 0 and not plan.max_train_steps > initial_step:
        raise InitialStepError(
            "max_train_steps should be greater than initial step / "
            f"max_train_stepsは初期ステップより大きい必要があります: {plan.max_train_steps} vs {initial_step}"
        )

    epoch_to_start = 0
    if initial_step > 0:
        if skip_until_initial_step:
            if not resuming:
                notes.append(
                    "initial_step is specified but not resuming. lr scheduler will be started from the beginning / "
                    "initial_stepが指定されていますがresumeしていないため、lr schedulerは最初から始まります"
                )
            notes.append(f"skipping {initial_step} steps / {initial_step}ステップをスキップします")
            initial_step *= ga
            epoch_to_start = initial_step // math.ceil(bpe / ga)
        else:
            epoch_to_start = initial_step // math.ceil(bpe / ga)
            initial_step = 0

    global_step = 0
    if initial_step > 0:
        for skip_epoch in range(epoch_to_start):
            notes.append(f"skipping epoch {skip_epoch + 1} because initial_step (multiplied) is {initial_step}")
            initial_step -= bpe
        global_step = initial_step

    return StartPoint(
        initial_step=initial_step,
        epoch_to_start=epoch_to_start,
        global_step=global_step,
        progress_total=plan.max_train_steps - initial_step,
        ignored_state_steps=ignored,
        notes=tuple(notes),
    )


def absolute_step(epoch_index: int, batch_index: int, plan: StepPlan) -> int:
    """1-based absolute optimizer step of a batch (epoch_index 0-based), whatever kohya's counter says."""
    return epoch_index * plan.steps_per_epoch + batch_index // plan.gradient_accumulation_steps + 1


def _name(output_name: str | None, default: str) -> str:
    return default if output_name is None else output_name


def epoch_ckpt_name(output_name: str | None, epoch_no: int) -> str:
    return EPOCH_FILE_NAME.format(_name(output_name, DEFAULT_EPOCH_NAME), epoch_no) + ".safetensors"


def step_ckpt_name(output_name: str | None, step_no: int) -> str:
    return STEP_FILE_NAME.format(_name(output_name, DEFAULT_STEP_NAME), step_no) + ".safetensors"


def last_ckpt_name(output_name: str | None) -> str:
    return _name(output_name, DEFAULT_LAST_OUTPUT_NAME) + ".safetensors"


def epoch_state_name(output_name: str | None, epoch_no: int) -> str:
    return EPOCH_STATE_NAME.format(_name(output_name, DEFAULT_EPOCH_NAME), epoch_no)


def step_state_name(output_name: str | None, step_no: int) -> str:
    return STEP_STATE_NAME.format(_name(output_name, DEFAULT_STEP_NAME), step_no)


def last_state_name(output_name: str | None) -> str:
    return LAST_STATE_NAME.format(_name(output_name, DEFAULT_LAST_OUTPUT_NAME))
