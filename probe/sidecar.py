"""Wiring: build the checks, runner, liveness policy, metrics and GPU source from a config.

Nothing starts here; `start()`/`stop()` are called by the app's startup and cleanup hooks (or by the one-shot
CLI), so importing or building never touches the network, NVML or threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from probe.checks.base import Check
from probe.checks.canary import CanaryCheck, GoldenStore, LatencyTracker
from probe.checks.latency import LatencyCheck
from probe.checks.lifecycle import Lifecycle, PingCheck, ShutdownCheck
from probe.checks.model import ModelCheck
from probe.checks.triton import TritonCheck
from probe.config import Config, derived_metrics_url
from probe.environment import EnvironmentProbe
from probe.logs import StateLogger
from probe.metrics import Metrics
from probe.queue import QueueWatcher
from probe.runner import Liveness, Run, Runner
from probe.server import Health
from probe.triton import TritonClient


@dataclass
class Sidecar:
    cfg: Config
    client: TritonClient
    runner: Runner
    liveness: Liveness
    lifecycle: Lifecycle
    metrics: Metrics
    health: Health
    environment: EnvironmentProbe
    gpu_source: Any = None
    queue: QueueWatcher | None = None
    _session: aiohttp.ClientSession | None = None
    _tasks: set[asyncio.Future[Any]] = field(default_factory=set)

    async def start(self, *, background: bool = True) -> None:
        """Open clients and start the GPU sampler; with `background`, also the periodic runs and watchers."""
        await self.client.open()
        self._session = aiohttp.ClientSession()
        if self.gpu_source is not None:
            if self.cfg.gpu.source == "triton-metrics":
                await self.gpu_source.start(self._session)
            else:
                self.gpu_source.start()
        if background:
            # The first run should see a GPU sample, or serve's first state line is a spurious "no GPU sample yet".
            await self.wait_first_gpu_sample(min(2.0, self.cfg.gpu.stale_limit))
            self.runner.start()
            if self.queue is not None:
                self.spawn(self.queue.run(self._session))
            self.spawn(self.publish_environment())

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.runner.stop()
        if self.gpu_source is not None:
            if self.cfg.gpu.source == "triton-metrics":
                await self.gpu_source.stop()
            else:
                self.gpu_source.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.client.close()

    async def wait_first_gpu_sample(self, limit: float) -> None:
        """For one-shot checks: give the sampler a moment (at most `limit` seconds) to take its first sample."""
        if self.gpu_source is None:
            return
        deadline = time.monotonic() + limit
        while self.gpu_source.latest() is None and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a thread
            await asyncio.sleep(0.01)

    def spawn(self, coro: Any) -> None:
        """Run a background coroutine owned by the sidecar (cancelled by stop())."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def publish_environment(self) -> None:
        """Export probe_environment_info once Triton answers (retried until it does).

        With canaries, the first canary's fingerprint; without (a GPU-only probe), the GPUs, driver and Triton."""
        c = self.cfg.canaries[0] if self.cfg.canaries else None
        while True:
            with contextlib.suppress(Exception):
                fingerprint = (
                    self.environment.fingerprint(c.model, c.version) if c else self.environment.server_fingerprint()
                )
                env = await asyncio.wait_for(fingerprint, 5.0)
                self.metrics.set_environment(env)
                return
            await asyncio.sleep(10.0)


def build_sidecar(
    cfg: Config,
    *,
    registry: CollectorRegistry | None = None,
    logger: logging.Logger | None = None,
    visible_devices: str | None = None,
    nvml_library: str | None = None,
    with_lifecycle_checks: bool = True,
) -> Sidecar:
    """Everything `serve` and `check` need, wired but not started."""
    client = TritonClient(cfg.triton.url, ssl=cfg.triton.ssl)
    lifecycle = Lifecycle()
    gpu_source: Any = None
    queue: QueueWatcher | None = None
    nvml_reader = None
    if visible_devices is None:
        visible_devices = os.environ.get("NVIDIA_VISIBLE_DEVICES")
    if cfg.gpu.source != "none":
        from probe import gpu as gpu_mod

        def nvml_reader() -> dict[str, Any]:
            return gpu_mod.nvml_environment(cfg.gpu.devices, visible_devices, library_path=nvml_library)

        if cfg.gpu.source == "nvml":
            gpu_source = gpu_mod.NvmlSampler(cfg.gpu, visible_devices=visible_devices, library_path=nvml_library)
        else:
            gpu_source = gpu_mod.TritonMetricsSampler(
                cfg.gpu, derived_metrics_url(cfg), visible_devices=visible_devices
            )
    environment = EnvironmentProbe(client, nvml_reader)
    checks: list[Check] = []
    canary_checks = []
    for c in cfg.canaries:
        golden = GoldenStore(cfg.golden_path(c.name))
        tracker = LatencyTracker.create(c.latency.window)
        canary = CanaryCheck(client, c, golden, tracker, environment, probe_timeout=cfg.probe.timeout)
        canary_checks.append(canary)
        checks += [ModelCheck(client, c, canary), canary, LatencyCheck(c, tracker, golden)]
    checks.insert(0, TritonCheck(client, canary_checks))
    if gpu_source is not None:
        from probe.checks.gpu import GpuCheck

        checks.append(GpuCheck(gpu_source, cfg.gpu))
    if with_lifecycle_checks:
        checks += [ShutdownCheck(lifecycle), PingCheck()]
    metrics = Metrics(registry or CollectorRegistry(), canaries=[c.name for c in cfg.canaries])
    runner = Runner(
        checks,
        timeout=cfg.probe.timeout,
        min_interval=cfg.probe.min_interval,
        interval=cfg.probe.interval,
        hang_backoff=cfg.probe.hang_backoff,
    )
    liveness = Liveness(after=cfg.liveness.after, startup=cfg.liveness.startup, has_canaries=bool(cfg.canaries))
    health = Health(runner, liveness, timeout=cfg.probe.timeout)
    runner.add_listener(liveness.observe)
    runner.add_listener(metrics.observe_run, deferred=True)
    if logger is not None:
        ready_log = StateLogger(logger, "ready")
        live_log = StateLogger(logger, "live")

        def log_states(run: Run) -> None:
            ready_log.observe(run.results)
            if live_log.passing and liveness.is_live(run.results):
                return  # still live: skip building the per-check verdict on every run
            live_log.observe(liveness.verdict(run.results))

        runner.add_listener(log_states, deferred=True)

    def gauges(run: Run) -> None:
        metrics.ready.set(1.0 if run.ok and not lifecycle.shutting_down else 0.0)
        metrics.live.set(1.0 if liveness.is_live(run.results) else 0.0)

    runner.add_listener(gauges, deferred=True)
    models = sorted({(c.model, c.version) for c in cfg.canaries})
    queue = QueueWatcher(client, models, metrics, derived_metrics_url(cfg), period=cfg.probe.interval or 10.0)
    return Sidecar(
        queue=queue if models else None,
        cfg=cfg,
        client=client,
        runner=runner,
        liveness=liveness,
        lifecycle=lifecycle,
        metrics=metrics,
        health=health,
        environment=environment,
        gpu_source=gpu_source,
    )
