"""Start and stop the local CPU Triton (demo/triton_server.py) for `make demo`, the tests and the benchmarks.

Triton runs in its own process session so that it and pytriton's helper processes can be signalled as one
group, and only that group: we never touch processes we did not start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODELS = ("demo_classifier", "demo_classifier_fp64", "typed")
# Loaded only when asked for (the benchmarks): the classifier with a fixed 20 ms service time, and a 16 MiB output.
BENCH_MODELS = ("demo_classifier_20ms", "demo_large_output")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str = "condition", every: float = 0.02) -> Any:
    """Poll `predicate` until it returns something truthy; raise AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


@dataclass
class TritonServer:
    """A running Triton with the demo models; faults are set per model through files."""

    http_port: int
    metrics_port: int
    fault_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def fault(self, model: str, mode: str) -> None:
        tmp = self.fault_dir / f".{model}.tmp"
        tmp.write_text(mode)
        os.replace(tmp, self.fault_dir / model)

    def clear_faults(self) -> None:
        for model in MODELS:
            self.fault(model, "ok")

    def stats(self, model: str) -> dict[str, Any]:
        status, body = _get(f"http://{self.url}/v2/models/{model}/stats")
        assert status == 200, f"stats of {model}: HTTP {status} {body[:200]!r}"
        return dict(json.loads(body)["model_stats"][0])

    def inference_count(self, model: str) -> int:
        s = self.stats(model)["inference_stats"]
        return int(s["success"]["count"]) + int(s["fail"]["count"])

    def model_ready(self, model: str) -> bool:
        return _get(f"http://{self.url}/v2/models/{model}/ready")[0] == 200

    def wait_idle(self, model: str, timeout: float = 30.0) -> None:
        """Wait until a model answers a plain request again (a hung request drained)."""
        wait_for(lambda: self.model_ready(model), timeout, f"{model} ready")


def start_triton(
    tmp: Path,
    models: tuple[str, ...] = MODELS,
    http_port: int | None = None,
    *,
    grpc_port: int | None = None,
    metrics_port: int | None = None,
    timeout: float = 180.0,
) -> TritonServer:
    """Start demo/triton_server.py in its own process session; the caller stops it with stop_triton."""
    http_port = http_port or free_port()
    metrics_port = metrics_port or free_port()
    fault_dir = tmp / "faults"
    fault_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # pytriton's Python backend must load this interpreter's libpython, not the system one.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = libdir + os.pathsep + env.get("LD_LIBRARY_PATH", "")
    log_path = tmp / f"triton-{http_port}.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "demo" / "triton_server.py"),
            "--http-port",
            str(http_port),
            "--grpc-port",
            str(grpc_port or free_port()),
            "--metrics-port",
            str(metrics_port),
            "--fault-dir",
            str(fault_dir),
            "--models",
            ",".join(models),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    log.close()
    server = TritonServer(http_port, metrics_port, fault_dir, proc, log_path)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"Triton exited early: {log_path.read_text()[-2000:]}")
        return all(server.model_ready(m) for m in models)

    try:
        wait_for(up, timeout, "Triton and its models to be ready", every=0.2)
    except BaseException:
        stop_triton(server)
        raise
    return server


def stop_triton(server: TritonServer, sig: int = signal.SIGTERM) -> None:
    """Signal the server's whole process group (only processes we started), then make sure it is gone."""
    pgid = server.process.pid
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(pgid, signal.SIGKILL)  # sweep helpers (proxy backends) left in the group
    except ProcessLookupError:
        pass
    server.process.wait(timeout=10)
    # pytriton's shared-memory segments outlive a killed instance; they are named after its pid.
    for segment in Path("/dev/shm").glob(f"pytrtion{pgid}-*"):
        segment.unlink(missing_ok=True)
