"""The HTTP app with pytest-aiohttp: verbose, exclude, JSON, per-check paths, methods, HEAD, metrics."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import pytest

from probe.checks.base import CheckResult, Kind, failed, passed
from probe.server import Health, serve
from tests.helpers import wired

KINDS = {"triton": Kind.SERVER, "canary/resnet": Kind.CANARY, "gpu": Kind.GPU}


class FixedCheck:
    """A check that returns whatever the test put in `result`, and counts its runs."""

    timeout: float | None = None

    def __init__(self, name: str, result: CheckResult | None = None) -> None:
        self.name = name
        self.names = (name,)
        self.result = result or passed(name, KINDS[name])
        self.calls = 0

    async def run(self) -> Sequence[CheckResult]:
        self.calls += 1
        return [self.result]

    def timed_out(self, after: float) -> Sequence[CheckResult]:
        return [failed(self.name, KINDS[self.name], "timed out", restart_worthy=True)]

    async def explain_timeout(self, after: float) -> Sequence[CheckResult]:
        return self.timed_out(after)


@pytest.fixture
def parts() -> dict[str, Any]:
    checks = {
        "triton": FixedCheck("triton"),
        "canary/resnet": FixedCheck("canary/resnet"),
        "gpu": FixedCheck("gpu"),
    }
    w = wired(list(checks.values()))
    return {
        "checks": checks,
        "runner": w.runner,
        "lifecycle": w.lifecycle,
        "liveness": w.liveness,
        "metrics": w.metrics,
    }


class Client:
    """An aiohttp client session bound to a real listening sidecar on 127.0.0.1."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    def get(self, path: str, **kw: Any) -> Any:
        return self.session.get(self.base + path, **kw)

    def head(self, path: str, **kw: Any) -> Any:
        return self.session.head(self.base + path, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.session.post(self.base + path, **kw)

    def put(self, path: str, **kw: Any) -> Any:
        return self.session.put(self.base + path, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.session.delete(self.base + path, **kw)


@pytest.fixture
async def client(parts: dict[str, Any]) -> AsyncIterator[Client]:
    health = Health(parts["runner"], parts["liveness"], timeout=0.5)
    serving = await serve(health, "127.0.0.1", 0, metrics=parts["metrics"].expose, max_connections=64)
    async with aiohttp.ClientSession() as session:
        yield Client(session, f"http://127.0.0.1:{serving.port}")
    await serving.close()


async def test_ready_ok(client: Any) -> None:
    resp = await client.get("/ready")
    assert resp.status == 200 and await resp.text() == "ok"


async def test_verbose_withholds_reasons(client: Any, parts: dict[str, Any]) -> None:
    parts["checks"]["gpu"].result = failed("gpu", Kind.GPU, "GPU-1 free 1.0GiB < min_free 2.0GiB")
    resp = await client.get("/ready?verbose")
    assert resp.status == 503
    assert (await resp.text()).splitlines() == [
        "[+]triton ok",
        "[+]canary/resnet ok",
        "[-]gpu failed: reason withheld",
        "[+]shutdown ok",
        "[+]ping ok",
        "ready check failed",
    ]


async def test_exclude_is_repeatable(client: Any, parts: dict[str, Any]) -> None:
    parts["checks"]["gpu"].result = failed("gpu", Kind.GPU, "low")
    parts["checks"]["canary/resnet"].result = failed("canary/resnet", Kind.CANARY, "mismatch")
    assert (await client.get("/ready?exclude=gpu")).status == 503
    resp = await client.get("/ready?exclude=gpu&exclude=canary/resnet&verbose")
    assert resp.status == 200
    text = await resp.text()
    assert "gpu" not in text and text.endswith("ready check passed\n")
    resp = await client.get("/ready?exclude=nope&verbose")
    assert "warn: some health checks cannot be excluded: no matches for 'nope'" in await resp.text()


async def test_per_check_path_gives_full_reason(client: Any, parts: dict[str, Any]) -> None:
    parts["checks"]["canary/resnet"].result = failed("canary/resnet", Kind.CANARY, "output y digest a != golden b")
    resp = await client.get("/ready/canary/resnet")
    assert resp.status == 503
    assert await resp.text() == "canary/resnet failed: output y digest a != golden b\n"
    resp = await client.get("/ready/triton")
    assert resp.status == 200 and await resp.text() == "ok\n"
    assert (await client.get("/ready/nope")).status == 404


async def test_json_is_health_json(client: Any, parts: dict[str, Any]) -> None:
    parts["checks"]["gpu"].result = failed("gpu", Kind.GPU, "low", observed_value=1.5e9, observed_unit="bytes")
    resp = await client.get("/ready", headers={"Accept": "application/json"})
    assert resp.status == 503
    assert resp.headers["Content-Type"].startswith("application/health+json")
    body = json.loads(await resp.text())
    assert body["status"] == "fail"
    gpu = body["checks"]["gpu"][0]
    assert (gpu["status"], gpu["output"], gpu["observedValue"], gpu["observedUnit"]) == ("fail", "low", 1.5e9, "bytes")
    assert gpu["time"].endswith("Z")


async def test_live_ignores_mismatch_and_ping_needs_no_run(client: Any, parts: dict[str, Any]) -> None:
    parts["checks"]["canary/resnet"].result = failed("canary/resnet", Kind.CANARY, "mismatch")
    resp = await client.get("/live?verbose")
    assert resp.status == 200 and (await resp.text()).endswith("live check passed\n")
    runs = parts["checks"]["triton"].calls
    resp = await client.get("/live/ping")
    assert resp.status == 200 and await resp.text() == "ok\n"
    assert parts["checks"]["triton"].calls == runs


async def test_live_fails_on_sustained_restart_worthy_failure(client: Any, parts: dict[str, Any]) -> None:
    await client.get("/ready")  # a first good canary arms liveness
    parts["checks"]["triton"].result = failed("triton", Kind.SERVER, "cannot connect", restart_worthy=True)
    resp = await client.get("/live")
    assert resp.status == 503 and await resp.text() == "live check failed"
    resp = await client.get("/live/triton")
    assert resp.status == 503 and "cannot connect" in await resp.text()


async def test_shutdown_fails_ready_at_once(client: Any, parts: dict[str, Any]) -> None:
    assert (await client.get("/ready")).status == 200
    parts["lifecycle"].begin_shutdown("SIGTERM")
    resp = await client.get("/ready/shutdown")
    assert resp.status == 503 and "SIGTERM" in await resp.text()
    assert (await client.get("/live")).status == 200


async def test_methods_head_and_unknown_paths(client: Any) -> None:
    assert (await client.post("/ready", data=b"x" * 100)).status == 405
    assert (await client.put("/live")).status == 405
    assert (await client.delete("/ready/triton")).status == 405
    head = await client.head("/ready")
    assert head.status == 200 and await head.read() == b""
    assert (await client.get("/")).status == 404
    assert (await client.get("/healthz")).status == 404


async def test_metrics_exposes_probe_metrics(client: Any) -> None:
    await client.get("/ready")
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    assert 'probe_check_success{check="triton"} 1.0' in text
    assert "probe_runs_total 1.0" in text


async def test_verbose_false_is_the_plain_answer(client: Any) -> None:
    resp = await client.get("/ready?verbose=false")
    assert resp.status == 200 and await resp.text() == "ok"
    resp = await client.get("/ready?verbose")
    assert (await resp.text()).endswith("ready check passed\n")


async def test_every_answer_names_the_probe_and_sniffs_nothing(client: Any) -> None:
    for path in ("/ready", "/live/ping", "/nope", "/metrics"):
        resp = await client.get(path)
        assert resp.headers["Server"].startswith("probe/"), path
    resp = await client.post("/ready")
    assert resp.status == 405 and resp.headers["Server"].startswith("probe/")
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


def _request_from(peer: str, path: str, accept: str = "") -> Any:
    from unittest import mock

    from aiohttp.test_utils import make_mocked_request

    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda key, default=None: (peer, 40000) if key == "peername" else default
    headers = {"Accept": accept} if accept else {}
    return make_mocked_request("GET", path, headers=headers, transport=transport)


@pytest.mark.parametrize(("peer", "shown"), [("10.1.2.3", False), ("127.0.0.1", True), ("::1", True)])
async def test_reasons_go_to_loopback_peers_only_when_configured(parts: dict[str, Any], peer: str, shown: bool) -> None:
    from probe.server import make_handler

    parts["checks"]["gpu"].result = failed("gpu", Kind.GPU, "GPU-1234 (NVIDIA H100) free 1.0GiB < min_free 2.0GiB")
    parts["metrics"].set_environment({"gpus": ["NVIDIA H100"], "driver": "580.1", "cuda_driver": "13.0"})
    handle = make_handler(
        Health(parts["runner"], parts["liveness"], timeout=0.5), metrics=parts["metrics"].expose, reasons="loopback"
    )
    one = await handle(_request_from(peer, "/ready/gpu"))
    assert one.status == 503
    assert ("H100" in one.text) is shown and ("reason withheld" in one.text) is not shown
    as_json = await handle(_request_from(peer, "/ready", accept="application/json"))
    assert ("H100" in as_json.text) is shown
    scraped = await handle(_request_from(peer, "/metrics"))
    assert (b"probe_environment_info" in scraped.body) is shown
    assert b"probe_check_success" in scraped.body
    everyone = make_handler(Health(parts["runner"], parts["liveness"], timeout=0.5))
    assert "H100" in (await everyone(_request_from(peer, "/ready/gpu"))).text
