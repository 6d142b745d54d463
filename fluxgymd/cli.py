"""`fluxgym`: shell tools for runs on a box. Errors are one line and a nonzero exit.

Shell completion (click's own):
  bash: eval "$(_FLUXGYM_COMPLETE=bash_source fluxgym)"
  zsh:  eval "$(_FLUXGYM_COMPLETE=zsh_source fluxgym)"
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .durations import format_duration
from .errors import ExitCode, FluxgymError
from .names import validate_name
from .paths import RunPaths, fluxgym_home


class _Group(click.Group):
    """Turns FluxgymError into one line on stderr and its exit code (the only place that does)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FluxgymError as e:
            click.echo(f"fluxgym: {e}", err=True)
            ctx.exit(int(e.exit_code))


def _home(ctx: click.Context) -> Path:
    return ctx.obj["home"]


def _paths(ctx: click.Context, name: str) -> RunPaths:
    return RunPaths(_home(ctx), validate_name(name))


def _out(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(path_type=Path), envvar="FLUXGYM_HOME", default=None,
              help="FLUXGYM_HOME (default /srv/fluxgym).")
@click.version_option(__version__, prog_name="fluxgym")
@click.pass_context
def main(ctx: click.Context, home: Path | None) -> None:
    """Long FluxGym LoRA trainings as systemd services.

    \b
    Examples:
      fluxgym new mylora --dataset ~/photos/cat --trigger fluffycat
      fluxgym start mylora
      fluxgym logs -f mylora
      fluxgym status mylora
    """
    ctx.ensure_object(dict)
    ctx.obj["home"] = home or fluxgym_home()


# --- runs ---------------------------------------------------------------------------------

def _rows(ctx: click.Context, names: list[str], user: bool) -> list[dict]:
    from .runinfo import row
    from .systemctl import show

    return [row(_paths(ctx, n), show(n, user=user)) for n in names]


def _fmt(v: Any, fmt: str = "{}") -> str:
    return "-" if v is None else fmt.format(v)


def _table(rows: list[dict]) -> str:
    head = ["NAME", "UNIT", "STATUS", "EPOCH", "STEP", "LOSS", "IT/S", "ETA", "GPU", "TRY", "CHECKPOINT", "PROGRESS AGO"]
    lines = [head]
    for r in rows:
        u = r["unit"]
        unit = "-" if u["active_state"] is None else f"{u['active_state']}/{u['sub_state']}"
        if u.get("restarts"):
            unit += f" ({u['restarts']} restarts)"
        lines.append([
            r["name"], unit, _fmt(r["status"]) if not r["config_problem"] else "config error",
            f"{_fmt(r['epoch'])}/{_fmt(r['epochs'])}", f"{_fmt(r['step'])}/{_fmt(r['steps'])}",
            _fmt(r["loss"], "{:.4f}"), _fmt(r["it_per_s"], "{:.2f}"),
            "-" if r["eta_s"] is None else format_duration(r["eta_s"]),
            _fmt(r["gpu_percent"], "{}%"), _fmt(r["attempt"]), _fmt(r["newest_checkpoint"]),
            "-" if r["last_progress_age_s"] is None else format_duration(r["last_progress_age_s"]),
        ])
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines)


@main.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/cli.md).")
@click.option("--user", "user_unit", is_flag=True, help="Ask the user's systemd (installed with --user-unit).")
@click.pass_context
def ls_cmd(ctx: click.Context, as_json: bool, user_unit: bool) -> None:
    """One row per run: unit state, status, progress, newest checkpoint.

    \b
    Example:
      fluxgym ls --json | jq '.[] | select(.status=="running") | .name'
    """
    from .runinfo import run_names

    rows = _rows(ctx, run_names(_home(ctx)), user_unit)
    _out(rows) if as_json else click.echo(_table(rows) if rows else f"no runs in {_home(ctx) / 'outputs'}")


@main.command("status")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/cli.md).")
@click.option("--user", "user_unit", is_flag=True, help="Ask the user's systemd.")
@click.pass_context
def status_cmd(ctx: click.Context, name: str | None, as_json: bool, user_unit: bool) -> None:
    """Status of one run (or all): unit, status.json, progress, checkpoint.

    \b
    Example:
      fluxgym status mylora
    """
    from .runinfo import run_names

    if name is not None and not _paths(ctx, name).run_dir.is_dir():
        raise FluxgymError(f"no run {name!r} in {_home(ctx) / 'outputs'}")
    rows = _rows(ctx, [name] if name else run_names(_home(ctx)), user_unit)
    if as_json:
        _out(rows[0] if name else rows)
        return
    if not name:
        click.echo(_table(rows) if rows else "no runs")
        return
    r = rows[0]
    for k, v in r.items():
        if k == "unit":
            v = " ".join(f"{a}={b}" for a, b in v.items())
        click.echo(f"{k:>20}: {_fmt(v)}")


