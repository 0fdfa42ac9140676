"""(a) `/ready` with a fresh canary on every request vs a raw `tritonclient.http.aio` inference of the same input.

Two models: the demo classifier (2-4 ms on this CPU) and the same classifier with a fixed 20 ms service time, the
size of a GPU model's inference, where what the sidecar adds is a small fraction of what the model takes.

`probe serve` runs with `min_interval: 0`, so each `/ready` runs every check (Triton live+ready, model ready,
the canary inference and its digest comparison) before it answers. The raw side sends the same model the same
tensor and decodes the same outputs, as a client writes it (new `InferInput`s each time, tritonclient's own
aiohttp session, which asks for gzip), on its own warm connection. Requests are sequential and interleaved
(ready, raw, ping; raw, ping, ready; ...) so drift from other load on the machine hits all sides alike.
`/live/ping` runs no check: it is the sidecar's HTTP round trip alone, and (raw + ping) / raw is what a sidecar
scores whose canary costs exactly what the raw inference does. The sidecar's CPU time is read from /proc around
each `/ready` only.

It runs ROUNDS rounds per model, each against a freshly started `probe serve`, and pools them: on a 2-core machine
where Triton's threads, its Python-backend stub, the sidecar and this process share the cores, where the scheduler
puts one sidecar process shifts its ratio by a few hundredths against another process running the same code.
Each round's own ratio is printed too. The target is on the pooled p50.

Run alone: python bench/ready_vs_raw.py
"""

from __future__ import annotations

import asyncio
import gc
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from common import (
    DEMO_CANARY,
    FRESH,
    PACED_CANARY,
    RawInference,
    Stack,
    Summary,
    cpu_seconds,
    interleave,
    mark,
    median,
    percentile,
    run_standalone,
    table,
    timed_get,
    vm_status,
)

ROUNDS = 3


@dataclass(frozen=True)
class Case:
    name: str
    canary: dict[str, Any]
    label: str
    target: float
    """Pooled p50 of /ready at most this many times the raw inference's."""
    n: int
    warmup: int


CASES = (
    Case("paced", PACED_CANARY, "model with a 20 ms service time", 1.05, n=100, warmup=10),
    Case("demo", DEMO_CANARY, "2-4 ms CPU demo model", 1.35, n=200, warmup=20),
)


@dataclass
class ReadyVsRaw:
    case: Case
    ready_ms: list[float]
    raw_ms: list[float]
    ping_ms: list[float]
    """The sidecar's own HTTP round trip (/live/ping runs no check): what any sidecar answer pays on top."""
    canary_runs: int
    sidecar_canary_ms: float
    """Mean canary inference time as the sidecar itself measured it (from its /metrics histogram)."""
    rounds: list[float] = field(default_factory=list)
    """p50 ratio of each round (one sidecar process each)."""
    sidecar_rss: int = 0
    sidecar_cpu_s: float = 0.0
    """CPU seconds the sidecar process ran while answering the measured /ready requests."""
    raw_cpu_s: float = 0.0
    """CPU seconds this process ran for the raw inferences (the client side of the same inference)."""

    @property
    def p50_ratio(self) -> float:
        return median(self.ready_ms) / median(self.raw_ms)

    @property
    def p90_ratio(self) -> float:
        return percentile(self.ready_ms, 90) / percentile(self.raw_ms, 90)

    @property
    def hop_ratio(self) -> float:
        return (median(self.raw_ms) + median(self.ping_ms)) / median(self.raw_ms)

    @property
    def ok(self) -> bool:
        return self.p50_ratio <= self.case.target and self.canary_runs >= len(self.ready_ms)

    def report(self) -> str:
        def row(label: str, ms: list[float]) -> list[object]:
            return [label, len(ms), f"{median(ms):.2f}", f"{percentile(ms, 90):.2f}", f"{min(ms):.2f}"]

        rows: list[list[object]] = [
            row("/ready (fresh canary)", self.ready_ms),
            row("raw tritonclient.aio infer", self.raw_ms),
            row("/live/ping (the HTTP hop alone)", self.ping_ms),
            ["ratio", "", f"{self.p50_ratio:.3f}x", f"{self.p90_ratio:.3f}x", ""],
        ]
        n = len(self.ready_ms)
        lines = [
            f"== (a) /ready with a fresh canary vs a raw inference, {self.case.label} ({self.case.canary['model']}) ==",
            table(rows, ["", "n", "p50 ms", "p90 ms", "min ms"]),
            f"p50 ratio of each round (a fresh sidecar process each): {', '.join(f'{r:.3f}x' for r in self.rounds)}",
            f"canary runs behind those /ready answers: {self.canary_runs} (every request ran the canary)"
            if self.canary_runs >= n
            else f"WARNING: only {self.canary_runs} canary runs for {n} /ready answers",
            f"the sidecar's own mean canary inference time (its /metrics histogram): {self.sidecar_canary_ms:.2f} ms"
            f" (raw inference mean {sum(self.raw_ms) / len(self.raw_ms):.2f} ms)",
            f"the hop on top of a raw inference, (raw + ping) / raw at p50: {self.hop_ratio:.3f}x",
            f"CPU per answer: sidecar {self.sidecar_cpu_s / n * 1e6:.0f} us per fresh /ready,"
            f" raw client {self.raw_cpu_s / len(self.raw_ms) * 1e6:.0f} us per inference;"
            f" sidecar VmRSS after the run: {self.sidecar_rss / 1e6:.1f} MB",
            f"target: pooled p50 ratio <= {self.case.target}x -> {mark(self.ok)}",
        ]
        return "\n".join(lines)

    def summary(self) -> Summary:
        return [
            (
                f"(a) fresh /ready vs raw infer, {self.case.label}: p50 ({len(self.rounds)} rounds pooled)",
                f"{self.p50_ratio:.3f}x (rounds {', '.join(f'{r:.2f}' for r in self.rounds)}; p90"
                f" {self.p90_ratio:.2f}x; {median(self.ready_ms):.2f} vs {median(self.raw_ms):.2f} ms)",
                f"<= {self.case.target}x",
                self.ok,
            )
        ]


