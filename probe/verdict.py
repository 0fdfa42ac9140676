"""The verdicts everything reads: readiness here, liveness in `probe.liveness`. Each is computed by one function;
the HTTP answers, /metrics, the state-change logs and `probe check` all call it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from probe.checks.base import CheckResult


@dataclass(frozen=True)
class Verdict:
    """An aggregate verdict and the per-check results it was judged from (as that verdict sees them)."""

    ok: bool
    checks: Mapping[str, CheckResult]

    def failing(self) -> list[str]:
        return [n for n, r in self.checks.items() if not r.ok]


def readiness(results: Mapping[str, CheckResult]) -> Verdict:
    """Ready = every check passes (the instant ones included: `shutdown` fails from SIGTERM on)."""
    return Verdict(all(r.ok for r in results.values()), results)
