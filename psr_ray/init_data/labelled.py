"""Labelled step pairs for measuring a judge, and the scores of a judge on them. Pure apart from
`measure_judge`, which sends the pairs to engine actors.

A pair is a right step against a wrong one for the same problem and previous steps: oracle-labelled
candidates of a model (`candidates.py`), or a reference step from a GSM8K worked solution (each solution line
is a step, `<<a*b=c>>` calculator annotations removed) against the same step with one integer changed
(`build_corrupted_pairs`, bench/judge_accuracy.py). The right step is known, so the judge is scored without a
grader. Each pair is judged in both orders: good step as A, then as B. The likelihood judge (`judge.mode:
likelihood`, an ablation) scores each step once instead (`score_requests`); its two scores are laid out as the
judgments of both orders (`likelihood_judgments`), so every judge is scored by the same rules.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from psr_ray.config import JudgeMode
from psr_ray.core.prompts import direct_verdict
from psr_ray.core.stats import wilson
from psr_ray.core.steps import join_steps, split_steps
from psr_ray.engines.api import JudgeRequest, Judgment, ScoreRequest

_CALCULATOR = re.compile(r"<<[^>]*>>")
# A plain integer: not part of a decimal or a comma-grouped number, so changing it keeps the text well-formed.
_INTEGER = re.compile(r"(?<![\d.,])\d+(?![.,]?\d)")


class LabelledPair(NamedTuple):
    question: str
    prefix: str  # previous reference steps, as `join_steps` writes them
    good_step: str
    bad_step: str


def dpo_rows(pairs: Iterable[LabelledPair]) -> list[dict[str, Any]]:
    """Labelled pairs as step-DPO rows (the right step chosen): the trainer's held-out measurement."""
    return [{"question": p.question, "prefix": p.prefix, "step_index": len(split_steps(p.prefix)) + 1,
             "chosen": p.good_step, "rejected": p.bad_step} for p in pairs]  # fmt: skip


def solution_steps(answer: str) -> list[str]:
    """The steps of a GSM8K `answer`: its lines before `#### N`, calculator annotations stripped."""
    solution = answer.split("####")[0]
    return [_CALCULATOR.sub("", line).strip() for line in solution.splitlines() if line.strip()]


def corrupt_one_number(step: str, rng: random.Random) -> str | None:
    """`step` with one of its integers (chosen by `rng`) moved by 1-9; None when it has no integer."""
    matches = list(_INTEGER.finditer(step))
    if not matches:
        return None
    match = rng.choice(matches)
    value = int(match.group())
    delta = rng.randint(1, 9)
    wrong = value - delta if rng.random() < 0.5 and value - delta >= 0 else value + delta
    return step[: match.start()] + str(wrong) + step[match.end() :]


def build_corrupted_pairs(rows: Iterable[dict], num_pairs: int, seed: int) -> list[LabelledPair]:
    """At most `num_pairs` pairs, one per row in order: a random step holding an integer, and its corruption.
    Rows with no such step are skipped. Same rows and seed, same pairs."""
    rng = random.Random(seed)
    pairs: list[LabelledPair] = []
    for row in rows:
        if len(pairs) == num_pairs:
            break
        steps = solution_steps(row["answer"])
        candidates = [i for i, step in enumerate(steps) if _INTEGER.search(step)]
        if not candidates:
            continue
        index = rng.choice(candidates)
        bad = corrupt_one_number(steps[index], rng)
        assert bad is not None and bad != steps[index]
        pairs.append(LabelledPair(row["question"].strip(), join_steps(steps[:index]), steps[index], bad))
    return pairs


def judge_requests(pairs: Sequence[LabelledPair]) -> tuple[list[JudgeRequest], list[str]]:
    """Two requests per pair (good step as A, then as B) and the right verdict of each."""
    requests, labels = [], []
    for pair in pairs:
        requests.append(JudgeRequest(pair.question, pair.prefix, pair.good_step, pair.bad_step))
        labels.append("A")
        requests.append(JudgeRequest(pair.question, pair.prefix, pair.bad_step, pair.good_step))
        labels.append("B")
    return requests, labels


def score_requests(pairs: Sequence[LabelledPair]) -> list[ScoreRequest]:
    """Two requests per pair for the likelihood judge: the good step, then the bad one."""
    return [ScoreRequest(p.question, p.prefix, len(split_steps(p.prefix)) + 1, step)
            for p in pairs for step in (p.good_step, p.bad_step)]  # fmt: skip


