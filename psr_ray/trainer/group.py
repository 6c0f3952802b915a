"""Driver side of the trainer group: one Ray Train `TorchTrainer.fit()` per iteration (DPO) or SFT stage.

    result = train_dpo(cfg, policy_path=..., reference_path=..., dataset=pairs_ds, output_dir=...,
                       policy_version=k + 1)
    result.hf_dir         # HF export: load it with transformers or into the vLLM engines
    result.metrics        # one dict per optimizer step, for wandb

Resume: a complete checkpoint of the same (or a later) policy version under `output_dir` is returned as is
without training; otherwise the latest complete checkpoint's DeepSpeed shards (weights and optimizer state)
replace the weights of `policy_path` before training. Shards are read back by the workers from `output_dir`,
so on a multi-node cluster it must be a shared filesystem.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psr_ray.config import PSRConfig
from psr_ray.data.schema import STEP_PAIR_SCHEMA, check_table
from psr_ray.trainer import checkpoint as ckpt
from psr_ray.trainer.batches import DPO_COLUMNS, SFT_COLUMNS
from psr_ray.trainer.worker import DATASET_NAME, train_loop_per_worker


@dataclass
class TrainResult:
    policy_version: int
    checkpoint_dir: str
    hf_dir: str
    metrics: list[dict[str, float]] = field(default_factory=list)
    num_optimizer_steps: int = 0
    resumed: bool = False
    weight_sync: dict[str, Any] | None = None  # the push into the engines (weight_sync.SyncReport.to_dict)


def train_dpo(
    cfg: PSRConfig,
    *,
    policy_path: str,
    reference_path: str,
    dataset: Any,
    output_dir: str,
    policy_version: int,
    num_pairs: int | None = None,
    on_weights: Callable[[dict[str, Any] | None], None] | None = None,
) -> TrainResult:
    """Step-DPO of `policy_path` against the frozen `reference_path` on `dataset` (rows of STEP_PAIR_SCHEMA,
    at least the columns question, prefix, step_index, chosen, rejected), `cfg.trainer.num_epochs` epochs.

    `num_pairs` sizes the cosine schedule; None counts the dataset (pass it for a streaming dataset, whose
    count would wait for the producers). `on_weights(state_dict)` runs on every rank inside the group after
    training (the weight-sync hook, `WeightSender.send`): rank 0 gets the full {HF name: CPU tensor} weights,
    the other ranks None; rank 0's returned report is `TrainResult.weight_sync`."""
    _require_columns(dataset, DPO_COLUMNS, "train_dpo")
    fit = {"learning_rate": cfg.trainer.learning_rate, "num_epochs": cfg.trainer.num_epochs}
    return _fit(cfg, "dpo", policy_path, reference_path, dataset, output_dir, policy_version, num_pairs, on_weights, **fit)


def train_sft(
    cfg: PSRConfig,
    *,
    model_path: str,
    dataset: Any,
    output_dir: str,
    policy_version: int = 1,
    num_rows: int | None = None,
    on_weights: Callable[[dict[str, Any] | None], None] | None = None,
) -> TrainResult:
    """Cross-entropy on target tokens of rows (prompt_text, target_text), `cfg.trainer.sft_num_epochs` epochs
    at `cfg.trainer.sft_learning_rate` (the initialization stage: IFT and EFT data together)."""
    _require_columns(dataset, SFT_COLUMNS, "train_sft")
    fit = {"learning_rate": cfg.trainer.sft_learning_rate, "num_epochs": cfg.trainer.sft_num_epochs}
    return _fit(cfg, "sft", model_path, None, dataset, output_dir, policy_version, num_rows, on_weights, **fit)


def read_pairs_dataset(directory: str) -> Any:
    """A Ray Dataset of the step pairs in a Parquet directory, checked against STEP_PAIR_SCHEMA first."""
    import pyarrow.parquet as pq
    import ray.data

    path = Path(directory)
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else []
    if not files:
        raise ValueError(
            f"{directory!r} is not a directory of .parquet step-pair files (psr_ray writes them per iteration)"
        )
    for file in files:
        try:
            schema = pq.read_schema(file)
        except Exception as err:  # pyarrow raises several types for a damaged footer
            raise ValueError(f"{file} is not a readable Parquet file ({err}); delete or regenerate it") from None
        check_table(schema.empty_table())
    return ray.data.read_parquet([str(f) for f in files], schema=STEP_PAIR_SCHEMA)


def _require_columns(dataset: Any, columns: tuple[str, ...], caller: str) -> None:
    # Only a schema Ray already knows: fetching one would run a streaming source's reads a second time.
    schema = dataset.schema(fetch_if_missing=False)
    missing = [c for c in columns if schema is not None and c not in schema.names]
    if missing:
        raise ValueError(f"{caller}: dataset lacks columns {missing}; it needs {list(columns)}")


def _fit(
    cfg: PSRConfig,
    mode: str,
    model_path: str,
    reference_path: str | None,
    dataset: Any,
    output_dir: str,
    policy_version: int,
    num_rows: int | None,
    on_weights: Callable[[dict[str, Any] | None], None] | None,
    *,
    learning_rate: float,
    num_epochs: int,
) -> TrainResult:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    output = Path(output_dir).expanduser().resolve()
    latest = ckpt.latest_checkpoint(output)
    if latest is not None:
        ckpt.check_checkpoint(latest)  # on the driver: a corrupt one would fail every worker, every retry
    if latest is not None and ckpt.read_version(latest)["policy_version"] >= policy_version:
        return _result(latest, resumed=True)

    tcfg = cfg.trainer
    if num_rows is None:
        num_rows = dataset.count()
    num_training_steps = max(1, math.floor(num_rows * num_epochs / tcfg.global_batch_size))
    loop_config = {
        "cfg": cfg,
        "mode": mode,
        "model_path": model_path,
        "reference_path": reference_path,
        "resume_dir": str(latest) if latest is not None else None,
        "policy_version": policy_version,
        "learning_rate": learning_rate,
        "num_epochs": num_epochs,
        "num_training_steps": num_training_steps,
        "on_weights": on_weights,
    }
    resources = {"CPU": tcfg.num_cpus_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu, resources_per_worker=resources
        ),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if tcfg.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            storage_path=str(output),
            name=f"{mode}_v{policy_version:04d}",
            # A dead worker restarts the whole group: the loop starts again from `resume_dir` (the last
            # complete checkpoint) and re-reads the dataset, a streaming one from its first part.
            failure_config=ray.train.FailureConfig(max_failures=tcfg.max_failures),
        ),
        datasets={DATASET_NAME: dataset},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"trainer group finished without a checkpoint ({result.error})")
    return _result(Path(result.checkpoint.path), resumed=False)


def _result(checkpoint_dir: Path, *, resumed: bool) -> TrainResult:
    version = ckpt.read_version(checkpoint_dir)
    metrics = ckpt.read_metrics(checkpoint_dir)
    return TrainResult(
        policy_version=int(version["policy_version"]),
        checkpoint_dir=str(checkpoint_dir),
        hf_dir=str(checkpoint_dir / ckpt.HF_DIR),
        metrics=metrics,
        num_optimizer_steps=int(version.get("num_optimizer_steps", len(metrics))),
        resumed=resumed,
        weight_sync=version.get("weight_sync"),
    )
