"""The Grafana dashboard of a run: every psr_ray instrument (psr_ray.runtime.metrics) and vLLM's engine metrics.

cluster/grafana_dashboard.json is `python -m psr_ray.runtime.grafana > cluster/grafana_dashboard.json`; a test keeps
the two equal, and the live test checks that the vLLM series plotted here are the ones engines export.
"""

from __future__ import annotations

from typing import Any

from psr_ray.runtime.metrics import INSTRUMENTS

# vLLM's metrics as Ray exports them from an engine (psr_ray.engines.stat_logger): (title, PromQL, unit).
# Every series carries the tags `role` and `engine_name`.
ENGINE_PANELS: tuple[tuple[str, str, str], ...] = (
    ("engine KV-cache usage", "max by (role, engine_name) (ray_vllm_kv_cache_usage_perc)", "percentunit"),
    ("engine requests running", "sum by (role, engine_name) (ray_vllm_num_requests_running)", "short"),
    ("engine requests waiting (queue)", "sum by (role, engine_name) (ray_vllm_num_requests_waiting)", "short"),
    ("engine generated tokens/s", "sum by (role, engine_name) (rate(ray_vllm_generation_tokens_total[1m]))", "short"),
    ("engine prompt tokens/s", "sum by (role, engine_name) (rate(ray_vllm_prompt_tokens_total[1m]))", "short"),
    ("engine time to first token p50 / p95",
     "histogram_quantile(0.95, sum by (le, role) (rate(ray_vllm_time_to_first_token_seconds_bucket[5m])))", "s"),
    ("engine request latency p95",
     "histogram_quantile(0.95, sum by (le, role) (rate(ray_vllm_e2e_request_latency_seconds_bucket[5m])))", "s"),
    ("engine queue time p95",
     "histogram_quantile(0.95, sum by (le, role) (rate(ray_vllm_request_queue_time_seconds_bucket[5m])))", "s"),
    ("engine prefix-cache hit rate",
     "sum by (role) (rate(ray_vllm_prefix_cache_hits_total[5m])) / sum by (role) "
     "(rate(ray_vllm_prefix_cache_queries_total[5m]))", "percentunit"),
    ("engine preemptions/s", "sum by (role, engine_name) (rate(ray_vllm_num_preemptions_total[1m]))", "short"),
)  # fmt: skip
# The p50 next to a p95 panel's query.
_P50 = {"engine time to first token p50 / p95"}


def instrument_expr(name: str) -> str:
    """The PromQL of one psr_ray instrument: per-second rate of a counter, latest value of a gauge, split by
    its tags."""
    kind, _, tag_keys = INSTRUMENTS[name]
    by = f" by ({', '.join(tag_keys)})" if tag_keys else ""
    if kind == "counter":
        return f"sum{by} (rate(ray_psr_{name}_total[1m]))"
    return f"max{by} (ray_psr_{name})"


def _panel(index: int, title: str, description: str, targets: list[tuple[str, str]], unit: str) -> dict[str, Any]:
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "gridPos": {"h": 7, "w": 8, "x": 8 * (index % 3), "y": 7 * (index // 3)},
        "targets": [{"expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
                    for i, (expr, legend) in enumerate(targets)],
    }  # fmt: skip


def grafana_dashboard() -> dict[str, Any]:
    """The dashboard: psr_ray's instruments, seconds per weight sync, then vLLM's engine panels."""
    panels: list[dict[str, Any]] = []
    for name, (kind, description, tag_keys) in INSTRUMENTS.items():
        legend = " ".join(f"{{{{{key}}}}}" for key in tag_keys) or name
        title = f"{name} ({'per second' if kind == 'counter' else 'latest'})"
        panels.append(_panel(len(panels), title, description, [(instrument_expr(name), legend)], "short"))
    per_sync = ("sum by (backend) (increase(ray_psr_weight_sync_seconds_total[1h])) / sum by (backend) "
                "(increase(ray_psr_weight_syncs_total[1h]))")  # fmt: skip
    panels.append(_panel(len(panels), "seconds per weight sync", "Mean time to load new weights into every engine",
                         [(per_sync, "{{backend}}")], "s"))  # fmt: skip
    for title, expr, unit in ENGINE_PANELS:
        targets = [(expr, "{{role}} {{engine_name}}" if "engine_name" in expr else "{{role}}")]
        if title in _P50:
            targets.insert(0, (expr.replace("0.95", "0.5", 1), "p50 {{role}}"))
            targets[1] = (expr, "p95 {{role}}")
        panels.append(_panel(len(panels), title, "vLLM engine metric (RayPrometheusStatLogger)", targets, unit))
    return {
        "title": "psr_ray",
        "uid": "psr-ray",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
        "panels": panels,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(grafana_dashboard(), indent=2))
