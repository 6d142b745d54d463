"""fluxgymd.trainsh against real FluxGym scripts and against bash itself."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluxgymd.errors import ConfigError, ExitCode, ScriptParseError
from fluxgymd.trainsh import (
    get_flag,
    has_flag,
    load_train_sh,
    parse_train_sh,
    render_train_sh,
    trainer_args_start,
    with_flag,
    without_flag,
)

FIXTURES = Path(__file__).parent / "fixtures" / "fluxgym"
CASES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
BASH = shutil.which("bash")


def expected_argv(case: str) -> list[str]:
    return json.loads((FIXTURES / case / "argv.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with an `accelerate` that prints the argv bash gave it, as JSON."""
    d = tmp_path_factory.mktemp("fakebin")
    fake = d / "accelerate"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(['accelerate', *sys.argv[1:]]))\n")
    fake.chmod(0o755)
    return d


def bash_argv(script: str, fake_bin: Path, tmp_path: Path) -> list[str]:
    path = tmp_path / "bash-oracle.sh"
    path.write_bytes(script.encode("utf-8"))
    result = subprocess.run(
        [BASH or "bash", str(path)], capture_output=True, check=True, env={"PATH": f"{fake_bin}:/usr/bin:/bin"}
    )
    return json.loads(result.stdout)