@main.command("checkpoints")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/cli.md).")
@click.pass_context
def checkpoints_cmd(ctx: click.Context, name: str, as_json: bool) -> None:
    """Each saved state with epoch, absolute step, and whether it can be resumed from.

    \b
    Example:
      fluxgym checkpoints mylora
    """
    from .checkpoints import best
    from .runinfo import run_files

    files = run_files(_paths(ctx, name))
    if files.problem:
        raise FluxgymError(files.problem)
    top = best(files.checkpoints)
    rows = [{
        "name": c.name, "kind": c.kind.value, "epoch": c.abs_epoch, "step": c.abs_step,
        "usable": c.usable, "problem": c.problem if c.problem else (
            None if c.usable else "end-of-training state: kohya cannot resume from it"),
        "resume_target": top is not None and c.name == top.name,
    } for c in files.checkpoints]
    if as_json:
        _out(rows)
        return
    if not rows:
        click.echo(f"no checkpoints of {name} yet")
        return
    for r in rows:
        mark = "*" if r["resume_target"] else " "
        why = "usable" if r["usable"] else f"not usable: {r['problem']}"
        click.echo(f"{mark} {r['name']:<40} epoch {_fmt(r['epoch']):>4}  step {_fmt(r['step']):>7}  {why}")


@main.command("verify")
@click.argument("name")
@click.pass_context
def verify_cmd(ctx: click.Context, name: str) -> None:
    """Exit 0 only for a completed run whose final model is valid.

    \b
    Example:
      fluxgym verify mylora && cp outputs/mylora/mylora.safetensors ~/loras/
    """
    from .runinfo import verify

    ok, detail = verify(_paths(ctx, name))
    if not ok:
        raise FluxgymError(f"{name}: not verified: {detail}")
    click.echo(f"{name}: verified {detail}")


@main.command("logs")
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep following across restarts and rotation.")
@click.option("-n", "--lines", default=50, show_default=True, help="How many past lines to show.")
@click.option("--journal", is_flag=True, help="Read journalctl for the unit instead of training.log.")
@click.pass_context
def logs_cmd(ctx: click.Context, name: str, follow: bool, lines: int, journal: bool) -> None:
    """training.log of a run (all attempts, with banners).

    \b
    Examples:
      fluxgym logs mylora
      fluxgym logs -f mylora
      fluxgym logs --journal -f mylora
    """
    import os
    import shutil

    paths = _paths(ctx, name)
    if journal:
        from .names import unit_name

        exe = shutil.which("journalctl")
        if exe is None:
            raise FluxgymError("journalctl not found")
        argv = [exe, "-u", unit_name(name), "-n", str(lines)] + (["-f"] if follow else [])
        os.execv(exe, argv)
    from .logfollow import follow as follow_log, tail_lines

    if not paths.run_dir.is_dir():
        raise FluxgymError(f"no run {name!r} in {paths.outputs}")
    try:
        if not follow:
            for line in tail_lines(paths.training_log, lines):
                click.echo(line)
            return
        for line in follow_log(paths.training_log, from_lines=lines, stop=lambda: False):
            click.echo(line)
    except (KeyboardInterrupt, BrokenPipeError):
        pass


def _control(verb: str):
    @click.argument("name")
    @click.option("--user", "user_unit", is_flag=True, help="The user's systemd (installed with --user-unit).")
    @click.pass_context
    def cmd(ctx: click.Context, name: str, user_unit: bool) -> None:
        from .names import unit_name
        from .systemctl import control

        paths = _paths(ctx, name)
        if verb != "stop" and not paths.run_dir.is_dir():
            raise FluxgymError(f"no run {name!r} in {paths.outputs} (create it with `fluxgym new {name}`)")
        control(verb, name, user=user_unit)
        click.echo(f"{verb}: {unit_name(name)}")

    cmd.__doc__ = f"systemctl {verb} fluxgym-train@NAME (name escaped).\n\n\b\nExample:\n  fluxgym {verb} mylora"
    return cmd


for _verb in ("start", "stop", "restart", "enable"):
    main.command(_verb)(_control(_verb))


