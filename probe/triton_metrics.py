"""Triton's own Prometheus page (its metrics port): fetched once per period, whoever asks, and read for the GPU
memory of sidecars that see no GPU of their own (`TritonMetricsSampler`) and for the pending-request queue
(`probe.queue`). Every fetch goes through the TritonClient, so its size is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass

from probe.config import GpuConfig
from probe.gpu import Clock, GpuMemory, GpuSample, History
from probe.triton import TritonClient, TritonRequestError, TritonUnreachable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Page:
    taken_at: float
    text: str | None
    error: str | None = None


class MetricsPage:
    """Triton's metrics page, fetched at most once per `max_age` however many readers ask (single-flight)."""

    def __init__(self, client: TritonClient, url: str, *, timeout: float = 2.0, clock: Clock = time.monotonic) -> None:
        self.client = client
        self.url = url
        self._timeout = timeout
        self._clock = clock
        self._last: Page | None = None
        self._inflight: asyncio.Future[Page] | None = None

    async def get(self, max_age: float) -> Page:
        last = self._last
        if last is not None and self._clock() - last.taken_at < max_age:
            return last
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._fetch())
        return await asyncio.shield(self._inflight)

    async def _fetch(self) -> Page:
        try:
            async with asyncio.timeout(self._timeout):
                text = await self.client.metrics_page(self.url)
            page = Page(self._clock(), text)
        except TimeoutError:
            page = Page(self._clock(), None, f"Triton metrics {self.url}: no answer within {self._timeout:g}s")
        except TritonRequestError as e:
            page = Page(self._clock(), None, f"Triton metrics {self.url}: {e}")
        except TritonUnreachable as e:  # "Triton metrics: cannot connect to <url>: <why>"
            page = Page(self._clock(), None, f"cannot read {e}")
        self._last = page
        return page


_TOTAL = "nv_gpu_memory_total_bytes"
_USED = "nv_gpu_memory_used_bytes"
NO_GPU_METRICS = "Triton exports no GPU memory metrics (CPU-only Triton, or --allow-gpu-metrics=false)"


class TritonMetricsSampler:
    """Reads GPU memory from Triton's Prometheus endpoint (`nv_gpu_memory_{total,used}_bytes`) on an
    asyncio task, every `cfg.interval` seconds, each fetch bounded by min(interval, 2 s).

    A round fails when the endpoint is unreachable or answers non-200, when the text has no GPU memory
    metrics, or when a configured UUID is absent. Triton labels GPUs only by UUID, so `gpu.devices` must
    list UUIDs for this source; with `auto`, UUIDs in NVIDIA_VISIBLE_DEVICES narrow the set, and anything
    else means every GPU Triton reports (Triton's container decides what it sees, not this sidecar's).
    """

    def __init__(
        self, cfg: GpuConfig, page: MetricsPage, *, clock: Clock = time.monotonic, visible_devices: str | None = None
    ) -> None:
        self._cfg = cfg
        self._page = page
        self._url = page.url
        self._clock = clock
        self._history = History(cfg.trend_window, "triton-metrics")
        self._task: asyncio.Task[None] | None = None
        self._wanted: tuple[str, ...] | None = None
        self._strict = False  # explicit gpu.devices: every listed UUID must be present
        self._config_error: str | None = None
        if cfg.devices is not None:
            indices = [d for d in cfg.devices if not d.startswith(("GPU-", "MIG-"))]
            if indices:
                self._config_error = (
                    f"gpu.devices: {', '.join(indices)}: source triton-metrics labels GPUs by UUID only; "
                    "list GPU-/MIG- UUIDs"
                )
            self._wanted, self._strict = tuple(cfg.devices), True
        elif visible_devices:
            uuids = tuple(p.strip() for p in visible_devices.split(",") if p.strip().startswith(("GPU-", "MIG-")))
            self._wanted = uuids or None

    def latest(self) -> GpuSample | None:
        """The newest sample, or None before the first fetch ends. Never blocks."""
        return self._history.latest()

    def trend(self) -> dict[str, float]:
        """Used-memory slope per GPU in bytes per minute over `cfg.trend_window` (see `NvmlSampler.trend`)."""
        return self._history.trend()

    async def start_sampling(self) -> None:
        """Start polling on a task of the running loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll(), name="probe-triton-gpu-metrics")

    async def stop_sampling(self) -> None:
        """Cancel the polling task and wait for it to end."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                sample = await self.fetch_once()
            except Exception as e:  # a bug must not end polling: the check would only see staleness
                log.exception("Triton GPU metrics round failed")
                sample = GpuSample(self._clock(), (), f"GPU metrics sampler error: {e!r}")
            self._history.publish(sample)
            await asyncio.sleep(max(0.0, self._cfg.interval - (loop.time() - started)))

    async def fetch_once(self) -> GpuSample:
        """Read the page once (shared with the queue watcher within one interval) and parse it, without publishing
        (the polling task publishes); every failure is returned as an error sample."""
        if self._config_error is not None:
            return GpuSample(self._clock(), (), self._config_error)
        page = await self._page.get(max_age=self._cfg.interval * 0.9)
        if page.text is None:
            return GpuSample(self._clock(), (), page.error or f"Triton metrics {self._url}: no page")
        return self._parse(page.text)

    def _parse(self, text: str) -> GpuSample:
        from prometheus_client.parser import text_string_to_metric_families

        # Triton's metrics page also carries per-model series; only our two metrics need parsing.
        lines = [ln for ln in text.splitlines() if _TOTAL in ln or _USED in ln]
        totals: dict[str, int] = {}
        used: dict[str, int] = {}
        try:
            for family in text_string_to_metric_families("\n".join(lines) + "\n"):
                for s in family.samples:
                    uuid = s.labels.get("gpu_uuid")
                    if uuid is None or math.isnan(s.value):
                        continue
                    if s.name == _TOTAL:
                        totals[uuid] = int(s.value)
                    elif s.name == _USED:
                        used[uuid] = int(s.value)
        except ValueError as e:
            return GpuSample(self._clock(), (), f"Triton metrics {self._url}: unparsable GPU metrics: {e}")
        seen = [u for u in totals if u in used]
        if not seen:
            return GpuSample(self._clock(), (), NO_GPU_METRICS)
        chosen = seen
        if self._wanted is not None:
            missing = [u for u in self._wanted if u not in totals or u not in used]
            if self._strict and missing:
                msg = (
                    f"gpu.devices: {', '.join(missing)} not in Triton's GPU metrics (Triton reports: {', '.join(seen)})"
                )
                return GpuSample(self._clock(), (), msg)
            chosen = [u for u in seen if u in self._wanted]
            if not chosen:
                msg = f"NVIDIA_VISIBLE_DEVICES: none of {', '.join(self._wanted)} in Triton's GPU metrics"
                return GpuSample(self._clock(), (), msg)
        # Triton has no device names in its metrics; the UUID alone names the device.
        devices = tuple(GpuMemory(u, "", totals[u], max(totals[u] - used[u], 0), used[u]) for u in chosen)
        return GpuSample(self._clock(), devices)
