"""`fluxgym`: shell tools for training runs on a box (docs/cli.md).

Every error is one line on stderr (`fluxgym: ...`) and a nonzero exit: 1 generic (a
systemctl call failed, verify failed), 2 usage (bad option or run name), 66 missing input
(unknown run, dataset/models/sd-scripts missing), 78 bad configuration.

Shell completion (click's own):
  bash: eval "$(_FLUXGYM_COMPLETE=bash_source fluxgym)"   # e.g. in ~/.bashrc
  zsh:  eval "$(_FLUXGYM_COMPLETE=zsh_source fluxgym)"    # e.g. in ~/.zshrc
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import click
from click.shell_completion import CompletionItem

from . import __version__
from .durations import format_duration
from .errors import ExitCode, FluxgymError, MissingInputError
from .names import validate_name
from .paths import RunPaths, fluxgym_home

# click >= 8.2 raises this for a bare `fluxgym` (8.1 printed the help itself)
_NO_ARGS_IS_HELP: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    """The one place errors become output: one line on stderr and the exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FluxgymError as e:
            click.echo(f"fluxgym: {e}", err=True)
            ctx.exit(int(e.exit_code))
        except BrokenPipeError:  # `fluxgym ls | head`
            sys.stderr.close()
            ctx.exit(0)

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        # click's own usage errors print usage plus a hint over three lines: make them one
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except _NO_ARGS_IS_HELP as e:  # bare `fluxgym`: the help, as click does
            click.echo(e.ctx.get_help() if e.ctx else e.format_message())
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"fluxgym: {e.format_message()} (see fluxgym --help)"
                       if isinstance(e, click.UsageError) else f"fluxgym: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("fluxgym: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def _home_of(ctx: click.Context) -> Path:
    root = ctx.find_root()
    if root.obj and "home" in root.obj:
        return root.obj["home"]
    home = root.params.get("home")
    return Path(home) if home else fluxgym_home()


class RunName(click.ParamType):
    """A run name: validated as the wrapper does, completed from FLUXGYM_HOME/outputs."""

    name = "NAME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return validate_name(str(value))
        except FluxgymError as e:
            self.fail(str(e), param, ctx)

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
        from .runinfo import run_names

        try:
            names = run_names(_home_of(ctx))
        except OSError:
            return []
        return [CompletionItem(n) for n in names if n.startswith(incomplete)]


RUN = RunName()


def _paths(ctx: click.Context, name: str) -> RunPaths:
    return RunPaths(_home_of(ctx), validate_name(name))


def _existing(ctx: click.Context, name: str) -> RunPaths:
    paths = _paths(ctx, name)
    if not paths.run_dir.is_dir():
        raise MissingInputError(f"no run {name!r} in {paths.outputs} (create it with `fluxgym new {name}` "
                                f"or `fluxgym import`)")
    return paths


def _json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def _color() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _style(text: str, color: bool, **kw: Any) -> str:
    return click.style(text, **kw) if color else text


_JSON = click.option("--json", "as_json", is_flag=True, help="Machine-readable output (schema: docs/cli.md).")
_USER_UNIT = click.option("--user-unit", is_flag=True,
                          help="Talk to the user's systemd (runs installed with `fluxgym install --user-unit`).")


@click.group(cls=_Group, context_settings=CONTEXT)
@click.option("--home", type=click.Path(path_type=Path, file_okay=False), envvar="FLUXGYM_HOME", default=None,
              help="FLUXGYM_HOME (env FLUXGYM_HOME; default /srv/fluxgym).")
