"""The fault matrix: one injected fault per row, against `probe serve` running as a real process.

Every row holds the same promises (docs/RELIABILITY.md is the table of them): /ready and /live answer with the
expected status within probe.timeout + a margin, `/ready/<check>` names the fault in its full reason, the sidecar
neither crashes nor logs a traceback, and once the fault clears it recovers without being restarted.

Faults are injected for real wherever they cross a wire: the demo Triton's fault files, Triton's own model
repository API, SIGKILL of Triton's process group, a TCP peer that answers garbage or broken JSON, the fake
libnvidia-ml.so.1 loaded through LD_LIBRARY_PATH, golden files changed on disk, RLIMIT_FSIZE for a failing write.
liveness.after is 0, so a restart-worthy failure shows on /live at once.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from demo.nvml_fakes import H100_TOTAL, FakeGpu
from tests.conftest import TritonServer
from tests.helpers import DEMO_CANARY, REPO, run_cli, write_config
from tests.reliability.harness import (
    PROBE,
    SLACK,
    TIMEOUT,
    Expect,
    FakeDriver,
    FaultyPeer,
    PrivateTriton,
    StartSidecar,
    http,
    model_hang,
    write_atomic,
)

pytestmark = pytest.mark.triton

MiB = 1024**2
MODEL = "demo_classifier"
# The runner keeps 20 ms of probe.timeout back for the answer; a hung check is cut at 0.48 s (or 0.47 s).
RETRYING = r"(?: \(retrying in \d+\.\ds\))?"
TIMED_OUT = r"timed out after 0\.4\ds" + RETRYING
# A canary without a timeout of its own also keeps 0.1 s back to read Triton's statistics after a miss: cut at 0.38 s,
# then judged. liveness.after 0 here, so no queue drains in time: never saturated.
OWN = r"(?:; not counting the probe's own \d+ canar(?:y|ies))?"
CANARY_HUNG = (
    rf"timed out after 0\.3\ds; hung: no request of model {MODEL} completed in \d+\.\ds \(\d+ pending{OWN}\)" + RETRYING
)
CANARY_SLOW = r"timed out after 0\.3\ds; (?:hung|not saturated|too little progress): [^\n]+"
ON_TRITON = ("triton", "model/demo")


def metrics_of(server: TritonServer) -> dict[str, str]:
    """The triton: section naming the server's metrics port, where the pending queue a missed canary is judged by
    comes from (the default, port 8002 of Triton's host, is not where the test Triton listens)."""
    return {"url": server.url, "metrics_url": f"http://127.0.0.1:{server.metrics_port}/metrics"}


def refused(url: str) -> str:
    host, port = url.split(":")
    at = re.escape(url)
    return (
        rf"server (?:ready|live): cannot connect to Triton at {at}: Connect call failed \('{re.escape(host)}', {port}\)"
    )


# ---------------------------------------------------------------------------------------------- the model


MODEL_FAULTS = [
    pytest.param("hang", {}, Expect(503, 503, "canary/demo", CANARY_HUNG, ON_TRITON), id="hang"),
    pytest.param("slow:1.0", {}, Expect(503, 503, "canary/demo", CANARY_SLOW, ON_TRITON), id="slow-past-timeout"),
    pytest.param(
        "slow:0.25",
        {"latency": {"max_ms": 150}},
        Expect(503, 200, "latency/demo", r"last canary took \d{3,}\.\dms > max_ms 150", ("canary/demo", *ON_TRITON)),
        id="slow-past-max-ms",
    ),
    pytest.param(
        "fail",
        {},
        Expect(
            503,
            503,
            "canary/demo",
            rf"canary demo inference: \[500\] Failed to process the request\(s\) for model '{MODEL}_0_0', "
            rf"message: TritonModelException: Model execute error: RuntimeError: fault injected into {MODEL}: fail",
            ON_TRITON,
        ),
        id="http-500",
    ),
    pytest.param(
        "wrong_value",
        {},
        Expect(
            503,
            200,
            "canary/demo",
            r"output PROBS digest xxh3_128:[0-9a-f]{12}… != golden xxh3_128:[0-9a-f]{12}… \(\+1 more\)",
            ON_TRITON,
        ),
        id="wrong-value",
    ),
    pytest.param(
        "wrong_shape",
        {},
        Expect(503, 200, "canary/demo", r"output PROBS shape \[1, 1, 10\] != golden \[1, 10\]", ON_TRITON),
        id="wrong-shape",
    ),
    pytest.param(
        "missing_output",
        {},
        Expect(503, 200, "canary/demo", r"output PROBS missing from the response", ON_TRITON),
        id="missing-output",
    ),
]


@pytest.mark.parametrize(("fault", "canary", "expect"), MODEL_FAULTS)
def test_model_fault(
    start_sidecar: StartSidecar, healthy_triton: TritonServer, fault: str, canary: dict[str, Any], expect: Expect
) -> None:
    car = start_sidecar(healthy_triton.url, canary=canary, triton=metrics_of(healthy_triton))
    car.passes(expect.check)
    healthy_triton.fault(MODEL, fault)
    car.expect(expect)
    healthy_triton.fault(MODEL, "ok")
    car.passes(expect.check)


def test_wrong_datatype(start_sidecar: StartSidecar, healthy_triton: TritonServer) -> None:
    """The golden was recorded on demo_classifier (PROBS FP32); the canary now reaches demo_classifier_fp64, same
    inputs, PROBS in FP64. Recovery is what an operator does for a deliberate change: `probe record --force`."""
    car = start_sidecar(healthy_triton.url, canary={"model": "demo_classifier_fp64"})
    car.expect(Expect(503, 200, "canary/demo", r"output PROBS datatype FP64 != golden FP32", ON_TRITON))
    rec = run_cli("record", "-c", str(car.config), "--force")
    assert rec.returncode == 0, rec.stderr
    car.passes("canary/demo")


def test_hang_backoff_reason_does_not_grow(start_sidecar: StartSidecar, healthy_triton: TritonServer) -> None:
    """While a hung canary is held back, every probe reuses the last result and says when it retries, once."""
    car = start_sidecar(healthy_triton.url, probe={**PROBE, "hang_backoff": 2.0}, triton=metrics_of(healthy_triton))
    car.passes("canary/demo")
    healthy_triton.fault(MODEL, "hang")
    reasons = [car.get("/ready/canary/demo").body for _ in range(12)]
    healthy_triton.fault(MODEL, "ok")
    assert all(re.fullmatch(f"canary/demo failed: {CANARY_HUNG}\n", r) for r in reasons), reasons
    car.passes("canary/demo")


# ---------------------------------------------------------------------------------------------- Triton itself


def test_model_unloaded(start_sidecar: StartSidecar, private_triton: PrivateTriton) -> None:
    """Unloaded through Triton's model-repository API, then loaded back. pytriton's Triton refuses a plain `/load`
    ("failed to poll from model repository": pytriton sends the model files inline when it loads), so there the
    model comes back with a Triton restart instead."""
    server = private_triton.server
    repository = f"http://{server.url}/v2/repository/models/{MODEL}"
    car = start_sidecar(server.url)
    car.passes("model/demo")
    assert http(f"{repository}/unload", method="POST", body=b"{}").status == 200
    car.expect(Expect(503, 200, "model/demo", rf"model {MODEL} is not ready \(loading, unloaded or failed to load\)"))
    canary = car.get("/ready/canary/demo")
    assert canary.status == 503 and canary.body.startswith(f"canary/demo failed: model {MODEL} is not ready: "), canary
    if http(f"{repository}/load", method="POST", body=b"{}").status != 200:
        private_triton.restart()
    car.passes("model/demo")


def test_triton_killed_mid_request_then_restarted_on_the_same_port(
    start_sidecar: StartSidecar, private_triton: PrivateTriton
) -> None:
    server = private_triton.server
    car = start_sidecar(server.url)
    car.passes("canary/demo")
    with model_hang(server, MODEL) as hang, ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(http, car.base + "/ready/canary/demo")
        hang.wait_entered()
        private_triton.stop(signal.SIGKILL)
        answer = in_flight.result(timeout=10)
    assert answer.status == 503 and answer.elapsed <= TIMEOUT + SLACK, answer
    assert re.fullmatch(
        rf"canary/demo failed: canary demo inference: cannot connect to Triton at {re.escape(server.url)}:"
        r" Server disconnected\n",
        answer.body,
    ), answer
    car.expect(Expect(503, 503, "triton", refused(server.url)))
    private_triton.start()  # same http port: the sidecar reconnects by itself
    car.passes("canary/demo")


def test_connection_refused(start_sidecar: StartSidecar, peer: FaultyPeer) -> None:
    """Nothing listens at triton.url. Before Triton was ever healthy, /live holds (liveness.startup budget)."""
    car = start_sidecar(peer.url)
    car.expect(Expect(503, 200, "triton", refused(peer.url)))
    live = car.get("/live/triton")
    assert live.status == 200, live
    assert re.fullmatch(f"ok \\(not counted before the first good canary: {refused(peer.url)}\\)\n", live.body), live
    peer.start()  # Triton (relayed) appears on that port
    car.passes("canary/demo")


@pytest.mark.parametrize(
    ("mode", "expect"),
    [
        pytest.param("silent", Expect(503, 503, "triton", TIMED_OUT), id="silent-peer"),
        pytest.param(
            "garbage",
            Expect(503, 503, "triton", r"server (?:ready|live): malformed reply from 127\.0\.0\.1:\d+: .+"),
            id="malformed-http",
        ),
        pytest.param(
            "bad_json",
            Expect(
                503,
                503,
                "canary/demo",
                r"canary demo inference: malformed reply from 127\.0\.0\.1:\d+: Parse error at offset \d+: .+",
                ON_TRITON,
            ),
            id="malformed-json",
        ),
    ],
)
def test_malformed_peer(start_sidecar: StartSidecar, peer: FaultyPeer, mode: str, expect: Expect) -> None:
    """A peer where Triton should be (a proxy, a wrong port) that stops speaking Triton's protocol mid-life."""
    car = start_sidecar(peer.start().url)
    car.passes(expect.check)
    peer.set_mode(mode)
    car.expect(expect, within=5)
    peer.set_mode("proxy")
    car.passes(expect.check)


# ---------------------------------------------------------------------------------------------- the GPU driver

NVML_GPU: dict[str, Any] = {"source": "nvml", "interval": 0.1, "stale_after": 1.0, "min_free": "2GiB"}


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        pytest.param(
            {"hang_ms": 60_000},
            Expect(
                503,
                200,
                "gpu",
                r"GPU sample is \d+\.\ds old \(limit 1\.0s\): NVML call hung or sampler stopped",
                ("triton",),
            ),
            id="nvml-hang",
        ),
        pytest.param(
            {"lost": True},
            Expect(
                503,
                200,
                "gpu",
                r"GPU-aaaa: GPU is lost \(fell off the bus or stopped responding\); re-initialising NVML",
                ("triton",),
            ),
            id="gpu-lost",
        ),
        pytest.param(
            {"gpus": (FakeGpu("GPU-aaaa", used=H100_TOTAL - 512 * MiB),)},
            Expect(
                503,
                503,
                "gpu",
                r"GPU-aaaa \(NVIDIA H100 80GB HBM3\) free 512\.0MiB < min_free 2\.0GiB"
                r"(?:; used \+\d+\.\d[KMGT]iB/min)?",
                ("triton",),
            ),
            id="headroom-exhausted",
        ),
    ],
)
def test_nvml_fault(
    start_sidecar: StartSidecar,
    healthy_triton: TritonServer,
    fake_driver: FakeDriver,
    change: dict[str, Any],
    expect: Expect,
) -> None:
    car = start_sidecar(healthy_triton.url, canaries=[], gpu=NVML_GPU, env=fake_driver.env)
    car.passes("gpu")
    # serve waits (briefly) for the first sample before its first run: no spurious failure at start.
    assert "no GPU sample yet" not in car.serve.logs()
    fake_driver.state.set(**change)
    car.expect(expect)
    fake_driver.state.reset()
    car.passes("gpu")


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None, reason="a real libnvidia-ml is installed")
def test_nvml_library_missing(
    start_sidecar: StartSidecar,
    healthy_triton: TritonServer,
    fake_driver: FakeDriver,
    fake_nvml_library: Path,
    tmp_path: Path,
) -> None:
    """gpu.source nvml on a node whose driver is not mounted (yet): the library directory starts empty, then
    the library appears in it (the driver container finished) and the sampler's retried init finds it."""
    driver_dir = tmp_path / "driver"
    driver_dir.mkdir()
    env = {**fake_driver.env, "LD_LIBRARY_PATH": str(driver_dir)}
    car = start_sidecar(healthy_triton.url, canaries=[], gpu=NVML_GPU, env=env)
    car.expect(
        Expect(
            503,
            200,
            "gpu",
            r"NVML library not found \(libnvidia-ml\.so\.1\): no NVIDIA driver on this node, "
            r"or it is not mounted into this container",
            ("triton",),
        )
    )
    shutil.copy(fake_nvml_library, driver_dir / ".mounting")
    os.replace(driver_dir / ".mounting", driver_dir / fake_nvml_library.name)
    car.passes("gpu", within=30)  # init is retried with backoff


