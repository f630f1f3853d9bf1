"""Learning-rate schedules shared by the stages that train (tuned lens, fine-tuning, pretraining): the
multiplier of the base rate at optimizer step `step` (0-based) of `steps`."""

from __future__ import annotations

import math


def linear_warmup_decay(step: int, steps: int, warmup_steps: int) -> float:
    """Linear warm-up reaching 1 at step warmup_steps, then linear decay reaching 0 after the last
    step (no step at zero rate; with no warm-up, step s uses (steps - s) / steps of the base rate, as
    the tuned-lens library does)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (steps - step) / max(1, steps - warmup_steps))


def cosine_warmup_decay(step: int, steps: int, warmup_steps: int, final: float = 0.1) -> float:
    """Linear warm-up to 1 over warmup_steps, then cosine decay to `final` at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
