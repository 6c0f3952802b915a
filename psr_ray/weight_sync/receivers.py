"""The engine's end of weight sync that every transport shares, mixed into `EngineActor` (which provides
`self.llm`, `self.settings`, `self.name` and `self._in_process`). Each transport's own receiving methods sit in
its module beside its sender (`ObjectStoreReceiver.load_bucket` in object_store.py, `CudaIpcReceiver.
load_bucket_from_ipc` in cuda_ipc.py, `NcclReceiver.transfer_*` in nccl.py, `ExportReceiver.load_folder` in
export.py), each a subclass of `WeightReceiver` that `EngineActor` mixes in beside it.

One update is a transaction (base.py drives it for a sync): `check_update(plan)` -> `begin_update` -> the
transport's loads -> `end_update` (answers the probe) -> `commit_update` or `rollback_update`. The gate
(gate.py) refuses generation from `begin_update` until commit or rollback. If the update fails after the
engine's layers were touched, the engine itself rolls back before it reports the error: the weights it served
before come back from `restore_dir` (the old policy's HF folder; by default the folder it last loaded whole)
and it keeps its old policy version. `update_weights` (here) and `update_weights_from_path` (export.py) are
whole updates in one call (tests, engine restarts).
"""

from __future__ import annotations

import tempfile
from typing import Any, NoReturn

from psr_ray.weight_sync.gate import UpdateGate, UpdateState
from psr_ray.weight_sync.plan import (
    TensorMeta,
    bucket_problems,
    checkpoint_spec,
    dtype_name,
    plan_problems,
    tensor_plan,
    tied_aliases,
)

# How an update's weights enter the engine: our worker extension (object store, CUDA IPC, in-memory, folders),
# or a transport's own way (nccl.py: vLLM's weight-transfer engine), which overrides `_start_reload` and
# `_finish_reload`.
VIA_EXTENSION = "extension"