@click.version_option(__version__, prog_name="fluxgym")
@click.pass_context
def main(ctx: click.Context, home: Path | None) -> None:
    """Long FluxGym LoRA trainings as systemd services (fluxgym-train@NAME.service).

    \b
    Examples:
      sudo fluxgym install --home /srv/fluxgym --user fluxgym
      fluxgym new mylora --dataset ~/photos/cat --trigger fluffycat
      fluxgym start mylora
      fluxgym logs -f mylora
      fluxgym ls
      fluxgym status mylora --json | jq .step

    \b
    Shell completion:
      eval "$(_FLUXGYM_COMPLETE=bash_source fluxgym)"    # bash
      eval "$(_FLUXGYM_COMPLETE=zsh_source fluxgym)"     # zsh
    """
    ctx.ensure_object(dict)
    ctx.obj["home"] = home or fluxgym_home()


# --- runs: ls / status / checkpoints / verify ---------------------------------------------

def _rows(ctx: click.Context, names: list[str], user_unit: bool) -> list[dict]:
    from .runinfo import row
    from .systemctl import show_many

    units = show_many(names, user=user_unit)
    return [row(_paths(ctx, n), units.get(n, {})) for n in names]


def _d(v: Any, fmt: str = "{}") -> str:
    return "-" if v is None else fmt.format(v)


def _of(a: Any, b: Any) -> str:
    if a is None and b is None:
        return "-"
    return f"{_d(a)}/{b}" if b is not None else _d(a)


_STATUS_COLORS = {"running": "green", "starting": "cyan", "completed": "blue", "failed": "red",
                  "failed-attempt": "yellow", "stalled": "yellow", "stopped": "white"}
_UNIT_COLORS = {"active": "green", "activating": "yellow", "failed": "red", "deactivating": "yellow"}


def unit_text(u: dict) -> str:
    if u["active_state"] is None:
        return "-"
    text = f"{u['active_state']}/{u['sub_state']}"
    if u["result"] not in (None, "success"):
        text += f" ({u['result']})"
    return text


def status_text(r: dict) -> str:
    if r["config_problem"] and r["status"] is None:
        return "config-error"
    return _d(r["status"]) + (" (stale)" if r["status_stale"] else "")


def table(rows: list[dict], color: bool) -> str:
    head = ["NAME", "UNIT", "RESTARTS", "STATUS", "EPOCH", "STEP", "LOSS", "IT/S", "ETA", "GPU", "TRY",
            "CHECKPOINT", "PROGRESS"]
    body = []
    for r in rows:
        u = r["unit"]
        body.append([
            r["name"], unit_text(u), _d(u["n_restarts"]), status_text(r), _of(r["epoch"], r["epochs"]),
            _of(r["step"], r["steps"]), _d(r["loss"], "{:.4f}"), _d(r["it_per_s"], "{:.2f}"),
            "-" if r["eta_s"] is None else format_duration(r["eta_s"]), _d(r["gpu_percent"], "{}%"),
            _d(r["attempt"]), _d(r["newest_checkpoint"]),
            "-" if r["last_progress_age_s"] is None else format_duration(r["last_progress_age_s"]) + " ago",
        ])
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]

    def render(cells: list[str], colors: list[str | None]) -> str:
        out = []
        for c, w, fg in zip(cells, widths, colors):
            out.append(_style(c, color and fg is not None, fg=fg) + " " * (w - len(c)))
        return "  ".join(out).rstrip()

    lines = [render(head, [None] * len(head)) if not color else _style(render(head, [None] * len(head)), True, bold=True)]
    for r, cells in zip(rows, body):
        colors: list[str | None] = [None] * len(head)
        colors[1] = _UNIT_COLORS.get(r["unit"]["active_state"] or "")
        colors[3] = "red" if r["status_stale"] or r["config_problem"] else _STATUS_COLORS.get(r["status"] or "")
        lines.append(render(cells, colors))
    return "\n".join(lines)


def _ls(ctx: click.Context, as_json: bool, user_unit: bool) -> None:
    from .runinfo import JSON_SCHEMA_VERSION, run_names

    home = _home_of(ctx)
    rows = _rows(ctx, run_names(home), user_unit)
    if as_json:
        _json({"schema": JSON_SCHEMA_VERSION, "home": str(home), "runs": rows})
    elif rows:
        click.echo(table(rows, _color()), color=_color())
    else:
        click.echo(f"no runs in {home / 'outputs'} (create one with `fluxgym new NAME`)")


