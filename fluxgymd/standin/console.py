"""Output plumbing: flush every line so a supervisor sees progress at once; kohya-like logs."""
from __future__ import annotations

import io
import logging
import sys

LOG_FORMAT = "%(asctime)s %(levelname)-8s %(message)s"
LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"


def setup_console() -> None:
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True)
    root = logging.getLogger()
    if not root.handlers:
        # kohya logs through rich on stderr; a plain handler there keeps the same stream split
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
