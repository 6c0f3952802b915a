"""Where every engine, tensor-parallel shard and trainer rank lands, for every topology a user can configure,
observed on logical GPUs (issue 23, defect 2), and whether that is what the config asks; writes
bench/results/gpu_placement.md. Every cell is computed from what Ray assigned to each process
(tests/scenarios/placement.py: the real engine pools and Ray Train worker group; the engine stops where
vllm.LLM would start, the trainer's loop reports instead of training, over gloo).

    PYTHONPATH=$PWD python bench/gpu_placement.py [--json placement.json]   # ~3-6 minutes on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.scenarios: shared with tests/, not packaged

from tests.scenarios.placement import TOPOLOGIES, problems  # noqa: E402

OUT = ROOT / "bench" / "results" / "gpu_placement.md"


def rows(seen: dict[str, Any]) -> list[list[str]]:
    """One row per process: what it is, its node, Ray's GPU ids, its GPU share, CUDA_VISIBLE_DEVICES, and
    (colocated) which trainer rank shares its GPU."""
    label = seen["nodes"].get
    rank_on = {(r["node_id"], r["gpu_ids"][0]): r["rank"] for r in seen["trainer"] if r["gpu_ids"]}

    def row(what: str, proc: dict[str, Any]) -> list[str]:
        gpus = proc["gpu_ids"]
        mate = rank_on.get((proc["node_id"], gpus[0])) if gpus and seen["colocate"] else None
        return [what, str(label(proc["node_id"])), ",".join(gpus) or "-", f"{proc['resources'].get('GPU', 0):g}",
                proc["cuda_visible_devices"] or "-", "-" if mate is None else f"trainer rank {mate}"]  # fmt: skip

    out = []
    for engine in seen["engines"]:
        if engine["shards"]:
            out += [row(f"{engine['name']} shard {i}", shard) for i, shard in enumerate(engine["shards"])]
        else:
            out.append(row(engine["name"], engine["host"]))
    for rank in sorted(seen["trainer"], key=lambda r: r["rank"]):
        fed = seen["fed"][rank["rank"]] if isinstance(seen["fed"], list) else None
        feeds = ", ".join(seen["engines"][i]["name"] for i in fed) if fed else "-"
        out.append(row(f"trainer rank {rank['rank']}", rank)[:5] + [f"feeds {feeds}" if fed else "-"])
    return out


def report(results: dict[str, Any]) -> tuple[str, bool]:
    """The markdown, and whether every topology placed as configured."""
    load = (f"1-minute load average {results['load_average_1m']:.2f} at the end" if "load_average_1m" in results
            else "load not measured: replayed from --json")  # fmt: skip
    lines = ["# GPU placement on logical GPUs (issue 23, defect 2)", "",
             f"Written by `bench/gpu_placement.py` (placing took {results['seconds']:.0f} s on {os.cpu_count()} cores, {load}): "
             "a `ray.cluster_utils.Cluster` whose nodes declare "
             "GPUs (and the recipe's `psr_engine` / `psr_trainer`), the real engine pools (`start_engine_pool`) and "
             "the real Ray Train worker group (`scaling_kwargs` with `trainer_gpu_share`, `start_bound`). Stubbed "
             "where CUDA starts: the engine's constructor stops before `vllm.LLM` (tensor-parallel engines start one "
             "`num_gpus=1` stand-in per GPU bundle, as vLLM's Ray executor does); the trainer's loop reports its "
             "placement over gloo instead of training. Each cell is what Ray assigned to that process "
             "(`get_accelerator_ids`, `get_assigned_resources`, its environment).", ""]  # fmt: skip
    verdicts = []
    for seen in results["topologies"]:
        found = problems(seen)
        verdicts.append((seen["topology"], found))
        lines += [f"## {seen['topology']}: {seen['about']}", "",
                  f"Trainer share per worker: {seen['trainer_share']:g} GPU; placed in {seen['seconds']:.0f} s. "
                  f"Check: {'as configured' if not found else '; '.join(found)}.", "",
                  "| process | node | Ray GPU ids | GPU share | CUDA_VISIBLE_DEVICES | shares its GPU with / feeds |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        lines += ["| " + " | ".join(cells) + " |" for cells in rows(seen)] + [""]
    if "unplaceable" in results:
        failed = results["unplaceable"]
        bounded = failed["error"] is not None and "could not start" in failed["error"]
        verdicts.append(("unplaceable", [] if bounded else ["the fit did not fail naming the trainer group"]))
        lines += ["## unplaceable: engines hold 0.4 + 0.4 of the only GPU, the trainer asks a whole one", "",
                  f"`train_sft` failed after {failed['seconds']:.0f} s ({failed['tries']} tries of "
                  f"`trainer.start_timeout_s={failed['start_timeout_s']:g}`; Ray Train alone retries forever):", "",
                  "```", (failed["error"] or "no error: it was placed")[:700], "```", ""]  # fmt: skip
    lines += ["## Verdict", "", "| topology | as configured (unplaceable: fails naming the group) |", "|---|---|"]
    lines += [f"| {name} | {'yes' if not found else 'NO: ' + found[0]} |" for name, found in verdicts]
    return "\n".join(lines) + "\n", all(not found for _, found in verdicts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="an observation written earlier (skips placing again)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    path = args.json
    if path is None:  # its own process: its own Ray cluster
        path = str(Path(tempfile.mkdtemp(prefix="psr_placement_")) / "placement.json")
        env = os.environ | {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        subprocess.run([sys.executable, "-m", "tests.scenarios.placement", path], check=True, cwd=ROOT, env=env)
    results = json.loads(Path(path).read_text())
    if args.json is None:  # the load while placing, read as it ended (not when a saved observation is replayed)
        results["load_average_1m"] = os.getloadavg()[0]
    assert [t["topology"] for t in results["topologies"]] == [t.name for t in TOPOLOGIES]
    text, ok = report(results)
    Path(args.out).write_text(text)
    print(text)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
