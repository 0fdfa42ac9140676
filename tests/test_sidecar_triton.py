"""`probe serve` against the real Triton: deadlines, single-flight, liveness, drain and recovery."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import TritonServer
from tests.helpers import DEMO_CANARY, ServeProcess, free_port, run_cli, wait_for, write_config

pytestmark = pytest.mark.triton


@pytest.fixture
def sidecar(tmp_path: Path, healthy_triton: TritonServer, serve_process: Callable[..., ServeProcess]) -> Iterator[Any]:
    """Factory: record goldens, then start `probe serve` with config overrides; stopped after the test."""

    def start(**overrides: Any) -> ServeProcess:
        port = free_port()
        canary = {**DEMO_CANARY, **overrides.pop("canary", {})}
        cfg = write_config(tmp_path, healthy_triton.url, [canary], listen={"port": port}, **overrides)
        if not (tmp_path / "golden" / "demo.json").exists():
            rec = run_cli("record", "-c", str(cfg))
            assert rec.returncode == 0, rec.stderr
        return serve_process(cfg, port)

    yield start


async def get(session: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, str, float]:
    start = time.monotonic()
    async with session.get(url, **kw) as resp:
        return resp.status, await resp.text(), time.monotonic() - start


def status_of(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


async def test_hang_gives_503_within_the_timeout(sidecar: Any, healthy_triton: TritonServer) -> None:
    srv = sidecar(probe={"timeout": 0.5, "min_interval": 0.0, "interval": 0})
    async with aiohttp.ClientSession() as s:
        status, _, _ = await get(s, srv.base + "/ready")
        assert status == 200
        healthy_triton.fault("demo_classifier", "hang")
        status, body, elapsed = await get(s, srv.base + "/ready/canary/demo")
        assert status == 503 and "timed out after" in body
        assert elapsed < 0.5 + 0.1, elapsed
        # while the backoff holds the canary back, answers are immediate and still failing
        status, _, elapsed = await get(s, srv.base + "/ready")
        assert status == 503 and elapsed < 0.5 + 0.1
        healthy_triton.fault("demo_classifier", "ok")

        async def recovered() -> bool:
            return (await get(s, srv.base + "/ready"))[0] == 200

        deadline = time.monotonic() + 30
        while not await recovered():
            assert time.monotonic() < deadline, "did not recover after the hang cleared"


async def test_200_concurrent_probes_reach_triton_as_a_few_canaries(sidecar: Any, healthy_triton: TritonServer) -> None:
    srv = sidecar(probe={"min_interval": 1.0, "interval": 0})
    before = healthy_triton.inference_count("demo_classifier")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        answers = await asyncio.gather(*(get(s, srv.base + "/ready") for _ in range(200)))
    assert all(a[0] == 200 for a in answers)
    canaries = healthy_triton.inference_count("demo_classifier") - before
    assert 1 <= canaries <= 3, canaries


async def test_wrong_output_fails_ready_not_live(sidecar: Any, healthy_triton: TritonServer) -> None:
    srv = sidecar(probe={"min_interval": 0.0, "interval": 0}, liveness={"after": 0})
    async with aiohttp.ClientSession() as s:
        assert (await get(s, srv.base + "/ready"))[0] == 200
        healthy_triton.fault("demo_classifier", "wrong_value")
        status, body, _ = await get(s, srv.base + "/ready/canary/demo")
        assert status == 503 and "output PROBS digest" in body
        status, body, _ = await get(s, srv.base + "/live?verbose")
        assert status == 200, body
        healthy_triton.fault("demo_classifier", "ok")
        assert (await get(s, srv.base + "/ready"))[0] == 200
    # state-change lines are written just after the answer that saw the change
    wait_for(lambda: srv.logs().count('"msg": "ready: passing"') == 2, 5, "the recovery log line")
    logs = srv.logs()
    assert '"msg": "ready: failing"' in logs and "output PROBS digest" in logs
    assert logs.count('"msg": "ready: failing"') == 1


async def test_liveness_escalates_after_sustained_hang(sidecar: Any, healthy_triton: TritonServer) -> None:
    srv = sidecar(
        probe={"timeout": 0.4, "min_interval": 0.0, "interval": 0.1, "hang_backoff": 0.2}, liveness={"after": 1.0}
    )
    async with aiohttp.ClientSession() as s:
        assert (await get(s, srv.base + "/live"))[0] == 200
        healthy_triton.fault("demo_classifier", "hang")
        status, _, _ = await get(s, srv.base + "/live")
        assert status == 200, "a fresh failure must not fail liveness yet"

    wait_for(lambda: status_of(srv.base + "/live") == 503, 15, "/live to fail after liveness.after")
    assert status_of(srv.base + "/live/ping") == 200
    healthy_triton.fault("demo_classifier", "ok")
    wait_for(lambda: status_of(srv.base + "/live") == 200, 30, "/live to recover")


async def test_sigterm_drains_then_exits_0(sidecar: Any) -> None:
    srv = sidecar(probe={"drain": 1.0, "interval": 0})
    assert status_of(srv.base + "/ready") == 200
    srv.process.send_signal(signal.SIGTERM)
    wait_for(lambda: status_of(srv.base + "/ready") == 503, 2, "/ready to fail after SIGTERM")
    assert status_of(srv.base + "/live/ping") == 200, "keeps answering while draining"
    assert srv.process.wait(timeout=10) == 0
    lines = [json.loads(ln) for ln in srv.logs().splitlines() if ln.startswith("{")]
    msgs = [ln["msg"] for ln in lines]
    assert "probe serving" in msgs and "probe stopped" in msgs
    assert any(m.startswith("shutdown:") for m in msgs)


@pytest.mark.parametrize("fault", ["fail", "missing_output", "slow:0.9"])
async def test_recovery_after_each_fault_clears(sidecar: Any, healthy_triton: TritonServer, fault: str) -> None:
    srv = sidecar(probe={"timeout": 0.8, "min_interval": 0.0, "interval": 0, "hang_backoff": 0.2})
    async with aiohttp.ClientSession() as s:
        assert (await get(s, srv.base + "/ready"))[0] == 200
        healthy_triton.fault("demo_classifier", fault)
        status, body, elapsed = await get(s, srv.base + "/ready?verbose")
        assert status == 503 and "[-]canary/demo failed" in body
        assert elapsed < 0.8 + 0.1
        healthy_triton.fault("demo_classifier", "ok")
    wait_for(lambda: status_of(srv.base + "/ready") == 200, 30, f"recovery after {fault}")
