"""The `gpu` check: enough free memory on every watched GPU, judged from the sampler's latest sample.

The check never touches NVML or the network itself: a sampler (`probe.gpu`) does that on its own thread or
task, and this check only reads the newest sample, so it answers instantly even while the driver hangs.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from probe.checks.base import CheckResult, Kind, failed, passed
from probe.config import GpuConfig, format_bytes
from probe.gpu import Clock, GpuMemory, GpuSample, GpuSampler


class GpuCheck:
    """GPU memory headroom.

    Fails when there is no sample yet, when the latest sample is older than `cfg.stale_limit` (an NVML call
    hung or the sampler stopped), when sampling failed (the sample's error is the reason), or when any
    device's free memory is below `cfg.min_free` (bytes, or a percentage of that device's total). Only the
    headroom failure is restart-worthy: restarting Triton frees its memory, but cannot fix a driver.
    """

    names = ("gpu",)
    name = "gpu"
    timeout: float | None = None  # reading a sample never blocks; the probe's deadline is plenty

    def __init__(self, source: GpuSampler, cfg: GpuConfig, *, clock: Clock = time.monotonic) -> None:
        self._source = source
        self._cfg = cfg
        self._clock = clock

    async def run(self) -> tuple[CheckResult]:
        return (self.now(),)

    def timed_out(self, after: float) -> tuple[CheckResult]:  # pragma: no cover - reading a sample never waits
        return (failed(self.name, Kind.GPU, f"reading the GPU sample took over {after:.2f}s"),)

    async def explain_timeout(self, after: float) -> tuple[CheckResult]:  # pragma: no cover - see timed_out
        return self.timed_out(after)

    def now(self) -> CheckResult:
        """Reads the sampler's latest sample: never waits (the sampler's thread or task does the waiting)."""
        sample = self._source.latest()
        if sample is None:
            return failed(self.name, Kind.GPU, "no GPU sample yet")
        age = self._clock() - sample.taken_at
        limit = self._cfg.stale_limit
        if age > limit:
            return failed(
                self.name,
                Kind.GPU,
                f"GPU sample is {age:.1f}s old (limit {limit:.1f}s): NVML call hung or sampler stopped",
            )
        if sample.error is not None:
            return failed(self.name, Kind.GPU, sample.error)
        if not sample.devices:
            return failed(self.name, Kind.GPU, "no GPU selected")
        return self._judge(sample, age)

    def _judge(self, sample: GpuSample, age: float) -> CheckResult:
        gpus = {d.gpu for d in sample.devices}
        trend = {gpu: slope for gpu, slope in self._source.trend().items() if gpu in gpus}
        details: dict[str, Any] = {
            "devices": [asdict(d) for d in sample.devices],
            "trend_bytes_per_minute": trend,
            "sample_age_seconds": age,
        }
        tightest = min(sample.devices, key=lambda d: d.free)
        common: dict[str, Any] = {
            "observed_value": float(tightest.free),
            "observed_unit": "bytes",
            "details": details,
        }
        short = [d for d in sample.devices if d.free < self._cfg.min_free.threshold(d.total)]
        suffix = _trend_suffix(trend, several=len(sample.devices) > 1)
        if short:
            reason = "; ".join(f"{_label(d)} free {format_bytes(d.free)} < {self._threshold(d)}" for d in short)
            return failed(self.name, Kind.GPU, reason + suffix, restart_worthy=True, **common)
        head = f"{tightest.gpu} free {format_bytes(tightest.free)} of {format_bytes(tightest.total)}"
        if len(sample.devices) > 1:
            head = f"{len(sample.devices)} GPUs, least free {head}"
        return passed(self.name, Kind.GPU, f"ok: {head}{suffix}", **common)

    def _threshold(self, d: GpuMemory) -> str:
        limit = self._cfg.min_free.threshold(d.total)
        if self._cfg.min_free.percent is not None:
            return f"min_free {self._cfg.min_free.percent:g}% ({format_bytes(limit)})"
        return f"min_free {format_bytes(limit)}"


def _label(d: GpuMemory) -> str:
    return f"{d.gpu} ({d.name})" if d.name else d.gpu


def _trend_suffix(trend: dict[str, float], *, several: bool) -> str:
    """`; used +12.0MiB/min` for the fastest-growing GPU (named when there are several): a leak shows here
    long before the headroom runs out."""
    if not trend:
        return ""
    gpu, slope = max(trend.items(), key=lambda kv: kv[1])
    sign = "-" if slope < 0 and format_bytes(-slope) != "0B" else "+"
    where = f" on {gpu}" if several else ""
    return f"; used {sign}{format_bytes(abs(slope))}/min{where}"
