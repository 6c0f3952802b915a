"""One checkpoint per iteration: DeepSpeed shards (resume), an HF export (transformers / vLLM), the resolved
config and the policy version.

Layout of a checkpoint directory (Ray Train merges every worker's files into one directory in storage):

    deepspeed/            engine.save_checkpoint(tag="final"): each rank writes its own partition
    hf/                   safetensors + config.json + tokenizer, in the engine's dtype (fp32 CPU / bf16 GPU)
    psr_config.json       the resolved PSRConfig
    metrics.jsonl         one line per optimizer step (rank 0's view of the all-reduced metrics)
    policy_version.json   {"policy_version": N, ...}; written last, so its presence marks a complete checkpoint
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DS_DIR = "deepspeed"
DS_TAG = "final"
HF_DIR = "hf"
CONFIG_FILE = "psr_config.json"
METRICS_FILE = "metrics.jsonl"
VERSION_FILE = "policy_version.json"


def save_deepspeed(engine: Any, checkpoint_dir: str | Path) -> None:
    """All ranks: each writes its ZeRO partition (weights, optimizer and scheduler state)."""
    engine.save_checkpoint(str(Path(checkpoint_dir) / DS_DIR), tag=DS_TAG)


def load_deepspeed(engine: Any, checkpoint_dir: str | Path, *, load_optimizer_states: bool = True) -> None:
    """All ranks: restores weights (and optimizer state) saved by `save_deepspeed` with the same world size.
    The learning-rate schedule is not restored: each iteration schedules its own data."""
    path = Path(checkpoint_dir) / DS_DIR
    if not (path / DS_TAG).is_dir():
        raise ValueError(f"{checkpoint_dir} holds no DeepSpeed checkpoint ({path / DS_TAG} is missing)")
    load_path, _ = engine.load_checkpoint(
        str(path), tag=DS_TAG, load_optimizer_states=load_optimizer_states, load_lr_scheduler_states=False
    )
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load {path}; was it saved with the same trainer.num_workers?")
    if engine.lr_scheduler is not None:
        # The loaded optimizer state carries the old run's last lr (about 0 at the end of a cosine); the
        # first step of this run must use this run's schedule.
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr(), strict=True):
            group["lr"] = lr


def export_hf(state_dict: dict[str, Any], model_config: Any, tokenizer: Any, out_dir: str | Path) -> str:
    """Rank 0: writes a folder `from_pretrained` and vLLM load directly (sharded safetensors above 5 GB)."""
    from huggingface_hub import save_torch_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(state_dict, out, max_shard_size="5GB", metadata={"format": "pt"})
    dtypes = {t.dtype for t in state_dict.values()}
    config = model_config.__class__.from_dict(model_config.to_dict())
    if len(dtypes) == 1:
        config.torch_dtype = next(iter(dtypes))
    config.use_cache = True  # gradient checkpointing turns it off during training
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def write_metadata(
    checkpoint_dir: str | Path,
    *,
    policy_version: int,
    config: dict[str, Any],
    metrics: list[dict[str, Any]],
    extra: dict[str, Any],
) -> None:
    """Rank 0, after everything else: config, metrics and the version file that marks completion."""
    root = Path(checkpoint_dir)
    (root / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True))
    (root / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (root / VERSION_FILE).write_text(json.dumps({"policy_version": policy_version, **extra}, sort_keys=True))


def read_version(checkpoint_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint_dir) / VERSION_FILE).read_text())


def read_metrics(checkpoint_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(checkpoint_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_checkpoint(checkpoint_dir: str | Path) -> Path:
    """Raises a ValueError naming what is wrong unless `checkpoint_dir` is a complete, readable checkpoint
    (version file, DeepSpeed shards, HF config and safetensors whose headers parse). Returns the path."""
    root = Path(checkpoint_dir)
    problems = []
    try:
        int(read_version(root)["policy_version"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        problems.append(f"{VERSION_FILE} unreadable ({type(err).__name__}: {err})")
    shards = root / DS_DIR / DS_TAG
    if not shards.is_dir() or not any(shards.iterdir()):
        problems.append(f"no DeepSpeed shards in {DS_DIR}/{DS_TAG}")
    hf = root / HF_DIR
    if not (hf / "config.json").is_file():
        problems.append(f"no {HF_DIR}/config.json")
    weights = sorted(hf.glob("*.safetensors"))
    if not weights:
        problems.append(f"no {HF_DIR}/*.safetensors")
    for file in weights:
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error types for a damaged header
            problems.append(f"{file.name} unreadable ({err})")
    if problems:
        raise ValueError(
            f"checkpoint {root} is corrupt: {'; '.join(problems)}. Move it away (the previous iteration's "
            "checkpoint is then used) or restore it from a backup"
        )
    return root


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest policy version under `output_dir` (any depth), else None."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    best: tuple[int, float, Path] | None = None
    for marker in root.rglob(VERSION_FILE):
        try:
            version = int(json.loads(marker.read_text())["policy_version"])
        except (ValueError, KeyError, json.JSONDecodeError):
            continue  # a half-written marker is not a checkpoint
        key = (version, marker.stat().st_mtime, marker.parent)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None
