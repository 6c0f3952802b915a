"""The checkpoint's HF export folder as a transport: every engine reads the safetensors files itself.

The fallback of the loop's sync stage (pipeline/sync_stage.py): for engines that do not serve the new policy after the
trainer's push (a resumed run, an engine restarted after the push, a failed push). The same transaction and
the same probe as every other transport, and the driver that runs it never loads a tensor of the export
(15 GB at 7B in bf16, on a head node that may have 32 GiB):

- the weights: each engine reads the folder itself (`ExportReceiver.load_folder`);
- the plan (names, shapes, dtypes): the safetensors headers (`plan.checkpoint_spec`, no tensor is read);
- the probe's reference: the one the trainer's rank 0 recorded beside the export when it wrote it
  (`probe.record_reference`, trainer/worker.py), computed from the very tensors it wrote, so it costs the
  stage a file read; rank 0 reuses the reference its push already computed, so it costs the trainer
  nothing more where a push ran. A folder with no reference for this probe (a model not written by the
  trainer) gets it from a Ray task that loads the folder on a worker with a CPU and the memory for it
  (`_reference_of_folder`; never the driver's process, and never a KubeRay head, which offers no CPUs).
  The honest check either way: the engines' forward of what they read against HF's forward of what the
  trainer wrote.

Both ends: `ExportSender` (the driver) and `ExportReceiver` (the engine actor): `load_folder` inside the
transaction, `update_weights_from_path` a whole update in one call (the search reloads an engine Ray restarted).
"""

from __future__ import annotations

from typing import Any

from psr_ray.weight_sync.base import Sender, SyncError, SyncReport, call_engines
from psr_ray.weight_sync.gate import UpdateState
from psr_ray.weight_sync.plan import TensorMeta, checkpoint_spec, plan_bytes
from psr_ray.weight_sync.probe import REFERENCE_FILE, ProbeSpec, read_reference
from psr_ray.weight_sync.receivers import WeightReceiver


class ExportSender(Sender):
    backend = "export"

    def __init__(self, engines: list[Any], *, folder: str, **kwargs: Any):
        super().__init__(engines, **kwargs)
        self.folder = folder

    def reload(self, *, policy_version: int) -> SyncReport:
        """Every engine reloads the folder as `policy_version`, verified; the report says what failed."""
        plan = [(n, shape, dtype) for n, (shape, dtype) in checkpoint_spec(self.folder).items()]
        if not plan:
            raise ValueError(f"no *.safetensors files in {self.folder!r}; export the model with save_pretrained first")
        return self._transaction(plan, {}, lambda: self._folder_reference(plan), policy_version=policy_version)

    def _folder_reference(self, plan: list[TensorMeta]) -> dict[str, Any]:
        recorded = read_reference(self.folder, self.probe)
        if recorded is not None:
            return recorded
        import ray

        memory = 2 * plan_bytes(plan)  # the tensors once, then the forward's activations
        task = ray.remote(num_cpus=1, max_retries=0, memory=memory)(_reference_of_folder)
        try:
            reference: dict[str, Any] = ray.get(task.remote(self.folder, self.probe), timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise SyncError(f"{self.folder} has no {REFERENCE_FILE} for this probe, and no Ray worker with 1 CPU "
                            f"and {memory / 2**30:.1f} GiB free computed the reference within "
                            f"{self.timeout_s:.0f} s") from None  # fmt: skip
        return reference

    def _transfer(self, state_dict: dict[str, Any], plan: list[TensorMeta]) -> None:
        call_engines(self.engines, "load_folder", self.folder, timeout_s=self.timeout_s)


def _reference_of_folder(folder: str, probe: ProbeSpec) -> dict[str, Any]:
    """A Ray task: the trainer's answer to the probe, from the export's tensors (probe.reference_logprobs)."""
    from psr_ray.runtime.models import load_safetensors_dir
    from psr_ray.weight_sync.probe import reference_logprobs

    return reference_logprobs(load_safetensors_dir(folder), probe)


class ExportReceiver(WeightReceiver):
    """The engine's end (mixed into `EngineActor`)."""

    def load_folder(self, hf_dir: str) -> int:
        """The `*.safetensors` files of an HF folder as the update's one bucket (read by the workers)."""
        self._gate.require(UpdateState.LOADING, "load weights")
        self._check_bucket([(n, shape, dtype) for n, (shape, dtype) in checkpoint_spec(hf_dir).items()])
        return self._guarded(lambda: self._load_folder(hf_dir))

    def update_weights_from_path(self, hf_dir: str, *, policy_version: int) -> int:
        """Loads the `*.safetensors` files of an HF folder in place (readable by the engine's workers)."""
        plan = [(n, shape, dtype) for n, (shape, dtype) in checkpoint_spec(hf_dir).items()]
        if not plan:
            raise ValueError(f"engine {self.name}: no *.safetensors files in {hf_dir!r}")
        self.begin_update(plan, policy_version=policy_version)
        count = self.load_folder(hf_dir)
        self.end_update()
        self.commit_update(weights_dir=hf_dir)
        return count
