"""Continuous batching for an engine actor: many calls in flight, all in one running vLLM batch.

`EngineActor` is a Ray async actor: its generation methods are coroutines on the actor's one event loop, so a
call that arrives while others run does not queue behind them. Each call hands its requests to vLLM's engine
(`LLM.enqueue`) and awaits them; one stepping task runs `llm_engine.step()` while any request is unfinished,
so a request joins the batch at the next step and its call returns as soon as its own requests finish, with
no call-level tail. Everything else the actor does (weight updates, stats) is a plain method: Ray runs those
on the same loop, between two steps, never during one.

Before the weights change, `drain()` steps every request already in the engine to completion at the old
weights (the gate then refuses new ones), so no request mixes two policies. This keeps vLLM's in-process
engine (`LLM`), whose worker the weight receivers reach with `collective_rpc`; vLLM's `AsyncLLM` would put the
engine core in a separate process.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any


class ContinuousBatcher:
    """Runs the requests of concurrent calls through one `vllm.LLM` step by step."""

    def __init__(self, llm: Any):
        self._llm = llm
        self._waiting: dict[str, asyncio.Future[Any]] = {}
        self._stepper: asyncio.Task[None] | None = None
        self.busy_seconds = 0.0  # time spent in engine steps: the engine's busy fraction over a wall time

    @property
    def num_unfinished(self) -> int:
        return len(self._waiting)

    async def generate(self, prompts: list[Any], params: list[Any]) -> list[Any]:
        """vLLM's final `RequestOutput` of each prompt, in order, once all of them have finished."""
        if not prompts:
            return []
        loop = asyncio.get_running_loop()
        # vLLM answers under the id it was given; `enqueue` returns it with a random suffix (`<id>-<8 chars>`).
        request_ids = [internal.rsplit("-", 1)[0] for internal in self._llm.enqueue(prompts, params, use_tqdm=False)]
        futures = [loop.create_future() for _ in request_ids]
        self._waiting.update(zip(request_ids, futures, strict=True))
        if self._stepper is None or self._stepper.done():
            self._stepper = loop.create_task(self._run())
        return list(await asyncio.gather(*futures))

    def drain(self) -> None:
        """Steps every request in the engine to completion now (called before its weights change)."""
        while self._llm.llm_engine.has_unfinished_requests():
            self._step()

    async def _run(self) -> None:
        try:
            while self._waiting:
                if not self._llm.llm_engine.has_unfinished_requests():  # never spin on answers that cannot come
                    raise RuntimeError(f"vLLM has no request left but {len(self._waiting)} were not answered")
                self._step()
                await asyncio.sleep(0)  # calls that arrived during the step enqueue before the next one
        except BaseException as err:  # the engine failed: every call waiting on it fails with its error
            waiting, self._waiting = self._waiting, {}
            for future in waiting.values():
                if not future.done():
                    future.set_exception(err)

    def _step(self) -> None:
        start = time.perf_counter()
        outputs = self._llm.llm_engine.step()
        self.busy_seconds += time.perf_counter() - start
        for output in outputs:
            if output.finished:
                future = self._waiting.pop(output.request_id, None)
                if future is not None and not future.done():
                    future.set_result(output)