class WeightReceiver:
    llm: Any
    settings: Any
    name: str
    _in_process: bool
    _batcher: Any  # engines/batching.py: the requests in the engine, finished (`drain`) before its weights change

    def _init_receiver(self, policy_version: int) -> None:
        self._gate = UpdateGate(self.name, policy_version)
        self._spec = checkpoint_spec(self.settings.model_path)
        self._aliases = tied_aliases(self.settings.model_path)
        self._weights_dir: str | None = self.settings.model_path  # a folder holding the weights served now
        self._restore_dir: str | None = None
        self._plan: list[TensorMeta] = []
        self._via = VIA_EXTENSION
        self._asleep: list[str] = []  # vLLM memory tags still offloaded (sleep): woken weights first

    @property
    def _policy_version(self) -> int:
        return self._gate.policy_version

    def policy_version(self) -> int:
        return self._gate.policy_version

    def node(self) -> tuple[str, str]:
        """(this engine's name, the id of the Ray node it runs on): where a sync report says the weights went."""
        import ray

        return self.name, ray.get_runtime_context().get_node_id()

    def update_state(self) -> str:
        if self._asleep and self._gate.state is UpdateState.SERVING:  # half woken by an update that stopped early
            return UpdateState.ASLEEP.value
        return self._gate.state.value

    # ---- the transaction ------------------------------------------------------------------------------

    def check_update(self, plan: list[TensorMeta], *, policy_version: int) -> str:
        """Refuses (ValueError, weights untouched) a plan whose names, shapes or dtypes do not fit."""
        problems = plan_problems(plan, self._spec, self._aliases)
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError(f"engine {self.name}: update to policy {policy_version} refused, weights unchanged: "
                             + "; ".join(problems[:5]) + more)  # fmt: skip
        return self.name

    def begin_update(
        self, plan: list[TensorMeta], *, policy_version: int, restore_dir: str | None = None, via: str = VIA_EXTENSION
    ) -> str:
        """Checks the plan, then starts one reload; generation is refused until commit or rollback."""
        if self._gate.in_update:  # an update whose sender vanished: undo it first
            self.rollback_update()
        self.check_update(plan, policy_version=policy_version)
        self._batcher.drain()  # the requests already in the engine finish on the weights they started with
        if self._gate.state is UpdateState.ASLEEP:  # colocated: only the weights now, the KV cache once they are in
            self._wake(["weights"])
            self._gate.wake()
        self._gate.begin(policy_version)
        self._plan = [(n, tuple(s), d) for n, s, d in plan]
        self._restore_dir = restore_dir or self._weights_dir
        self._via = via
        self._guarded(self._start_reload)
        return self.name

    def end_update(self, probe_token_ids: list[int] | None = None, num_top: int = 8) -> dict[str, Any] | None:
        """Finishes loading; returns the engine's answer to the probe (None without one). Still gated."""
        self._gate.require(UpdateState.LOADING, "finish an update")

        def finish() -> None:
            self._finish_reload()
            self._wake(["kv_cache"])  # a colocated engine's KV cache, now that its weights are in (the probe needs it)
            # Cached prefix KV was computed by the old weights; reusing it would mix two policies.
            self.llm.reset_prefix_cache()

        self._guarded(finish)
        self._gate.loaded()
        if probe_token_ids is None:
            return None
        return self._guarded(lambda: self._probe(probe_token_ids, num_top))

    def commit_update(self, *, weights_dir: str | None = None) -> int:
        """Serves the new weights at the new policy version (`weights_dir`: a folder that holds them)."""
        version = self._gate.commit()
        self._weights_dir = weights_dir
        self._plan = []
        return version

    def serving_from(self, hf_dir: str, *, policy_version: int) -> bool:
        """Records that `hf_dir` holds the weights of `policy_version` (the export of what was pushed), so a
        later failed update can restore them; False (nothing recorded) if this engine serves another version."""
        if self._gate.state is not UpdateState.SERVING or self._gate.policy_version != policy_version:
            return False
        self._weights_dir = hf_dir
        return True

    def rollback_update(self) -> int:
        """Back to the weights served before the update, at the old version; returns that version. A no-op
        when no update is under way. If they cannot be restored the engine is BROKEN and serves nothing."""
        if self._gate.state is UpdateState.BROKEN:
            raise RuntimeError(f"engine {self.name} serves no policy: {self._gate.reason}")
        if not self._gate.in_update:
            return self._gate.policy_version
        try:
            if self._gate.state is UpdateState.LOADING:
                self._rpc("abort_update")  # layers still on meta get their old tensors back
            if self._restore_dir is None:
                raise RuntimeError("no folder holds the weights it served before (an in-memory update)")
            self._load_whole(self._restore_dir)
            self._wake(["kv_cache"])
            self.llm.reset_prefix_cache()
        except Exception as err:
            self._gate.broke(f"a failed update could not be undone ({type(err).__name__}: {err})")
            raise
        self._gate.restored()
        self._weights_dir = self._restore_dir
        return self._gate.policy_version

    def sleep(self) -> None:
        """Colocated engines while the trainer trains: weights offloaded to CPU, KV cache freed (vLLM sleep
        level 1; nothing to free on CPU engines). Generation is refused until `wake_up`. A sync wakes the
        weights when it begins and the KV cache once they are loaded (`begin_update`, `end_update`), so the
        two are never both allocated beside the trainer's memory and the weights in flight."""
        self._gate.sleep()
        self._batcher.drain()
        self.llm.sleep(level=1)
        self._asleep = ["weights", "kv_cache"]

    def wake_up(self) -> None:
        """Everything still asleep, weights first (an engine whose sync never came)."""
        self._wake(["weights", "kv_cache"])
        if self._gate.state is UpdateState.ASLEEP:
            self._gate.wake()

    def _wake(self, tags: list[str]) -> None:
        """vLLM's `wake_up` of those `tags` still asleep, in order (vLLM resumes scheduling once all are up)."""
        for tag in tags:
            if tag in self._asleep:
                self.llm.wake_up(tags=[tag])
                self._asleep.remove(tag)

    # ---- whole updates in one call -----------------------------------------------------------------

    def update_weights(self, named_tensors: Any, *, policy_version: int, restore_dir: str | None = None) -> int:
        """Loads HF-named weights (a dict or `(name, tensor)` pairs, any subset of the model) in place and
        serves them as `policy_version`; returns how many tensors were loaded."""
        items = list(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
        self.begin_update(tensor_plan(dict(items)), policy_version=policy_version, restore_dir=restore_dir)
        count = self._load_named(items)
        self.end_update()
        self.commit_update()
        return count

    def probe(self, token_ids: list[int], num_top: int = 8) -> dict[str, Any]:
        """Log-probs of every prompt token given the ones before it, and the top `num_top` next tokens
        (probe.py compares them with the trainer's)."""
        if self._gate.state is not UpdateState.LOADED:
            self._gate.check_serving()
        self._batcher.drain()  # `LLM.generate` below steps the engine to empty and returns every output it sees
        return self._probe(token_ids, num_top)

    # ---- internals ---------------------------------------------------------------------------------

    def _start_reload(self) -> None:
        """Starts the engine's one reload for the update begun (layers on meta until their weights arrive)."""
        self._rpc("begin_update")

    def _finish_reload(self) -> None:
        """Ends that reload: layers that received nothing get their old tensors back."""
        self._rpc("end_update")

    def _load_named(self, named: list[tuple[str, Any]]) -> int:
        """`(name, tensor)` pairs into the update begun, checked against its plan first; returns their count."""
        self._check_bucket([(n, tuple(t.shape), dtype_name(t.dtype)) for n, t in named])
        return self._guarded(lambda: self._load(named))

    def _rpc(self, method: str, *args: Any) -> Any:
        (result, *_) = self.llm.collective_rpc(method, args=args)
        return result

    def _check_bucket(self, metas: list[tuple[str, tuple[int, ...], str]]) -> None:
        problems = bucket_problems(metas, self._plan)
        if problems:
            self._fail(ValueError("; ".join(problems[:5])))

    def _guarded(self, step: Any) -> Any:
        """Runs one step of an update; if it fails, rolls back first, then reports the real error."""
        try:
            return step()
        except Exception as err:
            self._fail(err)

    def _fail(self, err: Exception) -> NoReturn:
        version = self._gate.pending_version
        try:
            self.rollback_update()
            note = f"rolled back to policy {self._gate.policy_version} from {self._weights_dir}"
        except Exception as undo:
            note = f"could not roll back ({type(undo).__name__}: {undo}); it serves nothing until a whole update"
        raise RuntimeError(f"engine {self.name}: update to policy {version} failed ({type(err).__name__}: {err}); "
                           f"{note}") from err  # fmt: skip

    def _load(self, named: list[tuple[str, Any]]) -> int:
        if self._in_process:
            return self._rpc("load_bucket", named)
        # Multiprocess RPC serializes tensors as lists: hand the workers a safetensors file instead.
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(prefix="psr_weights_") as folder:
            # clone(): save_file refuses tensors that share storage (tied embeddings).
            save_file({n: t.detach().contiguous().clone() for n, t in named}, f"{folder}/model.safetensors")
            return self._rpc("load_bucket_from_path", folder)

    def _load_folder(self, hf_dir: str) -> int:
        if self._in_process:
            from psr_ray.runtime.models import load_safetensors_dir

            return self._rpc("load_bucket", list(load_safetensors_dir(hf_dir).items()))
        return self._rpc("load_bucket_from_path", hf_dir)

    def _load_whole(self, hf_dir: str) -> None:
        """A whole, separate reload of a folder (rollback)."""
        self._rpc("begin_update")
        try:
            self._load_folder(hf_dir)
        except BaseException:
            self._rpc("abort_update")
            raise
        self._rpc("end_update")

    def _probe(self, token_ids: list[int], num_top: int) -> dict[str, Any]:
        from vllm import SamplingParams

        prompt = {"prompt_token_ids": list(token_ids)}
        # First as any request is served (through the prefix cache: stale blocks would show), then with
        # prompt log-probs (vLLM computes those afresh, never from the cache).
        (cached,) = self.llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, logprobs=num_top),
                                      use_tqdm=False)  # fmt: skip
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, logprobs=num_top)
        (out,) = self.llm.generate([prompt], params, use_tqdm=False)
        return {
            "prompt": [entry[t].logprob for entry, t in zip(out.prompt_logprobs[1:], token_ids[1:], strict=True)],
            "top": {int(t): lp.logprob for t, lp in out.outputs[0].logprobs[0].items()},
            "cached_top": {int(t): lp.logprob for t, lp in cached.outputs[0].logprobs[0].items()},
        }
