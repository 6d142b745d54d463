"""Take a FluxGym ``train.sh`` apart into an argv without running a shell, and put one back.

FluxGym writes one ``accelerate launch`` command spread over ``\\``-continued lines, with
double-quoted absolute paths and, when sample prompts are on, the sample flags glued to
the previous line's backslash (``... adamw8bit \\--sample_prompts="/p" --sample_every_n_steps="100" \\``)
and a final line that still ends in `` \\`` with no newline. This module understands
exactly the subset of POSIX shell word syntax needed for that (and for hand edits of it):
words, blanks, ``\\``-newline continuations, backslash escapes, single and double quotes,
comments, a shebang. Everything whose meaning depends on a running shell (expansions,
globs, pipes, lists, redirections, several commands, shell builtins, env assignments)
is refused with a ScriptParseError naming the file, the line and the construct.

Decision on ``FOO=1 accelerate launch ...``: refused. Environment belongs in run.toml's
``[train] env``, where it is visible and typed; a parser that silently returned it
alongside the argv would be a second, hidden place for configuration.

The argv helpers at the bottom only look at the trainer's own arguments (after the
training script), so ``accelerate launch --mixed_precision bf16`` is never touched when the
wrapper edits ``--mixed_precision``/``--resume`` of the trainer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, ScriptParseError

__all__ = [
    "parse_train_sh",
    "render_train_sh",
    "load_train_sh",
    "trainer_args_start",
    "get_flag",
    "has_flag",
    "without_flag",
    "with_flag",
]

_ADVICE = "write the argv as command = [...] under [train] in run.toml instead"

# First words that make the line mean something other than "run this program".
_SHELL_WORDS = frozenset(
    """! [[ { } if then else elif fi for while until do done case esac select function time coproc
    cd export exec source . eval set unset alias trap exit return shift read local declare
    typeset readonly ulimit umask pushd popd wait builtin command let shopt""".split()
)
_ASSIGNMENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\+?=")
_OPERATORS = {
    "&&": "an and-list (&&)",
    "||": "an or-list (||)",
    "<<": "a heredoc or redirection (<<)",
    ">>": "a redirection (>>)",
    "|": "a pipe (|)",
    "&": "a background job (&)",
    ";": "a command separator (;)",
    "<": "a redirection (<)",
    ">": "a redirection (>)",
    "(": "a subshell or function definition (()",
    ")": "a subshell or function definition ())",
}
_GLOBS = {"*": "a glob (*)", "?": "a glob (?)", "[": "a glob ([)", "{": "brace expansion ({)", "}": "brace expansion (})"}


def _refuse(source: str, line: int, what: str) -> ScriptParseError:
    return ScriptParseError(f"{source}:{line}: {what} cannot be taken apart without a shell; {_ADVICE}")


@dataclass
class _Word:
    line: int
    start: int  # offset of the word's first source character, for the assignment check
    chars: list[str] = field(default_factory=list)


@dataclass
class _Command:
    line: int
    words: list[_Word] = field(default_factory=list)


def _check_windows_batch(text: str, source: str) -> None:
    for number, raw in enumerate(text.split("\n"), start=1):
        stripped = raw.rstrip("\r").rstrip()
        if stripped.endswith("^") or stripped.lower().startswith(("@echo", "rem ")):
            raise ScriptParseError(
                f"{source}:{number}: this is a Windows .bat script (^ line continuation / batch syntax); "
                f"fluxgymd adopts Linux train.sh files only; {_ADVICE}"
            )


def _tokenize(text: str, source: str) -> list[_Command]:
    commands: list[_Command] = []
    cmd: _Command | None = None
    word: _Word | None = None
    line = 1
    i = 0
    n = len(text)

    def begin_word() -> _Word:
        nonlocal word, cmd
        if word is None:
            word = _Word(line=line, start=i)
            if cmd is None:
                cmd = _Command(line=line)
        return word

    def end_word() -> None:
        nonlocal word
        if word is not None:
            assert cmd is not None
            cmd.words.append(word)
            word = None

    def end_command() -> None:
        nonlocal cmd
        end_word()
        if cmd is not None and cmd.words:
            commands.append(cmd)
        cmd = None

    while i < n:
        c = text[i]
        if c == "\\":
            nxt = text[i + 1] if i + 1 < n else ""
            if nxt == "\n":  # line continuation: vanishes, even inside a word
                i += 2
                line += 1
                continue
            if nxt == "":  # a trailing backslash at end of file (FluxGym's last line): bash drops it
                i += 1
                continue
            if nxt == "\r":
                raise _refuse(source, line, "a carriage return (CRLF line endings; convert with dos2unix)")
            begin_word().chars.append(nxt)  # \X outside quotes is X (FluxGym's `\--sample_prompts`)
            i += 2
            continue
        if c == "\n":
            end_command()
            line += 1
            i += 1
            continue
        if c in " \t":
            end_word()
            i += 1
            continue
        if c == "#" and word is None:  # a comment runs to the end of the line (not past it)
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if c == "'":
            opened = line
            j = text.find("'", i + 1)
            if j < 0:
                raise ScriptParseError(f"{source}:{opened}: unterminated single quote; {_ADVICE}")
            chunk = text[i + 1 : j]
            begin_word().chars.append(chunk)
            line += chunk.count("\n")
            i = j + 1
            continue
        if c == '"':
            w = begin_word()
            opened = line
            i += 1
            while True:
                if i >= n:
                    raise ScriptParseError(f"{source}:{opened}: unterminated double quote; {_ADVICE}")
                d = text[i]
                if d == '"':
                    i += 1
                    break
                if d == "\\":
                    nxt = text[i + 1] if i + 1 < n else ""
                    if nxt == "\n":
                        line += 1
                        i += 2
                    elif nxt in ('"', "\\", "$", "`"):
                        w.chars.append(nxt)
                        i += 2
                    else:  # inside double quotes other backslashes are literal
                        w.chars.append("\\")
                        i += 1
                    continue
                if d == "$":
                    raise _refuse(source, line, _dollar_construct(text, i))
                if d == "`":
                    raise _refuse(source, line, "a backtick command substitution")
                if d == "\x00":
                    raise _refuse(source, line, "a NUL byte")
                if d == "\n":
                    line += 1
                w.chars.append(d)
                i += 1
            continue
        if c == "$":
            raise _refuse(source, line, _dollar_construct(text, i))
        if c == "`":
            raise _refuse(source, line, "a backtick command substitution")
        if c == "\r":
            raise _refuse(source, line, "a carriage return (CRLF line endings; convert with dos2unix)")
        if c == "\x00":
            raise _refuse(source, line, "a NUL byte")
        if c in "|&;<>()":
            two = text[i : i + 2]
            raise _refuse(source, line, _OPERATORS.get(two) or _OPERATORS[c])
        if c in _GLOBS:
            raise _refuse(source, line, f"{_GLOBS[c]} outside quotes")
        if c == "~" and (
            word is None
            # bash also expands ~ after the = (or a :) of an assignment-looking word: x=~/a
            or (text[i - 1] in "=:" and _ASSIGNMENT_RE.match(text, word.start))
        ):
            raise _refuse(source, line, "tilde expansion (~)")
        begin_word().chars.append(c)
        i += 1
    end_command()
    return commands


def _dollar_construct(text: str, i: int) -> str:
    nxt = text[i + 1 : i + 2]
    if nxt == "(":
        return "a command substitution $(...)" if text[i + 2 : i + 3] != "(" else "arithmetic expansion $((...))"
    if nxt == "{":
        return "a variable expansion ${...}"
    if nxt == "'":
        return "ANSI-C quoting $'...'"
    if nxt == '"':
        return 'locale quoting $"..."'
    match = re.match(r"[A-Za-z_][A-Za-z0-9_]*|[0-9@*#?$!-]", text[i + 1 :])
    return f"a variable expansion ${match.group(0)}" if match else "a $ (expansion)"


def parse_train_sh(text: str, *, source: str = "train.sh") -> list[str]:
    """The argv bash would run for TEXT, which must hold exactly one simple command.

    Raises ScriptParseError (one line: ``source:line: construct ...``) for anything else.
    """
    try:
        return _parse_one_command(text, source)
    except ScriptParseError:
        # A .bat's ^-continued lines read as several commands to a POSIX parser; say what it is.
        _check_windows_batch(text, source)
        raise


def _parse_one_command(text: str, source: str) -> list[str]:
    if text.startswith("\ufeff"):
        raise ScriptParseError(f"{source}:1: starts with a UTF-8 byte-order mark, which bash would run as part of the command; remove it")
    commands = _tokenize(text, source)
    if not commands:
        raise ScriptParseError(f"{source}: holds no command; expected one `accelerate launch ...` command")
    if len(commands) > 1:
        second = commands[1]
        hint = ""
        if "".join(second.words[0].chars).startswith("-"):
            hint = " (a line without a trailing backslash, or a comment line, ends a command)"
        raise _refuse(
            source,
            second.line,
            f"a second command ({_preview(second)}) after the one on line {commands[0].line}{hint}",
        )
    command = commands[0]
    first = command.words[0]
    if _ASSIGNMENT_RE.match(text, first.start):
        raise ScriptParseError(
            f"{source}:{first.line}: environment assignment {''.join(first.chars)!r} before the command; "
            "move it to [train] env in run.toml (and the argv to command = [...] if you prefer)"
        )
    argv = ["".join(w.chars) for w in command.words]
    if argv[0] in _SHELL_WORDS:
        raise _refuse(source, first.line, f"the shell keyword/builtin {argv[0]!r}")
    return argv


def _preview(command: _Command) -> str:
    text = " ".join("".join(w.chars) for w in command.words[:3])
    return repr(text if len(text) <= 40 else text[:37] + "...")


def load_train_sh(path: Path) -> list[str]:
    """Read PATH (never modifying it) and parse it; ``.bat``/``.cmd`` scripts are refused."""
    path = Path(path)
    if path.suffix.lower() in (".bat", ".cmd"):
        raise ScriptParseError(
            f"{path}: Windows batch scripts are not supported; generate the Linux train.sh or {_ADVICE}"
        )
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read train script: {err.strerror or err}") from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ScriptParseError(f"{path}:{line}: not valid UTF-8 (byte offset {err.start}); re-save the file as UTF-8") from err
    return parse_train_sh(text, source=str(path))


# ---------------------------------------------------------------------------- rendering

_SAFE_RE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")
_FLAG_EQ_RE = re.compile(r"(--[A-Za-z0-9_-]+=)(.*)", re.DOTALL)


def _double_quote(text: str) -> str:
    escaped = "".join("\\" + ch if ch in '\\"$`' else ch for ch in text)
    return f'"{escaped}"'


def _quote(word: str, *, first: bool) -> str:
    if "\x00" in word:
        raise ValueError(f"argv word {word!r} holds a NUL byte, which no shell script can carry")
    if _SAFE_RE.fullmatch(word) and not (first and _ASSIGNMENT_RE.match(word)):
        return word
    flag = _FLAG_EQ_RE.fullmatch(word)
    if flag and not first:  # FluxGym's style: --sample_prompts="/path with space"
        return flag.group(1) + _double_quote(flag.group(2))
    return _double_quote(word)


def render_train_sh(argv: list[str]) -> str:
    """ARGV as a train.sh in FluxGym's layout: the launcher on line one, then one flag (with
    its values) or script per ``\\``-continued line, two-space indent. Unlike FluxGym the last
    line has no dangling backslash and the file ends with a newline; parse_train_sh reads both.
    """
    if not argv:
        raise ValueError("cannot render an empty argv")
    if argv[0] in _SHELL_WORDS:
        raise ValueError(f"argv[0] {argv[0]!r} is a shell keyword/builtin, not a program")
    lines: list[list[str]] = [[_quote(argv[0], first=True)]]
    for word in argv[1:]:
        quoted = _quote(word, first=False)
        if word.startswith("-") or word.endswith(".py"):
            lines.append([quoted])
        else:
            lines[-1].append(quoted)
    rendered = [" ".join(lines[0])] + ["  " + " ".join(parts) for parts in lines[1:]]
    return " \\\n".join(rendered) + "\n"


# ---------------------------------------------------------------------------- argv helpers


def _flag_name(name: str) -> str:
    return name if name.startswith("-") else f"--{name}"


def trainer_args_start(argv: list[str]) -> int:
    """Index of the trainer's first own argument: after the first ``*.py`` word, else after
    the module of a ``-m MODULE``, else 0 (the whole argv is the trainer's)."""
    for i, word in enumerate(argv):
        if word.endswith(".py"):
            return i + 1
    for i, word in enumerate(argv[:-1]):
        if word in ("-m", "--module"):
            return i + 2
    return 0


def _takes_next(argv: list[str], i: int) -> bool:
    return i + 1 < len(argv) and not argv[i + 1].startswith("--")


def get_flag(argv: list[str], name: str) -> str | None:
    """Value of trainer flag NAME (``--x v`` or ``--x=v``); the last occurrence wins, as in
    argparse. None when absent or given without a value."""
    flag = _flag_name(name)
    value: str | None = None
    found = False
    for i in range(trainer_args_start(argv), len(argv)):
        word = argv[i]
        if word == flag:
            found = True
            value = argv[i + 1] if _takes_next(argv, i) else None
        elif word.startswith(flag + "="):
            found = True
            value = word[len(flag) + 1 :]
    return value if found else None


def has_flag(argv: list[str], name: str) -> bool:
    flag = _flag_name(name)
    return any(w == flag or w.startswith(flag + "=") for w in argv[trainer_args_start(argv) :])


def without_flag(argv: list[str], name: str, takes_value: bool = True) -> list[str]:
    """ARGV minus every occurrence of trainer flag NAME (``--x v``, ``--x=v``, bare ``--x``)."""
    flag = _flag_name(name)
    start = trainer_args_start(argv)
    out = list(argv[:start])
    i = start
    while i < len(argv):
        word = argv[i]
        if word == flag:
            i += 2 if takes_value and _takes_next(argv, i) else 1
            continue
        if word.startswith(flag + "="):
            i += 1
            continue
        out.append(word)
        i += 1
    return out


def with_flag(argv: list[str], name: str, value: str | None) -> list[str]:
    """ARGV with trainer flag NAME set: VALUE None means a bare switch (added once if
    missing). A value replaces the first occurrence in place, keeping its ``--x v`` or
    ``--x=v`` form, and drops later ones; absent flags are appended."""
    flag = _flag_name(name)
    if value is None:
        return list(argv) if has_flag(argv, flag) else [*argv, flag]
    start = trainer_args_start(argv)
    out = list(argv[:start])
    replaced = False
    i = start
    while i < len(argv):
        word = argv[i]
        if word == flag or word.startswith(flag + "="):
            step = 2 if word == flag and _takes_next(argv, i) else 1
            if not replaced:
                out.extend([f"{flag}={value}"] if "=" in word or value.startswith("-") else [flag, value])
                replaced = True
            i += step
            continue
        out.append(word)
        i += 1
    if not replaced:
        out.extend([f"{flag}={value}"] if value.startswith("-") else [flag, value])
    return out
