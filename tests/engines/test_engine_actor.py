"""The vLLM engine actors with the real tiny model inside a real local Ray: one rollout and one judge engine,
started once for the module."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest

from psr_ray.config import ModelConfig, PSRConfig
from psr_ray.core import prompts, steps
from psr_ray.engines.api import JudgeRequest, ProposeRequest, ScoreRequest, StepLikelihood

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
JUDGE_REQUESTS = [
    JudgeRequest(QUESTION, "", "3 + 4 = 7 apples.", "3 + 4 = 8 apples."),
    JudgeRequest(QUESTION, "Step 1: 3 + 4 = 7\n", "The answer is \\boxed{7}.", "The answer is \\boxed{8}."),
]
GREEDY_PROMPTS = ["Step 1: Tom has", "The answer is"]


@pytest.fixture(scope="module")
def cfg() -> PSRConfig:
    # The judge engine with 32-token KV blocks (the default), the rollout engine at vLLM's CPU default of 128.
    base = PSRConfig()
    return dataclasses.replace(base, model=ModelConfig(max_model_len=512),
                               rollout=dataclasses.replace(base.rollout, cpu_kv_block_size=128))  # fmt: skip


@pytest.fixture(scope="module")
def workers(ray_cluster, tiny_model_dir, cfg):
    from concurrent.futures import ThreadPoolExecutor

    from psr_ray.engines.pool import start_engine_pool

    # Engines of these names left by another module would be reused with their weights: start fresh ones.
    for name in set(ray_cluster.util.list_named_actors()) & {"psr-rollout-0", "psr-judge-0"}:
        ray_cluster.kill(ray_cluster.get_actor(name))
        while name in ray_cluster.util.list_named_actors():  # the name frees once the actor is dead
            time.sleep(0.1)
    # Both engines start at once (each creator call waits for its own engine to be ready).
    with ThreadPoolExecutor(2) as pool:
        rollout_future = pool.submit(start_engine_pool, cfg, "rollout", tiny_model_dir)
        judge = start_engine_pool(cfg, "judge", tiny_model_dir)
        rollout = rollout_future.result()
    yield rollout.actors[0], judge.actors[0]
    # Other test modules may start engines of the same names: leave them none to reuse.
    for actor in rollout.actors + judge.actors:
        ray_cluster.kill(actor)


def test_named_engines_are_ready_and_reused(ray_cluster, workers, tiny_model_dir, cfg):
    from psr_ray.engines.pool import start_engine_pool

    rollout, judge = workers
    info = ray_cluster.get(ray_cluster.get_actor("psr-rollout-0").ready.remote())
    assert info["model"] == tiny_model_dir and info["role"] == "rollout" and info["policy_version"] == 0
    assert ray_cluster.get(ray_cluster.get_actor("psr-judge-0").ready.remote())["role"] == "judge"
    (again,) = start_engine_pool(cfg, "rollout", tiny_model_dir).actors  # a restarted driver finds the live engine
    assert ray_cluster.get(again.ready.remote())["pid"] == info["pid"]
    with pytest.raises(ValueError, match="already exists"):
        start_engine_pool(cfg, "rollout", tiny_model_dir + "-other")


def test_propose_returns_cleaned_candidates(ray_cluster, workers):
    rollout, _ = workers
    requests = [
        ProposeRequest(QUESTION, "", 1),
        ProposeRequest(QUESTION, "Step 1: 3 + 4 = 7\n", 2),
        ProposeRequest("7 " * 2000, "", 1),  # longer than max_model_len: empty candidates, not a failed batch
    ]
    kwargs = dict(num_candidates=3, temperature=1.0, top_p=0.95, max_tokens=16, seed=5)
    first = ray_cluster.get(rollout.propose.remote(requests, **kwargs))
    assert len(first) == 3
    for candidates in first[:2]:
        assert len(candidates.steps) == 3 and candidates.policy_version == 0
        assert 3 <= candidates.num_tokens <= 3 * 16
        assert all(step == steps.clean_step(step) for step in candidates.steps)
        assert len(set(candidates.steps)) > 1  # T=1 samples differ
    assert first[2].steps == ("", "", "") and first[2].num_tokens == 0
    assert ray_cluster.get(rollout.propose.remote(requests, **kwargs)) == first  # seeded


def test_judge_explain_returns_valid_verdicts(ray_cluster, workers):
    _, judge = workers
    judgments = ray_cluster.get(judge.judge.remote(JUDGE_REQUESTS, mode="explain", temperature=0.0, max_tokens=24))
    assert len(judgments) == 2
    for j in judgments:
        assert j.verdict in ("A", "B", "unparseable")
        assert j.verdict == prompts.parse_verdict(j.text).value
        assert j.prob_a == {"A": 1.0, "B": 0.0, "unparseable": 0.5}[j.verdict]
        assert 1 <= j.num_tokens <= 24 and j.policy_version == 0


def test_judge_direct_matches_hf_next_token_probabilities(ray_cluster, workers, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, judge = workers
    judgments = ray_cluster.get(judge.judge.remote(JUDGE_REQUESTS, mode="direct"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    letters = {
        c: [i for i in range(len(tokenizer)) if tokenizer.decode([i]).lstrip(" ") in (c, c + "]", c + "]]")]
        for c in "AB"
    }
    for request, j in zip(JUDGE_REQUESTS, judgments, strict=True):
        assert j.verdict in ("A", "B")  # direct mode always decides
        text = prompts.render_judge_prompt(
            tokenizer, request.question, request.prefix, request.step_a, request.step_b, mode="direct"
        )
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
        lp = {c: torch.logsumexp(logprobs[letters[c]], dim=0).item() for c in "AB"}
        expected = 1.0 / (1.0 + math.exp(lp["B"] - lp["A"]))
        assert j.prob_a == pytest.approx(expected, abs=1e-4)
        assert j.verdict == ("A" if expected > 0.5 else "B")


def test_score_steps_are_the_prompt_log_probs_of_the_step_tokens_only(ray_cluster, workers, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, judge = workers
    requests = [ScoreRequest(QUESTION, "", 1, "3 + 4 = 7 apples."), ScoreRequest(QUESTION, "", 1, "  "),
                ScoreRequest(QUESTION, "Step 1: 3 + 4 = 7\n", 2, "The answer is \\boxed{7}.")]  # fmt: skip
    scored = ray_cluster.get(judge.score_steps.remote(requests))
    assert scored[1] == StepLikelihood(0.0, 0, 0)  # an empty step: nothing to score
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for request, got in zip(requests[::2], scored[::2], strict=True):
        prompt = prompts.render_solver_prompt(tokenizer, request.question, request.prefix, request.step_index)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        step_ids = tokenizer.encode(steps.step_continuation(request.step), add_special_tokens=False)
        ids = torch.tensor([prompt_ids + step_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        token_logprobs = [logprobs[p - 1, ids[0, p]].item() for p in range(1, ids.shape[1])]
        assert got.num_tokens == len(step_ids) >= 3 and got.policy_version == 0
        assert got.logprob == pytest.approx(sum(token_logprobs[-len(step_ids) :]), abs=1e-3)
        assert got.score == pytest.approx(got.logprob / len(step_ids))
        # The prompt's tokens are not counted: with them the sum would be lower by their log-probs.
        assert sum(token_logprobs) < got.logprob - 10


def test_generate_is_greedy_and_deterministic(ray_cluster, workers):
    rollout, _ = workers
    first = ray_cluster.get(rollout.generate.remote(GREEDY_PROMPTS, max_tokens=12))
    again = ray_cluster.get(rollout.generate.remote(GREEDY_PROMPTS, max_tokens=12))
    assert first == again
    assert all(1 <= g.num_tokens <= 12 and g.policy_version == 0 for g in first)


def test_the_prefix_cache_reuses_whole_blocks_so_smaller_blocks_reuse_a_shorter_shared_prefix(
    ray_cluster, workers, tiny_model_dir
):
    """Two prompts sharing 80-110 tokens, as two judge prompts of one step share the question and the prefix:
    the engine with 32-token blocks (`cpu_kv_block_size`) reuses the shared whole blocks, the one at 128 none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    shared = "Tom counts his apples:"
    while len(tokenizer.encode(shared, add_special_tokens=False)) < 80:
        shared += f" {len(shared)} apples,"
    assert len(tokenizer.encode(shared, add_special_tokens=False)) <= 110
    hits = {}
    for name, engine in zip(("rollout", "judge"), workers, strict=True):
        before = ray_cluster.get(engine.engine_stats.remote())["prefix_cache_hits"]
        for ending in (" Which is first?", " Which is second?"):
            ray_cluster.get(engine.generate.remote([f"{name}: {shared}{ending}"], max_tokens=1))
        hits[name] = ray_cluster.get(engine.engine_stats.remote())["prefix_cache_hits"] - before
    assert hits == {"rollout": 0, "judge": 64}, hits


