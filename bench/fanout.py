"""(d) 16 canaries in one `/ready` vs 16 concurrent raw inferences.

`probe serve` runs 16 canaries of the demo classifier (same input, 16 names, 16 goldens) with `min_interval: 0`:
each `/ready` sends all 16 inferences at once on the sidecar's one client session and compares 16 outputs before
it answers. The raw side sends 16 `tritonclient.http.aio` inferences of the same input at once on one client
(`asyncio.gather`) and waits for the last. Both are timed to their last answer, interleaved in one run.

Run alone: python bench/fanout.py
"""

from __future__ import annotations

import asyncio
import gc
import time
from dataclasses import dataclass

from common import (
    FANOUT_CANARIES,
    FRESH,
    RawInference,
    Stack,
    Summary,
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
TARGET = 1.30  # /ready p50 at most this many times 16 concurrent raw inferences'


@dataclass
class Fanout:
    ms: dict[str, list[float]]

    @property
    def ratio(self) -> float:
        return median(self.ms["ready"]) / median(self.ms["raw"])

    @property
    def ok(self) -> bool:
        return self.ratio <= TARGET

    def report(self) -> str:
        n = len(FANOUT_CANARIES)
        labels = {"ready": f"/ready ({n} fresh canaries)", "raw": f"{n} concurrent raw tritonclient.aio infers"}
        raw = median(self.ms["raw"])
        rows: list[list[object]] = [
            [labels[k], len(v), f"{median(v):.2f}", f"{percentile(v, 90):.2f}", f"{median(v) / raw:.3f}x"]
            for k, v in self.ms.items()
        ]
        return "\n".join(
            [
                f"== (d) {n} canaries in one /ready vs {n} concurrent raw inferences (interleaved) ==",
                table(rows, ["", "n", "p50 ms", "p90 ms", "p50 vs raw"]),
                f"target: p50 ratio <= {TARGET}x -> {mark(self.ok)}",
            ]
        )

    def summary(self) -> Summary:
        return [
            (
                f"(d) {len(FANOUT_CANARIES)} canaries in one /ready vs as many concurrent raw infers, p50",
                f"{self.ratio:.3f}x ({median(self.ms['ready']):.1f} vs {median(self.ms['raw']):.1f} ms)",
                f"<= {TARGET}x",
                self.ok,
            )
        ]


async def _measure(base: str, triton_url: str, config: str) -> Fanout:
    import aiohttp

    n = len(FANOUT_CANARIES)
    async with aiohttp.ClientSession() as session, RawInference(config, triton_url) as raw:

        async def concurrent() -> float:
            start = time.perf_counter()
            await asyncio.gather(*(raw() for _ in range(n)))
            return time.perf_counter() - start

        steps = {"ready": lambda: timed_get(session, base + "/ready"), "raw": concurrent}
        await interleave(steps, 0, WARMUP)
        gc.collect()
        return Fanout(await interleave(steps, N, 0))


def measure(stack: Stack) -> Fanout:
    proc = stack.serve("fanout", FRESH, FANOUT_CANARIES)
    try:
        return asyncio.run(_measure(proc.base, stack.triton_url, str(stack.tmp / "fanout" / "probe.yaml")))
    finally:
        stack.stop(proc)


if __name__ == "__main__":
    run_standalone(measure)
