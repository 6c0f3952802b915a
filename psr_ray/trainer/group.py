"""Driver side of the trainer group: one Ray Train `TorchTrainer.fit()` per iteration (DPO) or SFT stage.

    result = train_dpo(cfg, policy_path=..., reference_path=..., dataset=pairs_ds, output_dir=...,
                       policy_version=k + 1)
    result.hf_dir         # HF export: load it with transformers or into the vLLM engines
    result.metrics        # one dict per optimizer step, for wandb
    result.num_trained_rows   # pairs (rows) trained, all epochs: every committed pair once per epoch
    result.heldout        # `heldout/...` figures of the new policy against its reference, with `heldout=`

Resume: a complete checkpoint of the same (or a later) policy version under `output_dir` is returned as is
without training; otherwise the latest complete checkpoint's DeepSpeed shards (weights and optimizer state)
replace the weights of `policy_path` before training. Shards are read back by the workers from `output_dir`,
so on a multi-node cluster it must be a shared filesystem.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psr_ray.config import PSRConfig
from psr_ray.config.errors import UserError
from psr_ray.data.schema import STEP_PAIR_SCHEMA, check_table
from psr_ray.trainer import checkpoint as ckpt
from psr_ray.trainer.batches import DPO_COLUMNS, SFT_COLUMNS
from psr_ray.trainer.heldout import heldout_subsample
from psr_ray.trainer.worker import DATASET_NAME, train_loop_per_worker

if TYPE_CHECKING:
    from psr_ray.weight_sync import WeightSender


@dataclass
class TrainResult:
    policy_version: int
    checkpoint_dir: str
    hf_dir: str
    metrics: list[dict[str, float]] = field(default_factory=list)
    num_optimizer_steps: int = 0
    num_trained_rows: int = 0  # over all epochs
    heldout: dict[str, float] = field(default_factory=dict)
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
    weight_sender: WeightSender | None = None,
    heldout: str | list[dict[str, Any]] | None = None,
) -> TrainResult:
    """Step-DPO of `policy_path` against the frozen `reference_path` on `dataset` (rows of STEP_PAIR_SCHEMA,
    at least the columns question, prefix, step_index, chosen, rejected), `cfg.trainer.num_epochs` epochs;
    the dataset may still be growing (a streamed iteration): every row it ever yields is trained once per epoch.

    `weight_sender` (a picklable `weight_sync.WeightSender`) is pushed by every rank inside the group after
    training (`weight_sync.push`: rank 0 gives the full {HF name: CPU tensor} weights, the other ranks None);
    rank 0's report is `TrainResult.weight_sync`. `heldout`: step pairs never trained on (a Parquet file or
    folder, or row dicts with the columns above); after training the new policy is measured on them against
    the reference (`trainer/heldout.py`), on the fixed subsample `trainer.heldout_accuracy_ci` sizes."""
    _require_columns(dataset, DPO_COLUMNS, "train_dpo")
    heldout_rows = None
    if heldout is not None:
        half_width = cfg.trainer.heldout_accuracy_ci
        heldout_rows = heldout_subsample(read_heldout_pairs(heldout), half_width=half_width)
    return _fit(
        cfg,
        "dpo",
        policy_path,
        reference_path,
        dataset,
        output_dir,
        policy_version,
        weight_sender,
        learning_rate=cfg.trainer.learning_rate,
        num_epochs=cfg.trainer.num_epochs,
        heldout_rows=heldout_rows,
    )


def train_sft(
    cfg: PSRConfig,
    *,
    model_path: str,
    dataset: Any,
    output_dir: str,
    policy_version: int = 1,
    weight_sender: WeightSender | None = None,
) -> TrainResult:
    """Cross-entropy on target tokens of rows (prompt_text, target_text), `cfg.trainer.sft_num_epochs` epochs
    at `cfg.trainer.sft_learning_rate` (the initialization stage: IFT and EFT data together); `weight_sender`
    as in `train_dpo`."""
    _require_columns(dataset, SFT_COLUMNS, "train_sft")
    cfg = dataclasses.replace(cfg, trainer=cfg.trainer.for_sft())  # what the fit runs with and its checkpoint records
    # Small blocks, so the unequal split (data_split.py) gives every worker a share of a one-block table.
    dataset = dataset.repartition(target_num_rows_per_block=cfg.trainer.micro_batch_size)
    return _fit(
        cfg,
        "sft",
        model_path,
        None,
        dataset,
        output_dir,
        policy_version,
        weight_sender,
        learning_rate=cfg.trainer.sft_learning_rate,
        num_epochs=cfg.trainer.sft_num_epochs,
    )


def read_pairs_dataset(directory: str) -> Any:
    """A Ray Dataset of the step pairs in a Parquet directory, checked against STEP_PAIR_SCHEMA first."""
    import pyarrow.parquet as pq
    import ray.data

    path = Path(directory)
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else []
    if not files:
        raise UserError(
            f"{directory!r} is not a directory of .parquet step-pair files (psr_ray writes them per iteration)"
        )
    for file in files:
        try:
            schema = pq.read_schema(file)
        except Exception as err:  # pyarrow raises several types for a damaged footer
            raise UserError(f"{file} is not a readable Parquet file ({err}); delete or regenerate it") from None
        check_table(schema.empty_table())
    return ray.data.read_parquet([str(f) for f in files], schema=STEP_PAIR_SCHEMA)


def read_heldout_pairs(source: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Held-out step pairs as plain rows of DPO_COLUMNS, from row dicts or a Parquet file or folder (read here
    on the driver: they travel to the workers in the loop config). Errors name the file and the columns."""
    if not isinstance(source, (str, Path)):
        return _heldout_rows(list(source), "held-out rows")
    import pyarrow.parquet as pq

    path = Path(source).expanduser()
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        raise UserError(f"held-out pairs {str(source)!r}: no such Parquet file or folder of .parquet files")
    rows: list[dict[str, Any]] = []
    for file in files:
        try:
            table = pq.read_table(file)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise UserError(f"held-out pairs {file} is not a readable Parquet file ({err})") from None
        missing = [c for c in DPO_COLUMNS if c not in table.column_names]
        if missing:
            raise UserError(f"held-out pairs {file} lack columns {missing}; they need {list(DPO_COLUMNS)}")
        rows += _heldout_rows(table.select(list(DPO_COLUMNS)).to_pylist(), str(file))
    return rows