def test_fixtures_present() -> None:
    assert {"20g", "16g", "12g", "20g-samples", "16g-samples", "12g-samples", "20g-samples-advanced"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_fixture_parses_to_bash_argv(case: str) -> None:
    path = FIXTURES / case / "train.sh"
    before = path.read_bytes()
    stat_before = path.stat()
    argv = load_train_sh(path)
    assert argv == expected_argv(case)
    assert path.read_bytes() == before  # never modified
    stat_after = path.stat()
    assert (stat_after.st_mtime_ns, stat_after.st_size, stat_after.st_mode) == (
        stat_before.st_mtime_ns,
        stat_before.st_size,
        stat_before.st_mode,
    )


@pytest.mark.parametrize("case", CASES)
def test_fixture_shape(case: str) -> None:
    argv = expected_argv(case)
    assert argv[:2] == ["accelerate", "launch"]
    assert argv[argv.index("sd-scripts/flux_train_network.py") - 2 :][:3] == [
        "--num_cpu_threads_per_process",
        "1",
        "sd-scripts/flux_train_network.py",
    ]
    text = (FIXTURES / case / "train.sh").read_text(encoding="utf-8")
    if "samples" in case:  # the glued form this parser must understand
        assert ' \\--sample_prompts="/srv/fluxgym/outputs/fluffycat/sample_prompts.txt"' in text
        assert "--sample_prompts=/srv/fluxgym/outputs/fluffycat/sample_prompts.txt" in argv
    if "advanced" not in case:
        assert text.endswith("--loss_type l2 \\")  # dangling backslash, no newline


def test_sample_flags_exact() -> None:
    argv = expected_argv("16g-samples")
    i = argv.index("--max_grad_norm")
    assert argv[i : i + 5] == [
        "--max_grad_norm",
        "0.0",
        "--sample_prompts=/srv/fluxgym/outputs/fluffycat/sample_prompts.txt",
        "--sample_every_n_steps=100",
        "--learning_rate",
    ]
    assert get_flag(argv, "--sample_every_n_steps") == "100"
    assert get_flag(argv, "sample_prompts") == "/srv/fluxgym/outputs/fluffycat/sample_prompts.txt"


def test_twelve_gig_optimizer_args() -> None:
    argv = expected_argv("12g")
    i = argv.index("--optimizer_args")
    assert argv[i : i + 4] == ["--optimizer_args", "relative_step=False", "scale_parameter=False", "warmup_init=False"]
    assert "--split_mode" in argv
    assert get_flag(argv, "--network_args") == "train_blocks=single"


@pytest.mark.skipif(BASH is None, reason="bash not installed")
@pytest.mark.parametrize("case", CASES)
def test_fixture_argv_still_matches_live_bash(case: str, fake_bin: Path, tmp_path: Path) -> None:
    text = (FIXTURES / case / "train.sh").read_text(encoding="utf-8")
    assert parse_train_sh(text) == bash_argv(text, fake_bin, tmp_path)


ACCEPTED = [
    # hand edits people make to a FluxGym script; bash is the oracle
    '#!/usr/bin/env bash\n# my run\naccelerate launch \\\n  --a "x y" \\\n  # not reached\n',
    "accelerate launch --x 'single quoted $HOME' --y \"dq \\\"inner\\\" \\\\ \\$ \\` end\" \\\n",
    'accelerate launch --a="p q"\'r s\' --b=\\"lit\\" c\\ d e#f\n\n\n',
    "\n\n  accelerate   launch\t--tab\t'x'\\\n'y'\n",
    'accelerate launch "" \'\' --empty="" "multi\nline" \\\n  --after 1',
    "accelerate launch --unicode \"ünïcødé ✓\" --glob '*.png' \"[x]\" --brace '{a,b}' \\~ok a~b --x=~/a b:~/c '~'",
    'accelerate "dq backslash \\n stays" ends \\',
]


@pytest.mark.skipif(BASH is None, reason="bash not installed")
@pytest.mark.parametrize("script", ACCEPTED)
def test_accepted_scripts_match_bash(script: str, fake_bin: Path, tmp_path: Path) -> None:
    assert parse_train_sh(script) == bash_argv(script, fake_bin, tmp_path)


REFUSED = [
    # (script, line, words that must appear in the message)
    ("accelerate launch --x $HOME\n", 1, "$HOME"),
    ("accelerate launch \\\n  --x ${OUT}/a\n", 2, "${...}"),
    ('accelerate launch \\\n  --x "$(pwd)"\n', 2, "$(...)"),
    ("accelerate launch --x `pwd`\n", 1, "backtick"),
    ("accelerate launch --x 1 | tee log\n", 1, "pipe"),
    ("cd /srv/fluxgym && accelerate launch x\n", 1, "&&"),
    ("accelerate launch x || true\n", 1, "||"),
    ("accelerate launch x; echo done\n", 1, ";"),
    ("accelerate launch x > log 2>&1\n", 1, "redirection"),
    ("cat <<EOF\nhello\nEOF\n", 1, "<<"),
    ("accelerate launch x &\n", 1, "background"),
    ("accelerate launch \\\n  --a 1\necho second\n", 3, "second command"),
    ("FOO=1 accelerate launch x\n", 1, "environment assignment"),
    ("#!/bin/bash\n\nexport FOO=1\n", 3, "export"),
    ("set -e\n", 1, "'set'"),
    ("accelerate launch --x *.png\n", 1, "glob"),
    ("accelerate launch --x {a,b}\n", 1, "brace"),
    ("accelerate launch ~/x\n", 1, "tilde"),
    ("accelerate launch \\\n  x=~/y\n", 2, "tilde"),
    ("accelerate launch PATH=a:~/y\n", 1, "tilde"),
    ("accelerate launch (x)\n", 1, "subshell"),
    ("accelerate launch \\\n  --x 'unterminated\n", 2, "unterminated single quote"),
    ('accelerate launch \\\n\\\n  --x "unterminated\n', 3, "unterminated double quote"),
    ("accelerate launch \\\r\n  --x 1\r\n", 1, "carriage return"),
    ("accelerate launch ^\n  --mixed_precision bf16 ^\n  sd-scripts/flux_train_network.py ^\n", 1, ".bat"),
    ("@echo off\r\naccelerate launch --x 1\r\n", 1, ".bat"),
    ("accelerate launch --x $'a\\nb'\n", 1, "ANSI-C"),
]


@pytest.mark.parametrize(("script", "line", "needle"), REFUSED)
def test_refused_constructs(script: str, line: int, needle: str) -> None:
    with pytest.raises(ScriptParseError) as info:
        parse_train_sh(script, source="outputs/x/train.sh")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"outputs/x/train.sh:{line}:"), message
    assert needle in message, message
    assert info.value.exit_code == ExitCode.BAD_CONFIG


