"""Prometheus metrics on an injected registry (never the global one), updated from each run."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from probe.checks.base import CheckResult, Kind
from probe.runner import Run

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _asyncio_tasks() -> float:
    """Tasks alive on the running loop when /metrics is scraped; NaN when collected outside the loop."""
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:
        return float("nan")


class Metrics:
    """Every `probe_` metric. Built per process (or per test) on the registry it is given."""

    def __init__(self, registry: CollectorRegistry, canaries: Iterable[str] = ()) -> None:
        """`canaries` are the configured canary names: their mismatch counters and saturation gauges are exported at
        0 from the start, so `increase(probe_canary_mismatch_total[...])` sees a pod's first mismatch (a series born
        at 1 has no earlier sample to increase from)."""
        self.registry = registry
        self._check_children: dict[str, tuple[Any, Any]] = {}
        self.ready = Gauge("probe_ready", "1 when /ready passes (all checks), else 0", registry=registry)
        self.live = Gauge("probe_live", "1 when /live passes, else 0", registry=registry)
        self.check_success = Gauge(
            "probe_check_success", "1 when the check passed in the latest run", ["check"], registry=registry
        )
        self.check_duration = Gauge(
            "probe_check_duration_seconds",
            "How long the check took in the latest run",
            ["check"],
            registry=registry,
        )
        self.canary_latency = Histogram(
            "probe_canary_latency_seconds",
            "Wall time of completed canary inferences",
            ["canary"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.first_response = Histogram(
            "probe_canary_first_response_seconds",
            "Time to the first event of completed generate_stream canaries (time to first token)",
            ["canary"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.mismatch = Counter(
            "probe_canary_mismatch",
            "Canary outputs that matched no golden record",
            ["canary"],
            registry=registry,
        )
        self.max_abs_error = Gauge(
            "probe_canary_max_abs_error",
            "Largest absolute error against the golden tensors (tolerance mode)",
            ["canary"],
            registry=registry,
        )
        self.gpu_free = Gauge("probe_gpu_memory_free_bytes", "Free GPU memory", ["gpu"], registry=registry)
        self.gpu_total = Gauge("probe_gpu_memory_total_bytes", "Total GPU memory", ["gpu"], registry=registry)
        self.gpu_trend = Gauge(
            "probe_gpu_memory_used_trend_bytes_per_minute",
            "Slope of used GPU memory over gpu.trend_window (a steady positive value is a leak)",
            ["gpu"],
            registry=registry,
        )
        self.runs = Counter("probe_runs", "Check runs executed", registry=registry)
        self.environment = Gauge(
            "probe_environment_info",
            "The environment fingerprint this node reports (value is always 1)",
            ["gpu", "driver", "cuda", "triton"],
            registry=registry,
        )
        self.queue_pending = Gauge(
            "probe_triton_queue_pending_requests",
            "Requests waiting in Triton's queue for the canary's model (nv_inference_pending_request_count)",
            ["model"],
            registry=registry,
        )
        self.queue_time = Gauge(
            "probe_triton_queue_time_seconds",
            "Mean queue time per request since the previous run, from Triton's /stats deltas",
            ["model"],
            registry=registry,
        )
        self.saturated = Gauge(
            "probe_saturated",
            "1 while the canary's last miss was judged saturated (its model kept completing other requests with some "
            "pending), else 0",
            ["canary"],
            registry=registry,
        )
        self.asyncio_tasks = Gauge(
            "probe_asyncio_tasks",
            "asyncio tasks alive in the sidecar when scraped (connections, runs, background work); a rise is a leak",
            registry=registry,
        )
        self.asyncio_tasks.set_function(_asyncio_tasks)
        for canary in canaries:
            self.mismatch.labels(canary)
            self.saturated.labels(canary).set(0)

    def observe_run(self, run: Run, *, ready: bool, live: bool) -> None:
        """One finished run, and the verdicts judged from it (`probe.verdict.readiness`, `Liveness.verdict`)."""
        self.runs.inc()
        self.ready.set(1.0 if ready else 0.0)
        self.live.set(1.0 if live else 0.0)
        for name, r in run.results.items():
            self.observe_check(r)
            if r.kind is Kind.CANARY:
                canary = name.split("/", 1)[1]
                self.saturated.labels(canary).set(1.0 if r.details.get("saturated") is True else 0.0)
                lat = r.details.get("latency_s")
                if isinstance(lat, float):
                    self.canary_latency.labels(canary).observe(lat)
                first = r.details.get("first_event_s")
                if isinstance(first, float):
                    self.first_response.labels(canary).observe(first)
                if r.details.get("mismatch"):
                    self.mismatch.labels(canary).inc()
                err = r.details.get("max_abs_error")
                if isinstance(err, float):
                    self.max_abs_error.labels(canary).set(err)
            elif r.kind is Kind.GPU:
                self.observe_gpu(r.details)

    def observe_check(self, r: CheckResult) -> None:
        # labels() hashes and locks on every call; the per-check children are looked up once and kept.
        children = self._check_children.get(r.name)
        if children is None:
            children = (self.check_success.labels(r.name), self.check_duration.labels(r.name))
            self._check_children[r.name] = children
        children[0].set(1.0 if r.ok else 0.0)
        children[1].set(r.duration)

    def observe_gpu(self, details: dict[str, Any]) -> None:
        for dev in details.get("devices", []):
            self.gpu_free.labels(dev["gpu"]).set(dev["free"])
            self.gpu_total.labels(dev["gpu"]).set(dev["total"])
        for gpu, slope in (details.get("trend_bytes_per_minute") or {}).items():
            self.gpu_trend.labels(gpu).set(slope)

    def set_environment(self, env: dict[str, Any]) -> None:
        gpus = ",".join(sorted(set(env.get("gpus") or []))) or "none"
        self.environment.clear()
        self.environment.labels(
            gpus,
            str(env.get("driver") or "none"),
            str(env.get("cuda_driver") or "none"),
            str(env.get("triton") or ""),
        ).set(1)

    def expose(self, environment: bool = True) -> tuple[bytes, str]:
        """The exposition; without `environment`, `probe_environment_info` (GPU, driver, CUDA and Triton versions)
        is left out."""
        text = generate_latest(self.registry)
        if not environment:
            text = b"".join(line for line in text.splitlines(keepends=True) if b"probe_environment_info" not in line)
        return text, CONTENT_TYPE_LATEST
