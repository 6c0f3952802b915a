"""The loop's eval stage measurements: the served policy's greedy accuracy on `eval.benchmarks` and its judge
accuracy on the init's held-out pairs.

M1 (iteration 0 of a run that initialized first) is the cached init's model: the first run on an init measures
it on its own engines and keeps the scores in the init folder (`init_cache.m1_scores_path`, per evaluation
setting and judge mode), and later runs on that init read them back instead of spending the evaluation again.
"""

from __future__ import annotations

import json
import time
from typing import Any

from psr_ray.config import JudgeMode


def iteration_scores(psr: Any, iteration: int, mode: JudgeMode) -> tuple[dict[str, Any], str | None]:
    """The scores of the policy `psr` (the loop's Driver) serves for `iteration`, and the file they were read
    from (None: measured now)."""
    from psr_ray.pipeline.init_cache import m1_scores_path, read_scores

    cache = m1_scores_path(psr.init, psr.cfg, mode) if iteration == 0 and psr.init is not None else None
    scores = read_scores(cache) if cache is not None else None
    if scores is not None:
        print(f"[psr_ray] eval 0: M1's scores read from the init cache ({cache}), measured by an earlier run")
        return scores, str(cache)
    scores = measure(psr, iteration, mode)
    if cache is not None:
        psr.session.commit(cache, json.dumps(scores, indent=2) + "\n")
    return scores, None


def measure(psr: Any, iteration: int, mode: JudgeMode) -> dict[str, Any]:
    """Greedy benchmark rows of the served policy, then its judge accuracy on the held-out pairs."""
    from psr_ray.evaluation.benchmarks import evaluate
    from psr_ray.evaluation.judging import judge_accuracy

    cfg = psr.cfg
    result = evaluate(psr.engines, psr.tokenizer, list(cfg.eval.benchmarks), limit=cfg.eval.limit or None,
                      max_tokens=cfg.eval.max_tokens, policy_version=psr.policy_version,
                      engine_names=psr.engine_names, timeout_s=cfg.run.engine_call_timeout_s)  # fmt: skip
    start = time.perf_counter()
    judge = judge_accuracy(psr.engines, psr.heldout_pairs, mode=mode.value,
                           max_tokens=cfg.judge.max_explanation_tokens, timeout_s=cfg.run.engine_call_timeout_s)  # fmt: skip
    return {
        "benchmarks": result.rows(iteration),
        "eval_s": result.elapsed_s,
        "judge": judge,
        "judge_s": time.perf_counter() - start,
    }