@pytest.mark.parametrize("script", ["", "\n\n# only a comment\n", "#!/bin/bash\n"])
def test_empty_script_refused(script: str) -> None:
    with pytest.raises(ScriptParseError, match="no command"):
        parse_train_sh(script)


def test_refusal_suggests_command_in_run_toml() -> None:
    with pytest.raises(ScriptParseError, match=r"command = \[\.\.\.\].*run\.toml"):
        parse_train_sh("accelerate launch $X")


def test_load_refuses_bat_suffix(tmp_path: Path) -> None:
    bat = tmp_path / "train.bat"
    bat.write_text("accelerate launch --x 1\n")
    with pytest.raises(ScriptParseError, match=r"train\.bat: Windows batch"):
        load_train_sh(bat)


def test_load_refuses_non_utf8_with_line(tmp_path: Path) -> None:
    path = tmp_path / "train.sh"
    data = b"accelerate launch \\\n  --x caf\xe9\n"
    path.write_bytes(data)
    with pytest.raises(ScriptParseError, match=r"train\.sh:2: not valid UTF-8"):
        load_train_sh(path)
    assert path.read_bytes() == data


def test_load_refuses_bom(tmp_path: Path) -> None:
    path = tmp_path / "train.sh"
    path.write_bytes(b"\xef\xbb\xbfaccelerate launch\n")
    with pytest.raises(ScriptParseError, match="byte-order mark"):
        load_train_sh(path)


def test_load_missing_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read train script"):
        load_train_sh(tmp_path / "nope.sh")


def test_render_layout() -> None:
    argv = expected_argv("16g-samples")
    text = render_train_sh(argv)
    lines = text.split("\n")
    assert lines[0] == "accelerate launch \\"
    assert lines[1] == "  --mixed_precision bf16 \\"
    assert "  sd-scripts/flux_train_network.py \\" in lines
    assert '  --optimizer_args relative_step=False scale_parameter=False warmup_init=False \\' in lines
    assert lines[-2] == "  --loss_type l2" and lines[-1] == ""
    assert parse_train_sh(text) == argv


def test_render_quotes_where_needed() -> None:
    argv = ["accelerate", "launch", "x.py", "--a", "with space", "--p=/a b/c", "--e", "", "--d", 'q"$`\\']
    text = render_train_sh(argv)
    assert '"with space"' in text
    assert '--p="/a b/c"' in text
    assert '--e ""' in text
    assert parse_train_sh(text) == argv


def test_render_refuses_unrepresentable() -> None:
    with pytest.raises(ValueError):
        render_train_sh([])
    with pytest.raises(ValueError):
        render_train_sh(["a", "b\x00c"])
    with pytest.raises(ValueError):
        render_train_sh(["cd", "/tmp"])


_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24)
_FLAGISH = st.builds(lambda n, v: f"--{n}={v}", st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True), _TEXT)
_PATHISH = st.lists(_TEXT.filter(lambda s: "/" not in s), min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))
_WORD = st.one_of(_TEXT, _FLAGISH, _PATHISH, st.sampled_from(["--x", "-1", "#c", "~", "a=b", "'", '"', "\\", "\n", " "]))
_ARGV = st.tuples(
    st.one_of(st.sampled_from(["accelerate", "python3", "/opt/venv/bin/accelerate"]), _TEXT), st.lists(_WORD, max_size=12)
).map(lambda t: [t[0], *t[1]])


@settings(max_examples=400, deadline=None)
@given(_ARGV)
def test_parse_render_roundtrip(argv: list[str]) -> None:
    from fluxgymd.trainsh import _SHELL_WORDS  # noqa: PLC0415 - test-only peek at the refused set

    if argv[0] in _SHELL_WORDS:
        with pytest.raises(ValueError):
            render_train_sh(argv)
        return
    assert parse_train_sh(render_train_sh(argv)) == argv


