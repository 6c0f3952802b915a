"""Memory of the embedded run (issue 17 section 5): its peak per stage and per process role against half this
machine's memory, before and after the memory levers. Writes bench/results/embedded_memory.md, every figure
computed here from the runs' own records (state.json: psr_ray.runtime.memory's per-stage peaks and role split, the
trainer's `memory/*` metrics).

    .venv/bin/python bench/embedded_memory.py                     # both arms, then the report
    .venv/bin/python bench/embedded_memory.py --arm after         # one arm (a finished arm is kept)
    .venv/bin/python bench/embedded_memory.py --arm report        # the table from the arms recorded

Each arm runs the product's loop (`psr_ray.pipeline.loop.run`, as `psr-ray run` does) on the embedded preset at reduced
size (REDUCED: 8 prompts, 1 iteration, 32 eval problems; the cached init is reused) on its own local Ray:
  before   the preset with the levers off (BEFORE: no gradient checkpointing, DeepSpeed's GPU-sized ZeRO-3
           buffers, a judge engine of its own, 1 GiB of KV cache per engine, glibc's dynamic mmap threshold)
  after    the preset as shipped
The logits lever (the head computes logits only at the scored positions) has no switch: both arms run it; the
table computes what the full-length logits of the same micro-batch would have held beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from psr_ray.trainer.memory_budget import PARTS

HERE = Path(__file__).resolve().parent
ARMS = ("before", "after")
REDUCED = ("run.prompts_per_iteration=[8]", "run.num_iterations=1", "eval.limit=32", "run.wandb_mode=disabled")
BEFORE = ("trainer.gradient_checkpointing=false", "trainer.zero3_buffer_numel=0", "judge.num_engines=1",
          "rollout.cpu_kv_cache_gib=1", "judge.cpu_kv_cache_gib=1", "run.malloc_mmap_threshold_mib=0")  # fmt: skip
SEARCH_TRAIN = "iter 1/1 search+train"


def load_cfg(args: argparse.Namespace, *extra: str) -> Any:
    from psr_ray import config as C
    from psr_ray.pipeline import preflight

    return preflight.validate(C.load(args.config or [str(C.DEFAULT_CONFIG)], [*REDUCED, *args.overrides, *extra]))


def run_arm(args: argparse.Namespace, arm: str) -> dict[str, Any]:
    """The loop on a fresh local Ray; the arm's record is its state.json plus the wall time."""
    import ray

    from psr_ray.pipeline.loop import run

    out = Path(args.work) / arm
    cfg = load_cfg(args, f"run.output_dir={out}", *(BEFORE if arm == "before" else ()))
    resume = str(out) if (out / "state.json").is_file() else None
    os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)  # an earlier arm's (cluster.init_ray sets it per run)
    start = time.perf_counter()
    try:
        driver = run(cfg, resume_dir=resume)
        del driver  # its engines go with it
    finally:
        ray.shutdown()
    state = json.loads((out / "state.json").read_text())
    return {"arm": arm, "overrides": list(BEFORE if arm == "before" else ()), "wall_s": time.perf_counter() - start,
            "state": state, "vocab": _vocab(cfg)}  # fmt: skip


def watch(pid: int, seconds: float) -> dict[str, Any]:
    """The `before` arm from a run another process is making (e.g. `make run` or a bench with main's preset):
    psr_ray.runtime.memory's peak and role split of that process tree, sampled each second for `seconds`."""
    import psutil

    from psr_ray.runtime.memory import PeakMemory

    command = " ".join(psutil.Process(pid).cmdline())
    start = time.perf_counter()
    with PeakMemory(root_pid=pid) as memory:
        while time.perf_counter() - start < seconds and psutil.pid_exists(pid):
            time.sleep(1.0)
        peak, roles = memory.take_with_roles()
    stage = f"watched pid {pid} for {time.perf_counter() - start:.0f} s"
    return {"arm": "before", "watched": command, "wall_s": time.perf_counter() - start, "vocab": None,
            "state": {"peak_memory_gib": {stage: peak}, "peak_memory_roles_gib": {stage: roles}, "iterations": {}}}  # fmt: skip


