"""Latency drift against the real Triton: a slow but correct canary fails latency/ and passes canary/."""

from __future__ import annotations

from pathlib import Path

import pytest

from probe.config import load_config
from probe.sidecar import build_sidecar
from tests.conftest import TritonServer
from tests.helpers import DEMO_CANARY, run_cli, write_config

pytestmark = pytest.mark.triton


async def test_slow_canary_is_latency_failure_not_canary_failure(tmp_path: Path, healthy_triton: TritonServer) -> None:
    canary = {**DEMO_CANARY, "latency": {"drift": 3.0, "window": 3}}
    cfg_path = write_config(tmp_path, healthy_triton.url, [canary], probe={"timeout": 0.8})
    assert run_cli("record", "-c", str(cfg_path)).returncode == 0
    sidecar = build_sidecar(load_config(cfg_path))
    await sidecar.start(background=False)
    try:
        run = await sidecar.runner.run_once()
        assert run.results["latency/demo"].ok and run.results["canary/demo"].ok
        baseline = run.results["latency/demo"].details["baseline_ms"]
        slow_s = max(0.15, baseline * 6 / 1000)
        healthy_triton.fault("demo_classifier", f"slow:{slow_s}")
        for _ in range(3):
            run = await sidecar.runner.run_once()
            assert run.results["canary/demo"].ok, run.results["canary/demo"].reason
        lat = run.results["latency/demo"]
        assert not lat.ok
        assert lat.reason.startswith("median of last 3 canaries ")
        assert f"> 3 x baseline {baseline:.1f}ms (golden, recorded " in lat.reason
        assert not lat.restart_worthy
        healthy_triton.fault("demo_classifier", "ok")
        for _ in range(3):
            run = await sidecar.runner.run_once()
        assert run.results["latency/demo"].ok, run.results["latency/demo"].reason
    finally:
        await sidecar.stop()


async def test_max_ms_budget_fails_one_slow_inference(tmp_path: Path, healthy_triton: TritonServer) -> None:
    canary = {**DEMO_CANARY, "latency": {"max_ms": 100}}
    cfg_path = write_config(tmp_path, healthy_triton.url, [canary])
    assert run_cli("record", "-c", str(cfg_path)).returncode == 0
    sidecar = build_sidecar(load_config(cfg_path))
    await sidecar.start(background=False)
    try:
        healthy_triton.fault("demo_classifier", "slow:0.2")
        run = await sidecar.runner.run_once()
        assert run.results["canary/demo"].ok
        lat = run.results["latency/demo"]
        assert not lat.ok and lat.reason.startswith("last canary took 2") and lat.reason.endswith("ms > max_ms 100")
    finally:
        await sidecar.stop()
