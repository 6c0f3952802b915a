"""Engine-side ends of the GPU weight-sync transports, mixed into `EngineActor` (which provides `self.llm`,
`self.settings` and `_after_update`). GPU only: on CPU engines nothing calls them.

- CUDA IPC (cuda_ipc.py): `update_weights_from_ipc` rebuilds the sender's tensors from their IPC handles
  on this engine's GPU inside each vLLM worker and reloads them in place.
- NCCL (nccl.py): `transfer_*` forward to vLLM's weight-transfer API (`LLM.init_weight_transfer_engine`,
  `start_weight_update`, `update_weights`, `finish_weight_update`); the engine must be built with
  `weight_transfer_backend="nccl"` (EngineSettings), which the loop sets when the backend resolves to nccl.
"""

from __future__ import annotations

from typing import Any


class GpuTransferReceiver:
    llm: Any
    settings: Any

    def _after_update(self, policy_version: int) -> None:  # provided by EngineActor
        raise NotImplementedError

    def update_weights_from_ipc(self, handles: dict[str, Any], *, policy_version: int | None) -> int:
        """Loads one bucket of weights shared by CUDA IPC; `policy_version` is set with the last bucket."""
        (count, *_) = self.llm.collective_rpc("load_hf_weights_from_ipc", args=(handles,))
        if policy_version is not None:
            self._after_update(policy_version)
        return count

    def transfer_world_size(self) -> int:
        """NCCL ranks this engine contributes to a weight-transfer group (one per tensor-parallel worker)."""
        return self.settings.tensor_parallel_size

    def transfer_init(self, init_info: dict[str, Any]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def transfer_start(self) -> None:
        self.llm.start_weight_update()

    def transfer_receive(self, update_info: dict[str, Any]) -> None:
        self.llm.update_weights({"update_info": update_info})

    def transfer_finish(self, policy_version: int) -> None:
        self.llm.finish_weight_update(weight_version=str(policy_version))
        self._after_update(policy_version)

    def transfer_shutdown(self) -> None:
        self.llm.shutdown_weight_transfer_engine()
