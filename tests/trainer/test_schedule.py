"""Issue 13c: the learning-rate schedule never rises again and needs no guess of the fit's length."""

from __future__ import annotations

import math

import pytest

from psr_ray import config as C
from psr_ray.config import LRSchedule
from psr_ray.pipeline import preflight
from psr_ray.trainer.schedule import lr_multiplier


def multipliers(n: int, **kwargs) -> list[float]:
    return [lr_multiplier(step, **kwargs) for step in range(n)]


def test_constant_after_warmup():
    assert multipliers(6, schedule=LRSchedule.CONSTANT, warmup_steps=0) == [1.0] * 6
    assert multipliers(6, schedule=LRSchedule.CONSTANT, warmup_steps=3) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decays_to_its_end_value_and_stays_there():
    got = multipliers(8, schedule=LRSchedule.COSINE, warmup_steps=1, decay_steps=4, min_lr_ratio=0.2)
    cosine = [0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * p / 4)) for p in range(5)]
    assert got == pytest.approx([0.5, *cosine, 0.2, 0.2])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"schedule": LRSchedule.CONSTANT, "warmup_steps": 5},
        {"schedule": LRSchedule.COSINE, "warmup_steps": 0, "decay_steps": 3},
        {"schedule": LRSchedule.COSINE, "warmup_steps": 10, "decay_steps": 7, "min_lr_ratio": 0.1},
    ],
)
def test_never_rises_after_the_warmup(kwargs):
    # Far past any length: the old uncapped cosine went 1, .75, .25, 0, .25, .75 past its guessed end.
    values = multipliers(500, **kwargs)
    peak = kwargs["warmup_steps"]
    assert values[peak] == 1.0 and max(values) == 1.0
    assert all(later <= earlier for earlier, later in zip(values[peak:], values[peak + 1 :], strict=False))
    assert values[:peak] == sorted(values[:peak]) and all(0 < v < 1 for v in values[:peak])


def test_cosine_needs_its_length():
    with pytest.raises(ValueError, match="decay_steps"):
        lr_multiplier(3, schedule=LRSchedule.COSINE, warmup_steps=0, decay_steps=0)
    assert C.PSRConfig().trainer.lr_schedule is LRSchedule.CONSTANT
    with pytest.raises(ValueError, match=r"trainer\.lr_decay_steps"):
        preflight.validate(C.load([], ["trainer.lr_schedule=cosine"]), gpu_available=False, check_paths=False)
    cfg = preflight.validate(C.load([], ["trainer.lr_schedule=cosine", "trainer.lr_decay_steps=20"]), gpu_available=False,
                     check_paths=False)  # fmt: skip
    assert cfg.trainer.lr_schedule is LRSchedule.COSINE
    with pytest.raises(ValueError, match=r"trainer\.lr_schedule"):
        C.load([], ["trainer.lr_schedule=cyclic"])
