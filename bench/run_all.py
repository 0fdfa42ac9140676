"""Every benchmark from one run against one local Triton, then one table of the figures against their targets.

    make bench              (or: python bench/run_all.py)

Each figure is a ratio of two things measured side by side in the same run, interleaved where it matters,
because the machine is shared and absolute numbers drift:

    (a) ready_vs_raw.py   fresh /ready vs a raw inference: 20 ms model <= 1.05x, 2-4 ms CPU demo model <= 1.35x
    (b) throughput.py     cached /ready req/s vs Triton's own /v2/health/ready >= 0.25x
    (c) large_output.py   a canary with a 16 MiB output vs the leanest raw client <= 1.25x
    (d) fanout.py         16 canaries in one /ready vs 16 concurrent raw inferences <= 1.30x
    (e) idle.py           the idle sidecar at production defaults <= 0.5% of one core
    (f) footprint.py      RSS <= 80 MB; exec to first /live/ping <= 1 s
    stream_vs_raw.py      a streaming canary's first event and whole answer vs a raw aiohttp SSE client <= 1.10x
    and, for information: overhead.py (probe serve vs a bare sidecar), digest.py (xxh3_128 vs sha256)

Exits 0 whether targets pass or miss; non-zero only if a benchmark crashed.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import digest
import fanout
import footprint
import idle
import large_output
import overhead
import ready_vs_raw
import stream_vs_raw
import throughput
from common import Stack, mark, print_machine, stack, table

BENCHMARKS: list[tuple[str, Callable[[Stack], Any]]] = [
    ("ready_vs_raw", ready_vs_raw.measure),
    ("stream_vs_raw", stream_vs_raw.measure),
    ("throughput", throughput.measure),
    ("large_output", large_output.measure),
    ("fanout", fanout.measure),
    ("idle", idle.measure),
    ("footprint", footprint.measure),
    ("overhead", overhead.measure),
    ("digest", digest.measure),
]


def main() -> int:
    t0 = time.perf_counter()
    print_machine()
    summary: list[tuple[str, str, str, bool | None]] = []
    crashed: list[str] = []
    with stack() as s:
        for name, measure in BENCHMARKS:
            started = time.perf_counter()
            try:
                result = measure(s)
            except Exception:
                traceback.print_exc()
                crashed.append(name)
                summary.append((name, "crashed", "", False))
                continue
            print()
            print(result.report())
            print(f"({name}: {time.perf_counter() - started:.1f}s)")
            summary.extend(result.summary())
    print()
    print("== summary ==")
    rows = [[what, value, target, "info" if ok is None else mark(ok)] for what, value, target, ok in summary]
    print(table(rows, ["figure", "measured", "target", "result"]))
    print_machine()
    print(f"total {time.perf_counter() - t0:.0f}s; the numbers are noisy on a shared machine, the ratios much less so")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
