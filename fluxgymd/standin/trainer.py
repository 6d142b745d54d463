"""The training loop: kohya's train_network.py control flow around a tiny model.

Names, banners, save points, train_state.json and the resume arithmetic follow kohya
exactly (see plan.py); the model and data are synthetic and each step takes
``--standin_step_seconds``.
"""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm

from fluxgymd.standin import plan as kplan
from fluxgymd.standin.cli import StandinArgs
from fluxgymd.standin.faults import FIRED_MARKER_NAME, Fault, FaultBook, FaultKind
from fluxgymd.standin.hangs import standin_hang_idle, standin_hang_spin
from fluxgymd.standin.model import StandinLoRA, make_dataset, save_lora
from fluxgymd.standin.nvmlfile import UTIL_IDLE_PERCENT, UTIL_SPIN_PERCENT, UTIL_STEPPING_PERCENT, NvmlFile
from fluxgymd.standin.records import StepRecorder

logger = logging.getLogger("fluxgymd.standin")

RNG_STATE_PREFIX = "random_states_"  # accelerate writes random_states_<rank>.pkl last


@dataclass
class _Counter:
    """kohya's shared ``current_epoch`` / ``current_step`` values read by the save hook."""

    value: int = 0


class _LossRecorder:
    """Moving average over the latest loss of each in-epoch position (kohya's avr_loss)."""

    def __init__(self) -> None:
        self._losses: list[float] = []
        self._total = 0.0

    def add(self, epoch: int, step: int, loss: float) -> None:
        if epoch == 0:
            self._losses.append(loss)
        else:
            while len(self._losses) <= step:
                self._losses.append(0.0)
            self._total -= self._losses[step]
            self._losses[step] = loss
        self._total += loss

    @property
    def moving_average(self) -> float:
        return self._total / len(self._losses) if self._losses else 0.0


def _constant_lr(_step: int) -> float:
    return 1.0


def _burn_cpu(seconds: float) -> None:
    """Silent busy phase standing in for model loading and latent caching."""
    deadline = time.monotonic() + seconds
    a = torch.randn(64, 64)
    while time.monotonic() < deadline:
        a = torch.tanh(a @ a)


@contextmanager
def _die_before_rng_state() -> Iterator[None]:
    """SIGKILL ourselves when accelerate is about to write random_states_0.pkl (its last file)."""
    real_save = torch.save

    def guarded_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(f, (str, os.PathLike)) and os.path.basename(os.fspath(f)).startswith(RNG_STATE_PREFIX):
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = guarded_save  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.save = real_save  # type: ignore[assignment]