@main.command("ls", context_settings=CONTEXT)
@_JSON
@_USER_UNIT
@click.pass_context
def ls_cmd(ctx: click.Context, as_json: bool, user_unit: bool) -> None:
    """One row per run: unit state and result, restarts, status, epoch/step, loss, it/s,
    ETA, GPU %, attempt, newest usable checkpoint, age of the last progress.

    \b
    Examples:
      fluxgym ls
      fluxgym ls --json | jq -r '.runs[] | select(.status=="running") | .name'
    """
    _ls(ctx, as_json, user_unit)


@main.command("status", context_settings=CONTEXT)
@click.argument("name", type=RUN, required=False)
@_JSON
@_USER_UNIT
@click.pass_context
def status_cmd(ctx: click.Context, name: str | None, as_json: bool, user_unit: bool) -> None:
    """Status of one run in detail (without NAME: the `ls` table).

    \b
    Examples:
      fluxgym status mylora
      fluxgym status mylora --json | jq '{step, steps, loss}'
    """
    if name is None:
        _ls(ctx, as_json, user_unit)
        return
    _existing(ctx, name)
    r = _rows(ctx, [name], user_unit)[0]
    if as_json:
        _json(r)
        return
    color = _color()
    u = r["unit"]
    st = _style(status_text(r), color, fg=_STATUS_COLORS.get(r["status"] or ""))
    pairs = [
        ("run", f"{r['name']}  ({r['run_dir']})"),
        ("unit", f"{u['name']}  {unit_text(u)}" + (f"  restarts {u['n_restarts']}" if u["n_restarts"] else "")),
        ("status", st + (f": {r['reason']}" if r["reason"] else "")),
        ("attempt", _d(r["attempt"]) + (f"  ({r['attempts_without_progress']} without progress)"
                                        if r["attempts_without_progress"] else "")),
        ("epoch", _of(r["epoch"], r["epochs"])),
        ("step", _of(r["step"], r["steps"])),
        ("loss", _d(r["loss"], "{:.4f}")),
        ("speed", _d(r["it_per_s"], "{:.2f} it/s")),
        ("ETA", "-" if r["eta_s"] is None else format_duration(r["eta_s"])),
        ("GPU", _d(r["gpu_percent"], "{}%")),
        ("checkpoint", _d(r["newest_checkpoint"]) + (f"  (step {r['newest_checkpoint_step']})"
                                                     if r["newest_checkpoint_step"] is not None else "")),
        ("last progress", "-" if r["last_progress_age_s"] is None
         else f"{format_duration(r['last_progress_age_s'])} ago ({r['last_progress_at']})"),
    ]
    if r["config_problem"]:
        pairs.append(("config", _style(r["config_problem"], color, fg="red")))
    for k, v in pairs:
        click.echo(f"{k:>13}: {v}", color=color)


@main.command("checkpoints", context_settings=CONTEXT)
@click.argument("name", type=RUN)
@_JSON
@click.pass_context
def checkpoints_cmd(ctx: click.Context, name: str, as_json: bool) -> None:
    """Each saved state with epoch, absolute step, and whether a restart can resume from it
    (and why not). `*` marks the state the next start resumes from.

    \b
    Examples:
      fluxgym checkpoints mylora
      fluxgym checkpoints mylora --json | jq -r '.checkpoints[] | select(.usable) | .path'
    """
    from .runinfo import JSON_SCHEMA_VERSION, checkpoint_rows, run_files

    files = run_files(_existing(ctx, name))
    if files.problem:
        raise FluxgymError(files.problem, ExitCode.BAD_CONFIG)
    rows = checkpoint_rows(files)
    if as_json:
        _json({"schema": JSON_SCHEMA_VERSION, "name": name, "checkpoints": rows})
        return
    if not rows:
        click.echo(f"no checkpoints of {name} yet in {files.target.output_dir if files.target else '?'}")
        return
    color = _color()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        mark = "*" if r["resume_target"] else " "
        why = _style("usable", color, fg="green") if r["usable"] else _style(f"not usable: {r['problem']}", color, fg="red")
        click.echo(f"{mark} {r['name']:<{width}}  epoch {_d(r['epoch']):>4}  step {_d(r['step']):>7}  {why}",
                   color=color)


