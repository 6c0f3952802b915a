"""An engine's settings from the config (engines/settings.py): CPU threads follow the CPUs it reserves."""

from __future__ import annotations

from psr_ray.config import DEFAULT_CONFIG, load
from psr_ray.engines.settings import engine_env, engine_settings


def test_a_cpu_engine_runs_as_many_threads_as_the_cpus_it_reserves():
    preset = engine_settings(load([str(DEFAULT_CONFIG)], []), "rollout", "/models/m")
    assert preset.cpu_threads == 2  # the preset's engine reserves both cores (bench/results/engine_threads.md)
    assert engine_env(preset)["OMP_NUM_THREADS"] == "2"
    for cpus, threads in ((0.5, 1), (1, 1), (3.7, 3)):  # whole CPUs, at least one
        cfg = load([str(DEFAULT_CONFIG)], [f"rollout.num_cpus_per_engine={cpus}"])
        assert engine_settings(cfg, "rollout", "/models/m").cpu_threads == threads


def test_a_gpu_engine_leaves_the_thread_count_alone():
    cfg = load([str(DEFAULT_CONFIG)], ["rollout.num_gpus_per_engine=1"])
    assert "OMP_NUM_THREADS" not in engine_env(engine_settings(cfg, "rollout", "/models/m"))
