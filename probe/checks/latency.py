"""`latency/<canary>`: is the canary as fast as when its golden file was recorded?

Judged by the canary's own check from what its runs measured (see `CanaryCheck`); never restart-worthy, since a
hung canary is the canary's failure, not this one's.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

from probe.checks.base import CheckResult, Kind, failed, passed
from probe.config import LatencyConfig


@dataclass
class LatencyTracker:
    """Recent canary latencies (seconds), and a start-up baseline from the first `window` of them."""

    window: int
    samples: deque[float] = field(init=False)
    last: float | None = None
    startup_baseline: float | None = None
    _startup: list[float] | None = field(default_factory=list)

    def __post_init__(self) -> None:
        self.samples = deque(maxlen=self.window)

    def add(self, latency_s: float) -> None:
        self.samples.append(latency_s)
        self.last = latency_s
        if self._startup is not None:
            self._startup.append(latency_s)
            if len(self._startup) >= self.window:
                self.startup_baseline = statistics.median(self._startup)
                self._startup = None

    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


def judge_latency(
    name: str, cfg: LatencyConfig, tracker: LatencyTracker, golden_baseline: tuple[float, str] | None
) -> CheckResult:
    """Fails when the last inference exceeded `max_ms`, or when the median of the last `window` canaries exceeds
    `drift` x the baseline median: the golden record's (`golden_baseline`: ms and where it came from) or, before
    one is readable, the first canaries after start. Drift is judged only once `window` canaries have completed:
    one cold sample (a fresh `probe check`) is no trend."""
    median = tracker.median()
    if median is None or tracker.last is None:
        return passed(name, Kind.LATENCY, "ok: no canary has completed yet")
    median_ms = median * 1000.0
    last_ms = tracker.last * 1000.0
    kw = {"observed_value": round(median_ms, 3), "observed_unit": "ms"}
    details = {"median_ms": median_ms, "last_ms": last_ms}
    if cfg.max_ms is not None and last_ms > cfg.max_ms:
        reason = f"last canary took {last_ms:.1f}ms > max_ms {cfg.max_ms:g}"
        return failed(name, Kind.LATENCY, reason, details=details, **kw)
    base = golden_baseline
    if base is None and tracker.startup_baseline is not None:
        base = (tracker.startup_baseline * 1000.0, "first canaries after start")
    n = len(tracker.samples)
    if base is None:
        return passed(name, Kind.LATENCY, f"ok: median {median_ms:.1f}ms over {n}", details=details, **kw)
    details["baseline_ms"] = base[0]
    if n < tracker.window:
        reason = f"ok: median {median_ms:.1f}ms over {n} of {tracker.window} (baseline {base[0]:.1f}ms; drift judged"
        return passed(name, Kind.LATENCY, reason + " once the window is full)", details=details, **kw)
    if cfg.drift is not None and base[0] > 0 and median_ms > cfg.drift * base[0]:
        reason = f"median of last {n} canaries {median_ms:.1f}ms > {cfg.drift:g} x baseline {base[0]:.1f}ms ({base[1]})"
        return failed(name, Kind.LATENCY, reason, details=details, **kw)
    reason = f"ok: median {median_ms:.1f}ms over {n} (baseline {base[0]:.1f}ms)"
    return passed(name, Kind.LATENCY, reason, details=details, **kw)
