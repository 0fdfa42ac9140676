"""A local CPU Triton (through nvidia-pytriton) serving the example models, for `make demo` and the tests.

Each model reads a fault mode from `<fault-dir>/<model name>` on every request, so a demo or a test can make
it misbehave at runtime without restarting Triton:

    ok                 correct output (also when the file is missing or empty)
    hang               block until the file says something else (at most 120 s)
    slow:<seconds>     sleep, then answer correctly
    fail               raise, so Triton answers the request with an error
    wrong_value        correct shapes and types, different numbers
    wrong_shape        an output with an extra dimension
    missing_output     leave the first output out
    noise:<amplitude>  add fresh random noise on every request (nondeterministic)
    offset:<delta>     add a constant (deterministic drift)

The decoupled model `demo_llm` streams one token per response and has faults of its own (see `LlmFaults`):

    stall              stop after half the tokens and hang until the file says something else (at most 120 s)
    stall:<k>          the same after k tokens (stall:0: before the first, so no reply headers at all)
    wrong_token        one token (the middle one) differs
    error_mid          raise after half the tokens (Triton forwards the traceback as an `error` event)
    slow_first         the first token after 0.5 s (slow_first:<seconds> for another delay)

Run: python demo/triton_server.py --http-port 8000 --grpc-port 8001 --metrics-port 8002 --fault-dir DIR
Start it in its own process session and stop it by signalling that group: pytriton starts helper processes.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

HANG_LIMIT_S = 120.0


class Faults:
    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory

    def mode(self, model: str) -> str:
        try:
            return (self.directory / model).read_text().strip() or "ok"
        except OSError:
            return "ok"

    def before(self, model: str) -> str:
        """Apply the timing faults; return the mode for the output faults."""
        mode = self.mode(model)
        if mode == "hang":
            deadline = time.monotonic() + HANG_LIMIT_S
            while self.mode(model) == "hang" and time.monotonic() < deadline:
                time.sleep(0.01)
            mode = self.mode(model)
        if mode.startswith("slow:"):
            time.sleep(float(mode.split(":", 1)[1]))
        if mode == "fail":
            raise RuntimeError(f"fault injected into {model}: fail")
        return mode


def apply_output_fault(mode: str, outputs: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    if mode == "wrong_value":
        return {k: (v + 1).astype(v.dtype) if v.dtype != np.object_ else v[::-1].copy() for k, v in outputs.items()}
    if mode == "wrong_shape":
        first = next(iter(outputs))
        return {**outputs, first: outputs[first][np.newaxis, ...]}
    if mode == "missing_output":
        first = next(iter(outputs))
        return {k: v for k, v in outputs.items() if k != first}
    if mode.startswith("noise:"):
        amp = float(mode.split(":", 1)[1])
        return {
            k: (v + rng.uniform(-amp, amp, v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
            for k, v in outputs.items()
        }
    if mode.startswith("offset:"):
        delta = float(mode.split(":", 1)[1])
        return {k: (v + delta).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in outputs.items()}
    return outputs


def classifier(weights: np.ndarray, probs_dtype: Any) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """A tiny fixed linear classifier: IMAGE [1,3,8,8] -> PROBS [1,10] (softmax), LABEL [1]."""

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["IMAGE"].reshape(inputs["IMAGE"].shape[0], -1).astype(np.float64)
        logits = x @ weights
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
        return {"PROBS": probs.astype(probs_dtype), "LABEL": probs.argmax(axis=1).astype(np.int64)}

    return run


def typed(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One tensor of several datatypes in, a transformed tensor of the same datatype out."""
    s = inputs["S"]
    reversed_s = np.array([bytes(v)[::-1] for v in s.reshape(-1)], dtype=np.object_).reshape(s.shape)
    return {
        "B_OUT": np.logical_not(inputs["B"]),
        "S_OUT": reversed_s,
        "H_OUT": (inputs["H"] * 2).astype(np.float16),
        "U_OUT": (inputs["U"] + 1).astype(np.uint64),
        "I_OUT": (inputs["I"] // 2).astype(np.int8),
    }


# The demo LLM's vocabulary: its continuation of a prompt is a fixed function of the prompt (see `continuation`).
VOCAB = tuple(
    "the a of to and in is it that was for on with as by at from be this an which or one had not but all "
    "were when there can more if no out so what up into time has two like then first any new may".split()
)
LLM_MAX_TOKENS = 16
"""Tokens `demo_llm` generates when the request gives no `max_tokens`."""
LLM_TOKEN_LIMIT = 4096
SLOW_FIRST_S = 0.5


def token(prompt: str, i: int) -> str:
    """The i-th token (a word with its leading space) that demo_llm generates for `prompt`."""
    digest = hashlib.sha256(f"{i}:{prompt}".encode()).digest()
    return " " + VOCAB[int.from_bytes(digest[:4], "big") % len(VOCAB)]


def continuation(prompt: str, max_tokens: int = LLM_MAX_TOKENS) -> str:
    """demo_llm's whole answer to `prompt` with greedy decoding: what a healthy stream joins to."""
    return "".join(token(prompt, i) for i in range(max_tokens))


def wrong(word: str) -> str:
    """A different token in place of `word` (wrong_token)."""
    return " " + VOCAB[(VOCAB.index(word.strip()) + 1) % len(VOCAB)]


class LlmFaults:
    """Where and how demo_llm misbehaves, read from its fault file when a request starts."""

    def __init__(self, faults: Faults, model: str) -> None:
        self.faults = faults
        self.model = model

    def stall(self) -> None:
        """Hang until the fault file no longer says stall (bounded, so a forgotten fault cannot wedge Triton).

        A client that gives up does not stop this generator, and the model's next request waits behind it:
        clearing the fault is what releases both."""
        deadline = time.monotonic() + HANG_LIMIT_S
        while self.faults.mode(self.model).startswith("stall") and time.monotonic() < deadline:
            time.sleep(0.01)

    def generate(self, prompt: str, max_tokens: int, temperature: float) -> Iterator[str]:
        mode = self.faults.before(self.model)  # hang, slow:<s> and fail apply as for the other models
        name, _, arg = mode.partition(":")
        middle = max_tokens // 2
        stall_at = (int(arg) if arg else middle) if name == "stall" else -1
        rng = np.random.default_rng() if temperature > 0 else None
        for i in range(max_tokens):
            if i == stall_at:
                self.stall()
            if i == 0 and name == "slow_first":
                time.sleep(float(arg) if arg else SLOW_FIRST_S)
            if i == middle and name == "error_mid":
                raise RuntimeError(f"fault injected into {self.model}: error_mid after {i} tokens")
            word = token(prompt, i) if rng is None else " " + VOCAB[int(rng.integers(len(VOCAB)))]
            if i == middle and name == "wrong_token":
                word = wrong(word)
            yield word


def llm(faults: LlmFaults) -> Callable[[list[Any]], Iterator[list[dict[str, np.ndarray]]]]:
    """A decoupled infer function: one response per token, each with one `text_output` element."""

    def infer(requests: list[Any]) -> Iterator[list[dict[str, np.ndarray]]]:
        # Unbatched (batching=False): Triton hands the model one request at a time.
        (req,) = requests
        prompt = bytes(req["text_input"].reshape(-1)[0]).decode("utf-8", "replace")
        max_tokens = int(req["max_tokens"].reshape(-1)[0]) if "max_tokens" in req else LLM_MAX_TOKENS
        temperature = float(req["temperature"].reshape(-1)[0]) if "temperature" in req else 0.0
        if not 0 <= max_tokens <= LLM_TOKEN_LIMIT:
            raise ValueError(f"max_tokens must be between 0 and {LLM_TOKEN_LIMIT}, got {max_tokens}")
        for word in faults.generate(prompt, max_tokens, temperature):
            yield [{"text_output": np.array([word.encode()], dtype=np.object_)}]

    return infer


# A GPU-sized service time for the benchmarks: the demo classifier answers in 2-4 ms on a CPU.
PACED_SERVICE_S = 0.020
# FP32 elements of demo_large_output's one output: 16 MiB.
LARGE_OUTPUT_ELEMENTS = 4 * 1024 * 1024


def paced(fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], seconds: float) -> Callable[..., Any]:
    """`fn` with a fixed service time: it answers `seconds` after the request reached the model, however long
    `fn` itself took (a model the size of a GPU's, for measuring what a canary adds to a real inference)."""

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        deadline = time.perf_counter() + seconds
        out = fn(inputs)
        time.sleep(max(0.0, deadline - time.perf_counter()))
        return out

    return run