def test_calls_in_flight_share_the_running_batch_and_an_update_finishes_them_first(ray_cluster, workers):
    """Continuous batching (engines/batching.py) on the real engine: a one-token call sent after a long call
    returns while the long one still runs (it joined its batch instead of queueing behind it); a weight update
    sent meanwhile finishes the long call at the old weights and version first, then serves the new version."""
    rollout, _ = workers
    # 128 sequences of up to 448 tokens: on a quiet machine the tiny model finished 32 x 256 within the
    # second the test used to wait, before the short call was sent.
    long_prompts = [f"Step {i}: Tom has" for i in range(16)]
    long_call = rollout.sample.remote(long_prompts, num_samples=8, temperature=1.0, max_tokens=448, seed=7)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not ray_cluster.get(
        rollout.__ray_call__.remote(lambda actor: actor._batcher.num_unfinished)
    ):
        time.sleep(0.05)  # until the long call's requests are in the engine
    short = ray_cluster.get(rollout.generate.remote(GREEDY_PROMPTS, max_tokens=1), timeout=120)
    assert len(short) == 2 and ray_cluster.wait([long_call], timeout=0)[1] == [long_call]  # long still running
    version = ray_cluster.get(rollout.policy_version.remote())
    state = ray_cluster.get(rollout.ready.remote())
    update = rollout.update_weights_from_path.remote(state["model"], policy_version=version + 1)
    samples = ray_cluster.get(long_call, timeout=600)
    ray_cluster.get(update, timeout=600)
    assert [len(s) for s in samples] == [8] * 16 and all(g.policy_version == version for s in samples for g in s)
    assert sum(g.num_tokens for s in samples for g in s) > 16 * 8  # it really generated, past the short call
    after = ray_cluster.get(rollout.generate.remote(GREEDY_PROMPTS, max_tokens=4))
    assert all(g.policy_version == version + 1 for g in after)


