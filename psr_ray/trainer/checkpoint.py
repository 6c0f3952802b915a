"""One checkpoint per iteration: DeepSpeed shards (resume), an HF export (transformers / vLLM), the resolved
config and the policy version.

Layout of a checkpoint directory (Ray Train merges every worker's files into one directory in storage):

    deepspeed/            engine.save_checkpoint(tag="final"): each rank writes its own partition
    hf/                   safetensors + config.json + tokenizer, in the engine's dtype (fp32 CPU / bf16 GPU)
    psr_config.json       the resolved PSRConfig
    metrics.jsonl         one line per optimizer step (rank 0's view of the all-reduced metrics)
    checkpoint_info.json  {"policy_version": N, "world_size": W, "num_optimizer_steps": S, ...} (rank 0)
    policy_version.json   the marker: the info plus every file's size. The driver writes it after the fit,
                          once Ray Train has persisted every rank's files, it has checked their contents
                          (`verify_contents`) and fsynced them: its presence marks a complete checkpoint.

A checkpoint directory without the marker (a fit or a persist killed midway) is not a checkpoint: it is
never resumed from. `check_checkpoint` re-checks a marked one before anything is built on it.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from psr_ray.runtime import kill_windows
from psr_ray.runtime.durable import fsync_tree, write_atomic

DS_DIR = "deepspeed"
DS_TAG = "final"
HF_DIR = "hf"
CONFIG_FILE = "psr_config.json"
METRICS_FILE = "metrics.jsonl"
INFO_FILE = "checkpoint_info.json"
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
    """Rank 0, after everything else: config, metrics and the checkpoint's info (what the marker will say;
    the driver writes the marker itself once the files are persisted, see `commit_checkpoint`)."""
    root = Path(checkpoint_dir)
    (root / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True))
    (root / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (root / INFO_FILE).write_text(json.dumps({"policy_version": policy_version, **extra}, sort_keys=True))


def commit_checkpoint(checkpoint_dir: str | Path) -> Path:
    """Driver, after the fit: checks the persisted files (`verify_contents`), fsyncs them and their folders,
    then writes the marker listing every file's size. Raises a ValueError, writing no marker, if the
    checkpoint is incomplete or trained no optimizer step (a policy version must never be bumped for
    nothing)."""
    root = Path(checkpoint_dir)
    try:
        info = json.loads((root / INFO_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"checkpoint {root} has no readable {INFO_FILE} ({err}); the trainer did not finish it"
        ) from None
    if int(info.get("num_optimizer_steps", 0)) < 1:
        raise ValueError(
            f"the trainer took 0 optimizer steps for policy version {info.get('policy_version')} (no step pairs "
            f"reached it); {root} is left unmarked and the policy version is not bumped"
        )
    problems = verify_contents(root, info)
    if problems:
        raise ValueError(f"checkpoint {root} is incomplete after the fit: {'; '.join(problems)}")
    fsync_tree(root)
    kill_windows.reached("checkpoint.persist")
    files = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    write_atomic(root / VERSION_FILE, json.dumps({**info, "files": files}, sort_keys=True))
    return root


def read_version(checkpoint_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint_dir) / VERSION_FILE).read_text())


def read_metrics(checkpoint_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(checkpoint_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_checkpoint(checkpoint_dir: str | Path) -> Path:
    """Raises a ValueError naming what is wrong unless `checkpoint_dir` is a complete, readable checkpoint:
    a marker, every file it lists present with its recorded size, and contents that `verify_contents`
    accepts (DeepSpeed shards of every rank, the HF config and safetensors headers, the run config).
    Returns the path."""
    root = Path(checkpoint_dir)
    problems = []
    try:
        info = read_version(root)
        int(info["policy_version"])
        files = dict(info["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        info, files = {}, {}
        problems.append(f"{VERSION_FILE} unreadable ({type(err).__name__}: {err})")
    for name, size in files.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, the marker recorded {size}")
    problems += verify_contents(root, info)
    if problems:
        raise ValueError(
            f"checkpoint {root} is corrupt: {'; '.join(problems)}. Move it away (the previous iteration's "
            "checkpoint is then used) or restore it from a backup"
        )
    return root


def verify_contents(root: Path, info: dict[str, Any]) -> list[str]:
    """What is wrong with a checkpoint's contents (empty when nothing): a DeepSpeed model-states shard and,
    from ZeRO stage 1 on, an optimizer shard for every rank, each a readable torch archive; an HF
    config.json naming its model type; safetensors whose headers parse; a tokenizer; the run config."""
    problems: list[str] = []
    config = _json_object(root / CONFIG_FILE, problems)
    shards = root / DS_DIR / DS_TAG
    model_states = sorted(shards.glob("*model_states.pt")) if shards.is_dir() else []
    if not model_states:
        problems.append(f"no DeepSpeed model states in {DS_DIR}/{DS_TAG}")
    zero_stage = (config or {}).get("trainer", {}).get("zero_stage", 3)
    world_size = int(info.get("world_size", 1) or 1)
    if zero_stage >= 1:
        for rank in range(world_size):
            if not list(shards.glob(f"*zero_pp_rank_{rank}_mp_rank_*_optim_states.pt")):
                problems.append(f"no DeepSpeed optimizer shard of rank {rank} of {world_size} in {DS_DIR}/{DS_TAG}")
    for file in sorted(shards.glob("*.pt")) if shards.is_dir() else []:
        try:
            with zipfile.ZipFile(file) as archive:  # torch.save's format; reads only the central directory
                if not any(name.endswith("data.pkl") for name in archive.namelist()):
                    raise zipfile.BadZipFile("no data.pkl")
        except (OSError, zipfile.BadZipFile) as err:
            problems.append(f"{DS_DIR}/{DS_TAG}/{file.name} unreadable ({err})")
    hf = root / HF_DIR
    hf_config = _json_object(hf / "config.json", problems, name=f"{HF_DIR}/config.json")
    if hf_config is not None and not hf_config.get("model_type"):
        problems.append(f"{HF_DIR}/config.json names no model_type")
    if not any((hf / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        problems.append(f"no tokenizer in {HF_DIR}/")
    weights = sorted(hf.glob("*.safetensors"))
    if not weights:
        problems.append(f"no {HF_DIR}/*.safetensors")
    for file in weights:
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                if not list(f.keys()):
                    raise ValueError("no tensors")
        except Exception as err:  # safetensors raises its own error types for a damaged header
            problems.append(f"{file.name} unreadable ({err})")
    return problems


def _json_object(path: Path, problems: list[str], *, name: str | None = None) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        problems.append(f"{name or path.name} unreadable ({type(err).__name__}: {err})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{name or path.name} is not a JSON object")
        return None
    return value


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