@main.command("verify", context_settings=CONTEXT)
@click.argument("name", type=RUN)
@_JSON
@click.pass_context
def verify_cmd(ctx: click.Context, name: str, as_json: bool) -> None:
    """Exit 0 only for a completed run whose final model is valid (exists, header parses,
    size matches, written during this run).

    \b
    Example:
      fluxgym verify mylora && cp /srv/fluxgym/outputs/mylora/mylora.safetensors ~/loras/
    """
    from .runinfo import verify

    ok, detail = verify(_existing(ctx, name))
    if as_json:
        _json({"name": name, "verified": ok, "detail": detail})
        if not ok:
            ctx.exit(int(ExitCode.FAILURE))
        return
    if not ok:
        raise FluxgymError(f"{name}: not verified: {detail}")
    click.echo(f"{name}: verified {detail}")


@main.command("logs", context_settings=CONTEXT)
@click.argument("name", type=RUN)
@click.option("-f", "--follow", is_flag=True, help="Keep following across restarts and rotation.")
@click.option("-n", "--lines", default=50, show_default=True, type=click.IntRange(min=0),
              help="How many past lines to show.")
@click.option("--journal", is_flag=True, help="Read journalctl for the unit instead of training.log.")
@click.pass_context
def logs_cmd(ctx: click.Context, name: str, follow: bool, lines: int, journal: bool) -> None:
    """training.log of a run: every attempt's output, with banners between attempts.

    \b
    Examples:
      fluxgym logs mylora
      fluxgym logs -f mylora
      fluxgym logs --journal -f mylora      # journalctl -u fluxgym-train@mylora.service -f
    """
    import shutil

    from .logfollow import follow as follow_log, journalctl_argv, tail_lines
    from .names import unit_name

    if journal:
        argv = journalctl_argv(unit_name(name), lines=lines, follow=follow)
        exe = shutil.which(argv[0])
        if exe is None:
            raise FluxgymError("journalctl not found")
        os.execv(exe, argv)
    paths = _existing(ctx, name)
    try:
        if not follow:
            for line in tail_lines(paths.training_log, lines):
                click.echo(line)
            return
        for line in follow_log(paths.training_log, from_lines=lines, stop=lambda: False):
            click.echo(line)
    except KeyboardInterrupt:
        pass


# --- systemctl verbs ------------------------------------------------------------------------

def _control(verb: str) -> Callable[..., None]:
    @click.argument("name", type=RUN)
    @_USER_UNIT
    @click.option("--no-block", is_flag=True, help="Do not wait for the job to finish.")
    @click.pass_context
    def cmd(ctx: click.Context, name: str, user_unit: bool, no_block: bool) -> None:
        from .names import unit_name
        from .systemctl import control

        if verb != "stop":
            _existing(ctx, name)
        control(verb, name, user=user_unit, no_block=no_block)
        done = {"start": "started", "stop": "stopped", "restart": "restarted", "enable": "enabled"}[verb]
        click.echo(f"{done} {unit_name(name)}" + ("" if verb in ("stop", "enable") else f"; follow it: fluxgym logs -f {name}"))

    what = {
        "start": "Start a run (it resumes from its newest usable checkpoint).",
        "stop": "Stop a run (status `stopped`; a later start resumes).",
        "restart": "Stop and start a run (e.g. after it gave up and the cause is fixed).",
        "enable": "Start a run again after every reboot until it completes.",
    }[verb]
    cmd.__doc__ = (f"{what}\n\nsystemctl {verb} fluxgym-train@NAME.service, the name systemd-escaped."
                   f"\n\n\b\nExamples:\n  fluxgym {verb} mylora\n  fluxgym {verb} --user-unit mylora")
    return cmd


