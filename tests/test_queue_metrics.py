"""Triton's queue signal and the environment info reach /metrics (real Triton, real stats endpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from probe.config import load_config
from probe.queue import pending_requests, queue_totals
from probe.sidecar import build_sidecar
from tests.conftest import TritonServer
from tests.helpers import DEMO_CANARY, async_wait_for, run_cli, write_config


def test_queue_totals_and_pending_parse() -> None:
    stats = {"model_stats": [{"inference_stats": {"queue": {"count": 4, "ns": 2_000_000}}}]}
    assert queue_totals(stats) == (4, 2_000_000)
    text = (
        "# TYPE nv_inference_pending_request_count gauge\n"
        'nv_inference_pending_request_count{model="m",version="1"} 3\n'
        'nv_inference_pending_request_count{model="other",version="1"} 9\n'
    )
    assert pending_requests(text, {"m"}) == {"m": 3.0}


@pytest.mark.triton
async def test_sidecar_exports_queue_and_environment(tmp_path: Path, healthy_triton: TritonServer) -> None:
    cfg_path = write_config(
        tmp_path,
        healthy_triton.url,
        [DEMO_CANARY],
        triton={"url": healthy_triton.url, "metrics_url": f"http://127.0.0.1:{healthy_triton.metrics_port}/metrics"},
        probe={"interval": 0.2, "min_interval": 0.0},
    )
    assert run_cli("record", "-c", str(cfg_path)).returncode == 0
    registry = CollectorRegistry()
    sidecar = build_sidecar(load_config(cfg_path), registry=registry)
    await sidecar.start()
    try:

        async def exported() -> bool:
            env = registry.get_sample_value(
                "probe_environment_info", {"gpu": "none", "driver": "none", "cuda": "none", "triton": "2.51.0"}
            )
            qt = registry.get_sample_value("probe_triton_queue_time_seconds", {"model": "demo_classifier"})
            pending = registry.get_sample_value("probe_triton_queue_pending_requests", {"model": "demo_classifier"})
            return env == 1.0 and qt is not None and pending is not None

        await async_wait_for(exported, 20, "queue and environment metrics")
        assert registry.get_sample_value("probe_runs_total") >= 1
        assert registry.get_sample_value("probe_check_success", {"check": "canary/demo"}) == 1.0
        assert registry.get_sample_value("probe_ready") == 1.0
    finally:
        await sidecar.stop()


@pytest.mark.triton
async def test_environment_is_exported_without_canaries(tmp_path: Path, healthy_triton: TritonServer) -> None:
    """A GPU-only probe (no canaries) still tells the fleet which driver, GPUs and Triton a pod runs on."""
    cfg_path = write_config(tmp_path, healthy_triton.url, [], probe={"interval": 0.2, "min_interval": 0.0})
    registry = CollectorRegistry()
    sidecar = build_sidecar(load_config(cfg_path), registry=registry)
    await sidecar.start()
    try:

        async def exported() -> bool:
            labels = {"gpu": "none", "driver": "none", "cuda": "none", "triton": "2.51.0"}
            return registry.get_sample_value("probe_environment_info", labels) == 1.0

        await async_wait_for(exported, 20, "the environment info")
    finally:
        await sidecar.stop()
