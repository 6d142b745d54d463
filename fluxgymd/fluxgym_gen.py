"""Write ``train.sh``, ``dataset.toml`` and ``sample_prompts.txt`` byte for byte as FluxGym does.

The facts mirrored here come from cocktailpeanut/fluxgym (app.py ``gen_sh``/``gen_toml``/
``start_training`` and models.yaml at commit 678add2): the Linux script layout (``\\``-continued
lines, absolute double-quoted paths under the FluxGym root, the sample flags glued behind the
optimizer block's backslash, a last line that still ends in `` \\`` without a newline), the
three VRAM presets, the form defaults, the ordering of "advanced" flags (by argparse dest),
and where FluxGym downloads the models (``models/{unet,clip,vae}``).

Numbers are rendered the way they reach FluxGym from the browser: JavaScript has one number
type, so a whole-valued guidance scale of 1.0 arrives (and is written) as ``1``.

The one deliberate difference: ``RunSpec.save_state`` (default True) adds a ``--save_state``
line right after ``--loss_type l2``, because resuming needs kohya's state directories.
With ``save_state=False`` the output is FluxGym's exactly.
"""
from __future__ import annotations

import enum
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from .errors import ConfigError, MissingInputError
from .names import validate_name
from .errors import ScriptParseError
from .trainsh import parse_train_sh

__all__ = [
    "BaseModel",
    "FLUXGYM_MODELS",
    "Vram",
    "RunSpec",
    "RequiredInput",
    "render_train_sh",
    "render_dataset_toml",
    "render_sample_prompts",
    "write_run_files",
    "required_inputs",
    "required_input_details",
    "check_required_inputs",
    "TRAINER_SCRIPT",
]

TRAINER_SCRIPT = "sd-scripts/flux_train_network.py"  # relative to the FluxGym root, as gen_sh writes it
CLIP_L = "models/clip/clip_l.safetensors"
T5XXL = "models/clip/t5xxl_fp16.safetensors"
AE = "models/vae/ae.sft"


@dataclass(frozen=True)
class BaseModel:
    """One entry of FluxGym's models.yaml (the fields fluxgymd needs)."""

    name: str
    repo: str  # Hugging Face repo the unet file is downloaded from
    file: str

    @property
    def unet_path(self) -> str:
        """Relative to the FluxGym root: the two stock models sit directly in models/unet,
        others in models/unet/<repo>/ (FluxGym's download() and gen_sh agree on this)."""
        if self.name in ("flux-dev", "flux-schnell"):
            return f"models/unet/{self.file}"
        return f"models/unet/{self.repo}/{self.file}"


FLUXGYM_MODELS: Mapping[str, BaseModel] = {
    m.name: m
    for m in (
        BaseModel("flux-dev", "cocktailpeanut/xulf-dev", "flux1-dev.sft"),
        BaseModel("flux-schnell", "black-forest-labs/FLUX.1-schnell", "flux1-schnell.safetensors"),
        BaseModel("bdsqlsz/flux1-dev2pro-single", "bdsqlsz/flux1-dev2pro-single", "flux1-dev2pro.safetensors"),
    )
}


class Vram(str, enum.Enum):
    G20 = "20G"
    G16 = "16G"
    G12 = "12G"


# Optimizer block of each preset, one script line each (gen_sh's "Optimizer args").
_ADAFACTOR = (
    "--optimizer_type adafactor",
    '--optimizer_args "relative_step=False" "scale_parameter=False" "warmup_init=False"',
)
_CONSTANT_WARMUP = ("--lr_scheduler constant_with_warmup", "--max_grad_norm 0.0")
_OPTIMIZER_LINES: Mapping[Vram, tuple[str, ...]] = {
    Vram.G20: ("--optimizer_type adamw8bit",),
    Vram.G16: (*_ADAFACTOR, *_CONSTANT_WARMUP),
    Vram.G12: (*_ADAFACTOR, "--split_mode", '--network_args "train_blocks=single"', *_CONSTANT_WARMUP),
}

