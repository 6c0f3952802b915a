"""The init's SFT on the CPU trainer against a plain torch loop, and trainer settings that may close the gap.
Writes bench/results/sft_cpu.md.

The init's SFTs (M0 -> M_ift, M0 -> M1) are most of a fresh `make run` (bench/results/make_run_full: 35 of 74
minutes) and ran at ~85 tokens/s, while bench/judge_phase.py's plain loop fitted the init's EFT rows at ~240.
Arms, each one `train_sft` fit (or the plain loop) on the same rows, in alternation:
  trainer        the product's `train_sft` with the embedded preset's settings;
  <name>=<k=v;k=v>  the same with those config overrides (e.g. `micro8=trainer.micro_batch_size=8`);
  plain          bench/judge_cues.train: one process, fp32, the trainer's AdamW and clipping, micro = global
                 batch, no gradient checkpointing, the output head on target positions only.
Rows: the first --rows of a built init's own SFT rows (IFT + EFT, shuffled as the init shuffles them).
Steady tokens/s per fit from the trainer's per-step metrics (psr_ray/trainer/fit_timing.py: steps after the
first); the plain loop's from its per-step tokens and seconds, also after the first step.

    flock /tmp/psr_heavy.lock .venv/bin/python bench/sft_cpu.py --init-dir ~/.cache/psr_ray/init/<key> \\
        --arm micro8=trainer.micro_batch_size=8 --arm nockpt=trainer.gradient_checkpointing=false
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def init_rows(init_dir: Path, num_rows: int, seed: int) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    from psr_ray.pipeline.init_stage import read_result

    result = read_result(init_dir)
    if result is None:
        raise SystemExit(f"{init_dir}: no finished init there (its init.json is missing)")
    rows = [{"prompt_text": r["prompt_text"], "target_text": r["target_text"]}
            for name in ("ift_train", "eft_train") for r in pq.read_table(result.data_files[name]).to_pylist()]  # fmt: skip
    random.Random(seed).shuffle(rows)
    return rows[:num_rows]


def trainer_fit(cfg: Any, model: str, rows: list[dict[str, Any]], out_dir: str) -> dict[str, Any]:
    import pyarrow as pa
    import ray.data

    from psr_ray.trainer.fit_timing import fit_timing
    from psr_ray.trainer.group import train_sft

    called = time.time()
    result = train_sft(cfg, model_path=model, dataset=ray.data.from_arrow(pa.Table.from_pylist(rows)),
                       output_dir=out_dir, policy_version=1)  # fmt: skip
    timing = fit_timing(result.metrics, called_at=called, returned_at=time.time())
    return {"steady": timing.steady_tokens_per_s, "steps": timing.num_steps, "tokens": timing.num_tokens,
            "startup_s": timing.startup_s, "teardown_s": timing.teardown_s,
            "peak_rss_gib": result.metrics[-1].get("memory/worker0_peak_rss_gib", float("nan"))}  # fmt: skip


def plain_fit(cfg: Any, model: str, rows: list[dict[str, Any]], out_dir: str) -> dict[str, Any]:
    from judge_cues import train

    rows_json = Path(out_dir + ".json")
    rows_json.write_text(json.dumps(rows))
    fit = train(model, str(rows_json), out_dir, lr=cfg.trainer.sft_learning_rate, epochs=1,
                batch=cfg.trainer.global_batch_size, seed=0, max_steps=None)  # fmt: skip
    steady = fit["history"][1:]
    return {"steady": sum(h["tokens"] for h in steady) / sum(h["step_s"] for h in steady), "steps": fit["steps"],
            "tokens": sum(h["tokens"] for h in fit["history"]), "startup_s": float("nan"), "teardown_s": float("nan"),
            "peak_rss_gib": _peak_rss_gib()}  # fmt: skip


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux; the whole script's peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-dir", required=True, help="a built init folder (holds init.json)")
    parser.add_argument("--rows", type=int, default=48, help="SFT rows per fit (8 per optimizer step)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--arm", action="append", default=[], help="name=key=value;key=value (config overrides)")
    parser.add_argument("--no-plain", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "sft_cpu.md"))
    args = parser.parse_args()

    from psr_ray import config as C
    from psr_ray.pipeline import preflight
    from psr_ray.runtime.cluster import init_ray
    from psr_ray.runtime.models import resolve_model_path

    arms: dict[str, list[str]] = {"trainer": []}
    for spec in args.arm:
        name, _, overrides = spec.partition("=")
        if not overrides:
            parser.error(f"--arm {spec}: give name=key=value[;key=value]")
        arms[name] = overrides.split(";")
    if not args.no_plain:
        arms["plain"] = []
    rows = init_rows(Path(args.init_dir).expanduser(), args.rows, 0)
    started = time.perf_counter()
    fits: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory(prefix="psr_sft_cpu_") as tmp:
        base = [f"run.output_dir={tmp}", "run.wandb_mode=disabled"]
        cfgs = {name: preflight.validate(C.load([str(C.DEFAULT_CONFIG)], [*base, *o])) for name, o in arms.items()}
        model = resolve_model_path(cfgs["trainer"].model.path, cfgs["trainer"].run.cache_dir)
        torch_threads = os.cpu_count() or 1
        init_ray(cfgs["trainer"])
        for rep in range(args.repeats):
            for name in arms:
                out = f"{tmp}/{name}_{rep}"
                if name == "plain":
                    import torch

                    torch.set_num_threads(torch_threads)
                    fit = plain_fit(cfgs[name], model, rows, out)
                else:
                    fit = trainer_fit(cfgs[name], model, rows, out)
                fits[name].append(fit)
                print(f"[{name} {rep + 1}] {fit['steps']} steps, {fit['tokens']:.0f} tokens, steady "
                      f"{fit['steady']:.1f} tokens/s", flush=True)  # fmt: skip
    base_rate = statistics.median(f["steady"] for f in fits["trainer"])
    lines = [
        "# The init's SFT: the CPU trainer, its settings, and a plain torch loop (bench/sft_cpu.py)", "",
        f"Command: `{' '.join(['bench/sft_cpu.py', *sys.argv[1:]])}`. {len(rows)} of the init's SFT rows (IFT + EFT), "
        f"{args.repeats} fit(s) per arm in alternation, {(time.perf_counter() - started) / 60:.1f} min in all. "
        "See the docstring for the arms.", "",
        "| arm | overrides | fits | steps | tokens | steady tokens/s (median) | x trainer | start-up s | teardown s | worker peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, overrides in arms.items():
        f = fits[name]
        rate = statistics.median(x["steady"] for x in f)
        lines.append(f"| {name} | {'; '.join(overrides) or '-'} | {len(f)} | {f[0]['steps']} | {f[0]['tokens']:.0f} | "
                     f"{rate:.1f} | {rate / base_rate:.2f}x | {statistics.median(x['startup_s'] for x in f):.1f} | "
                     f"{statistics.median(x['teardown_s'] for x in f):.1f} | {max(x['peak_rss_gib'] for x in f):.2f} |")  # fmt: skip
    Path(args.out).write_text("\n".join([*lines, ""]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