class _Run:
    def __init__(self, args: StandinArgs) -> None:
        self.args = args
        self.out = args.output_dir
        self.faults = FaultBook(args.faults, self.out / FIRED_MARKER_NAME, args.fault_every_attempt)
        self.nvml = NvmlFile(args.nvml_dir, args.gpu_index)
        self.recorder = StepRecorder(args.step_record)
        self.current_epoch = _Counter()
        self.current_step = _Counter()
        self.steps_from_state: int | None = None
        self.last_abs_step = 0
        self.metadata: dict[str, str] = {}
        self.accelerator: Accelerator  # set by train(): kohya creates it after parsing

    # --- accelerate hooks, as kohya registers them -------------------------------------
    def save_hook(self, models: list[Any], weights: list[Any], output_dir: str) -> None:
        train_state_file = os.path.join(output_dir, "train_state.json")
        # +1: the state is saved before current_step is set from global_step (kohya's comment)
        logger.info(
            f"save train state to {train_state_file} at epoch {self.current_epoch.value} "
            f"step {self.current_step.value + 1}"
        )
        with open(train_state_file, "w", encoding="utf-8") as f:
            json.dump({"current_epoch": self.current_epoch.value, "current_step": self.current_step.value + 1}, f)

    def load_hook(self, models: list[Any], input_dir: str) -> None:
        train_state_file = os.path.join(input_dir, "train_state.json")
        if os.path.exists(train_state_file):
            with open(train_state_file, "r", encoding="utf-8") as f:
                data = json.load(f)
            self.steps_from_state = data["current_step"]
            logger.info(f"load train state from {train_state_file}: {data}")

    # --- faults ------------------------------------------------------------------------
    def _fire(self, fault: Fault, abs_step: int) -> None:
        self.faults.mark_fired(fault)
        logger.info(f"stand-in fault {fault.spec} fires at absolute step {abs_step}")
        if fault.kind is FaultKind.HANG_IDLE:
            self.nvml.set_util(UTIL_IDLE_PERCENT)
            standin_hang_idle()
        if fault.kind is FaultKind.HANG_SPIN:
            self.nvml.set_util(UTIL_SPIN_PERCENT)
            standin_hang_spin()
        if fault.kind is FaultKind.CRASH:
            raise RuntimeError(f"stand-in fault: crash at step {abs_step}")

    # --- saving --------------------------------------------------------------------------
    def save_model(self, name: str, network: StandinLoRA, steps: int, epoch_no: int) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt_file = self.out / name
        self.accelerator.print(f"\nsaving checkpoint: {ckpt_file}")
        self.metadata["ss_training_finished_at"] = str(time.time())
        self.metadata["ss_steps"] = str(steps)
        self.metadata["ss_epoch"] = str(epoch_no)
        save_lora(ckpt_file, network, dict(self.metadata))

    def save_state(self, state_name: str, announcement: str) -> None:
        logger.info("")
        logger.info(announcement)
        self.out.mkdir(parents=True, exist_ok=True)
        state_dir = str(self.out / state_name)
        fault = self.faults.reached(FaultKind.DIE_SAVING, self.last_abs_step)
        if fault is None:
            self.accelerator.save_state(state_dir)
            return
        self.faults.mark_fired(fault)
        logger.info(f"stand-in fault {fault.spec} fires while saving {state_dir}")
        with _die_before_rng_state():
            self.accelerator.save_state(state_dir)

    # --- the run -----------------------------------------------------------------------
    def train(self) -> int:
        args = self.args
        seed = args.seed if args.seed is not None else random.randint(0, 2**32)
        set_seed(seed)
        # mixed precision forced off: FluxGym passes bf16, pointless for a tiny CPU model
        self.accelerator = accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision="no"
        )
        if args.startup_seconds > 0:
            _burn_cpu(args.startup_seconds)

        network = StandinLoRA()
        dataset = make_dataset(args.batches_per_epoch)
        train_dataloader = DataLoader(dataset, batch_size=1, shuffle=True)
        optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-2)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=_constant_lr)
        network, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            network, optimizer, train_dataloader, lr_scheduler
        )

        step_plan = kplan.plan_steps(
            len(train_dataloader), args.gradient_accumulation_steps, args.max_train_epochs, args.max_train_steps,
            accelerator.num_processes,
        )
        if step_plan.overridden_by_epochs:
            accelerator.print(
                f"override steps. steps for {args.max_train_epochs} epochs is / "
                f"指定エポックまでのステップ数: {step_plan.max_train_steps}"
            )

        accelerator.register_save_state_pre_hook(self.save_hook)
        accelerator.register_load_state_pre_hook(self.load_hook)
        if args.resume:
            logger.info(f"resume training from local state: {args.resume}")
            accelerator.load_state(args.resume)

        num_train_epochs = step_plan.num_train_epochs
        accelerator.print("running training / 学習開始")
        accelerator.print(f"  num batches per epoch / 1epochのバッチ数: {len(train_dataloader)}")
        accelerator.print(f"  num epochs / epoch数: {num_train_epochs}")
        accelerator.print(f"  batch size per device / バッチサイズ: 1")
        accelerator.print(
            f"  gradient accumulation steps / 勾配を合計するステップ数 = {args.gradient_accumulation_steps}"
        )
        accelerator.print(f"  total optimization steps / 学習ステップ数: {step_plan.max_train_steps}")

        self.metadata = {
            "ss_session_id": str(random.randint(0, 2**32)),
            "ss_training_started_at": str(time.time()),
            "ss_output_name": str(args.output_name),
            "ss_network_module": "fluxgymd.standin",
            "ss_network_dim": str(network.lora_down.out_features),
            "ss_num_batches_per_epoch": str(len(train_dataloader)),
            "ss_num_epochs": str(num_train_epochs),
            "ss_max_train_steps": str(step_plan.max_train_steps),
            "ss_gradient_accumulation_steps": str(args.gradient_accumulation_steps),
            "ss_seed": str(seed),
        }

        try:
            start = kplan.start_point(
                step_plan, args.initial_epoch, args.initial_step, self.steps_from_state,
                args.skip_until_initial_step, resuming=bool(args.resume), num_processes=accelerator.num_processes,
            )
        except kplan.InitialStepError as err:
            raise AssertionError(str(err)) from None  # kohya's traceback ends "AssertionError: ..."
        notes = list(start.notes)
        if start.ignored_state_steps:
            logger.warning(notes.pop(0))
        for note in notes:
            logger.info(note)
        initial_step = start.initial_step
        global_step = start.global_step
        loss_recorder = _LossRecorder()
        progress_bar = tqdm(
            range(start.progress_total), smoothing=0, disable=not accelerator.is_local_main_process, desc="steps"
        )

        for epoch in range(start.epoch_to_start, num_train_epochs):
            accelerator.print(f"\nepoch {epoch + 1}/{num_train_epochs}\n")
            self.current_epoch.value = epoch + 1
            self.metadata["ss_epoch"] = str(epoch + 1)
            network.train()

            skipped_dataloader = None
            batch_offset = 0  # enumerate restarts at 0 on a skipped loader; the record wants the real index
            if initial_step > 0:
                skipped_dataloader = accelerator.skip_first_batches(train_dataloader, initial_step - 1)
                batch_offset = initial_step - 1
                initial_step = 1

            for step, (x, y) in enumerate(skipped_dataloader or train_dataloader):
                self.current_step.value = global_step
                if initial_step > 0:
                    initial_step -= 1
                    continue

                batch_index = batch_offset + step
                abs_step = kplan.absolute_step(epoch, batch_index, step_plan)
                fault = self.faults.before_step(abs_step)
                if fault is not None:
                    self._fire(fault, abs_step)
                self.nvml.set_util(UTIL_STEPPING_PERCENT)

                step_started = time.monotonic()
                with accelerator.accumulate(network):
                    loss = torch.nn.functional.mse_loss(network(x), y)
                    accelerator.backward(loss)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                pause_s = args.step_seconds - (time.monotonic() - step_started)
                if pause_s > 0:
                    time.sleep(pause_s)

                if accelerator.sync_gradients:
                    progress_bar.update(1)
                    global_step += 1
                    self.recorder.record(epoch + 1, batch_index, abs_step)
                    self.last_abs_step = abs_step

                    if args.save_every_n_steps is not None and global_step % args.save_every_n_steps == 0:
                        accelerator.wait_for_everyone()
                        if accelerator.is_main_process:
                            name = kplan.step_ckpt_name(args.output_name, global_step)
                            self.save_model(name, accelerator.unwrap_model(network), global_step, epoch)
                            if args.save_state:
                                self.save_state(
                                    kplan.step_state_name(args.output_name, global_step),
                                    f"saving state at step {global_step}",
                                )

                loss_recorder.add(epoch=epoch, step=step, loss=loss.detach().item())
                progress_bar.set_postfix(avr_loss=loss_recorder.moving_average)

                if global_step >= step_plan.max_train_steps:
                    break

            accelerator.wait_for_everyone()
            if args.save_every_n_epochs is not None:
                saving = (epoch + 1) % args.save_every_n_epochs == 0 and (epoch + 1) < num_train_epochs
                if accelerator.is_main_process and saving:
                    name = kplan.epoch_ckpt_name(args.output_name, epoch + 1)
                    self.save_model(name, accelerator.unwrap_model(network), global_step, epoch + 1)
                    if args.save_state:
                        self.save_state(
                            kplan.epoch_state_name(args.output_name, epoch + 1), f"saving state at epoch {epoch + 1}"
                        )

        self.metadata["ss_training_finished_at"] = str(time.time())
        network = accelerator.unwrap_model(network)
        accelerator.end_training()

        fault = self.faults.reached(FaultKind.EXIT_NO_MODEL, self.last_abs_step)
        if fault is not None:
            self.faults.mark_fired(fault)
            logger.info(f"stand-in fault {fault.spec}: exiting 0 without the last state and final model")
            progress_bar.close()
            return 0

        if accelerator.is_main_process and (args.save_state or args.save_state_on_train_end):
            self.save_state(kplan.last_state_name(args.output_name), "saving last state.")
        if accelerator.is_main_process:
            name = kplan.last_ckpt_name(args.output_name)
            self.save_model(name, network, global_step, num_train_epochs)
            logger.info("model saved.")
        progress_bar.close()
        return 0


def train(args: StandinArgs) -> int:
    run = _Run(args)
    try:
        return run.train()
    finally:
        run.nvml.remove()