def large_output(elements: int) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """X FP32 [1] -> Y FP32 [elements]: the same ramp every time (a logits-sized reply, cheap to compute)."""
    ramp = np.arange(elements, dtype=np.float32)

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"Y": ramp}

    return run


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--fault-dir", type=pathlib.Path, required=True)
    ap.add_argument("--models", default="demo_classifier,demo_classifier_fp64,typed,demo_llm")
    ap.add_argument(
        "--restricted-endpoints",
        default="",
        help="comma-separated Triton endpoint groups that need pytriton's access token (e.g. statistics, as in "
        "pytriton's defaults); default none, so the probe can read /stats",
    )
    args = ap.parse_args()

    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    args.fault_dir.mkdir(parents=True, exist_ok=True)
    faults = Faults(args.fault_dir)
    weights = np.random.default_rng(1234).standard_normal((3 * 8 * 8, 10)) * 0.1
    noise = np.random.default_rng()
    models: dict[str, tuple[Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], list[Any], list[Any]]] = {
        "demo_classifier": (
            classifier(weights, np.float32),
            [Tensor(name="IMAGE", dtype=np.float32, shape=(-1, 3, 8, 8))],
            [
                Tensor(name="PROBS", dtype=np.float32, shape=(-1, -1)),
                Tensor(name="LABEL", dtype=np.int64, shape=(-1,)),
            ],
        ),
        "demo_classifier_fp64": (
            classifier(weights, np.float64),
            [Tensor(name="IMAGE", dtype=np.float32, shape=(-1, 3, 8, 8))],
            [
                Tensor(name="PROBS", dtype=np.float64, shape=(-1, -1)),
                Tensor(name="LABEL", dtype=np.int64, shape=(-1,)),
            ],
        ),
        "typed": (
            typed,
            [
                Tensor(name="B", dtype=np.bool_, shape=(-1,)),
                Tensor(name="S", dtype=bytes, shape=(-1,)),
                Tensor(name="H", dtype=np.float16, shape=(-1,)),
                Tensor(name="U", dtype=np.uint64, shape=(-1,)),
                Tensor(name="I", dtype=np.int8, shape=(-1, -1)),
            ],
            [
                Tensor(name="B_OUT", dtype=np.bool_, shape=(-1,)),
                Tensor(name="S_OUT", dtype=bytes, shape=(-1,)),
                Tensor(name="H_OUT", dtype=np.float16, shape=(-1,)),
                Tensor(name="U_OUT", dtype=np.uint64, shape=(-1,)),
                Tensor(name="I_OUT", dtype=np.int8, shape=(-1, -1)),
            ],
        ),
        "demo_classifier_20ms": (
            paced(classifier(weights, np.float32), PACED_SERVICE_S),
            [Tensor(name="IMAGE", dtype=np.float32, shape=(-1, 3, 8, 8))],
            [
                Tensor(name="PROBS", dtype=np.float32, shape=(-1, -1)),
                Tensor(name="LABEL", dtype=np.int64, shape=(-1,)),
            ],
        ),
        "demo_large_output": (
            large_output(LARGE_OUTPUT_ELEMENTS),
            [Tensor(name="X", dtype=np.float32, shape=(-1,))],
            [Tensor(name="Y", dtype=np.float32, shape=(-1,))],
        ),
    }

    def serve_model(name: str, fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> Any:
        def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
            out = []
            for req in requests:
                mode = faults.before(name)
                out.append(apply_output_fault(mode, fn(dict(req.items())), noise))
            return out

        return infer

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
        exit_timeout_secs=2,
        log_verbose=0,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    restricted = [e for e in args.restricted_endpoints.split(",") if e]
    with Triton(config=config, security_config=TritonSecurityConfig(restricted_endpoints=restricted)) as triton:
        for name in args.models.split(","):
            if name == "demo_llm":
                continue  # decoupled: bound below
            fn, inputs, outputs = models[name]
            triton.bind(
                model_name=name,
                infer_func=serve_model(name, fn),
                inputs=inputs,
                outputs=outputs,
                config=ModelConfig(batching=False),
                strict=False,
            )
        if "demo_llm" in args.models.split(","):
            triton.bind(
                model_name="demo_llm",
                infer_func=llm(LlmFaults(faults, "demo_llm")),
                inputs=[
                    Tensor(name="text_input", dtype=bytes, shape=(1,)),
                    Tensor(name="max_tokens", dtype=np.int32, shape=(1,), optional=True),
                    Tensor(name="temperature", dtype=np.float32, shape=(1,), optional=True),
                ],
                outputs=[Tensor(name="text_output", dtype=bytes, shape=(1,))],
                config=ModelConfig(batching=False, decoupled=True),
                strict=False,
            )
        triton.run()
        print(f"READY http=127.0.0.1:{args.http_port} models={args.models}", flush=True)
        try:
            while not stop.is_set() and triton.is_alive():
                stop.wait(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
