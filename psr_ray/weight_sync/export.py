"""The checkpoint's HF export folder as a transport: every engine reads the safetensors files itself.

The fallback of the loop's sync stage (pipeline/sync_stage.py): for engines that do not serve the new policy after the
trainer's push (a resumed run, an engine restarted after the push, a failed push). The same transaction and
the same probe as every other transport; the reference is computed from the export's tensors, which are
what the trainer's rank 0 gathered and wrote.

Both ends: `ExportSender` (the driver) and `ExportReceiver` (the engine actor): `load_folder` inside the
transaction, `update_weights_from_path` a whole update in one call (the search reloads an engine Ray restarted).
"""

from __future__ import annotations

from typing import Any

from psr_ray.weight_sync.base import Sender, call_engines
from psr_ray.weight_sync.gate import UpdateState
from psr_ray.weight_sync.plan import TensorMeta, checkpoint_spec
from psr_ray.weight_sync.receivers import WeightReceiver


class ExportSender(Sender):
    backend = "export"

    def __init__(self, engines: list[Any], *, folder: str, **kwargs: Any):
        super().__init__(engines, **kwargs)
        self.folder = folder

    def _transfer(self, state_dict: dict[str, Any], plan: list[TensorMeta]) -> None:
        call_engines(self.engines, "load_folder", self.folder, timeout_s=self.timeout_s)


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