def _heldout_rows(rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    for i, row in enumerate(rows):
        missing = [c for c in DPO_COLUMNS if row.get(c) is None]
        if missing:
            raise UserError(f"held-out pairs {source}: row {i} has no {missing}; they need {list(DPO_COLUMNS)}")
    return [{c: row[c] for c in DPO_COLUMNS} for row in rows]


def _require_columns(dataset: Any, columns: tuple[str, ...], caller: str) -> None:
    # Only a schema Ray already knows: fetching one would run a streaming source's reads a second time.
    schema = dataset.schema(fetch_if_missing=False)
    missing = [c for c in columns if schema is not None and c not in schema.names]
    if missing:
        raise ValueError(f"{caller}: dataset lacks columns {missing}; it needs {list(columns)}")


def scaling_kwargs(tcfg: Any, gpu_share: float = 1.0) -> dict[str, Any]:
    """Ray Train's ScalingConfig for the trainer section: every worker asks for its CPUs, its GPU share when
    less than a whole GPU (`gpu_share`: colocated, `trainer_gpu_share`) and, when the trainer is pinned to a
    node group, one unit of that group's `node_resource`."""
    resources = {"CPU": tcfg.num_cpus_per_worker} | ({tcfg.node_resource: 1.0} if tcfg.node_resource else {})
    if tcfg.use_gpu and gpu_share < 1.0:
        resources["GPU"] = gpu_share
    return {"num_workers": tcfg.num_workers, "use_gpu": tcfg.use_gpu, "resources_per_worker": resources}


def trainer_gpu_share(cfg: PSRConfig) -> float:
    """One trainer worker's share of its GPU: whole, or colocated what the engines on it leave."""
    from psr_ray.config.topology import colocated_shares

    return colocated_shares(cfg)[1] if cfg.weight_sync.colocate else 1.0


def start_bound(tcfg: Any) -> tuple[dict[str, str], dict[str, Any]]:
    """How long a worker group that cannot be placed is waited for: Ray Train's start-up timeout (an
    environment variable its controller reads) and FailureConfig's limit on those timeouts, which Ray Train
    retries forever by default. Returns (environment, FailureConfig kwargs)."""
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": f"{tcfg.start_timeout_s:g}"}
    return env, {"max_failures": tcfg.max_failures, "controller_failure_limit": tcfg.max_failures}


def _fit(
    cfg: PSRConfig,
    mode: str,
    model_path: str,
    reference_path: str | None,
    dataset: Any,
    output_dir: str,
    policy_version: int,
    weight_sender: WeightSender | None,
    *,
    learning_rate: float,
    num_epochs: int,
    heldout_rows: list[dict[str, Any]] | None = None,
) -> TrainResult:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from psr_ray.trainer.data_split import UnequalSplitDataConfig

    output = Path(output_dir).expanduser().resolve()
    latest = ckpt.latest_checkpoint(output)
    if latest is not None:
        ckpt.check_checkpoint(latest)  # on the driver: a corrupt one would fail every worker, every retry
    if latest is not None and ckpt.read_version(latest)["policy_version"] >= policy_version:
        return _result(latest, resumed=True)

    tcfg = cfg.trainer
    loop_config = {
        "cfg": cfg,
        "mode": mode,
        "model_path": model_path,
        "reference_path": reference_path,
        "resume_dir": str(latest) if latest is not None else None,
        "policy_version": policy_version,
        "learning_rate": learning_rate,
        "num_epochs": num_epochs,
        "seed": cfg.run.seed,
        "heldout_rows": heldout_rows,
        "weight_sender": weight_sender,
    }
    env, failure = start_bound(tcfg)
    scaling = scaling_kwargs(tcfg, trainer_gpu_share(cfg))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(**scaling),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if tcfg.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            storage_path=str(output),
            name=f"{mode}_v{policy_version:04d}",
            # A dead worker restarts the whole group: the loop starts again from `resume_dir` (the last
            # complete checkpoint) and re-reads the dataset, a streaming one from its first part.
            # A group with no room retries max_failures times, each waiting trainer.start_timeout_s, then fails.
            failure_config=ray.train.FailureConfig(**failure),
        ),
        datasets={DATASET_NAME: dataset},
        dataset_config=UnequalSplitDataConfig(),  # Ray Train's default split drops rows
    )
    with _environment(env):  # Ray Train hands it from the driver to its controller
        try:
            result = trainer.fit()
        except ray.train.ControllerError as err:
            raise RuntimeError(_start_failure(tcfg, scaling, err)) from err
    if result.checkpoint is None:
        raise RuntimeError(f"trainer group finished without a checkpoint ({result.error})")
    # The marker is written here, after Ray Train persisted every rank's files (see checkpoint.py).
    return _result(ckpt.commit_checkpoint(result.checkpoint.path), resumed=False)