# Flags gen_sh writes itself; FluxGym's "advanced" form leaves them out, so do we.
_BASIC_DESTS = frozenset(
    """pretrained_model_name_or_path clip_l t5xxl ae cache_latents_to_disk save_model_as sdpa
    persistent_data_loader_workers max_data_loader_n_workers seed gradient_checkpointing mixed_precision
    save_precision network_module network_dim learning_rate cache_text_encoder_outputs
    cache_text_encoder_outputs_to_disk fp8_base highvram max_train_epochs save_every_n_epochs dataset_config
    output_dir output_name timestep_sampling discrete_flow_shift model_prediction_type guidance_scale loss_type
    optimizer_type optimizer_args lr_scheduler sample_prompts sample_every_n_steps max_grad_norm split_mode
    network_args""".split()
)
_TIMESTEP_SAMPLING = frozenset({"sigma", "uniform", "sigmoid", "shift", "flux_shift"})  # kohya's choices
_FLAG_RE = re.compile(r"--[A-Za-z0-9][A-Za-z0-9_-]*")
_NUMBER_RE = re.compile(r"[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?|\.[0-9]+([eE][-+]?[0-9]+)?")

AdvancedValue = Union[str, bool]


def _browser_number(value: float) -> str:
    """A number as FluxGym writes it after the browser's round trip (JS Number -> JSON)."""
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    if isinstance(value, int):
        return str(value)
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _normalise_advanced(flags: object) -> tuple[tuple[str, AdvancedValue], ...]:
    items = list(flags.items()) if isinstance(flags, Mapping) else list(flags)  # type: ignore[arg-type]
    seen: set[str] = set()
    out: list[tuple[str, AdvancedValue]] = []
    for item in items:
        if isinstance(item, str):  # a bare "--flag" in a list means a ticked checkbox
            name, value = item, True
        else:
            name, value = item
        if not isinstance(name, str) or not _FLAG_RE.fullmatch(name):
            raise ConfigError(f"advanced flag {name!r}: expected a long option such as '--noise_offset'")
        dest = name[2:].replace("-", "_")
        if dest in _BASIC_DESTS:
            raise ConfigError(f"advanced flag {name}: FluxGym sets it itself; use the RunSpec field instead")
        if dest in seen:
            raise ConfigError(f"advanced flag {name} given twice")
        seen.add(dest)
        if not isinstance(value, (str, bool)):
            raise ConfigError(f"advanced flag {name}: value must be a string or true/false, got {value!r}")
        if isinstance(value, str):
            if "\n" in value or "\r" in value:
                raise ConfigError(f"advanced flag {name}: value must be one line")
            try:  # FluxGym pastes the value unquoted; it must be plain shell words we can read back
                parse_train_sh(f"x {value}", source=f"advanced flag {name}")
            except ScriptParseError as err:
                raise ConfigError(f"advanced flag {name}: value {value!r} is not plain shell words ({err})") from err
        out.append((name, value))
    # FluxGym lists its advanced components sorted by argparse dest.
    out.sort(key=lambda kv: kv[0][2:].replace("-", "_"))
    return tuple(out)