def likelihood_judgments(scores: Sequence[float], *, policy_version: int = 0) -> list[Judgment]:
    """Likelihood scores laid out as `score_requests` makes them (good, bad per pair) turned into the two
    judgments `judge_requests` lays out (good as A, then as B): P(A) = exp(s_A) / (exp(s_A) + exp(s_B)), the
    step the model finds likelier wins; -inf (a step not scored) counts as missing, both missing as unparseable."""
    if len(scores) % 2:
        raise ValueError(f"need a good and a bad score per pair, got {len(scores)} scores")
    judgments = []
    for k in range(0, len(scores), 2):
        good, bad = (None if s == -math.inf else s for s in scores[k : k + 2])
        for a, b in ((good, bad), (bad, good)):
            verdict, prob_a = direct_verdict(a, b)
            text = f"likelihood: A {a}, B {b}"
            judgments.append(Judgment(verdict.value, prob_a, text, 0, policy_version))
    return judgments


@dataclass(frozen=True)
class JudgeScores:
    num_judgments: int
    accuracy: float  # right verdicts / all judgments (an unparseable verdict counts as wrong)
    parse_rate: float  # parsed verdicts / all judgments
    pair_accuracy: float  # pairs where both orders' mean P(good step better) > 0.5 (the search's rule)
    share_a: float  # share of parsed verdicts that say A: 0.5 is no position bias
    num_right: int = 0
    num_pairs_right: int = 0

    @property
    def num_pairs(self) -> int:
        return self.num_judgments // 2

    def to_dict(self) -> dict[str, Any]:
        """The scores with 95% Wilson intervals (judgments; pairs)."""
        return dataclasses.asdict(self) | {
            "num_pairs": self.num_pairs,
            "accuracy_ci95": list(wilson(self.num_right, self.num_judgments)),
            "pair_accuracy_ci95": list(wilson(self.num_pairs_right, self.num_pairs)),
        }


def score_judgments(judgments: Sequence[Judgment], labels: Sequence[str]) -> JudgeScores:
    """Scores judgments laid out as `judge_requests` makes them (pairs of orders, good-as-A first)."""
    if len(judgments) != len(labels) or len(labels) % 2:
        raise ValueError(f"need one judgment per label in pairs of orders, got {len(judgments)} and {len(labels)}")
    parsed = [j for j in judgments if j.verdict in ("A", "B")]
    right = sum(j.verdict == label for j, label in zip(judgments, labels, strict=True))
    pairs_right = sum(
        (judgments[i].prob_a + (1.0 - judgments[i + 1].prob_a)) / 2 > 0.5 for i in range(0, len(judgments), 2)
    )
    total = len(judgments)
    return JudgeScores(
        num_judgments=total,
        accuracy=right / total if total else 0.0,
        parse_rate=len(parsed) / total if total else 0.0,
        pair_accuracy=pairs_right / (total // 2) if total else 0.0,
        share_a=sum(j.verdict == "A" for j in parsed) / len(parsed) if parsed else 0.0,
        num_right=right,
        num_pairs_right=pairs_right,
    )


def measure_judge(engines: Sequence[Any], pairs: Sequence[LabelledPair], *, mode: str, max_tokens: int,
                  batch_size: int = 256, timeout_s: float | None = None) -> JudgeScores:  # fmt: skip
    """Judge accuracy of the model the engine actors serve on `pairs`, both orders, greedy verdicts (the
    likelihood judge: each step scored once, `likelihood_judgments`)."""
    import ray

    from psr_ray.engines.api import split_batches

    requests, labels = judge_requests(pairs)
    if mode == JudgeMode.LIKELIHOOD:
        steps = score_requests(pairs)
        refs = [engines[i % len(engines)].score_steps.remote(steps[2 * s : 2 * e]) for i, (s, e) in
                enumerate(split_batches(len(pairs), num_engines=len(engines), batch_size=batch_size // 2))]  # fmt: skip
        scores = [x.score for batch in ray.get(refs, timeout=timeout_s) for x in batch]
        return score_judgments(likelihood_judgments(scores), labels)
    # Both orders of a pair stay in one batch (they share their prompt's prefix in the engine's cache).
    batches = [
        (2 * s, 2 * e) for s, e in split_batches(len(pairs), num_engines=len(engines), batch_size=batch_size // 2)
    ]
    refs = [engines[i % len(engines)].judge.remote(requests[s:e], mode=mode, temperature=0.0, max_tokens=max_tokens)
            for i, (s, e) in enumerate(batches)]  # fmt: skip
    return score_judgments([j for batch in ray.get(refs, timeout=timeout_s) for j in batch], labels)
