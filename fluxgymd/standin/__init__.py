"""The stand-in trainer (SPEC section 11): a tiny real trainer that behaves like kohya.

Run it as::

    python -m fluxgymd.standin --output_dir out --output_name demo --max_train_epochs 4 \\
        --save_every_n_epochs 1 --save_state
    accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no --num_cpu_threads_per_process 1 -m fluxgymd.standin <flags>

It trains a two-Linear "LoRA" (torch + accelerate + safetensors, CPU or GPU) on synthetic,
deterministic data, batch size 1, and reproduces what fluxgymd relies on from kohya-ss
sd-scripts' train_network.py: the banner, ``epoch e/N`` lines, a tqdm bar ``steps`` with
``avr_loss`` on stderr, ``saving checkpoint: PATH``, the ``saving state at ...`` and
``model saved.`` log lines, state dirs written by the real ``accelerator.save_state``
(``model.safetensors optimizer.bin scheduler.bin random_states_0.pkl`` plus
``train_state.json`` from a save-state pre hook) and resume by ``accelerator.load_state``.
kohya's resume arithmetic is reproduced *with its bug*: after a plain ``--resume`` the
step counter restarts at 0, so later states record relative steps and step-state names
use the relative count (sd-scripts #1999, #2248). ``--initial_epoch``/``--initial_step``
override the state's step count, as in kohya.

kohya flags honoured
    --output_dir DIR (required)    --output_name NAME (kohya's defaults epoch/at/last if absent)
    --max_train_epochs N           --max_train_steps N (default 1600; epochs override it)
    --save_every_n_epochs N        --save_every_n_steps N
    --save_state                   --save_state_on_train_end
    --resume STATE_DIR             --initial_epoch E (1-based)   --initial_step S
    --skip_until_initial_step      --seed N
    --save_model_as safetensors (the only choice)
    --gradient_accumulation_steps N (default 1)
    --dataset_config PATH (accepted, not read)
Every other flag (``--pretrained_model_name_or_path``, ``--network_dim``, ...) is accepted
and ignored; one log line lists them.

stand-in flags
    --standin_batches_per_epoch N   batches (= steps at accumulation 1) per epoch, default 8
    --standin_step_seconds F        wall time of one step (compute + sleep), default 0.02
    --standin_startup_seconds F     silent CPU-burning phase before the first step, default 0
    --standin_step_record FILE      default <output_dir>/.standin-steps.jsonl; one fsynced line
                                    per trained optimizer step: {"attempt_pid", "epoch"
                                    (absolute, 1-based), "batch" (0-based in epoch),
                                    "abs_step" (absolute, 1-based)}
    --standin_nvml_dir DIR          keep DIR/<pid> = "proc <pid> <gpu> <sm_util%> <mem_bytes>"
                                    (97 while stepping, 0 in hang-idle, 100 in hang-spin),
                                    removed at exit (also on SIGTERM; not after SIGKILL)
    --standin_gpu_index N           gpu index written there, default 0
    --standin_flood LINES           no training: print LINES lines "flood line 000123 ..." on
    --standin_flood_frames FRAMES   stdout, FRAMES tqdm-style \\r frames on stderr interleaved,
                                    write the final model, exit 0; achieved rate goes to
                                    <output_dir>/.standin-flood-rate.jsonl, one line per 0.5 s
                                    window {"t": monotonic, "lines": n}
    --fault KIND@STEP (repeatable)  STEP is the absolute 1-based optimizer step:
        hang-idle      block forever in standin_hang_idle() before training STEP, no CPU
        hang-spin      spin one core forever in standin_hang_spin() before training STEP
        crash          raise RuntimeError("stand-in fault: crash at step STEP"), exit 1
        exit-no-model  after training (if STEP was reached), exit 0 writing neither the
                       last state nor the final model
        die-saving     SIGKILL itself inside the first accelerator.save_state after step
                       STEP was trained, just before random_states_0.pkl is written
    --fault-every-attempt           fire faults on every attempt; by default each fires once,
                                    remembered in <output_dir>/.standin-faults-fired.json
                                    (written atomically before the fault acts)
"""
