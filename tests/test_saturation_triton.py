"""Saturated is not hung, against the real Triton: a slow model behind a queue of real clients, a true hang without
traffic, a hang with requests pending and none completing, and statistics refused with 403.

The model: demo_classifier with the fault `slow:0.1` (0.1 s per request, one instance, so 16 closed-loop clients
keep about 15 requests queued and the canary waits ~1.7 s, past its 0.68 s deadline), on a Triton of this module's
own. Every figure the assertions use is printed (run with -s): false restarts, /ready availability while
saturated, canaries that reached Triton, and the time to detect each hang.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import TritonServer, start_triton, stop_triton
from tests.helpers import DEMO_CANARY, ServeProcess, free_port, run_cli, write_config
from tests.helpers import async_wait_for as wait_until

pytestmark = pytest.mark.triton

MODEL = "demo_classifier"
SERVICE = "slow:0.1"
CLIENTS = 16
AFTER = 4.0
TIMEOUT = 0.8
MIN_INTERVAL = 0.5
# Background runs (and the queue watcher's polls) every 0.5 s; a cut-off canary is re-sent after 0.5, 1, 2, 2... s.
PROBE: dict[str, Any] = {"timeout": TIMEOUT, "min_interval": MIN_INTERVAL, "interval": 0.5, "hang_backoff": 2.0}
SATURATE_S = 3 * AFTER
# Over probe.timeout: the contract's "a few ms", plus an allowance for two cores shared by Triton, 16 clients, the
# sidecar and other test sessions.
SLACK = 0.25
BODY = json.dumps(
    {"inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0.5] * 192}]}
).encode()
NOT_TOLD = "saturation cannot be told from a hang"


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def slow_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    server = start_triton(tmp_path_factory.mktemp("saturation-triton"), (MODEL,))
    try:
        yield server
    finally:
        stop_triton(server)


@pytest.fixture(scope="module")
def golden_dir(slow_triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("saturation-golden")
    rec = run_cli("record", "-c", str(write_config(directory, slow_triton.url, [DEMO_CANARY])))
    assert rec.returncode == 0, rec.stderr
    return directory / "golden"


@pytest.fixture
def triton(slow_triton: TritonServer) -> Iterator[TritonServer]:
    """The module's Triton, healthy and idle before and after each test."""
    slow_triton.fault(MODEL, "ok")
    slow_triton.wait_idle(MODEL)
    yield slow_triton
    slow_triton.fault(MODEL, "ok")
    slow_triton.wait_idle(MODEL)


StartServe = Callable[..., ServeProcess]


@pytest.fixture
def serve(tmp_path: Path, golden_dir: Path, serve_process: Callable[..., ServeProcess]) -> StartServe:
    """Factory: `probe serve` for the demo canary on `server`, probe.saturated as given; killed after the test."""

    def start(server: TritonServer, saturated: str = "ready") -> ServeProcess:
        port = free_port()
        cfg = write_config(
            tmp_path,
            server.url,
            [DEMO_CANARY],
            triton={"url": server.url, "metrics_url": f"http://127.0.0.1:{server.metrics_port}/metrics"},
            listen={"port": port},
            probe={**PROBE, "saturated": saturated},
            liveness={"after": AFTER},
            golden_dir=str(golden_dir),
        )
        return serve_process(cfg, port)

    return start


# ---------------------------------------------------------------------------------------------- traffic and probes


@dataclass
class Traffic:
    """`CLIENTS` closed-loop clients of the model: each sends the next request when its answer came."""

    url: str
    completed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    _stop: float = 0.0
    _task: asyncio.Future[Any] | None = None

    def start(self, session: aiohttp.ClientSession, seconds: float) -> None:
        self._stop = time.monotonic() + seconds
        self._task = asyncio.gather(*(self._client(session) for _ in range(CLIENTS)))

    def stop_now(self) -> None:
        self._stop = 0.0

    async def wait(self) -> None:
        assert self._task is not None
        await asyncio.wait_for(self._task, 60)

    async def _client(self, session: aiohttp.ClientSession) -> None:
        url = f"http://{self.url}/v2/models/{MODEL}/infer"
        for _ in range(100_000):  # bounded in count as in time
            if time.monotonic() >= self._stop:
                return
            try:
                async with session.post(url, data=BODY, timeout=aiohttp.ClientTimeout(total=150)) as r:
                    await r.read()
                    if r.status == 200:
                        self.completed += 1
                    else:
                        self.errors[f"HTTP {r.status}"] += 1
            except (aiohttp.ClientError, TimeoutError) as e:
                self.errors[type(e).__name__] += 1


