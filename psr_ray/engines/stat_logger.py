"""vLLM's own engine metrics (KV-cache usage, queue, TTFT, tokens) exported through Ray, per engine.

vLLM 0.32's offline `LLM` takes no stat loggers, so `export_engine_stats(llm, ...)` swaps the engine's
logger manager for one with vLLM's `RayPrometheusStatLogger` (Ray's metrics agent exports it as
`ray_vllm_*`) next to the in-process Prometheus logger that `llm.get_metrics()` reads. Its metrics get
two more tags, `role` and `engine_name` (e.g. rollout / psr-rollout-0), as every engine metric of psr_ray
does. The engine must be built with `disable_log_stats=False`, or vLLM computes no stats at all.
"""

from __future__ import annotations

from typing import Any


def engine_tagged(wrapper_cls: Any, tags: dict[str, str]) -> type:
    """A subclass of one of vLLM's Ray metric wrappers whose series also carry `tags`."""

    class Tagged(wrapper_cls):
        @staticmethod
        def _get_tag_keys(labelnames: list[str] | None) -> tuple[str, ...]:
            return wrapper_cls._get_tag_keys(labelnames) + tuple(tags)

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._tags: dict[str, str] = {**self._tags, **tags}

        def _build_tags(self, *labels: Any, **labelskwargs: Any) -> dict[str, str]:
            # vLLM passes label values by position; the keys are its own, before ReplicaId and ours.
            labelskwargs.update(zip(self.metric._tag_keys, labels, strict=False))
            return {**{k: str(v) for k, v in labelskwargs.items()}, "ReplicaId": "", **tags}

    Tagged.__name__ = f"EngineTagged{wrapper_cls.__name__}"
    return Tagged


def export_engine_stats(llm: Any, *, role: str, engine_name: str) -> None:
    """Exports `llm`'s vLLM stats as Ray metrics tagged with the engine's role and name."""
    import vllm.v1.metrics.ray_wrappers as ray_wrappers
    from vllm.v1.metrics.loggers import PrometheusStatLogger, StatLoggerManager

    if ray_wrappers.ray_metrics is None:
        # vLLM imports `ray.serve` and `ray.util.metrics` together; without ray[serve] it records nothing.
        from ray.util import metrics as ray_util_metrics

        ray_wrappers.ray_metrics = ray_util_metrics
    tags = {"role": role, "engine_name": engine_name}
    base = ray_wrappers.RayPrometheusStatLogger
    logger_cls = type("EngineStatLogger", (base,), {
        "_gauge_cls": engine_tagged(ray_wrappers.RayGaugeWrapper, tags),
        "_counter_cls": engine_tagged(ray_wrappers.RayCounterWrapper, tags),
        "_histogram_cls": engine_tagged(ray_wrappers.RayHistogramWrapper, tags),
    })  # fmt: skip
    engine = llm.llm_engine
    # enable_default_loggers=False: no "Avg prompt throughput" lines in the engine's log every 10 s.
    engine.logger_manager = StatLoggerManager(vllm_config=engine.vllm_config, enable_default_loggers=False,
                                              custom_stat_loggers=[logger_cls, PrometheusStatLogger])  # fmt: skip
    engine.logger_manager.log_engine_initialized()
