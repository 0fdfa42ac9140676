"""Every benchmark from one run against one local Triton, then a summary with the targets.

    make bench              (or: python bench/run_all.py)

Each figure is a ratio of two things measured in the same run, interleaved where it matters, because the
machine is shared and absolute numbers drift. Exits 0 whether targets pass or miss; non-zero only if a
benchmark crashed. Scripts for one benchmark each: ready_vs_raw.py, stream_vs_raw.py, overhead.py, throughput.py,
digest.py, footprint.py.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import digest
import footprint
import overhead
import ready_vs_raw
import stream_vs_raw
import throughput
from common import Stack, mark, print_machine, stack, table

BENCHMARKS: list[tuple[str, Callable[[Stack], Any]]] = [
    ("ready_vs_raw", ready_vs_raw.measure),
    ("stream_vs_raw", stream_vs_raw.measure),
    ("overhead", overhead.measure),
    ("throughput", throughput.measure),
    ("digest", digest.measure),
    ("footprint", footprint.measure),
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
    print(table(rows, ["benchmark", "measured", "target", "result"]))
    print_machine()
    print(f"total {time.perf_counter() - t0:.0f}s; the numbers are noisy on a shared machine, the ratios much less so")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
