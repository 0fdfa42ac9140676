"""Triton's own queue signal for each canary's model, exported so KEDA or an HPA can scale on it.

Off the probe path: a background task owned by the sidecar polls `/v2/models/<m>/stats` (mean queue time per
request since the previous poll, from the counters' deltas) and reads Triton's metrics page
(`nv_inference_pending_request_count`) through the shared `MetricsPage`, so the page is fetched once per period
for this and the GPU source alike. A failed poll leaves the gauges as they were and is retried.

Its /stats readings are also the "before" readings the saturation judge compares a missed canary against
(`probe.saturation`): one poller feeds both.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families

from probe.metrics import Metrics
from probe.triton import TritonClient, TritonRequestError, TritonUnreachable
from probe.triton_metrics import MetricsPage

if TYPE_CHECKING:
    from probe.saturation import Saturation


@dataclass
class _Counter:
    count: int = 0
    ns: int = 0


def queue_totals(stats: dict[str, Any]) -> tuple[int, int]:
    """(requests that waited in the queue, total nanoseconds waited) summed over a model's versions."""
    count = ns = 0
    for entry in stats.get("model_stats", []):
        q = entry.get("inference_stats", {}).get("queue", {})
        count += int(q.get("count", 0))
        ns += int(q.get("ns", 0))
    return count, ns


def pending_requests(metrics_text: str, models: set[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "nv_inference_pending_request_count":
            continue
        for s in family.samples:
            model = s.labels.get("model", "")
            if model in models:
                out[model] = out.get(model, 0.0) + float(s.value)
    return out


class QueueWatcher:
    """Polls the queue signal every `period` seconds while the sidecar runs."""

    def __init__(
        self,
        client: TritonClient,
        models: list[tuple[str, str]],
        metrics: Metrics,
        page: MetricsPage,
        period: float,
        saturation: Saturation | None = None,
    ) -> None:
        self._client = client
        self._saturation = saturation
        self._models = models
        self._metrics = metrics
        self._page = page
        self.period = period
        self._last: dict[str, _Counter] = {}

    async def poll_once(self) -> None:
        for model, version in self._models:
            try:
                stats = await self._client.statistics(model, version)
            except TritonRequestError as e:  # an answer, and a refusal: saturation cannot be judged for the model
                if self._saturation is not None:
                    self._saturation.refused(model, version, str(e))
                continue
            except TritonUnreachable:
                continue
            if self._saturation is not None:
                self._saturation.observe_stats(model, version, stats)
            count, ns = queue_totals(stats)
            prev = self._last.get(model)
            self._last[model] = _Counter(count, ns)
            if prev is not None and count >= prev.count:
                waited = count - prev.count
                self._metrics.queue_time.labels(model).set((ns - prev.ns) / waited / 1e9 if waited else 0.0)
        page = await self._page.get(max_age=self.period * 0.9)
        if self._saturation is not None:
            self._saturation.observe_page(page)
        if page.text is None:
            return
        text = page.text
        with contextlib.suppress(ValueError):
            for model, value in pending_requests(text, {m for m, _ in self._models}).items():
                self._metrics.queue_pending.labels(model).set(value)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # observability must never take the sidecar down
                async with asyncio.timeout(max(self.period, 1.0)):
                    await self.poll_once()
            await asyncio.sleep(self.period)
