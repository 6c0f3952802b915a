"""What an update carries, checked before any engine is touched, and how it is cut into buckets. Pure.

A plan is the list of `(hf_name, shape, dtype)` of the tensors a sync will send, in order. Every engine
checks it against the checkpoint it was started from (`checkpoint_spec`: the safetensors headers, no tensor
is read) before its first layer is put on the meta device, so a wrong name, shape or dtype is refused with
the engine still serving its old weights. Buckets bound the memory a transport needs in flight; a bucket
never splits one layer's tensors (q/k/v of an attention layer, gate/up of an MLP), so even a transport that
reloaded per bucket could not materialize a fused layer half-loaded.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

TensorMeta = tuple[str, tuple[int, ...], str]  # (HF name, shape, torch dtype name such as "float32")

# Weights must be floating point; vLLM's loaders convert between these on copy.
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64",
                       "I64": "int64", "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # fmt: skip
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8, "int64": 8, "int32": 4, "int8": 1,
                "uint8": 1, "bool": 1}  # fmt: skip
_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


def dtype_name(dtype: Any) -> str:
    """`torch.bfloat16` -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def without_aliases(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drops a name whose tensor is an earlier name's tensor (a tied head in `model.state_dict()`): sent
    once, under its first name, as the engine's loader expects of a tied model."""
    seen: set[tuple[int, tuple[int, ...], Any]] = set()
    out = {}
    for name, t in state_dict.items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key not in seen or t.data_ptr() == 0:
            out[name] = t
            seen.add(key)
    return out


def tensor_plan(state_dict: dict[str, Any]) -> list[TensorMeta]:
    """The plan of a {name: tensor} state dict, in its order."""
    return [(name, tuple(t.shape), dtype_name(t.dtype)) for name, t in state_dict.items()]


def plan_bytes(plan: list[TensorMeta]) -> int:
    """The bytes the plan's tensors hold."""
    return sum(math.prod(shape) * _DTYPE_BYTES[dtype] for _, shape, dtype in plan)


def layer_key(name: str) -> str:
    """The unit a bucket keeps whole: a decoder layer (`model.layers.3`) or else the owning module
    (`model.embed_tokens`, `lm_head`, `model.norm`)."""
    match = _LAYER.match(name)
    return match.group(1) if match else name.rpartition(".")[0]


def plan_buckets(sizes: list[tuple[str, int]], bucket_bytes: int) -> list[list[str]]:
    """Names, in order, grouped into buckets of at most `bucket_bytes`, never splitting a layer: a layer
    that does not fit the current bucket starts the next; a layer larger than a bucket is one bucket."""
    layers: list[tuple[list[str], int]] = []
    for name, nbytes in sizes:
        key = layer_key(name)
        if layers and layer_key(layers[-1][0][-1]) == key:
            names, total = layers[-1]
            layers[-1] = (names + [name], total + nbytes)
        else:
            layers.append(([name], nbytes))
    buckets: list[list[str]] = []
    size = 0
    for names, nbytes in layers:
        if not buckets or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].extend(names)
        size += nbytes
    return buckets


def checkpoint_spec(folder: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype name)} of every tensor in a folder's `*.safetensors` files, read from their
    headers only. {} when the folder has none (then only dtypes can be checked)."""
    spec = {}
    for file in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []:
        with open(file, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                spec[name] = (tuple(entry["shape"]), _SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"]))
    return spec


def tied_aliases(folder: str) -> dict[str, str]:
    """{alias: canonical} weight names of a model whose config ties its output head to its embedding."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return {}
    tied = json.loads(config.read_text()).get("tie_word_embeddings", False)
    return {"lm_head.weight": "model.embed_tokens.weight"} if tied else {}


def plan_problems(
    plan: list[TensorMeta], spec: dict[str, tuple[tuple[int, ...], str]], aliases: dict[str, str]
) -> list[str]:
    """What is wrong with `plan` for an engine started from a checkpoint with `spec` (empty list: fine).
    A subset of the checkpoint is fine (untouched layers keep their weights); unknown names, other shapes
    and non-float dtypes are not; a tied alias must have its canonical tensor's shape."""
    problems = []
    seen = set()
    for name, shape, dtype in plan:
        shape = tuple(shape)
        if name in seen:
            problems.append(f"{name}: sent twice")
        seen.add(name)
        if dtype not in FLOAT_DTYPES:
            problems.append(f"{name}: dtype {dtype}, expected one of {', '.join(FLOAT_DTYPES)}")
        if not spec:
            continue
        expected = spec.get(name) or spec.get(aliases.get(name, ""))
        if expected is None:
            problems.append(f"{name}: not a weight of this model")
        elif expected[0] != shape:
            problems.append(f"{name}: shape {list(shape)}, expected {list(expected[0])}")
    return problems


def bucket_problems(named_shapes: list[tuple[str, tuple[int, ...], str]], plan: list[TensorMeta]) -> list[str]:
    """A bucket that does not match the plan its update began with (a transport bug, never user input)."""
    planned = {name: (tuple(shape), dtype) for name, shape, dtype in plan}
    problems = []
    for name, shape, dtype in named_shapes:
        if name not in planned:
            problems.append(f"{name}: not in the update's plan")
        elif planned[name] != (tuple(shape), dtype):
            problems.append(f"{name}: {list(shape)} {dtype}, the plan said {list(planned[name][0])} {planned[name][1]}")
    return problems
