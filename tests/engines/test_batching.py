"""engines/batching.py against a fake `vllm.LLM` that runs one token per step for every unfinished request
(the same enqueue/step surface as vLLM's offline engine)."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

import pytest

from psr_ray.engines.batching import ContinuousBatcher


@dataclass
class Output:
    request_id: str
    finished: bool
    prompt: str


@dataclass
class FakeEngine:
    """Each request needs `params` steps; every step advances all unfinished requests by one."""

    left: dict[str, int] = field(default_factory=dict)
    prompts: dict[str, str] = field(default_factory=dict)
    batches: list[list[str]] = field(default_factory=list)  # the prompts each step ran
    fail_next_step: bool = False

    def has_unfinished_requests(self) -> bool:
        return bool(self.left)

    def step(self) -> list[Output]:
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("engine core died")
        self.batches.append(sorted(self.prompts[r] for r in self.left))
        done = []
        for request_id in list(self.left):
            self.left[request_id] -= 1
            if self.left[request_id] == 0:
                del self.left[request_id]
                done.append(Output(request_id, True, self.prompts[request_id]))
        return done


class FakeLLM:
    def __init__(self) -> None:
        self.llm_engine = FakeEngine()
        self._ids = itertools.count()

    def enqueue(self, prompts: list[str], params: list[int], *, use_tqdm: bool) -> list[str]:
        ids = [str(next(self._ids)) for _ in prompts]
        for request_id, prompt, steps in zip(ids, prompts, params, strict=True):
            self.llm_engine.left[request_id] = steps
            self.llm_engine.prompts[request_id] = prompt
        return [f"{request_id}-1a2b3c4d" for request_id in ids]  # vLLM's internal ids; outputs carry the given one


def test_a_call_joins_the_running_batch_and_returns_without_waiting_for_longer_calls():
    llm = FakeLLM()
    batcher = ContinuousBatcher(llm)
    finished: list[str] = []

    async def call(name: str, prompts: list[str], steps: list[int], delay_steps: int = 0) -> list[str]:
        for _ in range(delay_steps):
            await asyncio.sleep(0)
        outputs = await batcher.generate(prompts, steps)
        finished.append(name)
        assert llm.llm_engine.has_unfinished_requests() == (name == "short")  # the long call still runs
        return [o.prompt for o in outputs]

    async def main() -> tuple[list[str], list[str]]:
        return await asyncio.gather(call("long", ["l1", "l2"], [8, 6]), call("short", ["s1"], [2], delay_steps=2))

    long_out, short_out = asyncio.run(main())
    assert long_out == ["l1", "l2"] and short_out == ["s1"]  # in the order asked, not the order finished
    assert finished == ["short", "long"]
    joined = [batch for batch in llm.llm_engine.batches if "s1" in batch]
    assert joined and all({"l1", "l2"} <= set(batch) for batch in joined)  # s1 ran inside the long call's batch
    assert len(llm.llm_engine.batches) == 8  # one stepping loop for both calls, no second pass for the short one
    assert batcher.num_unfinished == 0 and batcher.busy_seconds > 0


def test_drain_finishes_every_request_in_the_engine_and_wakes_its_call():
    llm = FakeLLM()
    batcher = ContinuousBatcher(llm)

    async def main() -> list[str]:
        task = asyncio.create_task(batcher.generate(["a", "b"], [5, 3]))
        await asyncio.sleep(0)  # the call enqueues; its stepping task has run one step at most
        batcher.drain()  # as a weight update does, between two steps
        assert not llm.llm_engine.has_unfinished_requests()
        return [o.prompt for o in await task]

    assert asyncio.run(main()) == ["a", "b"]
    assert len(llm.llm_engine.batches) == 5  # drained to the end, not stepped twice


def test_an_engine_failure_fails_every_waiting_call_with_its_error_and_later_calls_still_run():
    llm = FakeLLM()
    batcher = ContinuousBatcher(llm)

    async def main() -> list[str]:
        llm.llm_engine.fail_next_step = True
        results = await asyncio.gather(batcher.generate(["a"], [2]), batcher.generate(["b"], [1]),
                                       return_exceptions=True)  # fmt: skip
        assert [str(r) for r in results] == ["engine core died"] * 2
        llm.llm_engine.left.clear()  # the failed requests' state, as a restarted engine would have none
        return [o.prompt for o in await batcher.generate(["c"], [1])]

    assert asyncio.run(main()) == ["c"]


def test_no_prompts_is_no_request():
    llm = FakeLLM()
    assert asyncio.run(ContinuousBatcher(llm).generate([], [])) == []
    assert not llm.llm_engine.batches


@pytest.mark.parametrize("steps", [[1], [3, 1, 2]])
def test_every_call_gets_exactly_its_own_outputs(steps):
    llm = FakeLLM()
    batcher = ContinuousBatcher(llm)

    async def main() -> list[list[str]]:
        calls = [batcher.generate([f"{i}-{j}" for j in range(n)], [n] * n) for i, n in enumerate(steps)]
        return [[o.prompt for o in outs] for outs in await asyncio.gather(*calls)]

    assert asyncio.run(main()) == [[f"{i}-{j}" for j in range(n)] for i, n in enumerate(steps)]


def test_a_request_vllm_drops_without_an_answer_fails_its_call_instead_of_spinning():
    llm = FakeLLM()
    batcher = ContinuousBatcher(llm)

    async def main() -> None:
        call = asyncio.create_task(batcher.generate(["a", "b"], [2, 2]))
        await asyncio.sleep(0)
        llm.llm_engine.left.pop(next(iter(llm.llm_engine.left)))  # finished inside vLLM, never reported
        await call

    with pytest.raises(RuntimeError, match="1 were not answered"):
        asyncio.run(main())
