from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from psr_ray import config as C
from psr_ray.pipeline import preflight

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted([*(ROOT / "jobs" / "configs").glob("*.yaml"), *(ROOT / "psr_ray" / "configs").glob("*.yaml")])


def test_defaults_follow_the_paper():
    cfg = C.PSRConfig()
    assert cfg.rollout.num_candidates == 6
    assert (cfg.rollout.temperature, cfg.rollout.top_p) == (0.5, 0.95)
    assert cfg.search.max_steps == 20
    assert cfg.trainer.learning_rate == 5e-7
    assert cfg.trainer.global_batch_size == 32
    assert cfg.trainer.num_epochs == 1
    assert cfg.run.prompts_per_iteration == (400, 800, 1200)
    assert cfg.judge.both_orders and cfg.judge.mode == "explain"
    preflight.validate(cfg, gpu_available=False)


def test_configs_are_frozen():
    cfg = C.PSRConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rollout.num_candidates = 3  # type: ignore[misc]


def test_prompt_schedule_repeats_last_entry():
    cfg = C.PSRConfig()
    assert [cfg.prompts_for_iteration(i) for i in range(5)] == [400, 800, 1200, 1200, 1200]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = C.load([str(path)])
    preflight.validate(cfg, gpu_available=True)


def test_shipped_configs_exist():
    names = {p.name for p in SHIPPED}
    assert {"embedded_cpu.yaml", "qwen2.5-math-7b.yaml"} <= names
    assert C.DEFAULT_CONFIG in SHIPPED


def test_overrides_apply_and_coerce(tmp_path):
    cfg = C.load(
        [], ["rollout.num_candidates=4", "trainer.beta=1", "run.prompts_per_iteration=[5,6]", "eval.benchmarks=gsm8k"]
    )
    assert cfg.rollout.num_candidates == 4
    assert cfg.trainer.beta == 1.0 and isinstance(cfg.trainer.beta, float)
    assert cfg.run.prompts_per_iteration == (5, 6)
    assert cfg.eval.benchmarks == ("gsm8k",)