@dataclass(frozen=True)
class RunSpec:
    """FluxGym's training form, with its defaults. ``name`` is FluxGym's output_name (the
    slugified LoRA name); ``dataset_dir`` None means FluxGym's own ``datasets/NAME``."""

    name: str
    trigger_word: str = ""
    dataset_dir: Path | None = None
    base_model: str = "flux-dev"
    vram: Vram = Vram.G20
    resolution: int = 512
    seed: int = 42
    workers: int = 2
    learning_rate: str = "8e-4"  # a text field in FluxGym: written as typed
    network_dim: int = 4
    max_train_epochs: int = 16
    save_every_n_epochs: int = 4
    timestep_sampling: str = "shift"
    guidance_scale: float = 1.0
    num_repeats: int = 10
    sample_prompts: tuple[str, ...] | None = None  # None: the trigger word, as FluxGym pre-fills it
    sample_every_n_steps: int = 0
    advanced_flags: tuple[tuple[str, AdvancedValue], ...] = field(default=())
    class_tokens: str | None = None  # None: the trigger word (FluxGym uses it for class_tokens)
    save_state: bool = True  # fluxgymd's addition: resume needs kohya's state dirs

    def __post_init__(self) -> None:
        validate_name(self.name)
        try:
            object.__setattr__(self, "vram", Vram(self.vram))
        except ValueError:
            raise ConfigError(f"vram {self.vram!r}: expected one of 20G, 16G, 12G") from None
        if self.base_model not in FLUXGYM_MODELS:
            raise ConfigError(f"base_model {self.base_model!r}: expected one of {', '.join(FLUXGYM_MODELS)}")
        if self.dataset_dir is not None:
            object.__setattr__(self, "dataset_dir", Path(self.dataset_dir))
        for key, minimum in (
            ("resolution", 1), ("seed", 0), ("workers", 0), ("network_dim", 1), ("max_train_epochs", 1),
            ("save_every_n_epochs", 1), ("num_repeats", 1), ("sample_every_n_steps", 0),
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{key} {value!r}: expected a whole number >= {minimum}")
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)):
            raise ConfigError(f"guidance_scale {self.guidance_scale!r}: expected a number")
        lr = self.learning_rate
        if not isinstance(lr, str):
            if isinstance(lr, bool) or not isinstance(lr, (int, float)):
                raise ConfigError(f"learning_rate {lr!r}: expected a number such as 8e-4")
            lr = _browser_number(lr)
            object.__setattr__(self, "learning_rate", lr)
        if not _NUMBER_RE.fullmatch(lr):
            raise ConfigError(f"learning_rate {lr!r}: expected a number such as 8e-4")
        if self.timestep_sampling not in _TIMESTEP_SAMPLING:
            raise ConfigError(
                f"timestep_sampling {self.timestep_sampling!r}: expected one of {', '.join(sorted(_TIMESTEP_SAMPLING))}"
            )
        for key in ("trigger_word", "class_tokens"):
            value = getattr(self, key)
            if value is not None and ("'" in value or "\n" in value or "\r" in value):
                # dataset.toml holds it in a TOML literal string, which cannot carry these
                raise ConfigError(f"{key} {value!r}: must be one line without single quotes")
        if self.sample_prompts is not None:
            prompts = (self.sample_prompts,) if isinstance(self.sample_prompts, str) else tuple(self.sample_prompts)
            object.__setattr__(self, "sample_prompts", prompts)
        object.__setattr__(self, "advanced_flags", _normalise_advanced(self.advanced_flags))

    @property
    def model(self) -> BaseModel:
        return FLUXGYM_MODELS[self.base_model]

    @property
    def effective_class_tokens(self) -> str:
        return self.trigger_word if self.class_tokens is None else self.class_tokens

    @property
    def sample_prompts_text(self) -> str:
        """The text of FluxGym's sample-prompts box: one prompt per line."""
        prompts = (self.trigger_word,) if self.sample_prompts is None else self.sample_prompts
        return "\n".join(prompts)

    @property
    def samples_enabled(self) -> bool:
        return len(self.sample_prompts_text) > 0 and self.sample_every_n_steps > 0


def _root(fluxgym_root: Path) -> str:
    root = os.path.abspath(os.fspath(fluxgym_root))
    bad = [ch for ch in '"$`\\\n\r' if ch in root]
    if bad:
        raise ConfigError(f"FluxGym root {root!r}: holds {bad[0]!r}, which cannot go into a double-quoted train.sh path")
    return root


def _under(root: str, relative: str) -> str:
    return os.path.normpath(os.path.join(root, relative))


def _quoted(root: str, relative: str) -> str:
    return f'"{_under(root, relative)}"'


