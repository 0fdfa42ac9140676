"""`latency/<canary>`: is the canary as fast as when its golden file was recorded?"""

from __future__ import annotations

from probe.checks.base import CheckResult, failed, passed
from probe.checks.canary import LatencyTracker
from probe.config import CanaryConfig
from probe.golden import GoldenStore


class LatencyCheck:
    """Judges the canary latencies the canary check measured in this and recent runs.

    Fails when the last inference exceeded `latency.max_ms`, or when the median of the last `latency.window`
    canaries exceeds `latency.drift` x the baseline median (the golden record's; before one is readable, the
    first canaries after start). Never restart-worthy; a hung canary is the canary check's failure, not this.
    """

    timeout: float | None = None
    derived = True  # reads what the canary check of the same run measured

    def __init__(self, canary: CanaryConfig, tracker: LatencyTracker, golden: GoldenStore) -> None:
        self.canary = canary
        self._tracker = tracker
        self._golden = golden
        self.name = f"latency/{canary.name}"

    def baseline_ms(self) -> tuple[float, str] | None:
        golden = self._golden.cached()  # never reads a file: the canary check of this run just loaded it
        if golden is not None:
            rec = golden.records[-1]
            return rec.latency.median_ms, f"golden, recorded {rec.recorded_at}"
        if self._tracker.startup_baseline is not None:
            return self._tracker.startup_baseline * 1000.0, "first canaries after start"
        return None

    async def run(self) -> CheckResult:
        return self.now()

    def now(self) -> CheckResult:
        """Reads the tracker and the golden baseline: never waits."""
        lat = self.canary.latency
        t = self._tracker
        median = t.median()
        if median is None or t.last is None:
            return passed(self.name, "ok: no canary has completed yet")
        median_ms = median * 1000.0
        last_ms = t.last * 1000.0
        kw = {"observed_value": round(median_ms, 3), "observed_unit": "ms"}
        details = {"median_ms": median_ms, "last_ms": last_ms}
        if lat.max_ms is not None and last_ms > lat.max_ms:
            return failed(self.name, f"last canary took {last_ms:.1f}ms > max_ms {lat.max_ms:g}", details=details, **kw)
        base = self.baseline_ms()
        n = len(t.samples)
        if base is not None:
            details["baseline_ms"] = base[0]
            if lat.drift is not None and base[0] > 0 and median_ms > lat.drift * base[0]:
                return failed(
                    self.name,
                    f"median of last {n} canaries {median_ms:.1f}ms > {lat.drift:g} x baseline {base[0]:.1f}ms "
                    f"({base[1]})",
                    details=details,
                    **kw,
                )
            return passed(
                self.name,
                f"ok: median {median_ms:.1f}ms over {n} (baseline {base[0]:.1f}ms)",
                details=details,
                **kw,
            )
        return passed(self.name, f"ok: median {median_ms:.1f}ms over {n}", details=details, **kw)