def _vocab(cfg: Any) -> int:
    from transformers import AutoConfig

    from psr_ray.runtime.models import resolve_model_path

    return int(AutoConfig.from_pretrained(resolve_model_path(cfg.model.path, cfg.run.cache_dir)).vocab_size)


def report(arms: dict[str, dict[str, Any]], machine_gib: float) -> str:
    half = machine_gib / 2
    present = [a for a in ARMS if a in arms]
    lines = [f"# Memory of the embedded run: {', '.join(present)}", "",
             f"Written by `bench/embedded_memory.py` on {platform.machine()}, {os.cpu_count()} cores, "
             f"{machine_gib:.1f} GiB of memory (half: {half:.2f} GiB, the goal). PSS of the run's process tree on "
             f"this node (`psr_ray/runtime/memory.py`), sampled each second; the loop at reduced size: {', '.join(REDUCED)}.",
             f"`before` = the preset with {', '.join(BEFORE)}; `after` = the preset. Each arm ran in its own "
             "process tree and local Ray, one after the other (not at once): "
             + "; ".join(f"{a} took {arms[a]['wall_s']:.0f} s" for a in present) + ".", ""]  # fmt: skip
    if "watched" in arms.get("before", {}):
        lines[-1:-1] = [f"**The `before` column is not that arm and not the same configuration as `after`**: it is "
                        f"another process's run, watched with the same attribution (psr_ray.runtime.memory) while it ran: "
                        f"`{arms['before']['watched']}`. What ran is that command's configuration and stages (e.g. "
                        f"bench/fidelity.py's `oracle` stage runs the loop with `judge.mode=oracle`: no judge engine), "
                        f"not the preset with the `before` overrides above; compare the columns with that in mind."]  # fmt: skip
    peaks = {a: arms[a]["state"].get("peak_memory_gib", {}) for a in present}
    stages = list(dict.fromkeys(s for a in present for s in peaks[a]))
    lines += ["## Peak per stage (GiB)", "", "| stage | " + " | ".join(f"{a} | {a} / half" for a in present) + " |",
              "|---|" + "---|---|" * len(present)]  # fmt: skip
    for stage in stages:
        cells = [(f"{peaks[a][stage]:.2f}", f"{peaks[a][stage] / half:.2f}") if stage in peaks[a] else ("", "")
                 for a in present]  # fmt: skip
        lines.append(f"| {stage} | " + " | ".join(f"{g} | {r}" for g, r in cells) + " |")
    tops = {a: max(peaks[a].values()) for a in present if peaks[a]}
    lines += ["", "Highest peak: " + "; ".join(f"{a} {g:.2f} GiB = {g / half:.2f} x half the machine "
                                              f"({'under' if g < half else 'OVER'} half)" for a, g in tops.items())]  # fmt: skip
    if "before" in tops and "after" in tops:
        lines[-1] += f"; after / before = {tops['after'] / tops['before']:.2f}."
    lines += ["", *_roles_table(arms, present, half), "", *_trainer_table(arms, present)]
    return "\n".join(lines) + "\n"


def _roles_table(arms: dict[str, dict[str, Any]], present: list[str], half: float) -> list[str]:
    """The split by role at each arm's highest peak (psr_ray.runtime.memory: the roles add up to the peak)."""
    split = {}
    for a in present:
        peaks = arms[a]["state"].get("peak_memory_gib", {})
        stage = max(peaks, key=peaks.get) if peaks else None
        split[a] = (stage, arms[a]["state"].get("peak_memory_roles_gib", {}).get(stage, {}))
    roles = list(dict.fromkeys(r for a in present for r in split[a][1]))
    both = len(present) == 2
    lines = ["## At the highest peak, per process role (GiB, and / half the machine)", "",
             "| role | " + " | ".join(f"{a} (`{split[a][0]}`) | {a} / half" for a in present)
             + (" | after - before |" if both else " |"),
             "|---|" + "---|---|" * len(present) + "---|" * both]  # fmt: skip
    for role in [*roles, None]:
        values = [sum(split[a][1].values()) if role is None else split[a][1].get(role) for a in present]
        cells = ["" if v is None else f"{v:.2f} | {v / half:.2f}" for v in values]
        cells = [c or " | " for c in cells]
        if both:
            cells.append(f"{(values[1] or 0.0) - (values[0] or 0.0):+.2f}")
        lines.append(f"| {'**sum**' if role is None else role} | " + " | ".join(cells) + " |")
    return lines