@dataclass
class Samples:
    """What the kubelet would have seen: /ready and /live statuses, every answer's latency, canary reasons."""

    ready: Counter[int] = field(default_factory=Counter)
    live: Counter[int] = field(default_factory=Counter)
    reasons: list[str] = field(default_factory=list)
    slowest: float = 0.0
    first_live_failure: float | None = None

    def availability(self) -> float:
        return self.ready[200] / max(sum(self.ready.values()), 1)


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, float]:
    t0 = time.monotonic()
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
        body = await r.text()
    return r.status, body, time.monotonic() - t0


async def sample(
    session: aiohttp.ClientSession, base: str, seconds: float, *, until_live_fails: bool = False
) -> Samples:
    """Probe /ready, /live and /ready/canary/demo every 0.1 s for `seconds` (or until /live fails)."""
    s = Samples()
    start = time.monotonic()
    for _ in range(int(seconds / 0.1) + 1):
        if time.monotonic() - start >= seconds:
            break
        for path, counter in (("/ready", s.ready), ("/live", s.live)):
            status, _, took = await get(session, base + path)
            counter[status] += 1
            s.slowest = max(s.slowest, took)
            if path == "/live" and status != 200 and s.first_live_failure is None:
                s.first_live_failure = time.monotonic() - start
        _, body, took = await get(session, base + "/ready/canary/demo")
        s.slowest = max(s.slowest, took)
        s.reasons.append(body.strip())
        if until_live_fails and s.first_live_failure is not None:
            break
        await asyncio.sleep(0.1)
    return s


async def canary_passes(session: aiohttp.ClientSession, base: str) -> bool:
    status, body, _ = await get(session, base + "/ready/canary/demo")
    return status == 200 and body.strip() == "ok"


async def metric(session: aiohttp.ClientSession, base: str, name: str) -> float | None:
    _, text, _ = await get(session, base + "/metrics")
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def success(server: TritonServer) -> int:
    return int(server.stats(MODEL)["inference_stats"]["success"]["count"])


async def drained(server: TritonServer) -> None:
    """Wait until the model's queue is empty and its success count stands still."""
    last = [-1]

    async def still() -> bool:
        now = success(server)
        idle = now == last[0]
        last[0] = now
        return idle and server.model_ready(MODEL)

    await wait_until(still, 60, "the model's queue to drain")


# ---------------------------------------------------------------------------------------------- saturated


