"""Weight sync through the Ray object store: zero-copy buckets, one `ray.put` each, read by every engine.

Works anywhere (CPU engines, GPU engines, other nodes). Each bucket is put as NumPy byte views of the
trainer's CPU tensors, which Ray writes to shared memory in one copy and hands to every reader on the node
as read-only arrays over that same memory (pickle protocol 5, no deserialization copy); the engine wraps
them as tensors without copying and vLLM copies them once into its own layers. A bucket is put while the
engines still load the previous one, so at most two buckets are in the object store at a time.

Both ends: `ObjectStoreSender` (the trainer's rank 0) and `ObjectStoreReceiver.load_bucket` (the engine actor).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from psr_ray.config import WeightSyncBackend
from psr_ray.weight_sync.base import Sender, wait_engines
from psr_ray.weight_sync.gate import UpdateState
from psr_ray.weight_sync.plan import TensorMeta, dtype_name, plan_buckets
from psr_ray.weight_sync.receivers import WeightReceiver


@dataclass(frozen=True)
class PackedBucket:
    """Tensors as raw bytes: NumPy has no bfloat16, and raw bytes of any dtype travel zero-copy."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    arrays: tuple[Any, ...]  # 1-D uint8 numpy arrays


def pack_bucket(state_dict: dict[str, Any], names: list[str]) -> PackedBucket:
    """Byte views of contiguous CPU tensors (a copy only for a tensor that is not one already)."""
    tensors = [state_dict[n].detach().to("cpu").contiguous() for n in names]
    return PackedBucket(
        names=tuple(names),
        shapes=tuple(tuple(t.shape) for t in tensors),
        dtypes=tuple(dtype_name(t.dtype) for t in tensors),
        arrays=tuple(t.reshape(-1).view(_uint8()).numpy() for t in tensors),
    )


def unpack_bucket(bucket: PackedBucket) -> list[tuple[str, Any]]:
    """`(name, tensor)` pairs viewing the bucket's (read-only, shared) memory; nothing is copied."""
    import torch

    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": the loaders only read it
        for name, shape, dtype, array in zip(bucket.names, bucket.shapes, bucket.dtypes, bucket.arrays, strict=True):
            out.append((name, torch.from_numpy(array).view(getattr(torch, dtype)).reshape(shape)))
    return out


def _uint8() -> Any:
    import torch

    return torch.uint8


class ObjectStoreSender(Sender):
    backend = WeightSyncBackend.OBJECT_STORE

    def _transfer(self, state_dict: dict[str, Any], plan: list[TensorMeta]) -> None:
        import ray

        sizes = [(n, state_dict[n].numel() * state_dict[n].element_size()) for n, _, _ in plan]
        loading: list[Any] = []
        for names in plan_buckets(sizes, self.bucket_bytes):
            ref = ray.put(pack_bucket(state_dict, names))  # while the engines load the previous bucket
            if loading:
                wait_engines(loading, "loading a bucket", timeout_s=self.timeout_s)
            loading = [e.load_bucket.remote(ref) for e in self.engines]
            del ref  # the engines' calls hold it; freed once they return
        wait_engines(loading, "loading a bucket", timeout_s=self.timeout_s)


class ObjectStoreReceiver(WeightReceiver):
    """The engine's end (mixed into `EngineActor`)."""

    def load_bucket(self, bucket: Any) -> int:
        """One bucket of the update: a `PackedBucket` (object store), a dict or `(name, tensor)` pairs."""
        self._gate.require(UpdateState.LOADING, "load weights")
        if isinstance(bucket, PackedBucket):
            named = unpack_bucket(bucket)
        else:
            named = list(bucket.items() if isinstance(bucket, dict) else bucket)
        return self._load_named(named)
