"""Fixtures of the reliability suite: goldens recorded once, `probe serve` launched per test, a private Triton for
the scenarios that kill or restart it, and the fake libnvidia-ml.so.1 for the GPU driver's faults."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from demo.nvml_fakes import FakeNvmlState, build_fake_nvml
from tests.conftest import MODELS, TritonServer, start_triton
from tests.helpers import DEMO_CANARY, ServeProcess, free_port, run_cli, write_config
from tests.reliability.harness import (
    LIVENESS,
    PROBE,
    TIMEOUT,
    FakeDriver,
    FaultyPeer,
    PrivateTriton,
    Sidecar,
    StartSidecar,
)


def _record(directory: Path, url: str, canary: dict[str, Any]) -> bytes:
    directory.mkdir(parents=True, exist_ok=True)
    cfg = write_config(directory, url, [canary])
    rec = run_cli("record", "-c", str(cfg))
    assert rec.returncode == 0, rec.stderr
    return (directory / "golden" / f"{canary['name']}.json").read_bytes()


@pytest.fixture(scope="session")
def demo_golden(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The demo canary's golden file, recorded once on the session Triton (the private one is the same build)."""
    triton.clear_faults()
    for m in MODELS:
        triton.wait_idle(m)
    return _record(tmp_path_factory.mktemp("golden-demo"), triton.url, DEMO_CANARY)


@pytest.fixture(scope="session")
def other_input_golden(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A golden file for the demo canary recorded with another input (random seed 8 instead of 7)."""
    canary = {**DEMO_CANARY, "inputs": [{**DEMO_CANARY["inputs"][0], "fill": {"random": {"seed": 8}}}]}
    return _record(tmp_path_factory.mktemp("golden-other"), triton.url, canary)


@pytest.fixture
def start_sidecar(
    tmp_path: Path, demo_golden: bytes, serve_process: Callable[..., ServeProcess]
) -> Iterator[StartSidecar]:
    """Factory: write probe.yaml for `url` and the demo golden, start `probe serve`, wait until it answers.

    `canary` overrides keys of the demo canary; `canaries=[]` runs without one; other keywords override config
    sections (probe, liveness, gpu, ...); `env` is added to the process environment. Killed after the test.
    """

    def start(
        url: str,
        *,
        canary: dict[str, Any] | None = None,
        canaries: list[dict[str, Any]] | None = None,
        env: dict[str, str] | None = None,
        **sections: Any,
    ) -> Sidecar:
        port = free_port()
        sections.setdefault("probe", PROBE)
        sections.setdefault("liveness", LIVENESS)
        chosen = canaries if canaries is not None else [{**DEMO_CANARY, **(canary or {})}]
        cfg = write_config(tmp_path, url, chosen, listen={"port": port}, **sections)
        golden = tmp_path / "golden" / "demo.json"
        golden.parent.mkdir(exist_ok=True)
        golden.write_bytes(demo_golden)
        serve = serve_process(cfg, port, env)
        return Sidecar(serve, float(sections["probe"].get("timeout", TIMEOUT)), cfg, golden)

    yield start


@pytest.fixture
def peer(triton: TritonServer) -> Iterator[FaultyPeer]:
    """A faulty peer on a reserved port, relaying to the session Triton once started; stopped after the test."""
    p = FaultyPeer(upstream_port=triton.http_port, port=free_port())
    yield p
    p.stop()


@pytest.fixture(scope="module")
def private_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateTriton]:
    directory = tmp_path_factory.mktemp("private-triton")
    holder = PrivateTriton(directory, start_triton(directory, ("demo_classifier",)))
    try:
        yield holder
    finally:
        holder.stop()


@pytest.fixture(scope="session")
def fake_nvml_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake libnvidia-ml.so.1, compiled once (gcc)."""
    return build_fake_nvml(tmp_path_factory.mktemp("fake-nvml"))


@pytest.fixture
def fake_driver(tmp_path: Path, fake_nvml_library: Path) -> FakeDriver:
    """The fake library first on LD_LIBRARY_PATH (pynvml dlopens libnvidia-ml.so.1 by name), one healthy H100."""
    state = FakeNvmlState(tmp_path / "nvml-state")
    state.reset()
    library_path = os.pathsep.join(p for p in (str(fake_nvml_library.parent), os.environ.get("LD_LIBRARY_PATH")) if p)
    env = {"LD_LIBRARY_PATH": library_path, "FAKE_NVML_STATE": str(state.path), "NVIDIA_VISIBLE_DEVICES": "all"}
    return FakeDriver(state, env)