# ---------------------------------------------------------------------------------------------- golden files

CORRUPT = b'{"format": 1, "canary": "demo", "records": ['


def _json_error(text: bytes) -> str:
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return str(e)
    raise AssertionError("not corrupt")


def _golden_missing(path: Path, other: bytes) -> str:
    path.unlink()
    return f"{re.escape(str(path))}: golden file missing; record it with `probe record`"


def _golden_corrupt(path: Path, other: bytes) -> str:
    write_atomic(path, CORRUPT)
    return f"{re.escape(str(path))}: corrupt golden file: {re.escape(_json_error(CORRUPT))}"


def _golden_for_another_input(path: Path, other: bytes) -> str:
    write_atomic(path, other)
    return (
        rf"{re.escape(str(path))}: recorded for different canary inputs \(input digest xxh3_128:[0-9a-f]{{12}}… != "
        rf"xxh3_128:[0-9a-f]{{12}}… now\); re-record with `probe record --force`"
    )


@pytest.mark.parametrize(
    "inject",
    [
        pytest.param(_golden_missing, id="golden-missing"),
        pytest.param(_golden_corrupt, id="golden-corrupt"),
        pytest.param(_golden_for_another_input, id="golden-other-input"),
    ],
)
def test_golden_fault(
    start_sidecar: StartSidecar,
    healthy_triton: TritonServer,
    other_input_golden: bytes,
    inject: Callable[[Path, bytes], str],
) -> None:
    """The golden changes under a running sidecar (a ConfigMap update): it is re-read, judged, and re-read again
    when a good one is written back."""
    car = start_sidecar(healthy_triton.url)
    car.passes("canary/demo")
    good = car.golden.read_bytes()
    car.expect(Expect(503, 200, "canary/demo", inject(car.golden, other_input_golden), ON_TRITON))
    write_atomic(car.golden, good)
    car.passes("canary/demo")


