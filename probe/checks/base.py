"""What every check is and returns.

A check is a small object with a `name` and an async `run()` returning a `CheckResult`. An expected failure
(Triton down, a wrong output, too little GPU memory) is a result with a reason, never an exception; the
runner owns deadlines, timing and caching, so a check never sleeps, loops or sets its own alarm.

A check may also have a synchronous `now()` that returns its result when it can be had without waiting (a
read of what is already in memory), or None when `run()` must wait. The runner calls it first, which spares
such checks a task, a timer and a coroutine on every run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

PASS = "pass"
FAIL = "fail"


@dataclass(slots=True)
class CheckResult:
    """The verdict of one check at one moment. Never changed once built: make a changed copy instead.

    Not `frozen=True`: a frozen dataclass costs four times as much to build, and several are built on every
    run of every probe.

    `restart_worthy` marks failures a restart of Triton could cure (unreachable, hung or erroring inference,
    GPU headroom exhausted); only those count toward liveness. `details` carries data other parts use
    (latency seconds, max errors, GPU samples) without parsing the reason.
    """

    name: str
    status: str
    reason: str = "ok"
    observed_value: float | None = None
    observed_unit: str | None = None
    restart_worthy: bool = False
    time: float = field(default_factory=time.time)
    duration: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == PASS

    def with_timing(self, started_wall: float, duration: float) -> CheckResult:
        # A direct constructor call: dataclasses.replace costs several times more, on every check of every run.
        return CheckResult(
            self.name,
            self.status,
            self.reason,
            self.observed_value,
            self.observed_unit,
            self.restart_worthy,
            started_wall,
            duration,
            self.details,
        )


def passed(name: str, reason: str = "ok", **kw: Any) -> CheckResult:
    return CheckResult(name=name, status=PASS, reason=reason, **kw)


def failed(name: str, reason: str, **kw: Any) -> CheckResult:
    return CheckResult(name=name, status=FAIL, reason=reason, **kw)


@runtime_checkable
class Check(Protocol):
    """A named health check. `timeout` (seconds) is the check's own deadline, None = the probe's."""

    @property
    def name(self) -> str: ...

    @property
    def timeout(self) -> float | None: ...

    async def run(self) -> CheckResult: ...