def _start_failure(tcfg: Any, scaling: dict[str, Any], err: Exception) -> str:
    from psr_ray.runtime.cluster import why_unplaceable

    cause = getattr(err, "controller_failure", err)
    each = ({"GPU": 1.0} if scaling["use_gpu"] else {}) | scaling["resources_per_worker"]
    why = why_unplaceable(each)  # e.g. the trainer node lost with no replacement
    advice = (
        f"{why}: add a node that has them"
        if why
        else "check that the cluster has room for the workers beside the engines"
    )
    return (f"the trainer group ({tcfg.num_workers} workers of {each}) could not start: {type(cause).__name__}: {str(cause).rstrip('.')}. Tried {tcfg.max_failures + 1} times, "
            f"{tcfg.start_timeout_s:g} s each (trainer.start_timeout_s, trainer.max_failures); {advice}")  # fmt: skip


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _result(checkpoint_dir: Path, *, resumed: bool) -> TrainResult:
    version = ckpt.read_version(checkpoint_dir)
    metrics = ckpt.read_metrics(checkpoint_dir)
    return TrainResult(
        policy_version=int(version["policy_version"]),
        checkpoint_dir=str(checkpoint_dir),
        hf_dir=str(checkpoint_dir / ckpt.HF_DIR),
        metrics=metrics,
        num_optimizer_steps=int(version.get("num_optimizer_steps", len(metrics))),
        num_trained_rows=int(version.get("num_trained_rows", 0)),
        heldout=dict(version.get("heldout", {})),
        resumed=resumed,
        weight_sync=version.get("weight_sync"),
    )