def test_golden_replaced_keeping_size_and_mtime(start_sidecar: StartSidecar, healthy_triton: TritonServer) -> None:
    """A golden replaced by another of the same size that kept the old mtime (copied with `cp -p`, `rsync -t` or
    `tar`, or written twice within one coarse filesystem timestamp tick) must still be re-read and judged."""
    car = start_sidecar(healthy_triton.url)
    car.passes("canary/demo")
    before = car.golden.stat()
    good = car.golden.read_bytes()
    digest = json.loads(good)["input_digest"]
    stale = good.replace(digest.encode(), (digest[:-1] + ("0" if digest[-1] != "0" else "1")).encode())
    assert len(stale) == len(good) and stale != good
    write_atomic(car.golden, stale)  # a new file (new inode, new ctime) ...
    os.utime(car.golden, ns=(before.st_atime_ns, before.st_mtime_ns))  # ... that kept the old mtime
    car.expect(Expect(503, 200, "canary/demo", rf"{re.escape(str(car.golden))}: recorded for different .+"), within=3)


def test_golden_write_that_fails_keeps_the_old_file(
    tmp_path: Path, healthy_triton: TritonServer, demo_golden: bytes
) -> None:
    """`probe record --force` with the file-size limit below the golden's size: the write fails mid-way."""
    cfg = write_config(tmp_path, healthy_triton.url, [DEMO_CANARY])
    golden = tmp_path / "golden" / "demo.json"
    golden.parent.mkdir()
    golden.write_bytes(demo_golden)

    def small_files() -> None:  # Python ignores SIGXFSZ, so the write fails with EFBIG instead of killing it
        resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "probe", "record", "-c", str(cfg), "--force"],
        env=env,
        preexec_fn=small_files,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc
    assert re.fullmatch(
        r"probe: cannot write golden file for canary demo: \[Errno 27\] File too large; "
        r"the previous golden file is unchanged\n",
        proc.stderr,
    ), proc.stderr
    assert golden.read_bytes() == demo_golden
    assert [p.name for p in golden.parent.iterdir()] == ["demo.json"], "a temp file was left behind"


