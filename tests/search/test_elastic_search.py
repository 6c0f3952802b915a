"""`psr-ray scale` against a search that runs (real local Ray, the real scheduler, fake arith engines): the
command grows the rollout pool 1 -> 2 mid-search, the new engine serves calls at the searched policy, then
the pool shrinks back 2 -> 1, and every problem and pair is committed exactly once."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest

from psr_ray.config import JudgeConfig, PSRConfig, RolloutConfig, SearchConfig
from psr_ray.data.pairs_io import read_pairs
from psr_ray.data.problems import load_problems
from psr_ray.engines.pool import EnginePool, engine_name
from psr_ray.pipeline.elastic import CONTROL_NAME, scaled_counts, start_elastic
from psr_ray.pipeline.run_state import RunState
from psr_ray.pipeline.search_stage import generate_pairs
from psr_ray.testing.arith_engine import ArithEngine, off_by_one

pytestmark = pytest.mark.ray
POLICY_VERSION = 4


def candidates(request, right: str) -> tuple[str, ...]:
    return (off_by_one(right), right, off_by_one(right) + " So.")


class SlowArithEngine(ArithEngine):
    """An ArithEngine whose propose takes `delay` seconds (so the search lasts) and counts its calls."""

    def __init__(self, problems, *, name: str, delay: float, policy_version: int):
        super().__init__(problems, candidates=candidates, policy_version=policy_version)
        self.name, self.delay, self.calls = name, delay, 0

    def propose(self, requests, **kwargs):
        time.sleep(self.delay)
        self.calls += 1
        return super().propose(requests, **kwargs)

    def ready(self):
        return {"name": self.name, "policy_version": self.policy_version}

    def num_calls(self) -> int:
        return self.calls


@dataclasses.dataclass
class FakeSession:
    """What start_elastic uses of a RunSession: the config and `start_engine`."""

    cfg: PSRConfig
    problems: list
    started: list = dataclasses.field(default_factory=list)

    def start_engine(self, role, index, model_path, *, policy_version):
        import ray

        self.started.append((role, index, model_path, policy_version))
        remote = ray.remote(SlowArithEngine).options(num_cpus=0, name=engine_name(role, index))
        return remote.remote(self.problems, name=engine_name(role, index), delay=0.3, policy_version=policy_version)


def test_scale_grows_and_shrinks_a_running_search_exactly_once(ray_cluster, tmp_path):
    ray = ray_cluster
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    problems = load_problems("embedded:arith", split="train", seed=None, limit=60).problems
    cfg = dataclasses.replace(
        PSRConfig(),
        rollout=RolloutConfig(num_candidates=3),
        judge=JudgeConfig(mode="oracle", num_engines=0),
        search=SearchConfig(max_steps=6, max_rollbacks=2, max_problems_in_flight=4),
    )
    folder = tmp_path / "run"
    RunState(folder).set_config(cfg.to_dict())
    session = FakeSession(cfg, problems)
    first = session.start_engine("rollout", 0, "/policy/v4", policy_version=POLICY_VERSION)
    ray.get(first.ready.remote())
    rollout = EnginePool("rollout", [first], max_restarts=0)
    judge = EnginePool("judge", [first], max_restarts=0, names=[engine_name("rollout", 0)])
    elastic = start_elastic(session, folder, rollout, judge)
    control = ray.get_actor(CONTROL_NAME)
    # The command, as a user runs it, while the search runs: it joins the cluster through RUN_DIR/ray.json.
    command = subprocess.Popen(
        [sys.executable, "-c", "import sys; from psr_ray.app.cli import main; sys.exit(main(sys.argv[1:]))",
         "scale", str(folder), "--rollout", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    finished: list[str] = []
    added_at: list[int] = []
    shrink_at: list[int] = []

    def on_turn():
        elastic.tick(POLICY_VERSION, "/policy/v4")
        if len(rollout) == 2 and not added_at:
            added_at.append(len(finished))
        if added_at and not shrink_at and len(finished) >= added_at[0] + 10:
            shrink_at.append(len(finished))
            ray.get(control.set.remote({"rollout": 1}))

    summary = generate_pairs(cfg, problems, iteration=1, policy_version=POLICY_VERSION, rollout=rollout, judge=judge,
                             output_dir=str(folder), on_pairs=lambda r: finished.append(r.problem_id),
                             on_turn=on_turn)  # fmt: skip
    output, _ = command.communicate(timeout=120)
    assert command.returncode == 0, output
    assert "engines asked for: rollout=2" in output
    # Grown mid-search, on the searched policy; shrunk mid-search too; back to one engine at the end.
    assert session.started[1] == ("rollout", 1, "/policy/v4", POLICY_VERSION)
    assert added_at and 0 < added_at[0] < len(problems) and shrink_at and shrink_at[0] < len(problems)
    events = [(e["event"], e.get("index")) for e in elastic.summary()["scale_events"]]
    assert events == [("target", None), ("added", 1), ("target", None), ("removed", 1)]
    assert len(rollout) == len(judge) == 1 and scaled_counts(folder) == {"rollout": 1, "judge": 1}
    second = ray.get_actor(engine_name("rollout", 1))
    assert ray.get(second.num_calls.remote()) > 0  # it served requests
    elastic.kill_retired()
    # Exactly once: each problem finished once, each pair committed once, none answered at another version.
    assert Counter(finished) == Counter(p.problem_id for p in problems)
    assert summary.problems_total == len(problems) and summary.stale_results == 0
    table = read_pairs(str(folder), 1)
    pair_ids = table.column("pair_id").to_pylist()
    assert len(pair_ids) == len(set(pair_ids)) == summary.pairs_total == summary.pairs > 0
    assert set(table.column("policy_version").to_pylist()) == {POLICY_VERSION}
    assert json.loads((folder / "ray.json").read_text())["namespace"] == ray.get_runtime_context().namespace
    ray.kill(first)