for _verb in ("start", "stop", "restart", "enable"):
    main.command(_verb, context_settings=CONTEXT)(_control(_verb))


# --- files: new / import ---------------------------------------------------------------------

def _spec_defaults() -> dict[str, Any]:
    from .fluxgym_gen import RunSpec

    return {f.name: f.default for f in fields(RunSpec)}


_DEF = _spec_defaults()


@main.command("new", context_settings=CONTEXT)
@click.argument("name", type=RUN)
@click.option("--dataset", type=click.Path(path_type=Path), default=None,
              help="Folder of images with .txt captions (default: FLUXGYM_HOME/datasets/NAME, as FluxGym).")
@click.option("--trigger", default="", help="Trigger word or sentence.")
@click.option("--vram", type=click.Choice(["20G", "16G", "12G"]), default="20G", show_default=True,
              help="FluxGym's VRAM preset.")
@click.option("--base-model", default=_DEF["base_model"], show_default=True,
              type=click.Choice(["flux-dev", "flux-schnell", "bdsqlsz/flux1-dev2pro-single"]))
@click.option("--epochs", type=int, default=_DEF["max_train_epochs"], show_default=True)
@click.option("--save-every", type=int, default=_DEF["save_every_n_epochs"], show_default=True,
              help="Save a state every N epochs.")
@click.option("--lr", default=_DEF["learning_rate"], show_default=True, help="Learning rate.")
@click.option("--dim", type=int, default=_DEF["network_dim"], show_default=True, help="LoRA rank.")
@click.option("--resolution", type=int, default=_DEF["resolution"], show_default=True)
@click.option("--repeats", type=int, default=_DEF["num_repeats"], show_default=True)
@click.option("--seed", type=int, default=_DEF["seed"], show_default=True)
@click.option("--workers", type=int, default=_DEF["workers"], show_default=True)
@click.option("--sample-prompt", "sample_prompts", multiple=True, help="Repeatable.")
@click.option("--sample-every", type=int, default=_DEF["sample_every_n_steps"], show_default=True,
              help="Sample every N steps (0: never).")
@click.pass_context
def new_cmd(ctx: click.Context, name: str, **kw: Any) -> None:
    """Create outputs/NAME/ exactly as FluxGym would (train.sh, dataset.toml,
    sample_prompts.txt; FluxGym's defaults and VRAM presets, plus --save_state so restarts
    resume) and run.toml. Missing dataset, models or sd-scripts: exit 66 naming the path and
    how to get it.

    \b
    Examples:
      fluxgym new mylora --dataset ~/photos/cat --trigger fluffycat
      fluxgym new mylora --dataset ~/photos/cat --trigger fluffycat --vram 12G --epochs 8
      fluxgym start mylora
    """
    from .newrun import create_run

    for p in create_run(_paths(ctx, name), **kw):
        click.echo(f"wrote {p}")
    click.echo(f"start it with: fluxgym start {name}")


@main.command("import", context_settings=CONTEXT)
@click.argument("folder", type=click.Path(path_type=Path, file_okay=False))
@click.pass_context
def import_cmd(ctx: click.Context, folder: Path) -> None:
    """Adopt an existing FluxGym output folder (FLUXGYM_HOME/outputs/NAME with train.sh).
    Its files are not changed; only run.toml is added.

    \b
    Examples:
      fluxgym --home ~/fluxgym import ~/fluxgym/outputs/mylora
      fluxgym import /srv/fluxgym/outputs/mylora && fluxgym start mylora
    """
    from .newrun import import_run

    path, warnings = import_run(_home_of(ctx), folder)
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"wrote {path}" if path else f"{folder} already has a run.toml: nothing to do")