def render_train_sh(spec: RunSpec, *, fluxgym_root: Path) -> str:
    """train.sh as FluxGym's gen_sh writes it on Linux (plus ``--save_state`` if spec.save_state)."""
    root = _root(fluxgym_root)
    out = f"outputs/{spec.name}"
    optimizer = list(_OPTIMIZER_LINES[spec.vram])
    if spec.samples_enabled:
        # FluxGym glues the sample flags right behind the optimizer block's trailing backslash.
        optimizer[-1] += (
            f' \\--sample_prompts={_quoted(root, out + "/sample_prompts.txt")}'
            f' --sample_every_n_steps="{spec.sample_every_n_steps}"'
        )
    lines = [
        "accelerate launch",
        "--mixed_precision bf16",
        "--num_cpu_threads_per_process 1",
        TRAINER_SCRIPT,
        f"--pretrained_model_name_or_path {_quoted(root, spec.model.unet_path)}",
        f"--clip_l {_quoted(root, CLIP_L)}",
        f"--t5xxl {_quoted(root, T5XXL)}",
        f"--ae {_quoted(root, AE)}",
        "--cache_latents_to_disk",
        "--save_model_as safetensors",
        "--sdpa --persistent_data_loader_workers",
        f"--max_data_loader_n_workers {spec.workers}",
        f"--seed {spec.seed}",
        "--gradient_checkpointing",
        "--mixed_precision bf16",
        "--save_precision bf16",
        "--network_module networks.lora_flux",
        f"--network_dim {spec.network_dim}",
        *optimizer,
        f"--learning_rate {spec.learning_rate}",
        "--cache_text_encoder_outputs",
        "--cache_text_encoder_outputs_to_disk",
        "--fp8_base",
        "--highvram",
        f"--max_train_epochs {spec.max_train_epochs}",
        f"--save_every_n_epochs {spec.save_every_n_epochs}",
        f"--dataset_config {_quoted(root, out + '/dataset.toml')}",
        f"--output_dir {_quoted(root, out)}",
        f"--output_name {spec.name}",
        f"--timestep_sampling {spec.timestep_sampling}",
        "--discrete_flow_shift 3.1582",
        "--model_prediction_type raw",
        f"--guidance_scale {_browser_number(spec.guidance_scale)}",
        "--loss_type l2",
    ]
    advanced = [name if value is True else f"{name} {value}" for name, value in spec.advanced_flags if value not in (False, "")]
    if spec.save_state and "--save_state" not in advanced:
        lines.append("--save_state")
    body = " \\\n".join(lines[:1] + ["  " + line for line in lines[1:]]) + " \\"
    if advanced:  # FluxGym appends them after the dangling backslash; the very last has none
        body += "\n" + " \\\n".join("  " + flag for flag in advanced)
    return body


def _dataset_dir(spec: RunSpec, fluxgym_root: Path | None) -> str:
    if spec.dataset_dir is not None and spec.dataset_dir.is_absolute():
        path = os.path.normpath(os.fspath(spec.dataset_dir))
    elif fluxgym_root is None:
        raise ConfigError(
            f"dataset dir of run {spec.name!r}: a relative or default dataset dir needs the FluxGym root to resolve against"
        )
    else:
        relative = f"datasets/{spec.name}" if spec.dataset_dir is None else os.fspath(spec.dataset_dir)
        path = _under(os.path.abspath(os.fspath(fluxgym_root)), relative)
    if "'" in path or "\n" in path or "\r" in path:
        raise ConfigError(f"dataset dir {path!r}: a path with a single quote or newline cannot go into dataset.toml")
    return path


def render_dataset_toml(spec: RunSpec, *, fluxgym_root: Path | None = None) -> str:
    """dataset.toml as FluxGym's gen_toml writes it. FLUXGYM_ROOT resolves a relative or
    default (``datasets/NAME``) dataset dir, as FluxGym resolves against its own folder."""
    return (
        "[general]\n"
        "shuffle_caption = false\n"
        "caption_extension = '.txt'\n"
        "keep_tokens = 1\n"
        "\n"
        "[[datasets]]\n"
        f"resolution = {spec.resolution}\n"
        "batch_size = 1\n"
        "keep_tokens = 1\n"
        "\n"
        "  [[datasets.subsets]]\n"
        f"  image_dir = '{_dataset_dir(spec, fluxgym_root)}'\n"
        f"  class_tokens = '{spec.effective_class_tokens}'\n"
        f"  num_repeats = {spec.num_repeats}"
    )


