"""The learning-rate multiplier of each optimizer step. Pure: no torch (the trainer wraps it in a LambdaLR).

A linear warm-up over `warmup_steps`, then either `constant` (the default: the paper states no schedule) or
a half cosine from the peak down to `min_lr_ratio` over `decay_steps` optimizer steps, after which it stays
at that end value. Neither needs to know how many optimizer steps a fit will take, which a streamed
iteration cannot know before its search ends, and neither ever rises again after the warm-up: an
uncapped cosine sized by a guess went 1, .75, .25, 0, .25, .75 when the guess was too short.
"""

from __future__ import annotations

import math

from psr_ray.config import LRSchedule


def lr_multiplier(
    step: int, *, schedule: LRSchedule, warmup_steps: int, decay_steps: int = 0, min_lr_ratio: float = 0.0
) -> float:
    """The factor on the peak learning rate for optimizer step `step` (0 is the first step).

    Warm-up: (step + 1) / (warmup_steps + 1), so the first step already learns and step `warmup_steps` is the
    first at the peak. Cosine: min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2 with
    p = min(1, (step - warmup_steps) / decay_steps)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if LRSchedule(schedule) is LRSchedule.CONSTANT:
        return 1.0
    if decay_steps < 1:
        raise ValueError(f"a cosine schedule needs decay_steps >= 1, got {decay_steps}")
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
