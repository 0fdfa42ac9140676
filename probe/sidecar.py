"""Wiring: build the checks, runner, liveness policy, metrics and GPU sampler from a config.

Nothing starts here; `start()`/`stop()` are called by `serve` (or by the one-shot CLI), so importing or building
never touches the network, NVML or threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from probe.checks.base import Check, InstantCheck
from probe.checks.canary import CanaryCheck
from probe.checks.generate import GenerateCanaryCheck
from probe.checks.lifecycle import Lifecycle, PingCheck, ShutdownCheck
from probe.checks.triton import TritonCheck
from probe.config import Config, derived_metrics_url
from probe.environment import EnvironmentProbe
from probe.golden import GoldenStore
from probe.gpu import GpuSampler
from probe.liveness import Liveness
from probe.logs import StateLogger
from probe.metrics import Metrics
from probe.queue import QueueWatcher
from probe.runner import ANSWER_MARGIN, Run, Runner
from probe.saturation import Saturation
from probe.server import Health
from probe.triton import TritonClient
from probe.triton_metrics import MetricsPage
from probe.verdict import readiness


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
    gpu: GpuSampler | None = None
    queue: QueueWatcher | None = None
    saturation: Saturation | None = None
    _tasks: set[asyncio.Future[Any]] = field(default_factory=set)

    async def start(self, *, background: bool = True) -> None:
        """Open the client and start the GPU sampler; with `background`, also the periodic runs and watchers."""
        await self.client.open()
        if self.gpu is not None:
            await self.gpu.start_sampling()
        if background:
            # The first run should see a GPU sample, or serve's first state line is a spurious "no GPU sample yet".
            await self.wait_first_gpu_sample(min(2.0, self.cfg.gpu.stale_limit))
            self.runner.start()
            if self.queue is not None:
                self.spawn(self.queue.run())
            self.spawn(self.publish_environment())

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.runner.stop()
        await self.environment.close()
        if self.gpu is not None:
            await self.gpu.stop_sampling()
        await self.client.close()

    async def wait_first_gpu_sample(self, limit: float) -> None:
        """Give the sampler a moment (at most `limit` seconds) to take its first sample."""
        if self.gpu is None:
            return
        deadline = time.monotonic() + limit
        while self.gpu.latest() is None and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a thread
            await asyncio.sleep(0.01)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
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
                async with asyncio.timeout(5.0):
                    env = await (
                        self.environment.fingerprint(c.model, c.version) if c else self.environment.server_fingerprint()
                    )
                self.metrics.set_environment(env)
                return
            await asyncio.sleep(10.0)


def gpu_sampler(
    cfg: Config, page: MetricsPage, visible_devices: str | None, nvml_library: str | None
) -> GpuSampler | None:
    """The sampler for `gpu.source`: NVML's (the only importer of pynvml), Triton's metrics page, or none."""
    if cfg.gpu.source == "none":
        return None
    if cfg.gpu.source == "nvml":
        from probe.gpu import NvmlSampler

        return NvmlSampler(cfg.gpu, visible_devices=visible_devices, library_path=nvml_library)
    from probe.triton_metrics import TritonMetricsSampler

    return TritonMetricsSampler(cfg.gpu, page, visible_devices=visible_devices)


def observe_runs(runner: Runner, liveness: Liveness, metrics: Metrics, logger: logging.Logger | None) -> None:
    """After every run: liveness takes it in at once; then, once the waiting probes are answered, both verdicts are
    judged once for the metrics and the logs."""
    ready_log = StateLogger(logger, "ready") if logger is not None else None
    live_log = StateLogger(logger, "live") if logger is not None else None

    def observe(run: Run) -> None:
        liveness.observe(run.results, run.started)

    def after_run(run: Run) -> None:
        current = runner.current(run)
        ready, live = readiness(current), liveness.verdict(current)
        metrics.observe_run(run, ready=ready.ok, live=live.ok)
        if ready_log is not None and live_log is not None:
            ready_log.observe(ready)
            live_log.observe(live)

    runner.add_listener(observe)
    runner.add_listener(after_run, after_answer=True)


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
    client = TritonClient(cfg.triton.url, ssl=cfg.triton.ssl, tls=cfg.triton.tls)
    lifecycle = Lifecycle()
    if visible_devices is None:
        visible_devices = os.environ.get("NVIDIA_VISIBLE_DEVICES")
    page = MetricsPage(client, derived_metrics_url(cfg), timeout=min(cfg.gpu.interval, 2.0))
    gpu = gpu_sampler(cfg, page, visible_devices, nvml_library)
    nvml_reader = None
    if gpu is not None:

        def nvml_reader() -> dict[str, Any]:
            from probe.gpu import nvml_environment

            return nvml_environment(cfg.gpu.devices, visible_devices, library_path=nvml_library)

    environment = EnvironmentProbe(client, nvml_reader)
    saturation = Saturation(client, page, drain_limit=cfg.liveness.after, setting=cfg.probe.saturated, logger=logger)
    checks: list[Check] = [TritonCheck(client, vouch=bool(cfg.canaries))]
    for c in cfg.canaries:
        golden = GoldenStore(cfg.golden_path(c.name))
        kind = CanaryCheck if c.protocol == "infer" else GenerateCanaryCheck
        canary = kind(
            client,
            c,
            golden,
            environment,
            probe_timeout=cfg.probe.timeout,
            max_reply=cfg.triton.max_reply,
            saturation=saturation.canary(c.name, c.model, c.version),
        )
        saturation.check_room(c.name, cfg.probe.timeout - ANSWER_MARGIN - canary.timeout)
        checks.append(canary)
    if gpu is not None:
        from probe.checks.gpu import GpuCheck

        checks.append(GpuCheck(gpu, cfg.gpu))
    instant: list[InstantCheck] = [ShutdownCheck(lifecycle), PingCheck()] if with_lifecycle_checks else []
    metrics = Metrics(registry or CollectorRegistry(), canaries=[c.name for c in cfg.canaries])
    runner = Runner(
        checks,
        instant,
        timeout=cfg.probe.timeout,
        min_interval=cfg.probe.min_interval,
        interval=cfg.probe.interval,
        hang_backoff=cfg.probe.hang_backoff,
    )
    liveness = Liveness(after=cfg.liveness.after, startup=cfg.liveness.startup, has_canaries=bool(cfg.canaries))
    health = Health(runner, liveness, timeout=cfg.probe.timeout)
    observe_runs(runner, liveness, metrics, logger)
    models = sorted({(c.model, c.version) for c in cfg.canaries})
    queue = (
        QueueWatcher(client, models, metrics, page, period=cfg.probe.interval or 10.0, saturation=saturation)
        if models
        else None
    )
    return Sidecar(
        cfg=cfg,
        client=client,
        runner=runner,
        liveness=liveness,
        lifecycle=lifecycle,
        metrics=metrics,
        health=health,
        environment=environment,
        gpu=gpu,
        queue=queue,
        saturation=saturation,
    )
