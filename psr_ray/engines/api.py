"""What the search sends to the rollout and judge engines and what comes back. Pure data, no Ray.

Engine actors (psr_ray/engines/actor.py) expose, as Ray actor methods:
  propose(requests: list[ProposeRequest], *, num_candidates, temperature, top_p, max_tokens,
          seed: int | list[int] | None) -> list[Candidates]       (a list: one base seed per request)
  judge(requests: list[JudgeRequest], *, mode, temperature, max_tokens) -> list[Judgment]
  score_steps(requests: list[ScoreRequest]) -> list[StepLikelihood]      (judge.mode=likelihood)
  generate(prompts: list[str], *, max_tokens) -> list[Generation]       (greedy, for evaluation)
  sample(prompts: list[str], *, num_samples, temperature, top_p, max_tokens, seed) -> list[list[Generation]]
                                                                        (the step oracle's rollouts)
  policy_version() -> int
  update_weights(named_tensors, *, policy_version) -> int               (in place, no restart)
  update_weights_from_path(hf_dir, *, policy_version) -> int
  probe(token_ids, num_top) -> dict                                     (log-probs: a sync's check)
and the weight-sync transaction (check_update, begin_update, end_update, commit_update, rollback_update:
psr_ray/weight_sync/receivers.py; each transport's loads, e.g. load_bucket, in its module). Generation raises EngineUpdatingError while an update
is under way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ProposeRequest:
    question: str
    prefix: str  # previous steps, as steps.join_steps writes them
    step_index: int  # 1-based index of the step to propose


@dataclass(frozen=True)
class Candidates:
    steps: tuple[str, ...]  # cleaned step contents (no `Step k:` header), one per sample
    num_tokens: int  # generated tokens over all samples
    policy_version: int


@dataclass(frozen=True)
class JudgeRequest:
    question: str
    prefix: str
    step_a: str
    step_b: str


@dataclass(frozen=True)
class Judgment:
    verdict: str  # "A", "B", "unparseable" or "draw" (prompts.Verdict values)
    prob_a: float  # P(A better); 1/0 for a parsed explain-mode verdict, 0.5 when unparseable
    text: str  # the judge's raw output (explanation), for provenance and debugging
    num_tokens: int
    policy_version: int


@dataclass(frozen=True)
class ScoreRequest:
    """A candidate step to score by the policy's own likelihood under the prompt that proposed it."""

    question: str
    prefix: str
    step_index: int  # 1-based, as in the ProposeRequest that proposed `step`
    step: str


@dataclass(frozen=True)
class StepLikelihood:
    """log P(step | solver prompt): the sum over the step's tokens (prompt tokens excluded)."""

    logprob: float
    num_tokens: int  # the step's tokens; 0 for an empty step or a prompt too long for the engine
    policy_version: int

    @property
    def score(self) -> float:
        """The likelihood judge's score: the mean log-probability per step token (-inf without tokens).
        Mean, not sum: measured on the same held-out pairs they tie (sampled candidates of an init's M1, 29
        pairs: 75.9% vs 72.4% judged by M0, 75.9% vs 79.3% by M1; GSM8K steps with one number changed: 96% vs
        97%; bench/results/judge_accuracy_likelihood_*.md), and a sum ranks steps whose lengths differ by tens
        of tokens (5 to 90 among those candidates) by length first, so step-DPO on its pairs would learn
        "shorter is better"."""
        return self.logprob / self.num_tokens if self.num_tokens else -math.inf


@dataclass(frozen=True)
class Generation:
    text: str
    num_tokens: int
    policy_version: int


def split_batches(num_prompts: int, *, num_engines: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, end) batches of at most `batch_size`, at least one per engine when there are enough prompts,
    sizes within one of each other so the engines finish together."""
    if num_prompts == 0:
        return []
    count = min(num_prompts, max(num_engines, math.ceil(num_prompts / batch_size)))
    base, extra = divmod(num_prompts, count)
    bounds, start = [], 0
    for i in range(count):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds
