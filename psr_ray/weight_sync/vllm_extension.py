"""Methods mixed into every vLLM worker (`LLM(worker_extension_cls=...)`), called through `collective_rpc`.

They reload HF-named weights in place: the engine keeps its KV cache, compiled graphs and scheduler, so an
update costs a weight copy, not an engine restart. `reload_weights(..., is_checkpoint_format=True)` runs the
model's own `load_weights` with vLLM's layer-wise reload bookkeeping; calling `model.load_weights` directly
fails for fp32 on CPU (its parameters are empty placeholders there).
"""

from __future__ import annotations

from typing import Any


class WeightSyncExtension:
    """Mixed into vLLM's worker class; `self` is the worker (`self.model_runner.model` is the model)."""

    def load_hf_weights(self, named_tensors: list[tuple[str, Any]]) -> int:
        """Loads `(hf_name, tensor)` pairs in place; returns how many tensors were given. Tensors arrive
        intact only with the in-process engine (multiprocess RPC turns them into lists): there, use
        `load_hf_weights_from_path`."""
        self.reload_weights(weights_iterator=iter(named_tensors), is_checkpoint_format=True)
        return len(named_tensors)

    def load_hf_weights_from_path(self, hf_dir: str) -> int:
        """Loads every `*.safetensors` file of an HF export folder in place; returns the tensor count."""
        from psr_ray.models import load_safetensors_dir

        return self.load_hf_weights(list(load_safetensors_dir(hf_dir).items()))

    def load_hf_weights_from_ipc(self, handles: dict[str, Any]) -> int:
        """Loads tensors shared by CUDA IPC (`torch.multiprocessing.reductions.reduce_tensor` handles) in
        place. GPU only. The handle's device index is the sender's; the tensor is opened on this worker's
        device, which CUDA maps across GPUs of one node."""
        import torch

        named = []
        for name, (rebuild, args) in handles.items():
            args = list(args)
            args[6] = torch.cuda.current_device()  # rebuild_cuda_tensor's device argument
            named.append((name, rebuild(*args)))
        return self.load_hf_weights(named)
