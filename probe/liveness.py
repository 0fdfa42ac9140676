"""The liveness verdict: which failures would a restart of Triton cure, and have they lasted long enough?"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from probe.checks.base import FAIL, PASS, CheckResult, Kind
from probe.verdict import Verdict

Clock = Callable[[], float]


@dataclass
class Liveness:
    """Turns the stream of runs into the liveness verdict the contract describes.

    A check fails liveness only when its results have been restart-worthy failures continuously for `after`
    seconds, and only once the sidecar is armed (a canary has succeeded at least once; with no canaries, Triton
    was healthy once). Before that, liveness fails only if Triton has never been healthy `startup` seconds after
    start. Output mismatches, a loading model and latency drift are not restart-worthy and never fail /live;
    `shutdown` is left out (draining must not restart the container).
    """

    after: float
    startup: float
    has_canaries: bool = True
    clock: Clock = time.monotonic
    started: float = field(default=0.0)
    armed: bool = False
    triton_ever_healthy: bool = False
    failing_since: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.started:
            self.started = self.clock()

    def observe(self, results: Mapping[str, CheckResult], started: float) -> None:
        """Take in one run's results (`started`: when the run began, monotonic)."""
        for name, r in results.items():
            if r.ok:
                self.failing_since.pop(name, None)
                if r.kind is Kind.SERVER:
                    self.triton_ever_healthy = True
                    if not self.has_canaries:
                        self.armed = True
                elif r.kind is Kind.CANARY:
                    self.armed = True
            elif r.restart_worthy:
                self.failing_since.setdefault(name, started)
            else:
                self.failing_since.pop(name, None)

    def verdict(self, results: Mapping[str, CheckResult]) -> Verdict:
        """Each check's liveness result (its reason says how far it is from failing liveness) and the aggregate."""
        now = self.clock()
        startup_expired = not self.triton_ever_healthy and now - self.started >= self.startup
        out: dict[str, CheckResult] = {}
        for name, r in results.items():
            if r.kind is Kind.SHUTDOWN:
                continue
            since = self.failing_since.get(name)
            if since is not None and self.armed and now - since >= self.after:
                reason = f"failing for {now - since:.0f}s (liveness.after {self.after:g}s): {r.reason}"
                out[name] = replace(r, status=FAIL, reason=reason)
            elif r.kind is Kind.SERVER and startup_expired and r.restart_worthy:  # not "live but not ready": loading
                out[name] = replace(
                    r, status=FAIL, reason=f"Triton not healthy within {self.startup:g}s of start: {r.reason}"
                )
            elif r.ok:
                out[name] = r
            elif not r.restart_worthy:
                out[name] = replace(r, status=PASS, reason=f"ok (not restart-worthy: {r.reason})")
            elif not self.armed:
                out[name] = replace(r, status=PASS, reason=f"ok (not counted before the first good canary: {r.reason})")
            else:
                held = now - since if since is not None else 0.0
                reason = f"ok (failing for {held:.0f}s of liveness.after {self.after:g}s: {r.reason})"
                out[name] = replace(r, status=PASS, reason=reason)
        return Verdict(all(r.ok for r in out.values()), out)
