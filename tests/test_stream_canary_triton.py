"""Streaming canaries end to end against the real Triton: `probe record`, `probe check` and `probe serve` with a
generate_stream canary on the decoupled demo_llm, and every failure class its faults produce."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from demo.launcher import TritonServer, wait_for
from tests.helpers import ServeProcess, run_cli, write_config

pytestmark = pytest.mark.triton

MODEL = "demo_llm"
CHAT: dict[str, Any] = {
    "name": "chat",
    "model": MODEL,
    "protocol": "generate_stream",
    "request": {"text_input": "The capital of France is", "max_tokens": 8, "parameters": {"temperature": 0}},
    "outputs": ["text_output"],
    "timeout": 0.7,
}


def one_token_answers(triton: TritonServer) -> bool:
    """demo_llm answers a one-token stream within 2 s: a stalled generator no longer holds the model."""
    data = json.dumps({"text_input": "x", "max_tokens": 1}).encode()
    req = urllib.request.Request(f"http://{triton.url}/v2/models/{MODEL}/generate_stream", data=data)
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return b"text_output" in r.read()
    except OSError:
        return False


@pytest.fixture
def llm(healthy_triton: TritonServer) -> Iterator[TritonServer]:
    healthy_triton.fault(MODEL, "ok")
    wait_for(lambda: one_token_answers(healthy_triton), 60, "demo_llm to answer")
    yield healthy_triton
    healthy_triton.fault(MODEL, "ok")
    wait_for(lambda: one_token_answers(healthy_triton), 60, "demo_llm to drain")


def recorded(tmp_path: Path, triton: TritonServer, canary: dict[str, Any] | None = None, **sections: Any) -> Path:
    # Triton's metrics port too: a miss is judged saturated or hung from its pending queue.
    metrics = {"url": triton.url, "metrics_url": f"http://127.0.0.1:{triton.metrics_port}/metrics"}
    cfg = write_config(tmp_path, triton.url, [canary or CHAT], triton=metrics, **sections)
    done = run_cli("record", "-c", str(cfg))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("[+]chat added record 1 of ")
    return cfg


def check_line(cfg: Path, name: str) -> tuple[int, str]:
    done = run_cli("check", "-c", str(cfg))
    lines = [ln for ln in done.stdout.splitlines() if ln[3:].startswith(name + " ") or ln[3:] == name]
    assert len(lines) == 1, done.stdout
    return done.returncode, lines[0]


def test_record_writes_a_fields_golden_and_check_passes(tmp_path: Path, llm: TritonServer) -> None:
    cfg = recorded(tmp_path, llm)
    golden = json.loads((tmp_path / "golden" / "chat.json").read_text())
    assert golden["format"] == 2 and golden["protocol"] == "generate_stream"
    record = golden["records"][0]
    assert list(record["fields"]) == ["text_output"]
    assert record["fields"]["text_output"]["digest"].startswith("xxh3_128:")
    assert record["first_event"]["runs"] == 3
    assert run_cli("validate", "-c", str(cfg)).returncode == 0
    code, line = check_line(cfg, "canary/chat")
    assert code == 0
    assert re.fullmatch(r"\[\+\]canary/chat ok: 8 events in [\d.]+ms, first after [\d.]+ms", line), line
    code, line = check_line(cfg, "latency/chat")
    assert "first event median" in line


def test_wrong_token_is_a_mismatch_and_text_mode_says_where(tmp_path: Path, llm: TritonServer) -> None:
    cfg = recorded(tmp_path, llm)
    llm.fault(MODEL, "wrong_token")
    code, line = check_line(cfg, "canary/chat")
    assert code == 3 and line.startswith("[-]canary/chat failed: text_output: digest differs from the golden"), line

    text = dict(CHAT, name="chat", compare={"mode": "text", "min_similarity": 0.99})
    llm.fault(MODEL, "ok")
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    cfg = recorded(text_dir, llm, text)
    llm.fault(MODEL, "wrong_token")
    code, line = check_line(cfg, "canary/chat")
    assert code == 3
    assert "similarity" in line and "leaves the golden at character" in line, line


def test_stall_mid_stream_times_out_with_progress(tmp_path: Path, llm: TritonServer) -> None:
    cfg = recorded(tmp_path, llm)
    llm.fault(MODEL, "stall")
    code, line = check_line(cfg, "canary/chat")
    assert code == 3
    # Nothing else is running on demo_llm, so nothing completes while the canary waits: hung, not saturated.
    pattern = r"\[-\]canary/chat failed: timed out after 0\.70s: \d+ events?, first after \d+ ms; hung: .+"
    assert re.fullmatch(pattern, line), line


def test_error_mid_stream_fails_with_the_exception(tmp_path: Path, llm: TritonServer) -> None:
    cfg = recorded(tmp_path, llm)
    llm.fault(MODEL, "error_mid")
    code, line = check_line(cfg, "canary/chat")
    assert code == 3
    assert line.startswith("[-]canary/chat failed: canary chat generate_stream: error in event "), line
    assert "Error" in line


def test_slow_first_token_fails_latency_first_ms(tmp_path: Path, llm: TritonServer) -> None:
    cfg = recorded(tmp_path, llm, dict(CHAT, latency={"first_ms": 100}))
    llm.fault(MODEL, "slow_first:0.3")
    code, line = check_line(cfg, "latency/chat")
    assert code == 3
    assert re.fullmatch(r"\[-\]latency/chat failed: first event after \d+\.\dms > first_ms 100", line), line


def test_generate_on_a_streaming_model_quotes_tritons_error(tmp_path: Path, llm: TritonServer) -> None:
    cfg = write_config(tmp_path, llm.url, [dict(CHAT, protocol="generate")])
    done = run_cli("record", "-c", str(cfg))
    assert done.returncode == 3
    assert "generate expects model to produce exactly 1 response" in done.stderr, done.stderr


def test_infer_on_a_decoupled_model_says_to_use_generate_stream(tmp_path: Path, llm: TritonServer) -> None:
    canary = {
        "name": "chat",
        "model": MODEL,
        "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "fill": {"data": ["hi"]}}],
    }
    cfg = write_config(tmp_path, llm.url, [canary])
    done = run_cli("record", "-c", str(cfg))
    assert done.returncode == 3
    assert "use protocol: generate_stream" in done.stderr, done.stderr


def test_unknown_output_field_is_named(tmp_path: Path, llm: TritonServer) -> None:
    cfg = write_config(tmp_path, llm.url, [dict(CHAT, outputs=["text_output", "logprobs"])])
    done = run_cli("record", "-c", str(cfg))
    assert done.returncode == 3
    assert "logprobs" in done.stderr and "text_output" in done.stderr, done.stderr


def test_exact_mode_refuses_a_sampling_model_and_points_to_text_mode(tmp_path: Path, llm: TritonServer) -> None:
    sampling = dict(CHAT, request={"text_input": "Once upon a time", "max_tokens": 8, "parameters": {"temperature": 1}})
    cfg = write_config(tmp_path, llm.url, [sampling])
    done = run_cli("record", "-c", str(cfg))
    assert done.returncode == 3
    assert "not deterministic" in done.stderr and "text" in done.stderr, done.stderr


def test_a_changed_request_invalidates_the_golden(tmp_path: Path, llm: TritonServer) -> None:
    recorded(tmp_path, llm)
    changed = dict(CHAT, request={**CHAT["request"], "max_tokens": 4})
    cfg = write_config(tmp_path, llm.url, [changed])
    done = run_cli("validate", "-c", str(cfg))
    assert done.returncode == 1
    assert "recorded for a different request" in done.stderr, done.stderr


def test_serve_shows_both_times_and_exports_time_to_first_event(
    tmp_path: Path, llm: TritonServer, serve_process: Callable[..., ServeProcess]
) -> None:
    from demo.launcher import free_port

    port = free_port()
    cfg = recorded(tmp_path, llm, listen={"host": "127.0.0.1", "port": port})
    proc = serve_process(cfg, port)

    def get(path: str, accept: str = "") -> tuple[int, str]:
        req = urllib.request.Request(proc.base + path, headers={"Accept": accept} if accept else {})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    status, text = get("/ready?verbose")
    assert status == 200, text
    assert re.search(r"\[\+\]canary/chat ok \(answer [\d.]+ms, first event [\d.]+ms\)", text), text
    status, body = get("/ready", accept="application/json")
    output = json.loads(body)["checks"]["canary/chat"][0]["output"]
    assert re.fullmatch(r"ok: 8 events in [\d.]+ms, first after [\d.]+ms", output), output
    _, metrics = get("/metrics")
    assert re.search(r'probe_canary_first_response_seconds_count\{canary="chat"\} [1-9]', metrics), metrics[-2000:]
    llm.fault(MODEL, "stall")

    def stalled() -> bool:
        return "timed out after" in get("/ready/canary/chat")[1]

    wait_for(stalled, 20, "the stall to show on /ready/canary/chat")
    assert get("/live")[0] == 200  # liveness.after has not passed: a restart is not due yet
