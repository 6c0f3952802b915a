"""Methods mixed into every vLLM worker (`LLM(worker_extension_cls=...)`), called through `collective_rpc`.

They load HF-named weights in place: the engine keeps its KV cache, compiled graphs and scheduler, so an
update costs a weight copy, not an engine restart. One update is one vLLM layer-wise reload, however many
buckets it arrives in: `begin_update` puts every layer on the meta device and buffers what arrives,
`load_bucket` feeds tensors (a layer is materialized and processed once all its parts are in, so a fused
qkv_proj / gate_up_proj may span buckets), `end_update` puts back the layers that received nothing and
finishes. vLLM 0.32 initializes and finalizes per `reload_weights` call instead, which materializes a fused
layer split across calls half from uninitialized memory.

Tied embeddings (SmolLM2 ties `lm_head` to `embed_tokens`): vLLM's reload processes only layers that
received weights, and on CPU the head multiplies with a prepacked copy of the weight made when it was last
processed, so after an update it kept the OLD head (neither model was served). `end_update` re-processes
every embedding that shares its weight (a no-op on GPU, where the head reads the weight itself). A tied
update that also carries `lm_head.weight` is normalized first: vLLM would silently write the last one listed
into the shared tensor.
"""

from __future__ import annotations

from typing import Any


def tied_embedding_groups(model: Any) -> list[list[tuple[str, Any]]]:
    """Groups of (module name, module) of unquantized vocab embeddings / LM heads that share one weight
    Parameter; the first is the canonical one (`model.embed_tokens`). Untied models: []."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )

    by_param: dict[int, list[tuple[str, Any]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, VocabParallelEmbedding) and isinstance(
            getattr(module, "quant_method", None), UnquantizedEmbeddingMethod
        ):
            weight = getattr(module, "weight", None)
            if weight is not None and not weight.is_meta:
                by_param.setdefault(id(weight), []).append((name, module))
    return [group for group in by_param.values() if len(group) > 1]


class WeightSyncExtension:
    """Mixed into vLLM's worker class; `self` is the worker (`self.model_runner` holds the model)."""

    # The worker's own attributes, declared for the type checker (annotations only: vLLM's conflict check
    # sees no class attribute).
    model_runner: Any
    vllm_config: Any

    def begin_update(self) -> None:
        """Starts one in-place update: every layer goes on the meta device until its weights arrive."""
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        self._psr_tied = self._tied_names()  # before: on meta the shared Parameter is no longer shared
        with self._psr_config():
            initialize_layerwise_reload(self.model_runner.get_model())

    def load_bucket(self, named_tensors: list[tuple[str, Any]]) -> int:
        """Feeds `(hf_name, tensor)` pairs of the update begun by `begin_update`; returns their count."""
        named = self._untie_names(list(named_tensors))
        with self._psr_config():
            self.model_runner.get_model().load_weights(iter(named))
        return len(named_tensors)

    def load_bucket_from_path(self, hf_dir: str) -> int:
        """`load_bucket` from the `*.safetensors` files of a folder (multiprocess engines: RPC would turn
        tensors into lists)."""
        from psr_ray.runtime.models import load_safetensors_dir

        return self.load_bucket(list(load_safetensors_dir(hf_dir).items()))

    def load_bucket_from_ipc(self, shared: dict[str, Any]) -> int:
        """`load_bucket` from CUDA IPC handles (`cuda_ipc.share_bucket`). GPU only. The tensors are opened on
        this worker's device whose UUID is the sender's, never by the sender's device index (device indices
        differ between processes with different CUDA_VISIBLE_DEVICES)."""
        from psr_ray.weight_sync.cuda_ipc import open_bucket

        return self.load_bucket(open_bucket(shared))

    def end_update(self) -> None:
        """Finishes the update: layers that received nothing get their old tensors back, tied heads are
        re-processed, caches derived from the old weights are dropped (the prefix cache is the engine's)."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with self._psr_config():
            finalize_layerwise_reload(self.model_runner.get_model(), self.vllm_config.model_config)
        self.refresh_tied_heads()
        runner = self.model_runner
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            if hasattr(runner, reset):
                getattr(runner, reset)()

    def abort_update(self) -> int:
        """After a failed `load_bucket`: puts back the old tensors of every layer still waiting for weights
        and forgets what they buffered (vLLM has no abort; a new reload would replay the stale buffers).
        Layers processed before the failure keep their new values: reload a full policy afterwards.
        Returns how many layers were put back."""
        from vllm.model_executor.model_loader.reload.layerwise import (
            LAYERWISE_INFO,
            LOADING_LAYERS,
            _place_kernel_tensors,
        )

        model = self.model_runner.get_model()
        restored = 0
        for layer in model.modules():
            info = LAYERWISE_INFO.get(layer)
            if info is None or not info.can_load():
                continue
            if info.kernel_tensors is not None:
                _place_kernel_tensors(layer, info)
                restored += 1
            info.reset()
        LOADING_LAYERS.clear()
        if hasattr(model, "_original_do_torchao_reload"):
            model._do_torchao_reload = model._original_do_torchao_reload
        self.refresh_tied_heads()
        return restored

    def load_hf_weights(self, named_tensors: list[tuple[str, Any]]) -> int:
        """One whole update from `(hf_name, tensor)` pairs (any subset of the model)."""
        self.begin_update()
        try:
            count = self.load_bucket(named_tensors)
        except BaseException:
            self.abort_update()
            raise
        self.end_update()
        return count

    def refresh_tied_heads(self) -> list[str]:
        """Re-runs the (idempotent) post-load processing of every embedding / head that shares its weight.
        CPU: rebuilds the head's prepacked GEMM from the current weight. GPU: nothing to rebuild."""
        done = []
        for group in tied_embedding_groups(self.model_runner.get_model()):
            for name, module in group:
                module.quant_method.process_weights_after_loading(module)
                done.append(name)
        return done

    def head_error(self) -> float:
        """How far the output head's actual GEMM is from `x @ weight.T` with the weight it holds (max abs,
        random x): ~1e-5 when healthy, O(1) when the head kept a stale prepacked copy."""
        import torch

        model = self.model_runner.get_model()
        head = model.lm_head
        x = torch.randn(3, head.weight.shape[1], dtype=head.weight.dtype, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return float((head.quant_method.apply(head, x) - x @ head.weight.t()).abs().max())

    # ---- internals ---------------------------------------------------------------------------------

    def _psr_config(self) -> Any:
        from vllm.config import set_current_vllm_config

        return set_current_vllm_config(self.vllm_config)

    def _tied_names(self) -> dict[str, str]:
        """{alias weight name: canonical weight name} of this engine's tied embeddings."""
        aliases = {}
        for group in tied_embedding_groups(self.model_runner.get_model()):
            canonical = group[0][0] + ".weight"
            for alias, _ in group[1:]:
                aliases[alias + ".weight"] = canonical
        return aliases

    def _untie_names(self, named: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """A tied engine's alias (`lm_head.weight`): dropped when equal to its canonical tensor, renamed to
        it when that is absent, refused when different (which one would win is an accident of order)."""
        import torch

        tied = getattr(self, "_psr_tied", None)
        if tied is None:
            tied = self._psr_tied = self._tied_names()
        if not tied:
            return named
        given = dict(named)
        for alias, canonical in tied.items():
            if alias not in given:
                continue
            if canonical not in given:
                named = [(canonical if n == alias else n, t) for n, t in named]
            elif torch.equal(given[alias], given[canonical]):
                named = [(n, t) for n, t in named if n != alias]
            else:
                raise ValueError(f"this engine ties {alias} to {canonical}, but the update gives them different values")
        return named