# ---------------------------------------------------------------------------------------------- the sidecar


def test_sigterm_during_in_flight_probe(start_sidecar: StartSidecar, healthy_triton: TritonServer) -> None:
    """SIGTERM while a canary hangs inside the model: that probe still gets its answer in time, /ready fails from
    now on (the pod drains), /live holds, and the process exits 0 once the drain is over."""
    car = start_sidecar(healthy_triton.url, probe={**PROBE, "drain": 3.0}, liveness={"after": 60})
    car.passes("canary/demo")
    with model_hang(healthy_triton, MODEL) as hang, ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(http, car.base + "/ready")
        hang.wait_entered()
        car.serve.process.send_signal(signal.SIGTERM)
        answer = in_flight.result(timeout=10)
        assert answer.status == 503 and answer.elapsed <= TIMEOUT + SLACK, answer
        shutdown = car.get("/ready/shutdown")
        assert shutdown.status == 503, shutdown
        assert shutdown.body == "shutdown failed: shutting down (SIGTERM received): draining\n", shutdown
        assert car.get("/live").status == 200, "draining must not restart the container"
        assert car.serve.process.wait(timeout=15) == 0
    logs = car.serve.logs()
    assert "Traceback" not in logs, logs[-4000:]
    assert '"msg": "probe stopped"' in logs


# ---------------------------------------------------------------------------------------------- the document


def test_reliability_doc_names_every_row() -> None:
    """docs/RELIABILITY.md, the table of this matrix, names every test here and no test that is gone."""
    here = Path(__file__).relative_to(REPO)
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", str(here)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    tests = {line.split("::", 1)[1] for line in collected.stdout.splitlines() if line.startswith(f"{here}::")}
    assert len(tests) > 20, collected.stdout + collected.stderr
    named = set(re.findall(r"`(test_\w+(?:\[[\w-]+\])?)`", (REPO / "docs" / "RELIABILITY.md").read_text()))
    itself = {"test_reliability_doc_names_every_row"}
    assert named - itself == tests - itself