def test_yaml_merge_order(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("rollout:\n  num_candidates: 3\n  temperature: 0.9\n")
    b.write_text("rollout:\n  num_candidates: 5\n")
    cfg = C.load([str(a), str(b)], ["rollout.top_p=0.5"])
    assert (cfg.rollout.num_candidates, cfg.rollout.temperature, cfg.rollout.top_p) == (5, 0.9, 0.5)


@pytest.mark.parametrize(
    "override, field",
    [
        ("rollout.bogus=1", "rollout.bogus"),
        ("nosuch.x=1", "nosuch"),
        ("rollout.num_candidates=abc", "rollout.num_candidates"),
        ("trainer.use_gpu=3", "trainer.use_gpu"),
        ("rollout=3", "rollout"),
    ],
)
def test_load_rejects_unknown_keys_and_wrong_types(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        C.load([], [override])


def test_load_rejects_missing_file_and_bad_override():
    with pytest.raises(ValueError, match="does not exist"):
        C.load(["/nonexistent.yaml"])
    with pytest.raises(ValueError, match="section.key=value"):
        C.load([], ["rollout.num_candidates"])


@pytest.mark.parametrize(
    "override, field",
    [
        ("rollout.num_candidates=1", "rollout.num_candidates"),
        ("rollout.num_engines=-1", "rollout.num_engines"),
        ("judge.num_engines=-1", "judge.num_engines"),
        ("rollout.num_engines=0", "rollout.num_engines"),
        ("judge.cpu_kv_cache_gib=0", "judge.cpu_kv_cache_gib"),
        ("rollout.cpu_kv_block_size=48", "rollout.cpu_kv_block_size"),
        ("judge.cpu_kv_block_size=0", "judge.cpu_kv_block_size"),
        ("trainer.zero3_buffer_numel=-1", "trainer.zero3_buffer_numel"),
        ("trainer.heldout_accuracy_ci=0.5", "trainer.heldout_accuracy_ci"),
        ("run.malloc_mmap_threshold_mib=64", "run.malloc_mmap_threshold_mib"),
        ("rollout.top_p=0", "rollout.top_p"),
        ("judge.mode=vote", "judge.mode"),
        ("search.max_steps=0", "search.max_steps"),
        ("trainer.beta=-0.1", "trainer.beta"),
        ("trainer.global_batch_size=3", "trainer.global_batch_size"),
        ("trainer.zero_stage=4", "trainer.zero_stage"),
        ("trainer.sft_zero_stage=5", "trainer.sft_zero_stage"),
        ("trainer.sft_micro_batch_size=3", "trainer.sft_micro_batch_size"),
        ("trainer.sft_micro_batch_size=-1", "trainer.sft_micro_batch_size"),
        ("weight_sync.backend=carrier_pigeon", "weight_sync.backend"),
        ("run.num_iterations=0", "run.num_iterations"),
        ("run.prompts_per_iteration=[0]", "run.prompts_per_iteration"),
        ("run.wandb_mode=loud", "run.wandb_mode"),
        ("eval.limit=-1", "eval.limit"),
        ("model.path=/no/such/model", "model.path"),
        ("model.path=embedded:gpt5", "model.path"),
        ("data.source=/no/such.jsonl", "data.source"),
        ("init.num_ift_examples=0", "init.num_ift_examples"),
        ("init.num_eft_pairs=-2", "init.num_eft_pairs"),
        ("init.max_eft_problems=-1", "init.max_eft_problems"),
        ("init.num_candidates=1", "init.num_candidates"),
    ],
)
def test_validate_names_the_field(override, field):
    # Enum fields (judge.mode, weight_sync.backend) are already refused by load(); the rest by validate().
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        preflight.validate(C.load([], [override]), gpu_available=False)


def test_gpu_requests_without_gpu_fail_locally_but_not_for_a_cluster():
    cfg = C.load([], ["rollout.num_gpus_per_engine=1", "trainer.use_gpu=true"])
    with pytest.raises(ValueError, match="rollout.num_gpus_per_engine, trainer.use_gpu ask"):
        preflight.validate(cfg, gpu_available=False)
    preflight.validate(cfg, gpu_available=True)
    remote = C.load([], ["rollout.num_gpus_per_engine=1", "run.ray_address=auto", "run.output_dir=/mnt/shared/psr"])
    preflight.validate(remote, gpu_available=False)


def test_validate_reports_every_error_at_once():
    cfg = C.load([], ["rollout.num_candidates=1", "trainer.beta=0"])
    with pytest.raises(ValueError) as err:
        preflight.validate(cfg, gpu_available=False)
    assert "rollout.num_candidates" in str(err.value) and "trainer.beta" in str(err.value)


def test_existing_model_folder_and_hf_id_are_accepted(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id, **kwargs: {"id": repo_id})  # the hub has it
    (tmp_path / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 4096}')
    (tmp_path / "model.safetensors").write_text("x")
    (tmp_path / "tokenizer.json").write_text("{}")
    for path in (str(tmp_path), "Qwen/Qwen2.5-Math-7B-Instruct"):
        preflight.validate(C.load([], [f"model.path={path}"]), gpu_available=False)
    with pytest.raises(ValueError, match="model.path .* is a file"):
        preflight.validate(C.load([], [f"model.path={tmp_path / 'model.safetensors'}"]), gpu_available=False)


def test_a_model_id_the_hub_lacks_or_cannot_serve_is_refused_before_start(tmp_path, monkeypatch):
    """`checkpoints/missing` with no `checkpoints/` folder has the shape of a hub id: the hub's "no such
    repository" refuses it in validate, and so does a hub this machine cannot reach (nothing could download it:
    it used to start Ray and retry the hub for 89 s); a cluster run (run.ray_address) leaves it to the nodes."""
    import httpx
    from huggingface_hub import HfApi, errors

    def not_found(self, repo_id, **kwargs):
        response = httpx.Response(404, request=httpx.Request("GET", f"https://huggingface.co/api/models/{repo_id}"))
        raise errors.RepositoryNotFoundError(f"404 {repo_id}", response=response)

    def unreachable(self, repo_id, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.chdir(tmp_path)
    cfg = C.load([], ["model.path=checkpoints/missing"])
    monkeypatch.setattr(HfApi, "model_info", not_found)
    with pytest.raises(
        ValueError,
        match=rf"model.path 'checkpoints/missing' is no local folder \({tmp_path}/checkpoints/"
        r"missing does not exist\) nor a model on the HF hub \(no repository checkpoints/missing there",
    ):
        preflight.validate(cfg, gpu_available=False)
    monkeypatch.setattr(HfApi, "model_info", unreachable)
    with pytest.raises(
        ValueError,
        match=rf"model.path 'checkpoints/missing' is no local folder \({tmp_path}/checkpoints/missing does not "
        r"exist\), not in the HF cache, and the HF hub cannot be reached from here \(Name or service not known\)",
    ):
        preflight.validate(cfg, gpu_available=False)
    remote = C.load([], ["model.path=checkpoints/missing", "run.ray_address=auto", "run.require_shared_storage=false"])
    preflight.validate(remote, gpu_available=False)  # the cluster's nodes may reach the hub


def test_a_hub_benchmark_needs_datasets_before_start(monkeypatch):
    from psr_ray.data import checks

    monkeypatch.setattr(checks, "_package_missing", lambda name: name == "datasets")
    with pytest.raises(
        ValueError,
        match=r"eval.benchmarks olympiadbench: not shipped offline, loaded from the HF hub "
        r"with the datasets package, which is not installed: pip install datasets",
    ):
        preflight.validate(C.load([], ["eval.benchmarks=[gsm8k,olympiadbench]"]), gpu_available=False)


def test_section_sources_name_the_file_of_each_section(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("model:\n  max_model_len: 2048\nrollout:\n  num_candidates: 3\n")
    b.write_text("rollout:\n  top_p: 0.9\n")
    preset = str(C.DEFAULT_CONFIG)
    assert C.section_sources([preset, str(a), str(b)], ["trainer.beta=0.2"], preset=preset) == (
        f"config sections: model from {preset} + {a}; data, judge, search, trainer, weight_sync, eval, init, run from "
        f"{preset}; rollout from {preset} + {a} + {b}; overridden: trainer.beta"
    )
    assert C.section_sources([], [], preset=preset) == (
        "config sections: model, data, rollout, judge, search, trainer, weight_sync, eval, init, run from the built-in "
        f"defaults (paper-sized) (the preset {preset} is not used: list it first, --config {preset} --config FILE, to "
        "layer on it)"
    )


def test_init_section_overrides():
    cfg = preflight.validate(C.load([], ["init.num_ift_examples=64", "init.num_eft_pairs=20"]), gpu_available=False)
    assert (cfg.init.num_ift_examples, cfg.init.num_eft_pairs, cfg.init.num_heldout_pairs) == (64, 20, 150)


def test_a_hub_dataset_this_machine_cannot_load_is_refused_before_start(tmp_path, monkeypatch):
    """A hub benchmark (or an hf: data source) with `datasets` installed, not cached, and a hub that does not
    answer or lacks it: refused in validate, not after the init (hours on a 7B recipe); cached, it passes."""
    import httpx
    from huggingface_hub import HfApi, constants, errors

    from psr_ray.data import checks

    def unreachable(self, repo_id, **kwargs):
        raise OSError("Name or service not known")

    def not_found(self, repo_id, **kwargs):
        response = httpx.Response(404, request=httpx.Request("GET", f"https://huggingface.co/api/datasets/{repo_id}"))
        raise errors.RepositoryNotFoundError(f"404 {repo_id}", response=response)

    monkeypatch.setattr(checks, "_package_missing", lambda name: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setattr(HfApi, "dataset_info", unreachable)
    bench = C.load([], ["eval.benchmarks=[gsm8k,olympiadbench]"])
    with pytest.raises(
        ValueError,
        match=r"eval.benchmarks olympiadbench: the HF dataset Hothan/OlympiadBench is not in the local cache and the "
        r"HF hub cannot be reached from here \(Name or service not known\); pass the set as a .jsonl path",
    ):
        preflight.validate(bench, gpu_available=False)
    monkeypatch.setattr(HfApi, "dataset_info", not_found)
    with pytest.raises(ValueError, match=r"data.source: no dataset acme/nothing on the HF hub"):
        preflight.validate(C.load([], ["data.source=hf:acme/nothing"]), gpu_available=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"the hub is offline here"):
        preflight.validate(bench, gpu_available=False)
    (tmp_path / "datasets" / "Hothan___OlympiadBench").mkdir(parents=True)  # loaded once before: cached
    preflight.validate(bench, gpu_available=False)


def test_sft_fits_take_the_sft_memory_settings_where_set():
    dpo = ["trainer.micro_batch_size=2", "trainer.gradient_checkpointing=true", "trainer.zero_stage=3"]
    same = C.load([], dpo).trainer.for_sft()
    assert (same.micro_batch_size, same.gradient_checkpointing, same.zero_stage) == (2, True, 3)
    sft = C.load([], [*dpo, "trainer.sft_micro_batch_size=8", "trainer.sft_gradient_checkpointing=false",
                      "trainer.sft_zero_stage=0"]).trainer.for_sft()  # fmt: skip
    assert (sft.micro_batch_size, sft.gradient_checkpointing, sft.zero_stage) == (8, False, 0)
    assert sft.sft_micro_batch_size == 8 and sft.learning_rate == same.learning_rate  # the rest as it was
    # At most a worker's share of the global batch: the preset on two workers runs micro batches of 4.
    two = preflight.validate(C.load([str(C.DEFAULT_CONFIG)], ["trainer.num_workers=2"]), gpu_available=False)
    assert two.trainer.for_sft().micro_batch_size == two.trainer.global_batch_size // 2
