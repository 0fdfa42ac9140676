"""Shared test helpers: waiting on conditions, free ports, configs, running the CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from demo.launcher import REPO, free_port, wait_for
from probe.checks.lifecycle import Lifecycle, PingCheck, ShutdownCheck
from probe.liveness import Liveness
from probe.metrics import Metrics
from probe.runner import Runner
from probe.sidecar import observe_runs

__all__ = ["REPO", "free_port", "wait_for"]


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


DEMO_CANARY: dict[str, Any] = {
    "name": "demo",
    "model": "demo_classifier",
    "inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [1, 3, 8, 8], "fill": {"random": {"seed": 7}}}],
}

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


def write_config(directory: Path, url: str, canaries: list[dict[str, Any]], **sections: Any) -> Path:
    """A probe.yaml in `directory` for the given Triton url; `sections` override top-level keys."""
    cfg: dict[str, Any] = {
        "triton": {"url": url},
        "listen": {"host": "127.0.0.1", "port": 0},
        "probe": {"timeout": 0.8, "min_interval": 1.0, "interval": 0},
        "gpu": {"source": "none"},
        "golden_dir": "golden",
        "canaries": canaries,
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = directory / "probe.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    """Run `python -m probe ARGS` as a real process; returns CompletedProcess with text output."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "probe", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class ServeProcess:
    """`probe serve` as a real process on a free port; stopped by its own pid."""

    def __init__(self, config: Path, port: int, env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
        self.port = port
        self.log = config.parent / f"serve-{port}.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "probe", "serve", "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
            )
        self.base = f"http://127.0.0.1:{port}"

    def wait_up(self, timeout: float = 30) -> None:
        import urllib.request

        def up() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"probe serve exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.base + "/live/ping", timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_for(up, timeout, "probe serve to answer /live/ping", every=0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def logs(self) -> str:
        return self.log.read_text()


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
