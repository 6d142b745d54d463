"""`fluxgym new` and `fluxgym import`: make or adopt outputs/NAME/ (files as FluxGym writes them)."""
from __future__ import annotations

from pathlib import Path

from .atomic import write_atomic
from .errors import ConfigError, FluxgymError
from .fluxgym_gen import RunSpec, Vram, check_required_inputs, write_run_files
from .paths import RunPaths
from .trainsh import has_flag, load_train_sh

RUN_TOML = """# fluxgymd run configuration (docs: SPEC section 3). train.sh is FluxGym's own script,
# parsed (never run through a shell); fluxgymd adds --resume on restarts.
[train]
script = "train.sh"

[watchdog]
stall_timeout = "5min"
startup_timeout = "20min"
progress_timeout = "30min"

[restart]
max_attempts_without_progress = 3
"""


def create_run(
    paths: RunPaths, *, dataset: Path | None, trigger: str, vram: str, base_model: str, epochs: int,
    save_every: int, lr: str, dim: int, resolution: int, repeats: int, seed: int, workers: int,
    sample_prompts: tuple[str, ...], sample_every: int,
) -> list[Path]:
    if paths.run_dir.exists() and any(paths.run_dir.iterdir()):
        raise ConfigError(f"{paths.run_dir}: already exists and is not empty; choose another name")
    spec = RunSpec(
        name=paths.name, trigger_word=trigger, dataset_dir=None if dataset is None else dataset.expanduser().resolve(),
        base_model=base_model, vram=Vram(vram), resolution=resolution, seed=seed, workers=workers,
        learning_rate=lr, network_dim=dim, max_train_epochs=epochs, save_every_n_epochs=save_every,
        num_repeats=repeats, sample_prompts=tuple(sample_prompts) or None, sample_every_n_steps=sample_every,
    )
    check_required_inputs(spec, paths.home)  # 66 naming the path and how to get it
    written = write_run_files(spec, paths.run_dir, fluxgym_root=paths.home)
    write_atomic(paths.run_toml, RUN_TOML.encode())
    return written + [paths.run_toml]


def import_run(home: Path, folder: Path) -> tuple[Path | None, list[str]]:
    """Adopt FOLDER (FluxGym's outputs/NAME): validate its train.sh, add run.toml if missing.

    Returns (run.toml written or None when one existed, warnings). No existing file changes."""
    folder = folder.expanduser().resolve()
    outputs = (home / "outputs").resolve()
    if folder.parent != outputs:
        raise FluxgymError(
            f"{folder}: not in {outputs}; point FLUXGYM_HOME (--home) at the FluxGym checkout that holds it"
        )
    paths = RunPaths(home, folder.name)
    from .names import validate_name

    validate_name(folder.name)
    if not paths.train_sh.is_file():
        raise FluxgymError(f"{paths.train_sh}: not found; is {folder} a FluxGym output folder?")
    argv = load_train_sh(paths.train_sh)  # a script we cannot parse is refused now, not at start
    warnings = []
    if not has_flag(argv, "save_state"):
        warnings.append(f"{paths.train_sh} has no --save_state: a restart cannot resume and starts over "
                        "(add `--save_state \\` to it, or recreate the run with `fluxgym new`)")
    if paths.run_toml.exists():
        return None, warnings
    write_atomic(paths.run_toml, RUN_TOML.encode())
    return paths.run_toml, warnings
