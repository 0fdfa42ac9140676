"""The HTTP app with pytest-aiohttp: verbose, exclude, JSON, per-check paths, methods, HEAD, metrics."""

from __future__ import annotations

import json
from typing import Any

import pytest

from probe.checks.base import CheckResult, failed, passed
from probe.server import Health, make_app
from tests.helpers import wired


class FixedCheck:
    """A check that returns whatever the test put in `result`."""

    timeout: float | None = None
    derived = False

    def __init__(self, name: str, result: CheckResult | None = None) -> None:
        self.name = name
        self.result = result or passed(name)

    async def run(self) -> CheckResult:
        return self.result


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


@pytest.fixture
async def client(aiohttp_client: Any, parts: dict[str, Any]) -> Any:
    health = Health(parts["runner"], parts["liveness"], timeout=0.5)
    return await aiohttp_client(make_app(health, metrics=parts["metrics"].expose))


async def test_ready_ok(client: Any) -> None:
    resp = await client.get("/ready")
    assert resp.status == 200 and await resp.text() == "ok"


async def test_verbose_withholds_reasons(client: Any, parts: dict[str, Any]) -> None:
    parts["checks"]["gpu"].result = failed("gpu", "GPU-1 free 1.0GiB < min_free 2.0GiB")
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
    parts["checks"]["gpu"].result = failed("gpu", "low")
    parts["checks"]["canary/resnet"].result = failed("canary/resnet", "mismatch")
    assert (await client.get("/ready?exclude=gpu")).status == 503
    resp = await client.get("/ready?exclude=gpu&exclude=canary/resnet&verbose")
    assert resp.status == 200
    text = await resp.text()
    assert "gpu" not in text and text.endswith("ready check passed\n")
    resp = await client.get("/ready?exclude=nope&verbose")
    assert "warn: some health checks cannot be excluded: no matches for 'nope'" in await resp.text()


async def test_per_check_path_gives_full_reason(client: Any, parts: dict[str, Any]) -> None:
    parts["checks"]["canary/resnet"].result = failed("canary/resnet", "output y digest a != golden b")
    resp = await client.get("/ready/canary/resnet")
    assert resp.status == 503
    assert await resp.text() == "canary/resnet failed: output y digest a != golden b\n"
    resp = await client.get("/ready/triton")
    assert resp.status == 200 and await resp.text() == "ok\n"
    assert (await client.get("/ready/nope")).status == 404


async def test_json_is_health_json(client: Any, parts: dict[str, Any]) -> None:
    parts["checks"]["gpu"].result = failed("gpu", "low", observed_value=1.5e9, observed_unit="bytes")
    resp = await client.get("/ready", headers={"Accept": "application/json"})
    assert resp.status == 503
    assert resp.headers["Content-Type"].startswith("application/health+json")
    body = json.loads(await resp.text())
    assert body["status"] == "fail"
    gpu = body["checks"]["gpu"][0]
    assert (gpu["status"], gpu["output"], gpu["observedValue"], gpu["observedUnit"]) == ("fail", "low", 1.5e9, "bytes")
    assert gpu["time"].endswith("Z")


async def test_live_ignores_mismatch_and_ping_needs_no_run(client: Any, parts: dict[str, Any]) -> None:
    parts["checks"]["canary/resnet"].result = failed("canary/resnet", "mismatch")
    resp = await client.get("/live?verbose")
    assert resp.status == 200 and (await resp.text()).endswith("live check passed\n")
    runs = parts["runner"].runs_total
    resp = await client.get("/live/ping")
    assert resp.status == 200 and await resp.text() == "ok\n"
    assert parts["runner"].runs_total == runs


async def test_live_fails_on_sustained_restart_worthy_failure(client: Any, parts: dict[str, Any]) -> None:
    await client.get("/ready")  # a first good canary arms liveness
    parts["checks"]["triton"].result = failed("triton", "cannot connect", restart_worthy=True)
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