# --- box: install / doctor / notify ------------------------------------------------------------

@main.command("install", context_settings=CONTEXT)
@click.option("--home", "install_home", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="FLUXGYM_HOME for the services (default: fluxgym --home, FLUXGYM_HOME or /srv/fluxgym).")
@click.option("--user", "service_user", default="fluxgym", show_default=True,
              help="System user the trainings run as (created if missing).")
@click.option("--user-unit", is_flag=True, help="Install for the calling user's systemd (~/.config/systemd/user).")
@click.option("--unit-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where unit files go (default /etc/systemd/system, or the user unit dir).")
@click.option("--no-reload", is_flag=True, help="Skip systemctl daemon-reload.")
@click.pass_context
def install_cmd(ctx: click.Context, install_home: Path | None, service_user: str, user_unit: bool,
                unit_dir: Path | None, no_reload: bool) -> None:
    """Install the unit templates and drop-ins with this box's home, user and group
    (creating the system user if missing), then daemon-reload. Prints what it did;
    installing twice changes nothing.

    \b
    Examples:
      sudo fluxgym install --home /srv/fluxgym --user fluxgym
      fluxgym install --user-unit --home ~/fluxgym
    """
    from .install import install

    for line in install(home=install_home or _home_of(ctx), user=service_user, user_unit=user_unit,
                        unit_dir=unit_dir, reload=not no_reload):
        click.echo(line)


@main.command("doctor", context_settings=CONTEXT)
@_JSON
@_USER_UNIT
@click.pass_context
def doctor_cmd(ctx: click.Context, as_json: bool, user_unit: bool) -> None:
    """Check systemd, the unit, NVML and driver, GPUs, nvidia-uvm, sd-scripts and its
    Python, accelerate, models, free disk and permissions: one line per check, with a fix
    for each problem. Exit 1 when any check fails.

    \b
    Examples:
      fluxgym doctor
      fluxgym doctor --json | jq -r '.[] | select(.level!="ok") | .fix'
    """
    from .doctor import Level, run_checks

    results = run_checks(_home_of(ctx), user_unit=user_unit)
    if as_json:
        _json([r.to_json() for r in results])
    else:
        color = _color()
        marks = {Level.OK: ("ok  ", "green"), Level.WARN: ("WARN", "yellow"), Level.FAIL: ("FAIL", "red")}
        for r in results:
            text, fg = marks[r.level]
            click.echo(f"{_style(text, color, fg=fg)} {r.name}: {r.detail}" + (f"  -> {r.fix}" if r.fix else ""),
                       color=color)
    if any(r.level is Level.FAIL for r in results):
        ctx.exit(int(ExitCode.FAILURE))


@main.command("notify", context_settings=CONTEXT)
@click.argument("unit")
@click.pass_context
def notify_cmd(ctx: click.Context, unit: str) -> None:
    """Run the [notify] command for a train unit that ended (what fluxgym-notify@.service
    runs; `OnFailure=`/`OnSuccess=` start it with the train unit's name).

    The command gets FLUXGYM_RUN, FLUXGYM_UNIT, FLUXGYM_RESULT, FLUXGYM_EXIT_STATUS,
    FLUXGYM_STATUS, FLUXGYM_REASON and FLUXGYM_LOG_TAIL in its environment, {run}
    {unit} {result} {status} {reason} {exit_status} in its arguments, and a JSON object
    on stdin.

    \b
    Examples (fluxgym.toml):
      [notify]
      command = ["curl", "-fsS", "-d", "{run}: {result} ({status})", "https://ntfy.sh/mybox"]
      on_success = true
    \b
    Test it by hand:
      fluxgym notify 'fluxgym-train@mylora.service'
    """
    from .notify import notify

    click.echo(notify(_home_of(ctx), unit))


if __name__ == "__main__":  # pragma: no cover
    main()