@pytest.mark.skipif(BASH is None, reason="bash not installed")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_WORD, max_size=8))
def test_rendered_scripts_mean_the_same_to_bash(fake_bin: Path, tmp_path: Path, args: list[str]) -> None:
    argv = ["accelerate", *args]
    assert bash_argv(render_train_sh(argv), fake_bin, tmp_path) == argv


# ------------------------------------------------------------------ argv helpers

LAUNCH = ["accelerate", "launch", "--mixed_precision", "bf16", "sd-scripts/flux_train_network.py"]


def test_trainer_args_start() -> None:
    assert trainer_args_start(LAUNCH + ["--x"]) == 5
    assert trainer_args_start(["python", "-m", "fluxgymd.standin", "--x", "1"]) == 3
    assert trainer_args_start(["trainer", "--x", "1"]) == 0


def test_get_flag_forms() -> None:
    argv = LAUNCH + ["--output_dir", "/o", "--output_name=n", "--save_state", "--seed", "1", "--seed=7"]
    assert get_flag(argv, "--output_dir") == "/o"
    assert get_flag(argv, "output_name") == "n"
    assert get_flag(argv, "--seed") == "7"  # last wins, like argparse
    assert get_flag(argv, "--save_state") is None
    assert get_flag(argv, "--missing") is None
    assert get_flag(argv, "--output") is None  # no prefix matching
    assert get_flag(argv, "--mixed_precision") is None  # launcher flags are not the trainer's
    assert has_flag(argv, "--save_state") and has_flag(argv, "output_name")
    assert not has_flag(argv, "--mixed_precision") and not has_flag(argv, "--output")


def test_without_flag() -> None:
    argv = LAUNCH + ["--resume", "/a", "--x", "--resume=/b", "--resume", "--y", "1", "--resume"]
    assert without_flag(argv, "--resume") == LAUNCH + ["--x", "--y", "1"]
    assert without_flag(LAUNCH + ["--save_state", "pos"], "save_state", takes_value=False) == LAUNCH + ["pos"]
    assert without_flag(LAUNCH + ["--mixed_precision", "fp16"], "--mixed_precision") == LAUNCH


def test_with_flag() -> None:
    base = LAUNCH + ["--output_dir", "/o"]
    assert with_flag(base, "--resume", "/s") == base + ["--resume", "/s"]
    assert with_flag(base + ["--resume=/old", "--z", "--resume", "/old2"], "--resume", "/s") == base + ["--resume=/s", "--z"]
    assert with_flag(base + ["--resume", "/old", "--z"], "resume", "/s") == base + ["--resume", "/s", "--z"]
    assert with_flag(base, "--save_state", None) == base + ["--save_state"]
    assert with_flag(base + ["--save_state"], "--save_state", None) == base + ["--save_state"]
    assert with_flag(base, "--initial_step", "-1") == base + ["--initial_step=-1"]
    assert with_flag(base, "--mixed_precision", "fp16") == base + ["--mixed_precision", "fp16"]
    original = list(base)
    with_flag(base, "--output_dir", "/new")
    assert base == original  # helpers never mutate their input


def test_helpers_on_real_fixture() -> None:
    argv = load_train_sh(FIXTURES / "20g" / "train.sh")
    assert get_flag(argv, "--output_dir") == "/srv/fluxgym/outputs/fluffycat"
    assert get_flag(argv, "--output_name") == "fluffycat"
    assert get_flag(argv, "--max_train_epochs") == "16"
    assert get_flag(argv, "--mixed_precision") == "bf16"
    resumed = with_flag(argv, "--resume", "/srv/fluxgym/outputs/fluffycat/fluffycat-000004-state")
    assert resumed[:-2] == argv and resumed[-2] == "--resume"
    assert without_flag(resumed, "--resume") == argv
    assert os.fspath(FIXTURES)  # fixtures are read-only inputs here
