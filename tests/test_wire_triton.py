"""What a run sends to the real Triton: a healthy fresh run is one inference and nothing else on the wire.

The probe's cost next to a raw inference (bench/ready_vs_raw.py) depends on this: every extra request a run
sends is another round trip through the sidecar's event loop and Triton's HTTP frontend on the same node.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from probe.checks.triton import READY_EVERY_S, TritonCheck
from probe.config import load_config
from probe.sidecar import Sidecar, build_sidecar
from probe.verdict import readiness
from tests.conftest import TritonServer
from tests.helpers import DEMO_CANARY, run_cli, write_config

pytestmark = pytest.mark.triton

CALLS = ("live", "ready", "model_ready", "model_info", "infer")


def count_calls(sidecar: Sidecar) -> Counter[str]:
    """Wrap the sidecar's TritonClient methods (the real ones still run) to count the requests each sends."""
    sent: Counter[str] = Counter()
    for name in CALLS:
        real: Callable[..., Awaitable[Any]] = getattr(sidecar.client, name)

        def counted(*a: Any, _real: Callable[..., Awaitable[Any]] = real, _name: str = name, **kw: Any) -> Any:
            sent[_name] += 1
            return _real(*a, **kw)

        setattr(sidecar.client, name, counted)
    return sent


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_healthy_runs_send_only_the_inference(tmp_path: Path, healthy_triton: TritonServer) -> None:
    cfg_path = write_config(tmp_path, healthy_triton.url, [DEMO_CANARY], probe={"timeout": 0.8})
    assert run_cli("record", "-c", str(cfg_path)).returncode == 0
    sidecar = build_sidecar(load_config(cfg_path), with_lifecycle_checks=False)
    triton_check = next(c for c in sidecar.runner.checks if isinstance(c, TritonCheck))
    clock = Clock()
    triton_check._clock = clock
    await sidecar.start(background=False)
    try:
        sent = count_calls(sidecar)
        for _ in range(10):
            run = await sidecar.runner.run_once()
            assert readiness(run.results).ok, {n: r.reason for n, r in run.results.items() if not r.ok}
        # Readiness once, to vouch for the canaries that follow; the model's metadata once, to validate inputs.
        assert sent == Counter(infer=10, ready=1, model_info=1), sent

        clock.now += READY_EVERY_S  # the vouching expires: readiness is asked again, once
        for _ in range(3):
            assert readiness((await sidecar.runner.run_once()).results).ok
        assert sent["ready"] == 2 and sent["infer"] == 13, sent

        healthy_triton.fault("demo_classifier", "fail")
        failing = await sidecar.runner.run_once()
        assert not failing.results["canary/demo"].ok
        assert sent["model_ready"] == 1, sent  # a failed inference asks why: is the model still ready?
        healthy_triton.fault("demo_classifier", "ok")
        # The failed canary no longer vouches for Triton: the next run asks readiness again, at once.
        assert readiness((await sidecar.runner.run_once()).results).ok
        assert sent["ready"] == 3, sent
        assert readiness((await sidecar.runner.run_once()).results).ok
        assert sent["ready"] == 3 and sent["live"] == 0, sent
    finally:
        await sidecar.stop()
