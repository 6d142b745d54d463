"""`fluxgymd`: the unit's ExecStart wrapper. Only this module turns errors into exit codes."""
from __future__ import annotations

import sys

import click

from . import __version__
from .errors import ExitCode, FluxgymError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fluxgymd")
def main() -> None:
    """The wrapper systemd runs for each training: `fluxgym-train@NAME.service` executes
    `fluxgymd run NAME`. People use `fluxgym` and `systemctl` instead."""


@main.command("run")
@click.argument("name")
def run_cmd(name: str) -> None:
    """Run one attempt of training NAME (FLUXGYM_HOME/outputs/NAME/run.toml).

    \b
    Exit codes: 0 completed or stopped · 75 attempt failed or stalled (systemd restarts)
    · 78 bad configuration · 66 missing input · 79 gave up (no restart).

    \b
    Example (what the unit does):
      FLUXGYM_HOME=/srv/fluxgym fluxgymd run mylora
    """
    from . import journal
    from .runner import run

    try:
        run(name)
    except FluxgymError as e:
        journal.err(str(e))
        journal.wait_consumed()
        sys.exit(int(e.exit_code))
    except KeyboardInterrupt:
        sys.exit(int(ExitCode.OK))
    except Exception as e:  # a bug or an unforeseen OS error: say it in one line, let systemd retry
        import traceback

        for line in traceback.format_exc().splitlines():
            journal.log(journal.Priority.ERR, line)
        journal.err(f"internal error: {type(e).__name__}: {e}")
        journal.wait_consumed()
        sys.exit(int(ExitCode.ATTEMPT_FAILED))
    journal.wait_consumed()


if __name__ == "__main__":  # pragma: no cover
    main()