def test_update_weights_changes_outputs_and_restores_exactly(ray_cluster, workers, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    rollout, _ = workers
    original = load_file(f"{tiny_model_dir}/model.safetensors")
    before = ray_cluster.get(rollout.generate.remote(GREEDY_PROMPTS, max_tokens=12))
    noise = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.5 * torch.randn(v.shape, generator=noise) for k, v in original.items()}

    assert ray_cluster.get(rollout.update_weights.remote(perturbed, policy_version=1)) == len(original)
    assert ray_cluster.get(rollout.policy_version.remote()) == 1
    changed = ray_cluster.get(rollout.generate.remote(GREEDY_PROMPTS, max_tokens=12))
    assert [g.text for g in changed] != [g.text for g in before]
    assert all(g.policy_version == 1 for g in changed)

    # (name, tensor) pairs are accepted too; the originals give token-identical greedy output again.
    ray_cluster.get(rollout.update_weights.remote(list(original.items()), policy_version=2))
    restored = ray_cluster.get(rollout.generate.remote(GREEDY_PROMPTS, max_tokens=12))
    assert [g.text for g in restored] == [g.text for g in before]
    assert all(g.policy_version == 2 for g in restored)

    ray_cluster.get(rollout.update_weights.remote(perturbed, policy_version=3))
    assert ray_cluster.get(rollout.update_weights_from_path.remote(tiny_model_dir, policy_version=4)) == len(original)
    from_path = ray_cluster.get(rollout.generate.remote(GREEDY_PROMPTS, max_tokens=12))
    assert [g.text for g in from_path] == [g.text for g in before]
    assert ray_cluster.get(rollout.ready.remote())["policy_version"] == 4


def test_a_value_error_inside_an_engine_is_reported_as_an_internal_error(ray_cluster, workers, capsys):
    """`ray.get` re-raises the engine's ValueError as a RayTaskError that is also a ValueError: the CLI reports
    it as an internal error (its own message, the remote traceback saved to a file), not as a user's mistake."""
    from pathlib import Path

    from psr_ray.app.cli import is_user_error, report_error

    rollout, _ = workers
    two_seeds = dict(num_candidates=2, temperature=1.0, top_p=0.95, max_tokens=8, seed=[1, 2])  # for one request
    try:
        ray_cluster.get(rollout.propose.remote([ProposeRequest(QUESTION, "", 1)], **two_seeds))
    except ValueError as err:  # as the CLI catches it
        assert type(err).__name__ == "RayTaskError(ValueError)" and not is_user_error(err)
        assert report_error("run", err) == 1
    else:
        pytest.fail("the engine accepted two seeds for one request")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "psr-ray run failed: RayTaskError(ValueError): got 2 seeds for 1 propose requests (traceback: "
    )
    saved = Path(lines[0].rsplit("(traceback: ", 1)[1].rstrip(")"))
    try:
        text = saved.read_text()
        assert "Traceback" in text and "psr_ray/engines/actor.py" in text and "in propose" in text
    finally:
        saved.unlink()
