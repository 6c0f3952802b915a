"""Oracle-labelled step pairs from a model's own candidate steps: EFT data (the paper's section 3.2: best vs
worst of a policy's candidates by a reward model, here the step oracle) and the held-out pairs on which every
model's judge accuracy is measured.

At one step of a problem (a random step, after its reference steps so far) the model proposes candidates
through the engines' `propose`, exactly as in the search; the oracle labels them (the exact check where the
task has one, else Monte-Carlo rollouts); where some are right and some wrong, a right one (the best) and a
wrong one (the worst) form a pair. Neither the proposing model nor any judge sees the oracle or the answer.

With `own_prefixes`, each problem is also walked on the model's own path, as the search sees its prefixes:
from the empty prefix, a right candidate (drawn uniformly: the step a right judge would choose) extends the
prefix, and every step of the walk is a site, until the model writes no right step or the solution ends.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psr_ray.core.steps import extract_boxed, join_steps
from psr_ray.data.problems import Problem
from psr_ray.engines.api import ProposeRequest
from psr_ray.init_data.labelled import LabelledPair
from psr_ray.oracle.exact import has_exact_check, why_wrong
from psr_ray.oracle.judge import label_steps


@dataclass(frozen=True)
class StepSite:
    """Where candidates are proposed: the next step of `problem` after the steps `previous` (its reference
    steps, or with `own` the model's own right steps)."""

    problem: Problem
    previous: tuple[str, ...]
    own: bool = False

    @property
    def index(self) -> int:  # 0-based index of the step proposed
        return len(self.previous)

    @property
    def prefix(self) -> str:
        return join_steps(list(self.previous))


@dataclass(frozen=True)
class OraclePair:
    problem_id: str
    pair: LabelledPair  # question, prefix, good_step (right by the oracle), bad_step (wrong)
    num_candidates: int
    num_right: int  # right candidates among them
    why_bad: str = "it does not lead to the correct final answer"  # the EFT explanation's reason


@dataclass(frozen=True)
class Sampling:
    num_candidates: int
    temperature: float
    top_p: float
    max_tokens: int
    num_rollouts: int  # Monte-Carlo rollouts per candidate where there is no exact check
    seed: int


def step_sites(problems: Sequence[Problem], *, seed: int) -> list[StepSite]:
    """One site per problem with worked steps, at a step drawn uniformly by `seed`."""
    rng = random.Random(seed)
    return [StepSite(p, p.steps[: rng.randrange(len(p.steps))]) for p in problems if p.steps]


def propose_at(engines: Sequence[Any], sites: Sequence[StepSite], sampling: Sampling) -> list[tuple[str, ...]]:
    """The candidates of every site, in order, the sites split evenly over the engines; site i is seeded
    `(sampling.seed + i) * 1000` (replayable whatever the split)."""
    import ray

    from psr_ray.engines.api import split_batches

    requests = [ProposeRequest(s.problem.question, s.prefix, s.index + 1) for s in sites]
    refs = []
    for b, (start, end) in enumerate(split_batches(len(requests), num_engines=len(engines), batch_size=256)):
        seeds = [(sampling.seed + i) * 1_000 for i in range(start, end)]
        refs.append(engines[b % len(engines)].propose.remote(
            requests[start:end], num_candidates=sampling.num_candidates, temperature=sampling.temperature,
            top_p=sampling.top_p, max_tokens=sampling.max_tokens, seed=seeds))  # fmt: skip
    return [c.steps for batch in ray.get(refs) for c in batch]


def label_candidates(engines: Sequence[Any], tokenizer: Any, sites: Sequence[StepSite],
                     candidates: Sequence[Sequence[str]], sampling: Sampling) -> list[list[bool]]:  # fmt: skip
    """Oracle labels: the exact check where the problem has one, else Math-Shepherd's hard estimate from
    `sampling.num_rollouts` rollouts per candidate on the engines."""
    from psr_ray.oracle.rollouts import StepToValue, hard_label, rollout_values

    labels: list[list[bool] | None] = [None] * len(sites)
    todo = []
    for i, (site, steps) in enumerate(zip(sites, candidates, strict=True)):
        if has_exact_check(site.problem):
            labels[i] = label_steps(site.problem, site.prefix, steps)
        else:
            todo += [(i, j, StepToValue(site.problem, site.previous, step))
                     for j, step in enumerate(steps)]  # fmt: skip
    if todo:
        values = rollout_values(engines, tokenizer, [item for _, _, item in todo], num_rollouts=sampling.num_rollouts,
                                temperature=sampling.temperature, seed=sampling.seed)  # fmt: skip
        for i, steps in enumerate(candidates):
            if labels[i] is None:
                labels[i] = [False] * len(steps)
        for (i, j, _), value in zip(todo, values, strict=True):
            labels[i][j] = hard_label(value)  # type: ignore[index]
    return [list(x) for x in labels]  # type: ignore[arg-type]


def best_and_worst(steps: Sequence[str], labels: Sequence[bool], rng: random.Random) -> tuple[str, str] | None:
    """A right step and a wrong one (both non-empty, different texts), each drawn uniformly among its kind;
    None when the candidates are all right or all wrong."""
    right = sorted({s.strip() for s, ok in zip(steps, labels, strict=True) if ok and s.strip()})
    wrong = sorted({s.strip() for s, ok in zip(steps, labels, strict=True) if not ok and s.strip()} - set(right))
    if not right or not wrong:
        return None
    return rng.choice(right), rng.choice(wrong)


def oracle_pairs(
    engines: Sequence[Any],
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    num_pairs: int,
    sampling: Sampling,
    own_prefixes: bool = False,
    chunk: int = 64,
) -> tuple[list[OraclePair], dict[str, int]]:
    """Up to `num_pairs` oracle pairs from the model's candidates on `problems` (in order, one random step
    each, `chunk` problems at a time until enough pairs; with `own_prefixes` also every step of the model's
    own walk, module docstring), and counts: sites, candidates, right ones, sites with a pair (`own_*`: those
    on the model's own prefixes)."""
    rng = random.Random(sampling.seed)
    sites = step_sites(problems, seed=sampling.seed)
    pairs: list[OraclePair] = []
    counts = {"sites": 0, "candidates": 0, "right": 0, "mixed_sites": 0}
    if own_prefixes:
        counts |= {"own_sites": 0, "own_mixed_sites": 0}
    for start in range(0, len(sites), chunk):
        batch = sites[start : start + chunk]
        if own_prefixes:
            batch += [StepSite(site.problem, (), own=True) for site in batch]
        walk = 0  # a round of proposals: the walks' next steps depend on the labels of this one
        while batch and len(pairs) < num_pairs:
            seed = sampling.seed + start + 7919 * walk
            found = propose_at(engines, batch, Sampling(**{**sampling.__dict__, "seed": seed}))
            labels = label_candidates(engines, tokenizer, batch, found, sampling)
            walks = []
            for site, steps, ok in zip(batch, found, labels, strict=True):
                _count(counts, site, "sites", 1)
                counts["candidates"] += len(steps)
                counts["right"] += sum(ok)
                picked = best_and_worst(steps, ok, rng)
                if picked is not None:
                    _count(counts, site, "mixed_sites", 1)
                    if len(pairs) < num_pairs:
                        pairs.append(_pair(site, picked, len(steps), sum(ok)))
                if site.own and (step := _walk_on(site, steps, ok, rng)) is not None:
                    walks.append(step)
            batch, walk = walks, walk + 1
    return pairs, counts


def _count(counts: dict[str, int], site: StepSite, key: str, n: int) -> None:
    counts[key] += n
    if site.own:
        counts[f"own_{key}"] += n


def _walk_on(site: StepSite, steps: Sequence[str], labels: Sequence[bool], rng: random.Random) -> StepSite | None:
    """The walk's next site: after a right candidate drawn uniformly; None when none is right or the solution
    ends there (a `\\boxed{}` answer, or as many steps as the reference solution has)."""
    right = sorted({s.strip() for s, ok in zip(steps, labels, strict=True) if ok and s.strip()})
    if not right:
        return None
    step = rng.choice(right)
    if extract_boxed(step) is not None or site.index + 1 >= len(site.problem.steps):
        return None
    return StepSite(site.problem, (*site.previous, step), own=True)


def _pair(site: StepSite, picked: tuple[str, str], num_candidates: int, num_right: int) -> OraclePair:
    good, bad = picked
    pair = OraclePair(site.problem.problem_id, LabelledPair(site.problem.question, site.prefix, good, bad),
                      num_candidates, num_right)  # fmt: skip
    if has_exact_check(site.problem):
        reason = why_wrong(site.problem, site.index, bad)
        assert reason is not None, (site, bad)
        pair = OraclePair(pair.problem_id, pair.pair, num_candidates, num_right, reason)
    return pair
