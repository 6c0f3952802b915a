"""Init first, cached: `psr-ray run` with `init.run_first` starts PSR from M1, built once per settings.

The cache folder is `<run.cache_dir>/init/<key>`, the key a digest of everything that changes M1 or its
held-out pairs (model, data, init and SFT settings, seed, the EFT judge mode, the prompt and step formats, the
recipe: `init_stage.RECIPE`). A finished init leaves
`init.json` there and is reused as is; an interrupted one is redone, reusing its finished SFT checkpoint.
One process builds it at a time (a file lock); another waiting on the same key then reuses it.

M0's scores for the run's table are cached beside it per evaluation setting (`init_stage.scores_of`), so changing
`eval.*` re-evaluates M0 but never re-trains M1; so are M1's, measured by the first run's iteration-0 evaluation
on its own engines (`m1_scores_path`) and read back by later runs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from pathlib import Path
from typing import Any

from psr_ray.config import JudgeMode, PSRConfig
from psr_ray.pipeline.init_stage import RECIPE, InitResult, eft_mode, eval_key, initialize, read_result, scores_of
from psr_ray.pipeline.session import RunSession


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def format_digest() -> str:
    """The step and prompt formats SFT teaches: M1 trained on other prompts is another model."""
    from psr_ray.core import prompts, steps

    parts = [prompts.SOLVER_INSTRUCTION, prompts.JUDGE_INSTRUCTION, prompts.DIRECT_VERDICT_PREFIX,
             prompts.EXPLAIN_VERDICT_PREFIX, steps.join_steps(["a", "b"]), steps.step_header(3)]  # fmt: skip
    return _digest(parts)


# Trainer settings that change only memory, never M1: keyed at their defaults (an added one not at all), so
# caches built before they existed, or with other values, stay valid.
MEMORY_ONLY = {"gradient_checkpointing": False, "sft_gradient_checkpointing": None}
# Settings added since caches were first built, per section, keyed only away from these defaults (the M1
# they built).
ADDED: dict[str, dict[str, Any]] = {
    "init": {"max_eft_problems": 0},
    "trainer": {"cpu_bf16_autocast": False, "sft_micro_batch_size": 0, "sft_gradient_checkpointing": None,
                "sft_zero_stage": None},
}  # fmt: skip


def _keyed(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """`values` of config `section` without its added settings left at their defaults."""
    added = ADDED.get(section, {})
    return {k: v for k, v in values.items() if not (k in added and v == added[k])}


def init_key(cfg: PSRConfig) -> str:
    """The digest of every setting M1 and its held-out pairs depend on, and of the prompt formats."""
    plain = cfg.to_dict()
    memory_keyed = {k: MEMORY_ONLY.get(k, v) for k, v in plain["trainer"].items()}
    trainer = {k: v for k, v in _keyed("trainer", memory_keyed).items()
               if k not in ("learning_rate", "beta", "num_epochs", "zero3_buffer_numel", "share_prompt",
                             "heldout_accuracy_ci")}  # fmt: skip
    init = {k: v for k, v in _keyed("init", plain["init"]).items() if k != "run_first"}
    return _digest({
        "model": plain["model"], "data": plain["data"], "init": init,
        "trainer": trainer, "seed": cfg.run.seed, "eft_mode": eft_mode(cfg).value,
        "rollout": {k: plain["rollout"][k] for k in ("top_p", "max_step_tokens")}, "format": format_digest(),
        "recipe": RECIPE,
    })  # fmt: skip


def init_dir(cfg: PSRConfig) -> Path:
    return Path(cfg.run.cache_dir).expanduser() / "init" / init_key(cfg)


def initialize_first(session: RunSession) -> tuple[InitResult, dict[str, Any]]:
    """M1 (built now, or found in the cache) and M0's scores for the run's evaluation settings."""
    folder = init_dir(session.cfg)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = read_result(folder)
        if result is None:
            print(f"[init] building M1 (init.run_first) in {folder}", flush=True)
            result = initialize(session, output_dir=str(folder), evaluate=("M0",))
        else:
            print(f"[init] reusing M1 from {folder} (built before with the same settings)", flush=True)
        m0 = _m0_scores(session, result)
    return result, m0


def init_for_run(session: RunSession) -> tuple[InitResult, dict[str, Any], list[Any]]:
    """For `psr-ray run` with init.run_first: M1, M0's scores, and the held-out judge pairs (LabelledPair)."""
    from psr_ray.init_data.build import read_pairs

    init, m0 = initialize_first(session)
    return init, m0, [p.pair for p in read_pairs(init.data_files["heldout_pairs"])]


def _m0_scores(session: RunSession, result: InitResult) -> dict[str, Any]:
    """M0's scores for the run's evaluation settings (computed once per setting, then read back)."""
    from psr_ray.init_data.build import read_pairs

    pairs = [p.pair for p in read_pairs(result.data_files["heldout_pairs"])]
    return scores_of(session, Path(result.output_dir), "M0", session.model_path, 0, pairs)


def m1_scores_path(init: InitResult, cfg: PSRConfig, mode: JudgeMode) -> Path:
    """Where a run's iteration-0 scores of M1 (the init's model) are kept for the evaluation settings and the
    judge mode they were measured with."""
    return Path(init.output_dir) / f"scores_M1_{eval_key(cfg)}_{mode.value}.json"


def read_scores(path: Path) -> dict[str, Any] | None:
    """Scores kept by an earlier run; None when absent or unreadable (measured again, then)."""
    try:
        scores = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    keys = {"benchmarks", "eval_s", "judge", "judge_s"}
    return scores if isinstance(scores, dict) and keys <= scores.keys() else None
