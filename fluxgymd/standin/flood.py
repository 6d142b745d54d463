"""Flood mode: print many ordinary lines and tqdm-style ``\\r`` frames as fast as possible.

It exercises a supervisor's log path: a slow reader shows up as a low achieved rate, which is
recorded per 0.5 s window in ``<output_dir>/.standin-flood-rate.jsonl``.
"""
from __future__ import annotations

import json
import logging
import sys
import time

from fluxgymd.standin.cli import StandinArgs
from fluxgymd.standin.plan import last_ckpt_name

RATE_WINDOW_S = 0.5
RATE_FILE_NAME = ".standin-flood-rate.jsonl"
PAYLOAD = "the quick brown fox jumps over the lazy dog 0123456789 abcdefghij"


def _frame(i: int, total: int) -> str:
    pct = 100 * i // total
    filled = 10 * i // total
    bar = "█" * filled + " " * (10 - filled)
    return f"\rsteps: {pct:3d}%|{bar}| {i}/{total} [00:00<00:00, 99.99it/s, avr_loss=0.123]"


def flood(args: StandinArgs) -> int:
    assert args.flood_lines is not None
    lines, frames = args.flood_lines, max(0, args.flood_frames)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    out, err = sys.stdout, sys.stderr
    frames_done = 0
    with open(args.output_dir / RATE_FILE_NAME, "a", encoding="utf-8") as rate:
        window_start = time.monotonic()
        in_window = 0
        start = time.monotonic()
        for n in range(1, lines + 1):
            if args.flood_rate and n % 100 == 0:
                # hold the schedule: sleep only when ahead of it, never "catch up" faster
                ahead_s = start + n / args.flood_rate - time.monotonic()
                if ahead_s > 0:
                    time.sleep(ahead_s)
            out.write(f"flood line {n:06d} {PAYLOAD}\n")
            out.flush()
            in_window += 1
            # spread the frames evenly among the lines
            while frames_done < frames and (frames_done + 1) * lines <= n * frames:
                frames_done += 1
                err.write(_frame(frames_done, frames))
                err.flush()
            now = time.monotonic()
            if now - window_start >= RATE_WINDOW_S:
                rate.write(json.dumps({"t": now, "lines": in_window}) + "\n")
                rate.flush()
                window_start, in_window = now, 0
        if in_window:
            rate.write(json.dumps({"t": time.monotonic(), "lines": in_window}) + "\n")
    if frames:
        err.write("\n")
        err.flush()

    from fluxgymd.standin.model import StandinLoRA, save_lora  # torch only now, after the flood

    save_lora(args.output_dir / last_ckpt_name(args.output_name), StandinLoRA(), {"ss_output_name": str(args.output_name)})
    logging.getLogger("fluxgymd.standin").info("model saved.")
    return 0