def render_sample_prompts(spec: RunSpec) -> str:
    """sample_prompts.txt: FluxGym writes its prompt box verbatim (no final newline)."""
    return spec.sample_prompts_text


def _write_new(path: Path, text: str) -> None:
    """Write PATH atomically and refuse to replace an existing file, even one that appears
    while we write: the content goes to a temp file and is hard-linked into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ConfigError(f"{path}: already exists; not overwriting it") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_run_files(spec: RunSpec, out_dir: Path, *, fluxgym_root: Path) -> list[Path]:
    """Write train.sh, dataset.toml and sample_prompts.txt into OUT_DIR (created if needed).
    Refuses, before writing anything, if any of them exists."""
    out_dir = Path(out_dir)
    contents = {
        "train.sh": render_train_sh(spec, fluxgym_root=fluxgym_root),
        "dataset.toml": render_dataset_toml(spec, fluxgym_root=fluxgym_root),
        "sample_prompts.txt": render_sample_prompts(spec),
    }
    paths = [out_dir / name for name in contents]
    for path in paths:
        if os.path.lexists(path):
            raise ConfigError(f"{path}: already exists; not overwriting it")
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, text in zip(paths, contents.values()):
        _write_new(path, text)
    return paths


@dataclass(frozen=True)
class RequiredInput:
    path: Path
    what: str
    how_to_get: str


def required_input_details(spec: RunSpec, fluxgym_root: Path) -> list[RequiredInput]:
    """Everything the generated train.sh reads, with a hint for getting each (FluxGym's download())."""
    root = os.path.abspath(os.fspath(fluxgym_root))
    model = spec.model
    hf = "https://huggingface.co"
    return [
        RequiredInput(Path(_dataset_dir(spec, fluxgym_root)), "dataset folder",
                      "put the training images there, each with a same-named .txt caption"),
        RequiredInput(Path(_under(root, model.unet_path)), f"base model {model.name}",
                      f"download {model.file} from {hf}/{model.repo} into {_under(root, os.path.dirname(model.unet_path))}"),
        RequiredInput(Path(_under(root, CLIP_L)), "CLIP-L text encoder",
                      f"download clip_l.safetensors from {hf}/comfyanonymous/flux_text_encoders into {_under(root, 'models/clip')}"),
        RequiredInput(Path(_under(root, T5XXL)), "T5-XXL text encoder",
                      f"download t5xxl_fp16.safetensors from {hf}/comfyanonymous/flux_text_encoders into {_under(root, 'models/clip')}"),
        RequiredInput(Path(_under(root, AE)), "VAE",
                      f"download ae.sft from {hf}/cocktailpeanut/xulf-dev into {_under(root, 'models/vae')}"),
        RequiredInput(Path(_under(root, TRAINER_SCRIPT)), "kohya-ss sd-scripts",
                      "run scripts/install-sd-scripts"),
    ]


def required_inputs(spec: RunSpec, fluxgym_root: Path) -> list[Path]:
    """Paths the generated run needs: dataset dir, unet/clip/t5/vae files, the trainer script."""
    return [item.path for item in required_input_details(spec, fluxgym_root)]


def check_required_inputs(spec: RunSpec, fluxgym_root: Path) -> None:
    """Raise MissingInputError (exit 66) for the first missing input, naming it and how to get it."""
    for item in required_input_details(spec, fluxgym_root):
        present = item.path.is_dir() if item.what == "dataset folder" else item.path.is_file()
        if not present:
            raise MissingInputError(f"{item.path}: {item.what} is missing; {item.how_to_get}")