@main.command("notify")
@click.argument("unit")
@click.pass_context
def notify_cmd(ctx: click.Context, unit: str) -> None:
    """Run fluxgym.toml's [notify] command for a unit that failed (fluxgym-notify@.service).

    The command gets FLUXGYM_RUN, FLUXGYM_UNIT, FLUXGYM_RESULT, FLUXGYM_STATUS and
    FLUXGYM_LOG_TAIL (last 20 log lines) in its environment.
    """
    from .notify import notify

    notify(_home(ctx), unit)


@main.command("new")
@click.argument("name")
@click.option("--dataset", type=click.Path(path_type=Path), required=True, help="Folder of images (+ .txt captions).")
@click.option("--trigger", required=True, help="Trigger word or sentence.")
@click.option("--vram", type=click.Choice(["20G", "16G", "12G"]), default="20G", show_default=True)
@click.option("--base-model", default="flux-dev", show_default=True, help="A model of FluxGym's models.yaml.")
@click.option("--epochs", type=int, default=16, show_default=True)
@click.option("--save-every", type=int, default=4, show_default=True, help="Save a state every N epochs.")
@click.option("--lr", default="8e-4", show_default=True)
@click.option("--dim", type=int, default=4, show_default=True, help="LoRA rank.")
@click.option("--resolution", type=int, default=512, show_default=True)
@click.option("--repeats", type=int, default=10, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--sample-prompt", "sample_prompts", multiple=True, help="Repeatable.")
@click.option("--sample-every", type=int, default=0, show_default=True, help="Sample every N steps (0: never).")
@click.pass_context
def new_cmd(ctx: click.Context, name: str, **kw: Any) -> None:
    """Create outputs/NAME/ as FluxGym would (train.sh, dataset.toml, sample_prompts.txt)
    plus run.toml.

    \b
    Example:
      fluxgym new mylora --dataset ~/photos/cat --trigger fluffycat --vram 16G
      fluxgym start mylora
    """
    from .newrun import create_run

    for p in create_run(_paths(ctx, name), **kw):
        click.echo(f"wrote {p}")
    click.echo(f"start it with: fluxgym start {name}   (or systemctl start fluxgym-train@{name})")


@main.command("import")
@click.argument("folder", type=click.Path(path_type=Path))
@click.pass_context
def import_cmd(ctx: click.Context, folder: Path) -> None:
    """Adopt an existing FluxGym output folder (outputs/NAME with train.sh); its files are
    not changed, only run.toml is added.

    \b
    Example:
      FLUXGYM_HOME=~/fluxgym fluxgym import ~/fluxgym/outputs/mylora
    """
    from .newrun import import_run

    path = import_run(_home(ctx), folder)
    click.echo(f"wrote {path}" if path else f"{folder} already has a run.toml: nothing to do")


@main.command("install")
@click.option("--home", "install_home", type=click.Path(path_type=Path), default=None,
              help="FLUXGYM_HOME for the service (default: --home of fluxgym or /srv/fluxgym).")
@click.option("--user", "service_user", default="fluxgym", show_default=True,
              help="System user the trainings run as (created if missing).")
@click.option("--user-unit", is_flag=True, help="Install for the calling user's systemd (~/.config/systemd/user).")
@click.option("--unit-dir", type=click.Path(path_type=Path), default=None, help="Where to put unit files.")
@click.option("--no-reload", is_flag=True, help="Skip systemctl daemon-reload.")
@click.pass_context
def install_cmd(ctx: click.Context, install_home: Path | None, service_user: str, user_unit: bool,
                unit_dir: Path | None, no_reload: bool) -> None:
    """Install the unit template and a drop-in with this box's home and user.

    Installing twice changes nothing.

    \b
    Example:
      sudo fluxgym install --home /srv/fluxgym --user fluxgym
    """
    from .install import install

    for line in install(home=install_home or _home(ctx), user=service_user, user_unit=user_unit,
                        unit_dir=unit_dir, reload=not no_reload):
        click.echo(line)


@main.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def doctor_cmd(ctx: click.Context, as_json: bool) -> None:
    """Check systemd, the unit, NVML and driver, GPUs, sd-scripts, models, disk.

    One line per check, with a fix for each problem. Exit 1 when any check fails.
    """
    from .doctor import run_checks

    results = run_checks(_home(ctx))
    if as_json:
        _out([r.to_json() for r in results])
    else:
        color = sys.stdout.isatty()
        for r in results:
            mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}[r.level]
            if color:
                mark = click.style(mark, fg={"ok": "green", "warn": "yellow", "fail": "red"}[r.level])
            click.echo(f"{mark} {r.name}: {r.detail}" + (f"  -> {r.fix}" if r.fix else ""))
    if any(r.level == "fail" for r in results):
        ctx.exit(int(ExitCode.FAILURE))


if __name__ == "__main__":  # pragma: no cover
    main()
