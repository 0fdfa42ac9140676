"""`make demo`: a local CPU Triton, golden files recorded when absent, and the sidecar on :8080 until Ctrl-C.

`--tour` walks through a hang, a wrong output and recovery, then an LLM stalling mid-stream and answering a
wrong token, printing what `/ready?verbose` says at each step,
then exits 0.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from demo.launcher import TritonServer, start_triton, stop_triton, wait_for  # noqa: E402

CONFIG = REPO / "configs" / "demo.yaml"
STATE = REPO / ".demo"
PROBE = "http://127.0.0.1:8080"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def probe_cli(*args: str) -> int:
    return subprocess.call([sys.executable, "-m", "probe", *args, "-c", str(CONFIG)], cwd=REPO)


def fetch(path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(PROBE + path, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def show(path: str) -> int:
    status, body = fetch(path)
    print(f"$ curl -s '{PROBE}{path}'   # HTTP {status}")
    print("  " + body.rstrip().replace("\n", "\n  "))
    return status


def tour(triton: TritonServer) -> None:
    model = "demo_classifier"
    say("1. healthy: every check passes")
    show("/ready?verbose")
    say("2. the model hangs: Triton still says ready, the probe answers 503 within probe.timeout")
    triton.fault(model, "hang")
    wait_for(lambda: fetch("/ready")[0] == 503, 15, "/ready to fail")
    t0 = time.monotonic()
    status = show("/ready?verbose")
    print(f"  (answered in {time.monotonic() - t0:.2f}s)")
    show("/ready/canary/classifier")
    show("/live")
    print(f"  Triton's own /v2/health/ready: HTTP {triton_ready(triton)}")
    say("3. the hang clears: the probe recovers by itself")
    triton.fault(model, "ok")
    wait_for(lambda: fetch("/ready")[0] == 200, 30, "/ready to recover")
    show("/ready?verbose")
    say("4. the model returns plausible but wrong numbers: golden digest mismatch, /ready 503, /live 200")
    triton.fault(model, "wrong_value")
    wait_for(lambda: fetch("/ready")[0] == 503, 15, "/ready to fail")
    show("/ready?verbose")
    show("/ready/canary/classifier")
    show("/live")
    say("5. the model is fixed: back to ready")
    triton.fault(model, "ok")
    wait_for(lambda: fetch("/ready")[0] == 200, 15, "/ready to recover")
    show("/ready?verbose")
    say("6. the LLM stalls mid-stream: the streaming canary times out and says how far the stream got")
    triton.fault("demo_llm", "stall")
    wait_for(lambda: "timed out" in fetch("/ready/canary/chat")[1], 20, "the stall to show")
    show("/ready/canary/chat")
    show("/live")
    triton.fault("demo_llm", "ok")
    wait_for(lambda: fetch("/ready")[0] == 200, 60, "/ready to recover")
    say("7. the LLM answers one wrong token: text mode names where the answer leaves the golden")
    triton.fault("demo_llm", "wrong_token")
    wait_for(lambda: "golden at character" in fetch("/ready/canary/chat")[1], 20, "the wrong token to show")
    show("/ready/canary/chat")
    say("8. the LLM is fixed: back to ready")
    triton.fault("demo_llm", "ok")
    wait_for(lambda: fetch("/ready")[0] == 200, 30, "/ready to recover")
    status = show("/ready?verbose")
    if status != 200:
        raise SystemExit("tour: the probe did not recover")


def triton_ready(triton: TritonServer) -> int:
    try:
        with urllib.request.urlopen(f"http://{triton.url}/v2/health/ready", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--tour",
        action="store_true",
        help="inject a hang, a wrong output, a mid-stream stall and a wrong token, then exit",
    )
    args = ap.parse_args()
    busy = [p for p in (8000, 8001, 8002, 8080) if not port_free(p)]
    if busy:
        print(
            f"demo: port(s) {', '.join(map(str, busy))} on 127.0.0.1 are in use; stop what uses them", file=sys.stderr
        )
        return 1
    STATE.mkdir(exist_ok=True)
    say("starting a local CPU Triton (nvidia-pytriton) with the example models on 127.0.0.1:8000")
    triton = start_triton(STATE, http_port=8000, grpc_port=8001, metrics_port=8002)
    serve: subprocess.Popen[bytes] | None = None
    try:
        triton.clear_faults()
        if not all((STATE / "golden" / f"{name}.json").exists() for name in ("classifier", "chat")):
            say("recording golden files (probe record)")
            if probe_cli("record") != 0:
                return 1
        say("one-shot check (probe check)")
        t0 = time.monotonic()
        code = probe_cli("check")
        print(f"(probe check exited {code} in {time.monotonic() - t0:.2f}s)")
        say("starting the sidecar (probe serve) on 127.0.0.1:8080")
        serve = subprocess.Popen([sys.executable, "-m", "probe", "serve", "-c", str(CONFIG)], cwd=REPO)
        wait_for(lambda: fetch("/live/ping")[0] == 200, 30, "the sidecar to answer")
        wait_for(lambda: fetch("/ready")[0] == 200, 30, "the sidecar to be ready")
        if args.tour:
            tour(triton)
            return 0
        print(
            f"""
The sidecar is answering. Try:
  curl -i {PROBE}/ready
  curl -s '{PROBE}/ready?verbose'
  curl -s {PROBE}/ready/canary/classifier
  curl -s {PROBE}/ready/canary/chat          # the streaming canary on demo_llm
  curl -s -H 'Accept: application/json' {PROBE}/ready
  curl -s '{PROBE}/live?verbose'
  curl -s {PROBE}/metrics | grep ^probe_
Break the model and watch /ready turn red (and back):
  echo hang        > {triton.fault_dir}/demo_classifier
  echo wrong_value > {triton.fault_dir}/demo_classifier
  echo ok          > {triton.fault_dir}/demo_classifier
Triton also serves demo_llm, a decoupled model that streams one token per event:
  curl -sN -d '{{"text_input": "The capital of France is", "max_tokens": 8}}' \\
    http://{triton.url}/v2/models/demo_llm/generate_stream
  echo stall > {triton.fault_dir}/demo_llm     # also wrong_token, error_mid, slow_first, ok
Ctrl-C stops the sidecar and Triton."""
        )
        while serve.poll() is None:
            try:
                serve.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        return 0 if serve.returncode == 0 else 1
    except KeyboardInterrupt:
        return 0
    finally:
        if serve is not None and serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(timeout=10)
            except subprocess.TimeoutExpired:
                serve.kill()
        say("stopping Triton")
        stop_triton(triton)


if __name__ == "__main__":
    sys.exit(main())
