"""Issue 17 section 4: the tokens/s and start-up accounting bench/trainer_cpu.py reports (hand-computed)."""

from __future__ import annotations

import pytest

from psr_ray.trainer.fit_timing import fit_timing
from psr_ray.trainer.worker import step_metrics


def step(tokens: float, seconds: float, end: float) -> dict[str, float]:
    return {"train/num_tokens": tokens, "train/step_s": seconds, "train/step_end_unix_s": end}


def test_steady_rate_skips_the_warmup_step_and_startup_is_the_rest_of_the_first_step():
    # Called at 100; the first step (slow: 30 s for 400 tokens) ends at 150; then 600 + 1000 tokens in 3 + 5 s.
    history = [step(400, 30.0, 150.0), step(600, 3.0, 153.0), step(1000, 5.0, 158.0)]
    timing = fit_timing(history, called_at=100.0, returned_at=170.0)
    assert timing.steady_tokens_per_s == pytest.approx(1600 / 8)  # 200 tokens/s
    # 50 s from the call to the first step's end, of which 400 tokens / 200 tokens/s = 2 s were work.
    assert timing.startup_s == pytest.approx(48.0)
    assert timing.teardown_s == pytest.approx(12.0)
    assert (timing.num_steps, timing.num_tokens) == (3, 2000)


def test_no_warmup_counts_every_step():
    history = [step(100, 1.0, 11.0), step(300, 2.0, 13.0)]
    timing = fit_timing(history, called_at=0.0, returned_at=13.0, warmup_steps=0)
    assert timing.steady_tokens_per_s == pytest.approx(400 / 3)
    assert timing.startup_s == pytest.approx(11.0 - 100 / (400 / 3))
    assert timing.teardown_s == 0.0


def test_too_few_steps_or_missing_metrics_are_one_line_errors():
    with pytest.raises(ValueError, match="the fit took 1: give it more pairs"):
        fit_timing([step(100, 1.0, 1.0)], called_at=0.0, returned_at=2.0)
    with pytest.raises(ValueError, match=r"lack \['train/step_end_unix_s'\]"):
        fit_timing([{"train/num_tokens": 1, "train/step_s": 1.0}] * 2, called_at=0.0, returned_at=2.0)


def test_the_trainer_step_metrics_carry_what_fit_timing_reads():
    import torch

    # DPO sums: loss, margin, correct, chosen, rejected, pairs, tokens, computed tokens.
    sums = torch.tensor([1.0, 2.0, 3.0, -4.0, -5.0, 4.0, 480.0, 300.0])
    metrics = step_metrics("dpo", sums, lr=1e-6, seconds=2.0, step=1, truncated=0, ended_at=5.0)
    assert metrics["train/num_tokens"] == 480.0 and metrics["train/step_s"] == 2.0
    assert metrics["train/num_computed_tokens"] == 300.0
    assert metrics["train/tokens_per_s"] == 240.0 and metrics["train/step_end_unix_s"] == 5.0
