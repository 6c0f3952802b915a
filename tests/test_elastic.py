"""`psr-ray scale`'s reconcile logic (pipeline/elastic.py) on fake engines: no Ray, no model."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from psr_ray.config import JudgeConfig, PSRConfig, UserError
from psr_ray.engines.pool import EnginePool
from psr_ray.pipeline.elastic import Elastic, request_scale, scaled_counts


@dataclasses.dataclass
class Ref:
    done: bool = False
    value: Any = None
    error: Exception | None = None


class FakeEngines:
    """Records what Elastic does; the test decides when each ready()/reload answers."""

    def __init__(self):
        self.launched: list[tuple[str, int, str, int]] = []
        self.ready_refs: dict[str, list[Ref]] = {}
        self.reloads: list[tuple[str, str, int]] = []
        self.reload_refs: dict[str, Ref] = {}
        self.killed: list[str] = []

    def launch(self, role, index, model_path, policy_version):
        self.launched.append((role, index, model_path, policy_version))
        return f"psr-{role}-{index}"

    def ready(self, actor):
        ref = Ref()
        self.ready_refs.setdefault(actor, []).append(ref)
        return ref

    def reload(self, actor, policy_dir, policy_version):
        self.reloads.append((actor, policy_dir, policy_version))
        self.reload_refs[actor] = Ref()
        return self.reload_refs[actor]

    def result(self, ref):
        if ref.error is not None:
            raise ref.error
        return ref.done, ref.value

    def kill(self, actor):
        self.killed.append(actor)

    def answer_ready(self, actor, version):
        ref = self.ready_refs[actor][-1]
        ref.done, ref.value = True, {"policy_version": version}


def make(n: int = 1, *, shared: bool = False):
    rollout = EnginePool("rollout", [f"psr-rollout-{i}" for i in range(n)], max_restarts=1)
    pools = {"rollout": [rollout]}
    judge = None
    if shared:
        judge = EnginePool("judge", list(rollout.actors), max_restarts=1, names=list(rollout.names))
        pools["rollout"].append(judge)
    target: dict[str, int] = {}
    persisted: list[dict[str, int]] = []
    engines = FakeEngines()
    elastic = Elastic(pools, engines, read_target=lambda: dict(target), persist=persisted.append, poll_s=0.0)
    return elastic, engines, rollout, judge, target, persisted


def picks(pool: EnginePool, turns: int = 8) -> set[int]:
    """The engines `pick` hands calls to (each call left in flight, as the scheduler does)."""
    seen = set()
    for _ in range(turns):
        i = pool.pick()
        if i is None:
            break
        pool.started(i)
        seen.add(i)
    for i in seen:
        while pool.in_flight[i]:
            pool.succeeded(i)
    return seen


def test_a_new_engine_takes_calls_only_once_ready_at_the_version_being_searched():
    elastic, engines, rollout, _, target, persisted = make(1)
    elastic.tick(3, "/ckpt/v3")
    assert engines.launched == []  # nothing asked: nothing happens
    target["rollout"] = 2
    elastic.tick(3, "/ckpt/v3")
    assert engines.launched == [("rollout", 1, "/ckpt/v3", 3)]  # on the policy being searched
    assert persisted == [{"rollout": 2}]
    elastic.tick(3, "/ckpt/v3")
    assert len(rollout) == 1 and picks(rollout) == {0}  # loading: not in the pool yet
    # It answers ready() at another version (the policy moved on while it loaded): reloaded first, then asked again.
    engines.answer_ready("psr-rollout-1", 2)
    elastic.tick(3, "/ckpt/v3")
    assert engines.reloads == [("psr-rollout-1", "/ckpt/v3", 3)] and len(rollout) == 1
    engines.reload_refs["psr-rollout-1"].done = True
    elastic.tick(3, "/ckpt/v3")
    assert len(rollout) == 1
    engines.answer_ready("psr-rollout-1", 3)
    elastic.tick(3, "/ckpt/v3")
    assert rollout.actors == ["psr-rollout-0", "psr-rollout-1"] and rollout.names[1] == "psr-rollout-1"
    assert picks(rollout) == {0, 1}
    assert [e["event"] for e in elastic.events] == ["target", "added"]
    assert elastic.events[-1]["policy_version"] == 3
    summary = elastic.summary()
    assert summary["engines"] == {"rollout": 2} and len(summary["scale_events"]) == 2
    assert elastic.summary() == {}  # each event reported once


def test_a_removed_engine_drains_its_calls_before_it_leaves_and_is_killed_after_the_sync():
    elastic, engines, rollout, _, target, persisted = make(2)
    rollout.started(1)
    rollout.started(1)  # two calls in flight on the engine to remove
    target["rollout"] = 1
    elastic.tick(1, "/m")
    assert rollout.serving == 1 and len(rollout) == 2  # no new calls to it; its calls still count
    assert picks(rollout) == {0}
    rollout.succeeded(1)  # one answer back (the scheduler takes it as usual)
    elastic.tick(1, "/m")
    assert len(rollout) == 2
    rollout.succeeded(1)
    elastic.tick(1, "/m")
    assert rollout.actors == ["psr-rollout-0"] and rollout.in_flight == [0]
    assert engines.killed == []  # the trainer's weight sender may still hold it
    assert [e["event"] for e in elastic.events] == ["target", "removed"]
    elastic.kill_retired()
    assert engines.killed == ["psr-rollout-1"]
    assert persisted == [{"rollout": 1}]


def test_a_failed_call_on_a_draining_engine_still_lets_it_leave():
    elastic, _, rollout, _, target, _ = make(2)
    rollout.started(1)
    target["rollout"] = 1
    elastic.tick(1, "/m")
    rollout.failed(1, reason="died")  # the scheduler re-queues its requests on a serving engine
    elastic.tick(1, "/m")
    assert len(rollout) == 1


def test_shrinking_cancels_engines_still_loading_and_growing_again_takes_retired_ones_back():
    elastic, engines, rollout, _, target, _ = make(2)
    target["rollout"] = 1
    elastic.tick(1, "/m")
    elastic.tick(1, "/m")
    assert rollout.actors == ["psr-rollout-0"]
    target["rollout"] = 3
    elastic.tick(1, "/m")
    assert engines.launched == [("rollout", 2, "/m", 1)]  # engine 1 is still alive (retired): taken back
    engines.answer_ready("psr-rollout-2", 1)  # out of order: 2 waits for 1, indices stay the calls'
    elastic.tick(1, "/m")
    assert len(rollout) == 1
    engines.answer_ready("psr-rollout-1", 1)
    elastic.tick(1, "/m")
    assert rollout.actors == ["psr-rollout-0", "psr-rollout-1", "psr-rollout-2"]
    target["rollout"] = 4
    elastic.tick(1, "/m")
    target["rollout"] = 3  # asked for, then no longer wanted while it loads
    elastic.tick(1, "/m")
    elastic.kill_retired()
    assert engines.killed == ["psr-rollout-3"] and len(rollout) == 3


def test_a_draining_engine_asked_for_again_serves_again():
    elastic, engines, rollout, _, target, _ = make(2)
    rollout.started(1)
    target["rollout"] = 1
    elastic.tick(1, "/m")
    target["rollout"] = 2
    elastic.tick(1, "/m")
    assert rollout.serving == 2 and len(rollout) == 2 and engines.launched == []


def test_an_engine_that_fails_to_start_leaves_the_pool_as_it_was():
    elastic, engines, rollout, _, target, _ = make(1)
    target["rollout"] = 2
    elastic.tick(1, "/m")
    engines.ready_refs["psr-rollout-1"][-1].error = RuntimeError("no memory")
    elastic.tick(1, "/m")
    assert len(rollout) == 1 and elastic.events[-1]["event"] == "failed"


def test_a_judge_on_the_rollout_engines_grows_and_shrinks_with_them():
    elastic, engines, rollout, judge, target, _ = make(1, shared=True)
    target["rollout"] = 2
    elastic.tick(1, "/m")
    engines.answer_ready("psr-rollout-1", 1)
    elastic.tick(1, "/m")
    assert judge.actors == rollout.actors == ["psr-rollout-0", "psr-rollout-1"]
    assert judge.names == ["psr-rollout-0", "psr-rollout-1"]
    judge.started(1)  # a judge call in flight on it keeps it until answered
    target["rollout"] = 1
    elastic.tick(1, "/m")
    assert len(rollout) == 2 and rollout.serving == judge.serving == 1
    judge.succeeded(1)
    elastic.tick(1, "/m")
    assert len(rollout) == len(judge) == 1


def _run_folder(tmp_path, cfg: PSRConfig):
    from psr_ray.pipeline.run_state import RunState

    RunState(tmp_path).set_config(cfg.to_dict())
    return str(tmp_path)


def test_the_scale_command_refuses_what_the_run_cannot_do(tmp_path):
    shared = _run_folder(tmp_path / "shared", dataclasses.replace(PSRConfig(), judge=JudgeConfig(num_engines=0)))
    with pytest.raises(UserError, match="judge runs on its rollout engines"):
        request_scale(shared, {"judge": 2})
    with pytest.raises(UserError, match="must be >= 1"):
        request_scale(shared, {"rollout": 0})
    with pytest.raises(UserError, match="ray.json not found"):
        request_scale(shared, {"rollout": 2})
    assert scaled_counts(shared) == {}
    (tmp_path / "shared" / "scale.json").write_text(json.dumps({"rollout": 3, "judge": 3}))
    assert scaled_counts(shared) == {"rollout": 3, "judge": 3}


def test_the_scale_command_line(tmp_path, capsys):
    from psr_ray.app.cli import main

    assert main(["scale", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == "psr-ray scale: give --rollout N and/or --judge M"
    assert main(["scale", str(tmp_path), "--rollout", "2"]) == 1
    assert "no state.json there: not a psr-ray run folder" in capsys.readouterr().err


def test_a_resumed_run_starts_its_pools_at_the_scaled_counts(monkeypatch):
    from psr_ray.pipeline import session as session_module

    started = []
    monkeypatch.setattr(session_module, "start_engine_pool",
                        lambda cfg, role, path, **kw: started.append((role, cfg.rollout.num_engines, cfg.judge.num_engines)))  # fmt: skip
    shared = session_module.RunSession(dataclasses.replace(PSRConfig(), judge=JudgeConfig(num_engines=0)))
    shared.start_pool("rollout", "m", num_engines=3)
    shared.start_pool("judge", "m", num_engines=3)  # the judge on the rollout engines: as many as they are
    own = session_module.RunSession(dataclasses.replace(PSRConfig(), judge=JudgeConfig(num_engines=1)))
    own.start_pool("judge", "m", num_engines=2)
    assert started == [("rollout", 3, 0), ("judge", 3, 0), ("judge", 1, 2)]
