"""``python -m fluxgymd.standin`` and ``accelerate launch -m fluxgymd.standin``."""
from __future__ import annotations

import logging
import sys
from typing import Sequence

from fluxgymd.standin.cli import parse_args
from fluxgymd.standin.console import setup_console


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_console()
    log = logging.getLogger("fluxgymd.standin")
    if args.ignored_flags:
        log.info(f"stand-in: ignoring flags it does not use: {' '.join(args.ignored_flags)}")
    if args.flood_lines is not None:
        from fluxgymd.standin.flood import flood

        return flood(args)
    from fluxgymd.standin.trainer import train  # torch and accelerate load here, not for --help

    return train(args)


if __name__ == "__main__":
    sys.exit(main())
