"""Triton's metrics endpoint at an address that cannot be reached at all: a misspelt host in `triton.metrics_url`
or `gpu.metrics_url` (the name does not resolve), or a host on a network with no route.

Every other odd answer of that endpoint (non-200, wrong content, slow, cut short) comes from a real server on a
loopback port in tests/test_gpu.py. These two come from outside the machine, which a test here cannot reach, so
aioresponses raises the error aiohttp would raise for them, in the client session the probe uses.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey
from aioresponses import aioresponses
from prometheus_client import CollectorRegistry

from probe.config import GpuConfig
from probe.metrics import Metrics
from probe.queue import QueueWatcher
from probe.triton import TritonClient, TritonUnreachable
from probe.triton_metrics import MetricsPage, TritonMetricsSampler
from tests.helpers import async_wait_for

MISSPELT = "http://trtion-metrics.inference.svc:8002/metrics"
NO_ROUTE = "http://10.255.0.1:8002/metrics"


def key(url: str) -> ConnectionKey:
    u = aiohttp.client.URL(url)
    return ConnectionKey(u.host or "", u.port, False, True, None, None, None)


def name_does_not_resolve(url: str) -> aiohttp.ClientConnectorDNSError:
    return aiohttp.ClientConnectorDNSError(key(url), socket.gaierror(socket.EAI_NONAME, "Name or service not known"))


def network_unreachable(url: str) -> aiohttp.ClientConnectorError:
    return aiohttp.ClientConnectorError(key(url), OSError(errno.ENETUNREACH, "Network is unreachable"))


@pytest.fixture(autouse=True)
async def nothing_leaves_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The addresses above are never looked up or connected to: aioresponses answers first, and if it ever
    did not, this fails the test instead of sending a packet off the machine."""
    loop = asyncio.get_running_loop()

    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a test tried to reach the network: {args[:2]}")

    monkeypatch.setattr(loop, "getaddrinfo", refuse)
    monkeypatch.setattr(loop, "create_connection", refuse)
    monkeypatch.setattr(loop, "sock_connect", refuse)


CASES = [
    pytest.param(MISSPELT, name_does_not_resolve, "Name or service not known", id="name-does-not-resolve"),
    pytest.param(NO_ROUTE, network_unreachable, "Network is unreachable", id="network-unreachable"),
]


@pytest.mark.parametrize(("url", "error", "cause"), CASES)
async def test_gpu_sample_says_why_triton_metrics_cannot_be_read(url: str, error: Any, cause: str) -> None:
    with aioresponses() as mocked:
        mocked.get(url, exception=error(url), repeat=True)
        async with TritonClient("127.0.0.1:1") as client:
            sampler = TritonMetricsSampler(GpuConfig(interval=0.05), MetricsPage(client, url, timeout=0.05))
            sample = await sampler.fetch_once()
    assert sample.devices == ()
    assert sample.error is not None and "\n" not in sample.error
    assert sample.error.startswith(f"cannot read Triton metrics: cannot connect to {url}: "), sample.error
    assert cause in sample.error, sample.error


@pytest.mark.parametrize(("url", "error", "cause"), CASES)
async def test_gpu_sampler_keeps_polling_an_unreachable_endpoint(url: str, error: Any, cause: str) -> None:
    """Each round publishes the error as a sample (the gpu check fails with it); the task never dies."""
    with aioresponses() as mocked:
        mocked.get(url, exception=error(url), repeat=True)
        async with TritonClient("127.0.0.1:1") as client:
            sampler = TritonMetricsSampler(GpuConfig(interval=0.05), MetricsPage(client, url, timeout=0.05))
            await sampler.start_sampling()
            try:
                first = await async_wait_for(_latest(sampler), 5, "a first sample")
                later = await async_wait_for(_newer_than(sampler, first.taken_at), 5, "a second round")
            finally:
                await sampler.stop_sampling()
    assert cause in (later.error or ""), later


def _latest(sampler: TritonMetricsSampler) -> Any:
    async def latest() -> Any:
        return sampler.latest()

    return latest


def _newer_than(sampler: TritonMetricsSampler, t: float) -> Any:
    async def newer() -> Any:
        s = sampler.latest()
        return s if s is not None and s.taken_at > t else None

    return newer


class TritonWithoutStatistics:
    """Triton's HTTP port gone too: the queue watcher's /stats call fails as the probe's client reports it."""

    async def statistics(self, model: str, version: str = "") -> dict[str, Any]:
        raise TritonUnreachable(f"cannot connect to Triton for {model}")


@pytest.mark.parametrize(("url", "error", "cause"), CASES)
async def test_queue_watcher_leaves_the_gauge_unset_when_the_endpoint_is_unreachable(
    url: str, error: Any, cause: str
) -> None:
    metrics = Metrics(CollectorRegistry())
    with aioresponses() as mocked:
        mocked.get(url, exception=error(url), repeat=True)
        async with TritonClient("127.0.0.1:1") as client:
            page = MetricsPage(client, url, timeout=0.05)
            watcher = QueueWatcher(TritonWithoutStatistics(), [("resnet50", "")], metrics, page, period=0.05)  # type: ignore[arg-type]
            await asyncio.wait_for(watcher.poll_once(), 5)
    pending = metrics.registry.get_sample_value("probe_triton_queue_pending_requests", {"model": "resnet50"})
    assert pending is None, "no value is better than a made-up 0 when the endpoint cannot be read"