@pytest.mark.parametrize("setting", ["ready", "not-ready"])
async def test_saturated_model_is_never_restarted_and_ready_follows_the_setting(
    triton: TritonServer, serve: StartServe, setting: str
) -> None:
    car = serve(triton, setting)
    async with aiohttp.ClientSession() as session:
        await wait_until(lambda: canary_passes(session, car.base), 30, "a verified canary")
        assert await metric(session, car.base, 'probe_saturated{canary="demo"}') == 0.0
        triton.fault(MODEL, SERVICE)
        before = success(triton)
        traffic = Traffic(triton.url)
        traffic.start(session, SATURATE_S + 2.0)

        async def saturated() -> bool:
            _, body, _ = await get(session, car.base + "/ready/canary/demo")
            return "saturated: " in body

        t0 = time.monotonic()
        await wait_until(saturated, 10, "the canary to be judged saturated")
        judged_after = time.monotonic() - t0
        gauge = await metric(session, car.base, 'probe_saturated{canary="demo"}')
        s = await sample(session, car.base, SATURATE_S)
        traffic.stop_now()
        await traffic.wait()
        triton.fault(MODEL, "ok")
        await drained(triton)
        canaries = success(triton) - before - traffic.completed
        await wait_until(lambda: canary_passes(session, car.base), 30, "the canary to pass again after the load")
        gauge_after = await metric(session, car.base, 'probe_saturated{canary="demo"}')
    saturated_reasons = [r for r in s.reasons if "saturated: " in r]
    print(
        f"\n[{setting}] judged saturated {judged_after:.1f}s into the load; over {SATURATE_S:.0f}s "
        f"({SATURATE_S / AFTER:.0f}x liveness.after) with {CLIENTS} clients, {traffic.completed} client requests "
        f"completed ({traffic.completed / (SATURATE_S + 2.0):.1f}/s), errors {dict(traffic.errors)}: /live "
        f"{dict(s.live)} (false restarts: {s.live[503]}), /ready {dict(s.ready)} (available "
        f"{s.availability():.1%}), canary reasons saturated {len(saturated_reasons)}/{len(s.reasons)}, canaries "
        f"that reached Triton {canaries}, slowest answer {s.slowest * 1000:.0f} ms\n  e.g. {saturated_reasons[-1]}"
    )
    assert s.live[503] == 0, s.reasons
    assert not traffic.errors
    assert gauge == 1.0 and gauge_after == 0.0
    assert s.slowest <= TIMEOUT + SLACK
    # Every other reason is saturated (a stats read that missed its time would say "cannot tell", restart-worthy).
    assert len(saturated_reasons) >= 0.9 * len(s.reasons), Counter(r.split(";")[0][:60] for r in s.reasons)
    if setting == "ready":
        assert s.availability() >= 0.9, s.reasons
        assert re.fullmatch(
            r"saturated: \d+ requests? completed in \d+\.\ds and \d+ pending while the canary waited 0\.68s "
            r"\(the queue drains in about \d+\.\ds at that rate[^)]*\); last verified output \d+\.\ds ago",
            saturated_reasons[-1],
        ), saturated_reasons[-1]
    else:
        assert s.availability() <= 0.1, s.reasons
        assert re.fullmatch(
            r"canary/demo failed: saturated: .*; not ready to shed load \(probe\.saturated: not-ready\)"
            r"(?: \(retrying in \d+\.\ds\))?; last verified output \d+\.\ds ago",
            saturated_reasons[-1],
        ), saturated_reasons[-1]
    # No pile-up: one canary at a time, at most one new one per min_interval (the backoff makes it rarer still).
    assert canaries <= (SATURATE_S + 2.0) / MIN_INTERVAL + 2, canaries


async def test_probe_check_under_saturation_says_saturated_and_fails_without_a_verified_output(
    triton: TritonServer, golden_dir: Path, tmp_path: Path
) -> None:
    """One-shot `probe check` reads a baseline of the statistics first, so its missed canary is judged too; with no
    output verified in that process, a saturated canary fails (exit 3), never as hung."""
    cfg = write_config(
        tmp_path,
        triton.url,
        [DEMO_CANARY],
        triton={"url": triton.url, "metrics_url": f"http://127.0.0.1:{triton.metrics_port}/metrics"},
        probe=PROBE,
        liveness={"after": AFTER},
        golden_dir=str(golden_dir),
    )
    async with aiohttp.ClientSession() as session:
        triton.fault(MODEL, SERVICE)
        traffic = Traffic(triton.url)
        traffic.start(session, 60.0)

        async def queued() -> bool:
            _, text, _ = await get(session, f"http://127.0.0.1:{triton.metrics_port}/metrics")
            m = re.search(rf'^nv_inference_pending_request_count{{model="{MODEL}",version="1"}} (\S+)$', text, re.M)
            return m is not None and float(m.group(1)) >= CLIENTS - 2

        await wait_until(queued, 20, "a queue to build")
        proc = await asyncio.to_thread(run_cli, "check", "-c", str(cfg))
        traffic.stop_now()
        triton.fault(MODEL, "ok")
        await traffic.wait()
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("[-]canary/demo"))
    print(f"\n[probe check, saturated] exit {proc.returncode}: {line}")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert re.fullmatch(r"\[-\]canary/demo failed: saturated: .*; no output verified yet", line), line


# ---------------------------------------------------------------------------------------------- hung


async def test_true_hang_without_traffic_fails_live_after_liveness_after(
    triton: TritonServer, serve: StartServe
) -> None:
    car = serve(triton)
    async with aiohttp.ClientSession() as session:
        await wait_until(lambda: canary_passes(session, car.base), 30, "a verified canary")
        triton.fault(MODEL, "hang")
        s = await sample(session, car.base, AFTER + 8.0, until_live_fails=True)
        triton.fault(MODEL, "ok")
        await wait_until(lambda: canary_passes(session, car.base), 60, "the canary to pass after the hang")
    hung = [r for r in s.reasons if "; hung: " in r]
    print(f"\n[hang, no traffic] /live failed {s.first_live_failure}s after the hang began\n  e.g. {hung[-1]}")
    assert s.first_live_failure is not None and AFTER <= s.first_live_failure <= AFTER + 3.0
    assert re.fullmatch(
        rf"canary/demo failed: timed out after 0\.68s; hung: no request of model {MODEL} completed in \d+\.\ds "
        r"\(\d+ pending(?:; not counting the probe's own \d+ canar(?:y|ies))?\)(?: \(retrying in \d+\.\ds\))?",
        hung[-1],
    ), hung[-1]
    assert not any("saturated: " in r for r in s.reasons)


