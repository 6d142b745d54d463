"""Missing-input checks before a launch (exit 66, no restart: retrying cannot help)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import MissingInputError
from .trainsh import get_flag

# kohya/FluxGym flags naming model files
_MODEL_FLAGS = ("pretrained_model_name_or_path", "clip_l", "t5xxl", "ae")


def _resolve(p: str, workdir: Path) -> Path:
    path = Path(p)
    return path if path.is_absolute() else workdir / path


def check_inputs(argv: list[str], workdir: Path, path_env: str, source: str) -> None:
    if not workdir.is_dir():
        raise MissingInputError(f"{source}: trainer workdir {workdir} does not exist")
    exe = argv[0]
    if "/" in exe:
        if not os.access(_resolve(exe, workdir), os.X_OK):
            raise MissingInputError(f"{source}: trainer program {exe} not found or not executable")
    elif shutil.which(exe, path=path_env) is None:
        raise MissingInputError(
            f"{source}: {exe!r} not found on PATH ({path_env}); install sd-scripts' requirements "
            "or give an absolute path in train.command"
        )
    for word in argv[1:]:
        if word.endswith(".py") and not word.startswith("-"):
            script = _resolve(word, workdir)
            if not script.is_file():
                hint = " (install it with scripts/install-sd-scripts)" if "sd-scripts" in word else ""
                raise MissingInputError(f"{source}: trainer script {script} not found{hint}")
            break
    for flag in _MODEL_FLAGS:
        value = get_flag(argv, flag)
        if value and ("/" in value or value.endswith((".safetensors", ".sft"))):
            if not _resolve(value, workdir).exists():
                raise MissingInputError(
                    f"{source}: model file --{flag} {_resolve(value, workdir)} not found "
                    "(download it as FluxGym does into models/)"
                )
    ds = get_flag(argv, "dataset_config")
    if ds:
        ds_path = _resolve(ds, workdir)
        if not ds_path.is_file():
            raise MissingInputError(f"{source}: dataset config {ds_path} not found")
        try:
            doc = tomllib.loads(ds_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise MissingInputError(f"{ds_path}: unreadable dataset config: {e}") from e
        for d in doc.get("datasets", []) or []:
            for sub in d.get("subsets", []) or []:
                img = sub.get("image_dir") if isinstance(sub, dict) else None
                if isinstance(img, str) and not _resolve(img, workdir).is_dir():
                    raise MissingInputError(f"{ds_path}: dataset image_dir {_resolve(img, workdir)} not found")
