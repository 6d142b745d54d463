"""fluxgymd.fluxgym_gen reproduces FluxGym's files byte for byte (fixtures made by FluxGym itself)."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from fluxgymd.errors import ConfigError, ExitCode, MissingInputError
from fluxgymd.fluxgym_gen import (
    FLUXGYM_MODELS,
    RunSpec,
    Vram,
    check_required_inputs,
    render_dataset_toml,
    render_sample_prompts,
    render_train_sh,
    required_input_details,
    required_inputs,
    write_run_files,
)
from fluxgymd.trainsh import get_flag, has_flag, parse_train_sh

FIXTURES = Path(__file__).parent / "fixtures" / "fluxgym"
CASES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
ROOT = Path("/srv/fluxgym")


def spec_for(case: str, **changes: object) -> RunSpec:
    inputs = json.loads((FIXTURES / case / "inputs.json").read_text(encoding="utf-8"))
    assert inputs["fluxgym_root"] == str(ROOT)
    spec = RunSpec(
        name=inputs["output_name"],
        trigger_word=inputs["class_tokens"],
        base_model=inputs["base_model"],
        vram=inputs["vram"],
        resolution=inputs["resolution"],
        seed=inputs["seed"],
        workers=inputs["workers"],
        learning_rate=inputs["learning_rate"],
        network_dim=inputs["network_dim"],
        max_train_epochs=inputs["max_train_epochs"],
        save_every_n_epochs=inputs["save_every_n_epochs"],
        timestep_sampling=inputs["timestep_sampling"],
        guidance_scale=float(inputs["guidance_scale"]),
        num_repeats=inputs["num_repeats"],
        sample_prompts=tuple(inputs["sample_prompts"].split("\n")),
        sample_every_n_steps=inputs["sample_every_n_steps"],
        advanced_flags=inputs["advanced"],
        save_state=False,
    )
    return dataclasses.replace(spec, **changes) if changes else spec


def fixture_text(case: str, name: str) -> str:
    return (FIXTURES / case / name).read_bytes().decode("utf-8")


@pytest.mark.parametrize("case", CASES)
def test_train_sh_byte_for_byte(case: str) -> None:
    assert render_train_sh(spec_for(case), fluxgym_root=ROOT).encode() == (FIXTURES / case / "train.sh").read_bytes()


@pytest.mark.parametrize("case", CASES)
def test_dataset_toml_byte_for_byte(case: str) -> None:
    assert render_dataset_toml(spec_for(case), fluxgym_root=ROOT).encode() == (FIXTURES / case / "dataset.toml").read_bytes()


@pytest.mark.parametrize("case", CASES)
def test_sample_prompts_byte_for_byte(case: str) -> None:
    assert render_sample_prompts(spec_for(case)).encode() == (FIXTURES / case / "sample_prompts.txt").read_bytes()


@pytest.mark.parametrize("case", CASES)
def test_save_state_adds_exactly_one_line(case: str) -> None:
    plain = fixture_text(case, "train.sh").split("\n")
    ours = render_train_sh(spec_for(case, save_state=True), fluxgym_root=ROOT).split("\n")
    at = plain.index("  --loss_type l2 \\")
    assert ours == plain[: at + 1] + ["  --save_state \\"] + plain[at + 1 :]


@pytest.mark.parametrize("case", CASES)
def test_generated_script_parses_to_fixture_argv_plus_save_state(case: str) -> None:
    expected = json.loads(fixture_text(case, "argv.json"))
    argv = parse_train_sh(render_train_sh(spec_for(case, save_state=True), fluxgym_root=ROOT))
    at = expected.index("l2", expected.index("--loss_type")) + 1
    assert argv == expected[:at] + ["--save_state"] + expected[at:]
    assert has_flag(argv, "--save_state")
    assert get_flag(argv, "--output_dir") == "/srv/fluxgym/outputs/fluffycat"
    assert get_flag(argv, "--output_name") == "fluffycat"
    assert get_flag(argv, "--dataset_config") == "/srv/fluxgym/outputs/fluffycat/dataset.toml"
    assert get_flag(argv, "--max_train_epochs") == "16"
    assert get_flag(argv, "--save_every_n_epochs") == "4"


def test_defaults_are_fluxgyms_form() -> None:
    spec = RunSpec("mylora", trigger_word="fluffycat")
    assert (spec.base_model, spec.vram, spec.num_repeats, spec.max_train_epochs) == ("flux-dev", Vram.G20, 10, 16)
    assert (spec.learning_rate, spec.network_dim, spec.resolution, spec.seed, spec.workers) == ("8e-4", 4, 512, 42, 2)
    assert (spec.save_every_n_epochs, spec.timestep_sampling, spec.guidance_scale) == (4, "shift", 1.0)
    assert spec.sample_every_n_steps == 0 and spec.save_state is True
    assert render_sample_prompts(spec) == "fluffycat"  # FluxGym pre-fills the box with the trigger
    assert "--sample_prompts" not in render_train_sh(spec, fluxgym_root=ROOT)  # 0 steps: no sampling
    # a default spec with save_state off is the 20g fixture, renamed
    plain = dataclasses.replace(spec, name="fluffycat", save_state=False)
    assert render_train_sh(plain, fluxgym_root=ROOT) == fixture_text("20g", "train.sh")


def test_numbers_as_the_browser_sends_them() -> None:
    text = render_train_sh(RunSpec("a", guidance_scale=3.5, learning_rate=0.0001), fluxgym_root=ROOT)
    argv = parse_train_sh(text)
    assert get_flag(argv, "--guidance_scale") == "3.5"
    assert get_flag(argv, "--learning_rate") == "0.0001"
    assert get_flag(parse_train_sh(render_train_sh(RunSpec("a", guidance_scale=2), fluxgym_root=ROOT)), "--guidance_scale") == "2"


def test_models_and_unet_layout() -> None:
    assert set(FLUXGYM_MODELS) == {"flux-dev", "flux-schnell", "bdsqlsz/flux1-dev2pro-single"}
    for name, expected in (
        ("flux-dev", "/srv/fluxgym/models/unet/flux1-dev.sft"),
        ("flux-schnell", "/srv/fluxgym/models/unet/flux1-schnell.safetensors"),
        ("bdsqlsz/flux1-dev2pro-single", "/srv/fluxgym/models/unet/bdsqlsz/flux1-dev2pro-single/flux1-dev2pro.safetensors"),
    ):
        argv = parse_train_sh(render_train_sh(RunSpec("a", base_model=name), fluxgym_root=ROOT))
        assert get_flag(argv, "--pretrained_model_name_or_path") == expected


def test_custom_dataset_dir_and_root_with_space(tmp_path: Path) -> None:
    root = tmp_path / "flux gym"
    spec = RunSpec("cat", trigger_word="c4t", dataset_dir=Path("/data/photos/cat"), class_tokens="a c4t cat")
    toml = render_dataset_toml(spec)
    assert "  image_dir = '/data/photos/cat'\n  class_tokens = 'a c4t cat'\n" in toml
    argv = parse_train_sh(render_train_sh(spec, fluxgym_root=root))
    assert get_flag(argv, "--output_dir") == str(root / "outputs" / "cat")
    relative = RunSpec("cat", dataset_dir=Path("datasets/../mine"))
    assert f"image_dir = '{root / 'mine'}'" in render_dataset_toml(relative, fluxgym_root=root)
    with pytest.raises(ConfigError, match="FluxGym root"):
        render_dataset_toml(RunSpec("cat"))


def test_advanced_flags_sorted_and_filtered() -> None:
    spec = RunSpec(
        "a",
        advanced_flags={"--noise_offset": "0.1", "--enable_bucket": True, "--cache_info": False, "--min_snr_gamma": ""},
        save_state=False,
    )
    text = render_train_sh(spec, fluxgym_root=ROOT)
    assert text.endswith("  --loss_type l2 \\\n  --enable_bucket \\\n  --noise_offset 0.1")
    both = render_train_sh(dataclasses.replace(spec, advanced_flags=[("--save_state", True)], save_state=True), fluxgym_root=ROOT)
    assert parse_train_sh(both).count("--save_state") == 1


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"vram": "8G"}, "vram"),
        ({"name": "bad name"}, "invalid run name"),
        ({"base_model": "sdxl"}, "base_model"),
        ({"trigger_word": "it's"}, "trigger_word"),
        ({"timestep_sampling": "flux_shfit"}, "timestep_sampling"),
        ({"learning_rate": "8e-4; rm -rf /"}, "learning_rate"),
        ({"max_train_epochs": 0}, "max_train_epochs"),
        ({"seed": True}, "seed"),
        ({"advanced_flags": {"--seed": "1"}}, "FluxGym sets it itself"),
        ({"advanced_flags": {"--noise_offset": "$(reboot)"}}, "not plain shell words"),
        ({"advanced_flags": {"noise_offset": "1"}}, "long option"),
    ],
)
def test_invalid_specs(changes: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("$", r"\$")) as info:
        RunSpec(**{"name": "ok", **changes})  # type: ignore[arg-type]
    assert info.value.exit_code == ExitCode.BAD_CONFIG
    assert "\n" not in str(info.value)


def test_root_that_would_break_the_script_is_refused() -> None:
    with pytest.raises(ConfigError, match="double-quoted"):
        render_train_sh(RunSpec("a"), fluxgym_root=Path('/srv/"weird"'))


def test_write_run_files(tmp_path: Path) -> None:
    spec = spec_for("16g-samples")
    out = tmp_path / "outputs" / "fluffycat"
    paths = write_run_files(spec, out, fluxgym_root=ROOT)
    assert [p.name for p in paths] == ["train.sh", "dataset.toml", "sample_prompts.txt"]
    for path in paths:
        assert path.read_bytes() == (FIXTURES / "16g-samples" / path.name).read_bytes()
    assert sorted(os.listdir(out)) == ["dataset.toml", "sample_prompts.txt", "train.sh"]  # no temp files left
    (out / "train.sh").write_text("mine")
    with pytest.raises(ConfigError, match="train.sh: already exists"):
        write_run_files(spec, out, fluxgym_root=ROOT)
    assert (out / "train.sh").read_text() == "mine"


def test_write_run_files_writes_nothing_if_any_exists(tmp_path: Path) -> None:
    (tmp_path / "sample_prompts.txt").write_text("keep")
    with pytest.raises(ConfigError, match="sample_prompts.txt: already exists"):
        write_run_files(RunSpec("a"), tmp_path, fluxgym_root=ROOT)
    assert sorted(os.listdir(tmp_path)) == ["sample_prompts.txt"]
    assert (tmp_path / "sample_prompts.txt").read_text() == "keep"


def test_required_inputs(tmp_path: Path) -> None:
    spec = RunSpec("cat", base_model="bdsqlsz/flux1-dev2pro-single")
    paths = required_inputs(spec, tmp_path)
    assert paths == [
        tmp_path / "datasets/cat",
        tmp_path / "models/unet/bdsqlsz/flux1-dev2pro-single/flux1-dev2pro.safetensors",
        tmp_path / "models/clip/clip_l.safetensors",
        tmp_path / "models/clip/t5xxl_fp16.safetensors",
        tmp_path / "models/vae/ae.sft",
        tmp_path / "sd-scripts/flux_train_network.py",
    ]
    # every path the generated script reads is in the list
    argv = parse_train_sh(render_train_sh(spec, fluxgym_root=tmp_path))
    for flag in ("--pretrained_model_name_or_path", "--clip_l", "--t5xxl", "--ae"):
        assert Path(get_flag(argv, flag) or "") in paths
    assert tmp_path / argv[argv.index("sd-scripts/flux_train_network.py")] in paths

    with pytest.raises(MissingInputError, match=r"datasets/cat: dataset folder is missing") as info:
        check_required_inputs(spec, tmp_path)
    assert info.value.exit_code == ExitCode.MISSING_INPUT
    (tmp_path / "datasets/cat").mkdir(parents=True)
    with pytest.raises(MissingInputError, match="huggingface.co/bdsqlsz/flux1-dev2pro-single"):
        check_required_inputs(spec, tmp_path)
    for item in required_input_details(spec, tmp_path)[1:]:
        item.path.parent.mkdir(parents=True, exist_ok=True)
        item.path.write_bytes(b"")
        if item.path.name == "flux_train_network.py":
            break
    check_required_inputs(spec, tmp_path)  # all present: no error