async def test_hang_with_requests_pending_and_none_completing_fails_live(
    triton: TritonServer, serve: StartServe
) -> None:
    """The starvation of the incident: requests queued (for GPU memory that never came), none completing."""
    car = serve(triton)
    async with aiohttp.ClientSession() as session:
        await wait_until(lambda: canary_passes(session, car.base), 30, "a verified canary")
        traffic = Traffic(triton.url)
        traffic.start(session, 60.0)
        await wait_until(lambda: asyncio.sleep(0, traffic.completed > 50), 20, "healthy traffic first")
        triton.fault(MODEL, "hang")
        s = await sample(session, car.base, AFTER + 8.0, until_live_fails=True)
        _, text, _ = await get(session, f"http://127.0.0.1:{triton.metrics_port}/metrics")
        pending = re.search(rf'^nv_inference_pending_request_count{{model="{MODEL}",version="1"}} (\S+)$', text, re.M)
        traffic.stop_now()
        triton.fault(MODEL, "ok")
        await traffic.wait()
        await wait_until(lambda: canary_passes(session, car.base), 60, "the canary to pass after the hang")
    hung = [r for r in s.reasons if "; hung: " in r]
    judged = Counter(re.sub(r"\d+(\.\d+)?", "N", r.split("; ", 1)[-1])[:70] for r in s.reasons)
    print(
        f"\n[hang, {CLIENTS} clients queued] /live failed {s.first_live_failure}s after the hang began; Triton "
        f"pending then {pending and pending.group(1)}; reasons {dict(judged)}\n  e.g. {hung[-1]}"
    )
    assert pending is not None and float(pending.group(1)) >= CLIENTS - 1
    assert s.first_live_failure is not None and AFTER <= s.first_live_failure <= AFTER + 4.0
    assert re.search(rf"hung: no request of model {MODEL} completed in \d+\.\ds \((1[5-9]|[2-9]\d) pending", hung[-1])


# ---------------------------------------------------------------------------------------------- not told apart


@pytest.fixture
def restricted_triton(tmp_path: Path) -> Iterator[TritonServer]:
    """A Triton with pytriton's default restriction on the statistics endpoint: /stats answers 403."""
    server = start_triton(tmp_path / "restricted", (MODEL,), restricted_endpoints=("statistics",))
    try:
        yield server
    finally:
        stop_triton(server)


async def test_statistics_refused_count_a_saturated_miss_as_hung_and_are_logged_once(
    restricted_triton: TritonServer, serve: StartServe
) -> None:
    car = serve(restricted_triton)
    async with aiohttp.ClientSession() as session:
        await wait_until(lambda: canary_passes(session, car.base), 30, "a verified canary")
        restricted_triton.fault(MODEL, SERVICE)
        traffic = Traffic(restricted_triton.url)
        traffic.start(session, 60.0)
        s = await sample(session, car.base, AFTER + 8.0, until_live_fails=True)
        traffic.stop_now()
        restricted_triton.fault(MODEL, "ok")
        await traffic.wait()
    told = [json.loads(line) for line in car.logs().splitlines() if NOT_TOLD in line]
    reason = next(r for r in s.reasons if "cannot tell" in r)
    print(f"\n[403] /live failed {s.first_live_failure}s into the load\n  {reason}\n  log: {told}")
    assert s.first_live_failure is not None and s.first_live_failure >= AFTER
    assert re.fullmatch(
        rf"canary/demo failed: timed out after 0\.68s; cannot tell saturated from hung: model {MODEL} statistics: "
        r"\[403\] This API is restricted, expecting header 'triton-access-token'(?: \(retrying in \d+\.\ds\))?",
        reason,
    ), reason
    assert len(told) == 1, told
    assert told[0]["level"] == "warning" and told[0]["canaries"] == ["demo"] and told[0]["model"] == MODEL
    assert told[0]["reason"].startswith(f"model {MODEL} statistics: [403] This API is restricted")
