"""Parse kohya's output into progress (pure: lines in, state out).

What kohya prints (train_network.py): a banner with `num batches per epoch / ...: N`,
`num epochs / ...: N`, `total optimization steps / ...: N`; `epoch E/N` at each epoch start
(E absolute, since kohya starts its epoch loop at the resumed epoch); a tqdm bar
`steps:  45%|...| 9/20 [00:01<00:02,  4.50it/s, avr_loss=0.123]` whose count restarts at 0
on every attempt; `saving state at epoch E` / `saving state at step S`; `model saved.`
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

_TQDM_RE = re.compile(
    r"steps:\s*(?P<pct>\d+)%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*\[(?P<inside>[^\]]*)\]"
)
_RATE_RE = re.compile(r"(?P<v>[\d.]+)\s*(?P<unit>it/s|s/it)")
_LOSS_RE = re.compile(r"avr_loss=(?P<loss>[-+\d.eE]+|nan|inf)")
_EPOCH_RE = re.compile(r"^\s*epoch (?P<e>\d+)/(?P<n>\d+)\s*$")
_BATCHES_RE = re.compile(r"num batches per epoch\b[^:]*:\s*(\d+)")
_EPOCHS_RE = re.compile(r"num epochs\b[^:]*:\s*(\d+)")
_TOTAL_RE = re.compile(r"total optimization steps\b[^:]*:\s*(\d+)")
_ACCUM_RE = re.compile(r"gradient accumulation steps\b[^=:]*[=:]\s*(\d+)")


@dataclass(frozen=True)
class Progress:
    """What the output of the current attempt says, made absolute with the attempt's offset."""

    attempt_offset_steps: int = 0  # absolute steps done before this attempt's bar started
    bar_n: int | None = None  # the tqdm count of this attempt
    bar_total: int | None = None
    epoch: int | None = None  # absolute epoch in progress
    epochs: int | None = None
    batches_per_epoch: int | None = None
    grad_accum: int = 1
    total_steps: int | None = None  # planned optimizer steps of the whole run
    loss: float | None = None
    it_per_s: float | None = None
    finished_saving: bool = False  # "model saved." seen

    @property
    def abs_step(self) -> int | None:
        if self.bar_n is None:
            return None
        return self.attempt_offset_steps + self.bar_n

    @property
    def steps_per_epoch(self) -> int | None:
        if self.total_steps and self.epochs:
            return -(-self.total_steps // self.epochs)
        if self.batches_per_epoch:
            return -(-self.batches_per_epoch // max(self.grad_accum, 1))
        return None

    @property
    def eta_s(self) -> float | None:
        if self.abs_step is None or not self.total_steps or not self.it_per_s:
            return None
        return max(self.total_steps - self.abs_step, 0) / self.it_per_s


def parse_line(p: Progress, line: str) -> Progress:
    """Fold one output line (or tqdm frame) into P. Unrelated lines return P itself."""
    if "steps:" in line:
        m = _TQDM_RE.search(line)
        if m:
            inside = m.group("inside")
            rate = None
            rm = _RATE_RE.search(inside)
            if rm:
                v = float(rm.group("v"))
                rate = v if rm.group("unit") == "it/s" else (1.0 / v if v > 0 else None)
            lm = _LOSS_RE.search(inside)
            return replace(
                p,
                bar_n=int(m.group("n")),
                bar_total=int(m.group("total")),
                it_per_s=rate if rate is not None else p.it_per_s,
                loss=float(lm.group("loss")) if lm else p.loss,
            )
    m = _EPOCH_RE.match(line)
    if m:
        return replace(p, epoch=int(m.group("e")), epochs=int(m.group("n")))
    if "num batches per epoch" in line and (m := _BATCHES_RE.search(line)):
        return replace(p, batches_per_epoch=int(m.group(1)))
    if "num epochs" in line and (m := _EPOCHS_RE.search(line)):
        return replace(p, epochs=int(m.group(1)))
    if "total optimization steps" in line and (m := _TOTAL_RE.search(line)):
        return replace(p, total_steps=int(m.group(1)))
    if "gradient accumulation steps" in line and (m := _ACCUM_RE.search(line)):
        return replace(p, grad_accum=int(m.group(1)))
    if line.rstrip().endswith("model saved."):
        return replace(p, finished_saving=True)
    return p
