"""(c) A canary with a 16 MiB output: a fresh `/ready` vs the leanest raw client of the same inference.

`demo_large_output` answers one FP32 [4194304] tensor (16 MiB). `probe serve` runs that one canary with
`min_interval: 0`, so each `/ready` reads the whole reply, decodes it and digests it against the golden before it
answers. The raw side is `LeanInference` (bench/common.py): the request body built once, keep-alive, identity
encoding, the reply read whole and decoded as views on its buffer; what any client must do at the least.
`/live/ping` is the sidecar's HTTP round trip alone. All three are interleaved in one run.

Run alone: python bench/large_output.py
"""

from __future__ import annotations

import asyncio
import gc
import resource
from dataclasses import dataclass

from common import (
    FRESH,
    LARGE_CANARY,
    LeanInference,
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
)

N = 100
WARMUP = 10
TARGET = 1.25  # /ready p50 at most this many times the lean client's


@dataclass
class LargeOutput:
    ms: dict[str, list[float]]
    sidecar_cpu_s: float
    sidecar_faults: float
    """Minor page faults of the sidecar per fresh /ready (memory handed back to the kernel and touched again)."""
    lean_faults: float
    """The same for the lean client (this process) per inference."""

    @property
    def ratio(self) -> float:
        return median(self.ms["ready"]) / median(self.ms["lean"])

    @property
    def ok(self) -> bool:
        return self.ratio <= TARGET

    def report(self) -> str:
        labels = {
            "ready": "/ready (fresh 16 MiB canary)",
            "lean": "lean raw client (prebuilt, identity)",
            "ping": "/live/ping (the HTTP hop alone)",
        }
        lean = median(self.ms["lean"])
        rows: list[list[object]] = [
            [labels[k], len(v), f"{median(v):.2f}", f"{percentile(v, 90):.2f}", f"{median(v) / lean:.3f}x"]
            for k, v in self.ms.items()
        ]
        extra = median(self.ms["ready"]) - lean
        return "\n".join(
            [
                "== (c) a canary with a 16 MiB output vs the leanest raw client (sequential, interleaved) ==",
                table(rows, ["", "n", "p50 ms", "p90 ms", "p50 vs lean"]),
                f"the sidecar adds {extra:.2f} ms at p50 (hop {median(self.ms['ping']):.2f} ms); its CPU per fresh"
                f" /ready: {self.sidecar_cpu_s / len(self.ms['ready']) * 1e3:.2f} ms",
                f"minor page faults per call: sidecar {self.sidecar_faults:.0f} per /ready, lean client"
                f" {self.lean_faults:.0f} per inference (16 MiB is 4096 pages)",
                f"target: p50 ratio <= {TARGET}x -> {mark(self.ok)}",
            ]
        )

    def summary(self) -> Summary:
        return [
            (
                "(c) 16 MiB canary: fresh /ready vs lean raw client, p50",
                f"{self.ratio:.3f}x ({median(self.ms['ready']):.1f} vs {median(self.ms['lean']):.1f} ms)",
                f"<= {TARGET}x",
                self.ok,
            )
        ]


async def _measure(base: str, triton_url: str, config: str, pid: int) -> LargeOutput:
    import aiohttp

    cpu = 0.0
    faults = {"ready": 0, "lean": 0}
    async with aiohttp.ClientSession() as session, LeanInference(config, triton_url) as lean:

        async def fresh() -> float:
            nonlocal cpu
            before, faulted = cpu_seconds(pid), _minor_faults(pid)
            seconds = await timed_get(session, base + "/ready")
            cpu += cpu_seconds(pid) - before
            faults["ready"] += _minor_faults(pid) - faulted
            return seconds

        async def direct() -> float:
            faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            seconds = await lean()
            faults["lean"] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted
            return seconds

        steps = {"ready": fresh, "lean": direct, "ping": lambda: timed_get(session, base + "/live/ping")}
        await interleave(steps, 0, WARMUP)
        cpu = 0.0
        faults = dict.fromkeys(faults, 0)
        gc.collect()
        ms = await interleave(steps, N, 0)
    return LargeOutput(ms, cpu, faults["ready"] / N, faults["lean"] / N)


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[7])


def measure(stack: Stack) -> LargeOutput:
    proc = stack.serve("large", FRESH, [LARGE_CANARY])
    try:
        config = str(stack.tmp / "large" / "probe.yaml")
        return asyncio.run(_measure(proc.base, stack.triton_url, config, proc.process.pid))
    finally:
        stack.stop(proc)


if __name__ == "__main__":
    run_standalone(measure)
