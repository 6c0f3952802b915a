"""The weight-sync protocol: how a trained policy gets into every running rollout and judge engine.

A sender runs in the trainer's processes after an iteration's last optimizer step. The loop builds it
(`weight_sync.sender_for`) and passes it to the trainer (`train_dpo(weight_sender=...)`); every rank then calls
`weight_sync.push(sender, ...)`, which runs `send(...)` timed (gathering ZeRO-3 shards is a collective); rank 0
passes the full HF-named state dict, the other ranks None. The sender holds the engines' Ray actor handles,
which pickle, so it travels into the Ray Train workers as it is. One module per transport, both ends in it:
its sender (a `Sender` subclass) and its receiver (a `receivers.WeightReceiver` subclass that the engine actor
mixes in); `psr_ray.weight_sync.make_sender` picks the sender:

- object_store.py: zero-copy buckets in the Ray object store, one put for every engine (CPU; anywhere).
- cuda_ipc.py: CUDA IPC handles to buckets on the GPU the engines share with the trainer (colocated; GPU).
- nccl.py: vLLM's weight-transfer engine over one NCCL group with every engine worker (GPUs apart; GPU).
- export.py: the checkpoint's HF export folder, read by every engine (the loop's sync stage; the driver reads
  no tensor: the plan comes from the safetensors headers, the probe's reference from beside the export).

receivers.py holds the engine's side every transport shares (the transaction below, its gate and rollback),
vllm_extension.py what runs inside vLLM's workers.

Every sync is one transaction over all engines (`Sender.send`):
  1. every engine checks the plan (names, shapes, dtypes) and begins: no generation from then on (gate.py)
  2. the transport moves the weights, in buckets, into one reload per engine
  3. every engine finishes loading and answers the probe prompt; rank 0 computes the trainer's answer
     from the same tensors (probe.py); a difference above the dtype's tolerance fails the sync
  4. all pass: every engine commits the new policy version. Anything fails: every engine rolls back to
     the weights it served before (reloaded from `restore_dir`, the old policy's HF folder) at its old
     version, and the report carries the first real error, naming the engine.
A sender never raises into the trainer (a raise would make Ray Train retrain the iteration): the report
says what failed, and the loop's sync stage raises it.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from psr_ray.weight_sync.plan import TensorMeta, plan_bytes, tensor_plan, without_aliases
from psr_ray.weight_sync.probe import ProbeSpec, probe_distance, reference_logprobs, tolerance_for


@dataclass(frozen=True)
class SyncReport:
    backend: str
    policy_version: int
    num_engines: int
    num_tensors: int
    num_bytes: int
    seconds: float  # begin .. every engine loaded (the transfer)
    verify_seconds: float = 0.0  # the probe on every engine and the trainer-side reference
    probe_errors: dict[str, float] = field(default_factory=dict)  # engine name -> probe.probe_distance
    tolerance: float = 0.0
    error: str | None = None  # None: every engine serves `policy_version`, verified
    # Where the weights went: the Ray node ids of the sending process and of each engine (by name; the engines'
    # only when the sync succeeded). A multi-node run shows here that the push crossed nodes.
    sender_node: str | None = None
    engine_nodes: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def gbytes_per_s(self) -> float:
        return self.num_bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"gbytes_per_s": self.gbytes_per_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SyncReport:
        return cls(**{k: v for k, v in data.items() if k != "gbytes_per_s"})


class WeightSender(Protocol):
    backend: str

    def send(self, state_dict: dict[str, Any] | None, *, policy_version: int) -> SyncReport | None:
        """Called on every trainer rank; rank 0 gives the full state dict and gets the report."""


class SyncError(RuntimeError):
    """A sync failed; every engine was rolled back (or the message says which could not be)."""


def state_dict_bytes(state_dict: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict.values())


def engine_versions(engines: list[Any], *, timeout_s: float, names: list[str] | None = None) -> list[int]:
    """The policy version each engine reports serving; a TimeoutError names (`names`, else `engine #i`) those
    that do not answer within `timeout_s`."""
    from psr_ray.runtime.waits import get_all

    labels = names if names is not None else [f"engine #{i}" for i in range(len(engines))]
    return get_all([e.policy_version.remote() for e in engines], labels=labels, timeout_s=timeout_s,
                   what="policy_version()")  # fmt: skip


def call_engines(engines: list[Any], method: str, *args: Any, timeout_s: float, **kwargs: Any) -> list[Any]:
    """`method` on every engine at once; every answer, or a SyncError with each engine's own error (an
    engine that does not answer within `timeout_s` is named as such)."""
    refs = [getattr(e, method).remote(*args, **kwargs) for e in engines]
    return wait_engines(refs, method, timeout_s=timeout_s)


def wait_engines(refs: list[Any], what: str, *, timeout_s: float) -> list[Any]:
    import ray

    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    results: list[Any] = []
    errors: list[str] = []
    for index, ref in enumerate(refs):
        if ref not in done:
            errors.append(f"engine #{index} did not finish {what} within {timeout_s:.0f} s")
            results.append(None)
            continue
        try:
            results.append(ray.get(ref))
        except Exception as err:  # the engine's own message names it
            errors.append(_cause(err))
            results.append(None)
    if errors:
        raise SyncError("; ".join(errors))
    return results


def _cause(err: BaseException, limit: int = 600) -> str:
    cause = getattr(err, "cause", None) or err  # RayTaskError wraps the engine's exception
    text = f"{type(cause).__name__}: {cause}"
    return text if len(text) <= limit else text[: limit - 5] + " ..."


class Sender:
    """The transaction every transport shares; subclasses move the weights (`_transfer`)."""

    backend = ""
    every_rank = False  # True: every trainer rank gives the whole weights (cuda_ipc.py), not rank 0 alone

    def __init__(
        self,
        engines: list[Any],
        *,
        probe: ProbeSpec,
        restore_dir: str | None,
        bucket_mb: int = 512,
        timeout_s: float = 600.0,
    ):
        if not engines:
            raise ValueError("weight sync needs at least one engine")
        self.engines = list(engines)
        self.probe = probe
        self.restore_dir = restore_dir
        self.bucket_bytes = bucket_mb * 2**20
        self.timeout_s = timeout_s
        self.reference: dict[str, Any] | None = None  # rank 0's answer to the probe, once computed

    def send(self, state_dict: dict[str, Any] | None, *, policy_version: int) -> SyncReport | None:
        if state_dict is None:  # not rank 0: nothing to send, the gather already happened
            return None
        state_dict = without_aliases(state_dict)
        return self._transaction(tensor_plan(state_dict), state_dict, lambda: self._reference_of(state_dict),
                                 policy_version=policy_version)  # fmt: skip

    def _reference_of(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        # Kept: rank 0 records it beside the export (trainer/worker.py), so the forward runs once.
        self.reference = reference_logprobs(state_dict, self.probe)
        return self.reference

    def _transaction(self, plan: list[TensorMeta], state_dict: dict[str, Any],
                     reference_of: Callable[[], dict[str, Any]], *, policy_version: int) -> SyncReport:  # fmt: skip
        """Steps 1-4 above for `plan`; `state_dict` is what `_transfer` moves (empty where the engines read
        the weights themselves), `reference_of` gives the trainer's answer to the probe."""
        started = time.perf_counter()
        seconds = verify_seconds = 0.0
        errors: dict[str, float] = {}
        dtype = plan[0][2]
        tolerance = tolerance_for(dtype)
        try:
            names = self._begin(plan, policy_version)
            self._transfer(state_dict, plan)
            answers = self._finish()
            seconds = time.perf_counter() - started
            reference = reference_of()
            errors = {name: probe_distance(reference, a, dtype) for name, a in zip(names, answers, strict=True)}
            verify_seconds = time.perf_counter() - started - seconds
            wrong = {name: e for name, e in errors.items() if not e <= tolerance}
            if wrong:
                raise SyncError("; ".join(
                    f"engine {name} does not serve the trainer's weights: its log-probs on the probe are "
                    f"{e:.3g} from rank 0's (tolerance {tolerance:g})" for name, e in wrong.items()))  # fmt: skip
            call_engines(self.engines, "commit_update", timeout_s=self.timeout_s)
        except Exception as err:
            message = f"{type(err).__name__}: {err}" if isinstance(err, SyncError) else traceback.format_exc(limit=3)
            return self._report(plan, policy_version, seconds or time.perf_counter() - started,
                                verify_seconds, errors, tolerance, error=message + self._rollback())  # fmt: skip
        return self._report(plan, policy_version, seconds, verify_seconds, errors, tolerance)

    # ---- steps a transport may override --------------------------------------------------------------

    def _begin(self, plan: list[TensorMeta], policy_version: int) -> list[str]:
        # Every engine checks the plan before any begins: one refusal then touches no engine's weights.
        call_engines(self.engines, "check_update", plan, policy_version=policy_version, timeout_s=self.timeout_s)
        return call_engines(self.engines, "begin_update", plan, policy_version=policy_version,
                            restore_dir=self.restore_dir, timeout_s=self.timeout_s)  # fmt: skip

    def _transfer(self, state_dict: dict[str, Any], plan: list[TensorMeta]) -> None:
        raise NotImplementedError

    def _finish(self) -> list[Any]:
        return call_engines(self.engines, "end_update", list(self.probe.token_ids), self.probe.num_top,
                            timeout_s=self.timeout_s)  # fmt: skip

    # ---- internals ---------------------------------------------------------------------------------

    def _rollback(self) -> str:
        """Every engine back to the weights it served before; what could not be done, as text."""
        try:
            versions = call_engines(self.engines, "rollback_update", timeout_s=self.timeout_s)
        except SyncError as err:
            return f". Rolling back failed too: {err}"
        return f". Every engine rolled back to the weights it served before (policy versions {versions})."

    def _report(self, plan: list[TensorMeta], policy_version: int, seconds: float, verify_seconds: float,
                errors: dict[str, float], tolerance: float, *, error: str | None = None) -> SyncReport:  # fmt: skip
        return SyncReport(self.backend, policy_version, len(self.engines), len(plan), plan_bytes(plan), seconds,
                          verify_seconds, errors, tolerance, error, sender_node=_this_node(),
                          engine_nodes=self._engine_nodes() if error is None else {})  # fmt: skip

    def _engine_nodes(self) -> dict[str, str]:
        """{engine name: its Ray node id}, asked after a sync every engine answered (a failed one reports none:
        a dead engine would hold the report up to `timeout_s`)."""
        return dict(call_engines(self.engines, "node", timeout_s=self.timeout_s))


def _this_node() -> str | None:
    """The Ray node id of this process, None outside Ray (a sender used directly in a test)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
