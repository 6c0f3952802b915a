"""A fake rollout engine for units that need an engine actor's `propose` but no model: its candidates are
made from each problem's reference step (the built-in arith task), so which are right is known exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from psr_ray.engines.api import Candidates, ProposeRequest


def off_by(step: str, delta: int) -> str:
    """`step` with its first result (`... = 24 ...`) moved by `delta`: a wrong step."""
    result = step.split(" = ")[1].split()[0]
    return step.replace(f"= {result}", f"= {int(result) + delta}", 1)


def off_by_one(step: str) -> str:
    return off_by(step, 1)


class ArithEngine:
    """Answers `propose` like `psr_ray.engines.actor.EngineActor`: for each request, `candidates(request,
    right)` where `right` is the problem's reference step at the request's step index (truncated to
    `num_candidates`). Never judges. Run it as a Ray actor; `candidates` travels with it (a function defined
    in a test module needs `cloudpickle.register_pickle_by_value` on that module)."""

    def __init__(
        self,
        problems: list[Any],
        *,
        candidates: Callable[[ProposeRequest, str], tuple[str, ...]],
        policy_version: int = 1,
    ):
        self.steps = {p.question: p.steps for p in problems}
        self.candidates = candidates
        self.policy_version = policy_version

    def propose(self, requests, *, num_candidates, temperature, top_p, max_tokens, seed):
        out = []
        for r in requests:
            steps = self.candidates(r, self.steps[r.question][r.step_index - 1])
            out.append(
                Candidates(steps=tuple(steps[:num_candidates]), num_tokens=30, policy_version=self.policy_version)
            )
        return out

    def judge(self, requests, **kwargs):
        raise AssertionError("ArithEngine never judges")

    def ready(self) -> bool:
        return True
