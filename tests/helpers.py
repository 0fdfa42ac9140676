"""Shared test helpers. Configs, `probe serve` processes and the CLI come from demo/harness.py (shared with bench/)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from demo.harness import DEMO_CANARY, ServeProcess, run_cli, write_config
from demo.launcher import REPO, free_port, wait_for
from probe.checks.lifecycle import Lifecycle, PingCheck, ShutdownCheck
from probe.liveness import Liveness
from probe.metrics import Metrics
from probe.runner import Runner
from probe.sidecar import observe_runs

__all__ = ["DEMO_CANARY", "REPO", "ServeProcess", "free_port", "run_cli", "wait_for", "write_config"]


async def async_wait_for(
    predicate: Callable[[], Awaitable[Any]], timeout: float, what: str = "condition", every: float = 0.02
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(every)


TYPED_CANARY: dict[str, Any] = {
    "name": "typed",
    "model": "typed",
    "inputs": [
        {"name": "B", "datatype": "BOOL", "shape": [3], "fill": {"data": [True, False, True]}},
        {"name": "S", "datatype": "BYTES", "shape": [2], "fill": {"data": ["hello", "wörld"]}},
        {"name": "H", "datatype": "FP16", "shape": [4], "fill": "ones"},
        {"name": "U", "datatype": "UINT64", "shape": [2], "fill": {"value": 18446744073709551614}},
        {"name": "I", "datatype": "INT8", "shape": [2, 2], "fill": {"random": {"seed": 3}}},
    ],
}


@dataclass
class Wired:
    """A runner over some checks plus `shutdown` and `ping`, with liveness and metrics listening, as
    `build_sidecar` wires them (no Triton): for the HTTP tests."""

    runner: Runner
    lifecycle: Lifecycle
    liveness: Liveness
    metrics: Metrics


def wired(checks: list[Any], *, timeout: float = 0.5) -> Wired:
    lifecycle = Lifecycle()
    runner = Runner(checks, [ShutdownCheck(lifecycle), PingCheck()], timeout=timeout, min_interval=0)
    liveness = Liveness(after=0, startup=600)
    metrics = Metrics(CollectorRegistry())
    observe_runs(runner, liveness, metrics, None)
    return Wired(runner, lifecycle, liveness, metrics)