@dataclass
class ReadyVsRawAll:
    parts: list[ReadyVsRaw]

    def report(self) -> str:
        return "\n\n".join(p.report() for p in self.parts)

    def summary(self) -> Summary:
        return [row for p in self.parts for row in p.summary()]


_METRIC = re.compile(r'^probe_(canary_latency_seconds_(?:sum|count)|runs_total)(?:\{canary="[^"]*"\})? (\S+)$', re.M)


async def _metrics(session: Any, base: str) -> dict[str, float]:
    async with session.get(base + "/metrics") as r:
        text = await r.text()
    return {m.group(1): float(m.group(2)) for m in _METRIC.finditer(text)}


async def _measure(case: Case, base: str, triton_url: str, config_path: str, pid: int) -> ReadyVsRaw:
    import aiohttp

    cpu = raw_cpu = 0.0
    measuring = False
    async with aiohttp.ClientSession() as session, RawInference(config_path, triton_url) as raw:

        async def fresh() -> float:
            nonlocal cpu
            before = cpu_seconds(pid)
            seconds = await timed_get(session, base + "/ready")
            if measuring:
                cpu += cpu_seconds(pid) - before
            return seconds

        async def direct() -> float:
            nonlocal raw_cpu
            before = time.process_time()
            seconds = await raw()
            if measuring:
                raw_cpu += time.process_time() - before
            return seconds

        async def hop() -> float:
            return await timed_get(session, base + "/live/ping", must_pass=False)

        steps = {"ready": fresh, "raw": direct, "ping": hop}
        await interleave(steps, 0, case.warmup)
        before = await _metrics(session, base)
        gc.collect()
        measuring = True
        ms = await interleave(steps, case.n, 0)
        after = await _metrics(session, base)
    runs = int(after.get("runs_total", 0) - before.get("runs_total", 0))
    count = after.get("canary_latency_seconds_count", 0) - before.get("canary_latency_seconds_count", 0)
    total = after.get("canary_latency_seconds_sum", 0) - before.get("canary_latency_seconds_sum", 0)
    return ReadyVsRaw(
        case=case,
        ready_ms=ms["ready"],
        raw_ms=ms["raw"],
        ping_ms=ms["ping"],
        canary_runs=runs,
        sidecar_canary_ms=total / count * 1000 if count else float("nan"),
        sidecar_cpu_s=cpu,
        raw_cpu_s=raw_cpu,
    )


def _round(stack: Stack, case: Case) -> ReadyVsRaw:
    proc = stack.serve(f"fresh-{case.name}", FRESH, [case.canary])
    try:
        cfg = stack.tmp / f"fresh-{case.name}" / "probe.yaml"
        result = asyncio.run(_measure(case, proc.base, stack.triton_url, str(cfg), proc.process.pid))
        result.sidecar_rss = vm_status(proc.process.pid)["VmRSS"]
        return result
    finally:
        stack.stop(proc)


def measure_case(stack: Stack, case: Case) -> ReadyVsRaw:
    parts = [_round(stack, case) for _ in range(ROUNDS)]
    runs = sum(p.canary_runs for p in parts)
    canary_ms = sum(p.sidecar_canary_ms * p.canary_runs for p in parts if p.canary_runs) / runs if runs else math.nan
    return ReadyVsRaw(
        case=case,
        ready_ms=[v for p in parts for v in p.ready_ms],
        raw_ms=[v for p in parts for v in p.raw_ms],
        ping_ms=[v for p in parts for v in p.ping_ms],
        canary_runs=runs,
        sidecar_canary_ms=canary_ms,
        rounds=[p.p50_ratio for p in parts],
        sidecar_rss=max(p.sidecar_rss for p in parts),
        sidecar_cpu_s=sum(p.sidecar_cpu_s for p in parts),
        raw_cpu_s=sum(p.raw_cpu_s for p in parts),
    )


def measure(stack: Stack) -> ReadyVsRawAll:
    return ReadyVsRawAll([measure_case(stack, case) for case in CASES])


if __name__ == "__main__":
    run_standalone(measure)
