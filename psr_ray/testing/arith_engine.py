"""A fake rollout engine for units that need an engine actor's `propose` (and `score_steps`) but no model: its
candidates are made from each problem's reference step (the built-in arith task), so which are right is known
exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from psr_ray.engines.api import Candidates, ProposeRequest, ScoreRequest, StepLikelihood


def off_by(step: str, delta: int) -> str:
    """`step` with its first result (`... = 24 ...`) moved by `delta`: a wrong step."""
    result = step.split(" = ")[1].split()[0]
    return step.replace(f"= {result}", f"= {int(result) + delta}", 1)


def off_by_one(step: str) -> str:
    return off_by(step, 1)


def right_is_likelier(request: ScoreRequest, right: str) -> float:
    """A mean log-probability per token: -0.5 for the reference step, -2.0 for any other."""
    return -0.5 if request.step.strip() == right.strip() else -2.0


class ArithEngine:
    """Answers `propose` like `psr_ray.engines.actor.EngineActor`: for each request, `candidates(request,
    right)` where `right` is the problem's reference step at the request's step index (truncated to
    `num_candidates`). Never judges; `score_steps` answers like the engine's prompt log-probs (judge.mode=
    likelihood): `likelihood(request, right)` is the step's mean log-probability per token, one token per word.
    Run it as a Ray actor; `candidates` travels with it (a function defined in a test module needs
    `cloudpickle.register_pickle_by_value` on that module)."""

    def __init__(
        self,
        problems: list[Any],
        *,
        candidates: Callable[[ProposeRequest, str], tuple[str, ...]],
        likelihood: Callable[[ScoreRequest, str], float] = right_is_likelier,
        policy_version: int = 1,
    ):
        self.steps = {p.question: p.steps for p in problems}
        self.candidates = candidates
        self.likelihood = likelihood
        self.policy_version = policy_version

    def propose(self, requests, *, num_candidates, temperature, top_p, max_tokens, seed):
        out = []
        for r in requests:
            steps = self.candidates(r, self.steps[r.question][r.step_index - 1])
            out.append(
                Candidates(steps=tuple(steps[:num_candidates]), num_tokens=30, policy_version=self.policy_version)
            )
        return out

    def score_steps(self, requests: list[ScoreRequest]) -> list[StepLikelihood]:
        out = []
        for r in requests:
            num_tokens = len(r.step.split())
            mean = self.likelihood(r, self.steps[r.question][r.step_index - 1])
            out.append(StepLikelihood(mean * num_tokens, num_tokens, self.policy_version))
        return out

    def judge(self, requests, **kwargs):
        raise AssertionError("ArithEngine never judges")

    def ready(self) -> bool:
        return True
