"""Every bad input the CLI must turn into one line naming the field or file, exit status 1, and no traceback:
the cases tests/test_bad_input.py asserts line by line and bench/fault_injection.py tabulates.

`cases(work, model_dir)` writes each case's files under `work` and returns the cases; `run_case` runs one as
`python -m psr_ray.app.cli ...` in a fresh process (the real CLI, as a user runs it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from psr_ray.config import DEFAULT_CONFIG, REPO_ROOT, load
from psr_ray.config.sections import RolloutConfig
from psr_ray.data.problems import BENCHMARKS


@dataclass(frozen=True)
class BadInput:
    name: str  # what the user got wrong
    argv: tuple[str, ...]  # `psr-ray` arguments
    expected: str  # the exact last line on stderr (stdout for `returncode == 0` cases)
    returncode: int = 1
    stdout_has: str = ""  # also printed (e.g. the skipped line of a bad JSONL)
    before_ray: bool = True  # fails before anything starts Ray (the checks the CLI runs first)
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CaseResult:
    returncode: int
    line: str  # last non-empty stderr line (stdout's for a success)
    stdout: str
    stderr: str

    @property
    def traceback(self) -> bool:
        return "Traceback" in self.stderr or "Traceback" in self.stdout


def run_case(case: BadInput, *, timeout: float = 180.0) -> CaseResult:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           **case.env}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "psr_ray.app.cli", *case.argv], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    text = done.stdout if case.returncode == 0 else done.stderr
    lines = [line for line in text.splitlines() if line.strip()]
    return CaseResult(done.returncode, lines[-1] if lines else "", done.stdout, done.stderr)


def cases(work: Path, model_dir: str) -> list[BadInput]:
    """The cases, their files written under `work` (which must exist). `model_dir` is a valid model folder."""
    w = str(work)
    files = {
        "malformed.yaml": "rollout:\n  num_candidates: [1,\n",
        "duplicate.yaml": "rollout:\n  num_candidates: 3\nrollout:\n  top_p: 0.5\n",
        "list.yaml": "- rollout\n- judge\n",
        "interpolation.yaml": "run:\n  name: ${oops\n",
        "section.yaml": "trainer: 4\n",
        "ok.yaml": "rollout:\n  num_candidates: 3\n",
        "nested.jsonl": "[" * 100_000 + "]" * 100_000 + "\n",
        "a_file": "not a folder\n",
        "state/state.json": "{not json",
        "cluster.yaml": "cluster_name: psr\nmax_workers: 2\nprovider:\n  type: aws\n  region: ${AWS_REGION}\n"
        "available_node_types: {}\nhead_node_type: head\nsetup_commands: []\nhead_setup_commands: []\n",
        "empty.jsonl": "",
        "no_tokenizer/config.json": Path(model_dir, "config.json").read_text(),
        "no_tokenizer/model.safetensors": "x",
        "no_tokenizer/tokenizer_config.json": "{}",
    }
    for name, text in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text)
    (work / "empty_model").mkdir(exist_ok=True)
    (work / "relative").mkdir(exist_ok=True)
    (work / "folder.jsonl").mkdir(exist_ok=True)
    stored = work / "stored_run"
    stored.mkdir(exist_ok=True)

    cfg = load([], [f"model.path={model_dir}", f"run.output_dir={stored}"])
    (stored / "state.json").write_text(json.dumps({"config": cfg.to_dict(), "iterations": {}}))
    tiny = (f"model.path={model_dir}", "model.max_model_len=1024", "rollout.max_step_tokens=12",
            "judge.max_explanation_tokens=16", "eval.max_tokens=16", "run.wandb_mode=disabled")  # fmt: skip
    run = ("run", *tiny)
    valid_keys = "data, eval, init, judge, model, rollout, run, search, trainer, weight_sync"
    default = load([str(DEFAULT_CONFIG)])
    one_node = ("run.require_shared_storage=false",)  # only the address is wrong here
    rollout_keys = ", ".join(sorted(f.name for f in dataclasses.fields(RolloutConfig)))
    return [
        BadInput("malformed YAML", ("validate", "--config", f"{w}/malformed.yaml"),
                 f"psr-ray validate: config file {w}/malformed.yaml: invalid YAML at line 3, column 1: "
                 "did not find expected node content"),
        BadInput("duplicate YAML keys", ("validate", "--config", f"{w}/duplicate.yaml"),
                 f"psr-ray validate: config file {w}/duplicate.yaml: invalid YAML at line 3, column 1: "
                 "found duplicate key rollout"),
        BadInput("YAML that is not a mapping", ("validate", "--config", f"{w}/list.yaml"),
                 f"psr-ray validate: config file {w}/list.yaml must be a mapping of sections (model:, data:, "
                 "rollout:, ...), got a list"),
        BadInput("a section that is not a mapping", ("validate", "--config", f"{w}/section.yaml"),
                 f"psr-ray validate: config file {w}/section.yaml: trainer must be a mapping of its fields, got 4"),
        BadInput("config file that does not exist", ("validate", "--config", f"{w}/nope.yaml"),
                 f"psr-ray validate: config file '{w}/nope.yaml' does not exist"),
        BadInput("config path without --config (taken as the config)", ("validate", f"{w}/ok.yaml"),
                 f"config OK ({w}/ok.yaml)", returncode=0),
        BadInput("override that is not key=value", ("validate", "rollout.num_candidates"),
                 "psr-ray validate: override 'rollout.num_candidates' must look like section.key=value, "
                 "e.g. rollout.num_candidates=4"),
        BadInput("override value that is not YAML", ("validate", "rollout.num_candidates=[1,"),
                 "psr-ray validate: override 'rollout.num_candidates=[1,': '[1,' is not a valid YAML value for "
                 "rollout.num_candidates (did not find expected node content)"),
        BadInput("broken ${ interpolation (override)", ("validate", "run.name=${oops"),
                 "psr-ray validate: override 'run.name=${oops': '${oops' is not a valid YAML value for run.name "
                 "(no viable alternative at input '${oops')"),
        BadInput("broken ${ interpolation (file)", ("validate", "--config", f"{w}/interpolation.yaml"),
                 f"psr-ray validate: config file {w}/interpolation.yaml: run.name: no viable alternative at "
                 "input '${oops'"),
        BadInput("interpolation of a missing key", ("validate", "run.name=${nosuch.key}"),
                 "psr-ray validate: run.name: cannot resolve its ${...} interpolation (Interpolation key "
                 "'nosuch.key' not found)"),
        BadInput("unknown key", ("validate", "rollout.bogus=1"),
                 f"psr-ray validate: unknown config key 'rollout.bogus'; valid keys of rollout: {rollout_keys}"),
        BadInput("unknown section", ("validate", "nosuch.x=1"),
                 f"psr-ray validate: unknown config key 'nosuch'; valid keys of the root: {valid_keys}"),
        BadInput("wrong type", ("validate", "rollout.num_candidates=four"),
                 "psr-ray validate: rollout.num_candidates must be of type int, got str 'four'"),
        BadInput("trainer.micro_batch_size=0", ("validate", "trainer.micro_batch_size=0"),
                 "psr-ray validate: invalid config: trainer.micro_batch_size must be >= 1, got 0"),
        BadInput("trainer.num_workers=0", ("validate", "trainer.num_workers=0"),
                 "psr-ray validate: invalid config: trainer.num_workers must be >= 1, got 0"),
        BadInput("learning_rate=inf", ("validate", "trainer.learning_rate=.inf"),
                 "psr-ray validate: trainer.learning_rate must be a finite number, got inf"),
        BadInput("learning_rate=nan", ("validate", "trainer.learning_rate=.nan"),
                 "psr-ray validate: trainer.learning_rate must be a finite number, got nan"),
        BadInput("max_step_tokens above the context length", ("validate", "rollout.max_step_tokens=4096"),
                 "psr-ray validate: invalid config: rollout.max_step_tokens (4096) must be below "
                 f"model.max_model_len ({default.model.max_model_len}), leaving room for the prompt"),
        BadInput("max_model_len above the model's context", ("validate", *tiny, "model.max_model_len=8192"),
                 f"psr-ray validate: invalid config: model.max_model_len (8192) is above the model's context "
                 f"length (4096, max_position_embeddings in {model_dir}/config.json)"),
        BadInput("unknown benchmark name", ("validate", "eval.benchmarks=[gsm8k,gsm9k]"),
                 f"psr-ray validate: invalid config: eval.benchmarks: unknown benchmark 'gsm9k'; use one of "
                 f"{', '.join(BENCHMARKS)} or a .jsonl path"),
        BadInput("bad data.split", ("validate", "data.split=trian"),
                 f"psr-ray validate: invalid config: data.split 'trian' does not exist in {default.data.source}; "
                 "its splits: train, test"),
        BadInput("ray_address that is no address", ("validate", "run.ray_address=my-cluster", *one_node),
                 "psr-ray validate: invalid config: run.ray_address 'my-cluster' must be auto, host:port "
                 "(e.g. 10.0.0.1:6379) or ray://host:10001"),
        BadInput("dashboard URL as ray_address", ("validate", "run.ray_address=http://127.0.0.1:8265", *one_node),
                 "psr-ray validate: invalid config: run.ray_address 'http://127.0.0.1:8265' is a dashboard address "
                 "(psr-ray submit --address takes those); run.ray_address takes auto, host:port "
                 "(e.g. 10.0.0.1:6379) or ray://host:10001"),
        BadInput("empty model folder", ("validate", f"model.path={w}/empty_model"),
                 f"psr-ray validate: invalid config: model.path '{w}/empty_model' is a folder without config.json; "
                 "give an HF model folder (config.json, tokenizer, *.safetensors)"),
        BadInput("relative dir/missing model path", ("validate", "model.path=psr_ray/no_such_model"),
                 "psr-ray validate: invalid config: model.path 'psr_ray/no_such_model' does not exist (a local "
                 f"path: {REPO_ROOT}/psr_ray/no_such_model)"),
        BadInput("data.source that does not exist", ("validate", f"data.source={w}/nope.jsonl"),
                 f"psr-ray validate: invalid config: data.source '{w}/nope.jsonl' does not exist"),
        BadInput("deeply nested JSONL line", (*run, f"data.source={w}/nested.jsonl", f"run.output_dir={w}/out_nested"),
                 f"psr-ray run: data.source '{w}/nested.jsonl' yielded no usable problems",
                 stdout_has="skipped line 1: invalid JSON: nested too deeply"),
        BadInput("output folder under a file", (*run, f"run.output_dir={w}/a_file/out"),
                 f"psr-ray run: output folder {w}/a_file/out: cannot create it or its lock (Not a directory)"),
        BadInput("--resume of a folder with no run", ("run", "--resume", f"{w}/empty_model"),
                 f"psr-ray run: --resume {w}/empty_model: no state.json there (is it a run folder? a run that "
                 "failed to start leaves none); start a new run with `psr-ray run`"),
        BadInput("--resume of a corrupt state.json", ("run", "--resume", f"{w}/state"),
                 f"psr-ray run: {w}/state/state.json is corrupt (Expecting property name enclosed in double quotes: "
                 "line 1 column 2 (char 1)); move it away to start this run over"),
        BadInput("--resume with --config", ("run", "--resume", str(stored), "--config", f"{w}/ok.yaml"),
                 f"psr-ray run: --resume {stored} continues with the config stored in its state.json; drop --config "
                 "(single key=value overrides of settings such as run.num_iterations or run.ray_address are allowed)"),
        BadInput("--resume with an override that changes results", ("run", "--resume", str(stored), "trainer.beta=0.1"),
                 f"psr-ray run: --resume {stored}: trainer.beta cannot change in a resumed run (it would change "
                 "what the run's finished stages computed); start a new run, or change only: "
                 "judge.cpu_kv_block_size, judge.cpu_kv_cache_gib, judge.gpu_memory_utilization, judge.max_restarts, "
                 "judge.num_cpus_per_engine, judge.num_engines, rollout.cpu_kv_block_size, rollout.cpu_kv_cache_gib, "
                 "rollout.gpu_memory_utilization, rollout.max_restarts, "
                 "rollout.num_cpus_per_engine, rollout.num_engines, run.autoscaling, run.cache_dir, "
                 "run.engine_call_timeout_s, run.engine_start_timeout_s, run.engine_unavailable_timeout_s, "
                 "run.malloc_mmap_threshold_mib, run.name, run.num_iterations, "
                 "run.ray_address, run.resume, run.wandb_mode, run.wandb_project, search.flush_pairs, search.max_problems_in_flight, trainer.gradient_checkpointing, "
                 "trainer.max_failures, trainer.num_cpus_per_worker, trainer.share_prompt, trainer.zero3_buffer_numel"),
        BadInput("generate --num-problems 0", ("generate", *tiny, "--num-problems", "0"),
                 "psr-ray generate: --num-problems must be >= 1, got 0"),
        BadInput("eval --limit -1", ("eval", *tiny, "--limit", "-1"), "psr-ray eval: --limit must be >= 0 (0 means "
                 "all), got -1"),
        BadInput("eval --benchmarks with an unknown name", ("eval", *tiny, "--benchmarks", "gsm8k,nope"),
                 f"psr-ray eval: invalid config: eval.benchmarks: unknown benchmark 'nope'; use one of "
                 f"{', '.join(BENCHMARKS)} or a .jsonl path"),
        BadInput("train --pairs of a missing folder", ("train", *tiny, "--pairs", f"{w}/nope", "--output", f"{w}/t"),
                 f"psr-ray train: --pairs {w}/nope: no such folder"),
        BadInput("Ray address where nothing answers", (*run, f"run.output_dir={w}/out_addr",
                                                       "run.ray_address=127.0.0.1:1"),
                 "psr-ray run: run.ray_address 127.0.0.1:1: nothing answers at 127.0.0.1:1 (Connection refused); "
                 "is the Ray head running and reachable from here?"),
        BadInput("submit address where nothing answers", ("submit", "--address", "http://127.0.0.1:1"),
                 "psr-ray submit: cannot reach a Ray dashboard at http://127.0.0.1:1: Failed to connect to Ray at "
                 "address: http://127.0.0.1:1."),
        BadInput("submit address that is no URL", ("submit", "--address", "nonsense"),
                 "psr-ray submit: cannot reach a Ray dashboard at http://nonsense: no host named 'nonsense' "
                 "resolves"),
        # issue 27: each caught by `validate` (or before the output folder is used), before Ray
        BadInput("eval --benchmarks with spaces after the commas", ("eval", *tiny, "--benchmarks", "nope, gsm8k"),
                 f"psr-ray eval: invalid config: eval.benchmarks: unknown benchmark 'nope'; use one of "
                 f"{', '.join(BENCHMARKS)} or a .jsonl path"),
        BadInput("data.source that is a folder", ("validate", f"data.source={w}/folder.jsonl"),
                 f"psr-ray validate: invalid config: data.source '{w}/folder.jsonl' is a folder, not a .jsonl file"),
        BadInput("benchmark path that is a folder", ("validate", f"eval.benchmarks=[{w}/folder.jsonl]"),
                 f"psr-ray validate: invalid config: eval.benchmarks: the test file '{w}/folder.jsonl' is a folder, "
                 "not a .jsonl file"),
        BadInput("empty .jsonl benchmark", ("validate", f"eval.benchmarks=[{w}/empty.jsonl]"),
                 f"psr-ray validate: invalid config: eval.benchmarks: the test file '{w}/empty.jsonl' holds no usable "
                 "problem (0 problems, 0 skipped)"),
        BadInput("output_dir that is a file", ("validate", f"run.output_dir={w}/a_file"),
                 f"psr-ray validate: invalid config: run.output_dir '{w}/a_file' is a file, not a folder; give a "
                 "folder for the run's files"),
        BadInput("a Ray cluster launcher YAML as --config", ("validate", "--config", f"{w}/cluster.yaml"),
                 f"psr-ray validate: config file {w}/cluster.yaml is not a psr_ray config: its top-level keys "
                 "(cluster_name, max_workers, provider, available_node_types, head_node_type, setup_commands, ...) "
                 "are not sections (model, data, rollout, judge, search, trainer, weight_sync, eval, init, run)",
                 env={"AWS_REGION": "us-west-2"}),
        BadInput("relative model path of no folder, offline", ("validate", "model.path=checkpoints/missing"),
                 f"psr-ray validate: invalid config: model.path 'checkpoints/missing' is no local folder "
                 f"({REPO_ROOT}/checkpoints/missing does not exist) nor an HF model in the offline cache "
                 "(HF_HUB_OFFLINE is set)", env={"HF_HUB_OFFLINE": "1"}),
        BadInput("model path deeper than org/name", ("validate", "model.path=nowhere/ckpt/missing"),
                 "psr-ray validate: invalid config: model.path 'nowhere/ckpt/missing' does not exist (a local "
                 f"path: {REPO_ROOT}/nowhere/ckpt/missing)"),
        BadInput("model folder without a tokenizer", ("validate", f"model.path={w}/no_tokenizer"),
                 f"psr-ray validate: invalid config: model.path '{w}/no_tokenizer' has no tokenizer (tokenizer.json, "
                 f"tokenizer.model, *.tiktoken, vocab.json, vocab.txt, spiece.model: none in {w}/no_tokenizer); copy "
                 "the base model's tokenizer files there"),
        BadInput("generate with no usable problem", ("generate", *tiny, f"data.source={w}/nested.jsonl",
                                                     "--output", f"{w}/out_generate"),
                 f"psr-ray generate: data.source '{w}/nested.jsonl' yielded no usable problems",
                 stdout_has="0 problems, 1 skipped (1 invalid JSON)"),
        BadInput("a --config file that replaces the preset (said, not refused)", ("validate", "--config", f"{w}/ok.yaml"),
                 f"config OK ({w}/ok.yaml)", returncode=0,
                 stdout_has="config sections: model, data, judge, search, trainer, weight_sync, eval, init, run from "
                 f"the built-in defaults (paper-sized); rollout from {w}/ok.yaml (the preset {DEFAULT_CONFIG} is not "
                 f"used: list it first, --config {DEFAULT_CONFIG} --config FILE, to layer on it)\n"),
    ]  # fmt: skip
