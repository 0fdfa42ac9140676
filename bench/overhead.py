"""Where a fresh /ready's time goes beyond the raw inference: the probe against a bare sidecar.

Two kinds of server, COPIES processes of each, all measured in one interleaved run with a raw inference:

- `bare`: the probe's own HTTP front and `Health`, with a "run" that is nothing but the canary's inference
  through `TritonClient` (no checks, no golden comparison, no metrics). This is the floor for any sidecar that
  answers over HTTP with one inference per probe: the hop plus the inference.
- `probe`: `probe serve`'s own stack (`build_sidecar` + `serve`), every check, `min_interval: 0`.

The distance between the two is what the checks, the runner and the metrics cost per fresh probe. Several
processes of each are measured because where the scheduler places a process among Triton's threads on a
2-core machine moves its ratio by a few hundredths against another process running the same code.

Run alone: python bench/overhead.py
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from dataclasses import dataclass
from typing import Any

from common import FRESH, RawInference, Stack, free_port, median, percentile, run_standalone, table, timed_get

COPIES = 3
N = 200
WARMUP = 20


def _serve(kind: str, config: str, port: int, started: Any) -> None:
    """A server process: `bare` or `probe`, on 127.0.0.1:port, until terminated."""

    async def main() -> None:
        from probe.checks.base import passed
        from probe.config import load_config
        from probe.front import serve
        from probe.runner import Run
        from probe.server import Health, make_app
        from probe.sidecar import build_sidecar

        cfg = load_config(config)
        sidecar = build_sidecar(cfg)
        await sidecar.start(background=False)
        health = sidecar.health
        if kind == "bare":
            from probe.golden import load_golden
            from probe.tensors import build_inputs

            canary = cfg.canaries[0]
            inputs = build_inputs(canary)
            outputs = tuple(load_golden(cfg.golden_path(canary.name)).records[0].outputs)
            client = sidecar.client

            class InferenceOnly:
                """Just enough of a Runner for Health: each run is one inference."""

                def __init__(self) -> None:
                    self.inflight: asyncio.Future[Run] | None = None

                def add_done_hook(self, fn: Any) -> None:
                    pass

                def cached(self) -> None:
                    return None

                def instant_passing(self) -> bool:
                    return True

                def run_future(self) -> asyncio.Future[Run]:
                    if self.inflight is None or self.inflight.done():
                        self.inflight = asyncio.ensure_future(self.run())
                    return self.inflight

                async def run(self) -> Run:
                    await client.infer(canary, inputs, outputs)
                    return Run(started=0.0, wall=0.0, duration=0.0, results={"canary": passed("canary")})

            health = Health(InferenceOnly(), sidecar.liveness, timeout=cfg.probe.timeout)  # type: ignore[arg-type]
        await serve(make_app(health), health, "127.0.0.1", port)
        started.set()
        await asyncio.Event().wait()

    asyncio.run(main())


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
            f"== a fresh /ready: the probe vs a bare sidecar (front + one inference), {COPIES} processes each ==",
            table(rows, ["", "n", "p50 ms", "p50 vs raw", "p90 vs raw"]),
            "pooled p50 vs raw: " + ", ".join(f"{k} {v:.3f}x" for k, v in pooled.items()),
        ]
        if {"bare", "probe"} <= set(pooled):
            added = pooled["probe"] - pooled["bare"]
            lines.append(
                f"what the checks, runner and metrics add per fresh probe: {added * raw:.3f} ms"
                f" ({added:.3f} of a raw inference)"
            )
        return "\n".join(lines)

    def summary(self) -> list[tuple[str, str, str, bool | None]]:
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

    ms: dict[str, list[float]] = {name: [] for name in [*bases, "raw"]}
    async with aiohttp.ClientSession() as session, RawInference(config, triton_url) as raw:
        steps: list[tuple[str, Any]] = [
            (n, lambda b=base: timed_get(session, b + "/ready")) for n, base in bases.items()
        ]
        steps.append(("raw", raw))
        for i in range(WARMUP + N):  # rotate the order, so no side always runs right after another
            k = i % len(steps)
            for name, step in steps[k:] + steps[:k]:
                seconds = await step()
                if i >= WARMUP:
                    ms[name].append(seconds * 1000)
    return Overhead(ms)


def measure(stack: Stack) -> Overhead:
    config = str(stack.config("overhead", FRESH))
    ctx = mp.get_context("fork")  # the parent has not imported probe: each child imports it afresh
    bases: dict[str, str] = {}
    procs = []
    try:
        for i in range(COPIES):
            for kind in ("bare", "probe"):
                port = free_port()
                started = ctx.Event()
                proc = ctx.Process(target=_serve, args=(kind, config, port, started), daemon=True)
                proc.start()
                procs.append(proc)
                if not started.wait(60):
                    raise RuntimeError(f"{kind} server did not start")
                bases[f"{kind}#{i}"] = f"http://127.0.0.1:{port}"
        return asyncio.run(_measure(bases, stack.triton_url, config))
    finally:
        for proc in procs:
            proc.terminate()
            proc.join(10)


if __name__ == "__main__":
    run_standalone(measure)
