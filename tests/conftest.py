"""Session fixtures: one real Triton server (nvidia-pytriton, CPU) for every integration test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from demo.launcher import MODELS, TritonServer, start_triton, stop_triton
from tests.helpers import ServeProcess

__all__ = ["MODELS", "TritonServer", "start_triton", "stop_triton"]


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    server = start_triton(tmp_path_factory.mktemp("triton"))
    try:
        yield server
    finally:
        stop_triton(server)


@pytest.fixture
def healthy_triton(triton: TritonServer) -> Iterator[TritonServer]:
    """The session Triton with every fault cleared before and after the test."""
    triton.clear_faults()
    for m in MODELS:
        triton.wait_idle(m)
    yield triton
    triton.clear_faults()
    for m in MODELS:
        triton.wait_idle(m)


@pytest.fixture
def serve_process() -> Iterator[Callable[..., ServeProcess]]:
    """Factory: start `probe serve` for a config on a port and wait until it answers; killed after the test."""
    started: list[ServeProcess] = []

    def start(config: Path, port: int, env: dict[str, str] | None = None) -> ServeProcess:
        proc = ServeProcess(config, port, env)
        started.append(proc)
        proc.wait_up()
        return proc

    yield start
    for proc in started:
        proc.stop()
