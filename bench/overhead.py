"""Where a fresh /ready's time goes beyond the raw inference: `probe serve` against a bare sidecar.

Two kinds of server, COPIES processes of each, all measured in one interleaved run with a raw inference of the
demo classifier:

- `bare`: the probe's own HTTP stack (aiohttp's low-level server through `probe.server.serve`, `Health`, the
  `Runner`) with one check that is nothing but the canary's inference through `TritonClient.infer`: no `triton`
  check, no golden comparison, no latency window, no liveness, metrics or logs. This is the floor for a sidecar
  built this way that answers each probe with one inference: the hop, the runner and the client.
- `probe`: `probe serve` itself, every check, `min_interval: 0`.

The distance between the two is what the checks and their bookkeeping cost per fresh probe. Several processes of
each are measured because where the scheduler places a process among Triton's threads on a 2-core machine moves
its ratio by a few hundredths against another process running the same code.

Run alone: python bench/overhead.py
(`python bench/overhead.py --bare CONFIG PORT` is one bare server, as this benchmark starts it.)
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    FRESH,
    RawInference,
    Stack,
    Summary,
    free_port,
    interleave,
    median,
    percentile,
    run_standalone,
    table,
    timed_get,
    wait_for,
)

COPIES = 3
N = 200
WARMUP = 20


async def _serve_bare(config: str, port: int) -> None:
    """A bare sidecar on 127.0.0.1:port until killed: see the module docstring."""
    from probe.checks.base import CheckResult, Kind, failed, passed
    from probe.config import load_config
    from probe.golden import load_golden
    from probe.liveness import Liveness
    from probe.runner import Runner
    from probe.server import Health, serve
    from probe.tensors import build_inputs
    from probe.triton import TritonClient

    cfg = load_config(config)
    canary = cfg.canaries[0]
    inputs = build_inputs(canary)
    outputs = tuple(load_golden(cfg.golden_path(canary.name)).records[0].outputs)
    client = TritonClient(cfg.triton.url)
    await client.open()

    class InferenceOnly:
        """One inference, passed when Triton answered: no comparison, nothing recorded."""

        names = ("canary",)
        timeout = None

        async def run(self) -> Sequence[CheckResult]:
            await client.infer(canary, inputs, outputs, max_reply=cfg.triton.max_reply)
            return [passed("canary", Kind.CANARY)]

        def timed_out(self, after: float) -> Sequence[CheckResult]:
            return [failed("canary", Kind.CANARY, f"timed out after {after:.3f}s")]

    runner = Runner([InferenceOnly()], timeout=cfg.probe.timeout, min_interval=0)
    health = Health(runner, Liveness(after=60, startup=600), timeout=cfg.probe.timeout)
    await serve(health, "127.0.0.1", port)
    await asyncio.Event().wait()


@contextlib.contextmanager
def bare_sidecar(config: Path) -> Iterator[str]:
    """A bare sidecar as its own process (a fresh interpreter, like `probe serve`): its base URL; killed by pid."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--bare", str(config), str(port)])
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError("the bare sidecar exited")
        try:
            with urllib.request.urlopen(base + "/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    try:
        wait_for(up, 60, "the bare sidecar to answer /ready", every=0.05)
        yield base
    finally:
        proc.kill()
        proc.wait(timeout=10)


@dataclass
class Overhead:
    ms: dict[str, list[float]]

    def ratio(self, name: str, q: float = 50) -> float:
        return percentile(self.ms[name], q) / percentile(self.ms["raw"], q)

    def pooled(self) -> dict[str, float]:
        """p50 of every process of a kind together, as a ratio to the raw inference's p50."""
        raw = median(self.ms["raw"])
        kinds = sorted({k.split("#")[0] for k in self.ms if k != "raw"})
        return {
            kind: median([v for k, vs in self.ms.items() if k.startswith(kind + "#") for v in vs]) / raw
            for kind in kinds
        }

    def report(self) -> str:
        rows: list[list[object]] = []
        for name, values in self.ms.items():
            rows.append(
                [name, len(values), f"{median(values):.2f}", f"{self.ratio(name):.3f}x", f"{self.ratio(name, 90):.3f}x"]
            )
        pooled = self.pooled()
        raw = median(self.ms["raw"])
        lines = [
            f"== a fresh /ready: probe serve vs a bare sidecar (server + runner + one inference), {COPIES} each ==",
            table(rows, ["", "n", "p50 ms", "p50 vs raw", "p90 vs raw"]),
            "pooled p50 vs raw: " + ", ".join(f"{k} {v:.3f}x" for k, v in pooled.items()),
        ]
        if {"bare", "probe"} <= set(pooled):
            added = pooled["probe"] - pooled["bare"]
            lines.append(
                f"what the checks and their bookkeeping add per fresh probe: {added * raw:.3f} ms"
                f" ({added:.3f} of a raw inference)"
            )
        return "\n".join(lines)

    def summary(self) -> Summary:
        p = self.pooled()
        return [
            (
                f"fresh /ready, {COPIES}+{COPIES} processes interleaved: bare sidecar, probe (p50 vs raw)",
                f"{p.get('bare', float('nan')):.2f}x, {p.get('probe', float('nan')):.2f}x",
                "(info)",
                None,
            )
        ]


async def _measure(bases: dict[str, str], triton_url: str, config: str) -> Overhead:
    import aiohttp

    async with aiohttp.ClientSession() as session, RawInference(config, triton_url) as raw:
        steps: dict[str, Any] = {n: (lambda b=base: timed_get(session, b + "/ready")) for n, base in bases.items()}
        steps["raw"] = raw
        return Overhead(await interleave(steps, N, WARMUP))


def measure(stack: Stack) -> Overhead:
    config = stack.config("overhead", FRESH)
    bases: dict[str, str] = {}
    with contextlib.ExitStack() as started:
        for i in range(COPIES):
            bases[f"bare#{i}"] = started.enter_context(bare_sidecar(config))
            proc = stack.serve(f"overhead{i}", FRESH)
            started.callback(stack.stop, proc)
            bases[f"probe#{i}"] = proc.base
        return asyncio.run(_measure(bases, stack.triton_url, str(config)))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bare"]:
        asyncio.run(_serve_bare(sys.argv[2], int(sys.argv[3])))
    else:
        run_standalone(measure)