def _trainer_table(arms: dict[str, dict[str, Any]], present: list[str]) -> list[str]:
    """Per trainer worker: the parts computed from the model's sizes (trainer/memory_budget.py) against its
    measured peak RSS, and what full-length logits of the largest micro-batch would have held."""
    final = {
        a: ((arms[a]["state"]["iterations"].get("1") or {}).get("train") or {}).get("final") or {} for a in present
    }
    lines = ["## Trainer worker memory, iteration 1 (GiB per worker)", "", "| part | " + " | ".join(present) + " |",
             "|---|" + "---|" * len(present)]  # fmt: skip
    for part in PARTS:
        key = f"memory/{part}_gib"
        lines.append(
            f"| {part} | " + " | ".join(f"{final[a][key]:.2f}" if key in final[a] else "" for a in present) + " |"
        )
    lines.append(
        "| **accounted** | "
        + " | ".join(f"{final[a].get('memory/accounted_gib', float('nan')):.2f}" for a in present)
        + " |"
    )
    workers = sorted({k for a in present for k in final[a] if k.endswith("_peak_rss_gib")})
    for key in workers:
        name = key.removeprefix("memory/").removesuffix("_peak_rss_gib")
        lines.append(
            f"| {name} measured peak RSS | "
            + " | ".join(f"{final[a][key]:.2f}" if key in final[a] else "" for a in present)
            + " |"
        )
        lines.append(f"| {name} peak RSS - accounted | " + " | ".join(
            f"{final[a][key] - final[a]['memory/accounted_gib']:+.2f}" if key in final[a] else "" for a in present) + " |")  # fmt: skip
    for a in present:
        f = final[a]
        if "train/max_micro_tokens" in f:
            full = 2 * f["train/max_micro_tokens"] * arms[a]["vocab"] * 4 / 2**30  # forward + gradient, fp32
            lines.append("")
            lines.append(f"{a}: largest micro-batch {f['train/max_micro_tokens']:.0f} tokens, of which "
                         f"{f['train/max_micro_logit_rows']:.0f} row-positions scored: logits (and their gradient) "
                         f"{f.get('memory/logits_gib', 0):.2f} GiB at the scored positions, {full:.2f} GiB at full length.")  # fmt: skip
    return lines


def main() -> None:
    from psr_ray.runtime.memory import machine_gib

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(HERE.parent / "runs" / "embedded_memory"), help="arm outputs (kept)")
    parser.add_argument("--arm", action="append", choices=(*ARMS, "report"), help="run only these (repeatable)")
    parser.add_argument("--redo", action="store_true", help="run the named arms again even if recorded")
    parser.add_argument(
        "--watch-before",
        type=int,
        metavar="PID",
        help="record `before` from the run of another process (its driver's pid) instead",
    )
    parser.add_argument("--watch-seconds", type=float, default=1200.0)
    parser.add_argument("--config", action="append", help="YAML config(s); default: the embedded preset")
    parser.add_argument("--out", default=str(HERE / "results" / "embedded_memory.md"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for arm in [a for a in ARMS if a in (args.arm or ARMS)]:
        record = work / f"arm_{arm}.json"
        if record.is_file() and not args.redo:
            print(f"[bench] {arm}: recorded in {record}")
            continue
        if args.redo and (work / arm).exists():
            import shutil

            shutil.rmtree(work / arm)
        result = (
            watch(args.watch_before, args.watch_seconds)
            if arm == "before" and args.watch_before
            else run_arm(args, arm)
        )
        record.write_text(json.dumps(result, indent=2, default=str) + "\n")
    arms = {a: json.loads((work / f"arm_{a}.json").read_text()) for a in ARMS if (work / f"arm_{a}.json").is_file()}
    if arms:
        text = report(arms, machine_gib())
        Path(args.out).write_text(text)
        print(text)


if __name__ == "__main__":
    main()
