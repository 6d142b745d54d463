"""One exception family; each carries the exit code the CLI turns it into (SPEC section 8)."""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # generic failure of a shell tool
    ATTEMPT_FAILED = 75  # EX_TEMPFAIL: systemd restarts the unit
    MISSING_INPUT = 66  # EX_NOINPUT: dataset, models, sd-scripts missing
    BAD_CONFIG = 78  # EX_CONFIG
    GAVE_UP = 79  # max_attempts_without_progress reached


class FluxgymError(Exception):
    """Base of every error fluxgymd reports; ``str(err)`` is one line naming the culprit."""

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(FluxgymError):
    exit_code = ExitCode.BAD_CONFIG


class MissingInputError(FluxgymError):
    exit_code = ExitCode.MISSING_INPUT


class ScriptParseError(ConfigError):
    """A train.sh that cannot be taken apart safely without a shell."""


class AttemptFailed(FluxgymError):
    exit_code = ExitCode.ATTEMPT_FAILED


class GaveUp(FluxgymError):
    exit_code = ExitCode.GAVE_UP


class AlreadyRunning(FluxgymError):
    """Another wrapper holds the run's lock: no restart (it would only collide again)."""

    exit_code = ExitCode.BAD_CONFIG
