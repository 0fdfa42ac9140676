"""What every check is and returns.

A check is a small object that the runner calls under a deadline. It declares in its type everything the runner
reads: the names of the results it produces (a canary produces `model/`, `canary/` and `latency/` from one run),
its own deadline, and what its results are when the runner cuts it off at that deadline. An expected failure
(Triton down, a wrong output, too little GPU memory) is a result with a reason, never an exception; the runner owns
deadlines, timing and caching, so a check never sleeps, loops or sets its own alarm.

Instant checks (`shutdown`, `ping`) read the sidecar's own state: they are evaluated on every request, never run
or cached by the runner.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

PASS = "pass"
FAIL = "fail"


class Kind(enum.Enum):
    """What a result is about, in the operator's words: liveness and metrics tell results apart by this."""

    SERVER = "server"
    """`triton`: the server is live and ready."""
    MODEL = "model"
    CANARY = "canary"
    LATENCY = "latency"
    GPU = "gpu"
    SHUTDOWN = "shutdown"
    PING = "ping"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The verdict of one check at one moment.

    `restart_worthy` marks failures a restart of Triton could cure (unreachable, hung or erroring inference,
    GPU headroom exhausted); only those count toward liveness. `details` carries data other parts read (latency
    seconds, max errors, GPU samples) without parsing the reason.
    """

    name: str
    kind: Kind
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


def passed(name: str, kind: Kind, reason: str = "ok", **kw: Any) -> CheckResult:
    return CheckResult(name=name, kind=kind, status=PASS, reason=reason, **kw)


def failed(name: str, kind: Kind, reason: str, **kw: Any) -> CheckResult:
    return CheckResult(name=name, kind=kind, status=FAIL, reason=reason, **kw)


class Check(Protocol):
    """A check the runner schedules: run under `timeout` (None = the probe's budget), cancelled at it."""

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the results `run()` returns, in order."""
        ...

    @property
    def timeout(self) -> float | None: ...

    async def run(self) -> Sequence[CheckResult]:
        """One result per name in `names`."""
        ...

    def timed_out(self, after: float) -> Sequence[CheckResult]:
        """The results to report when the runner cancelled `run()` after `after` seconds and nothing more could be
        learnt in the probe budget (one per name). Never waits, never asks anything.

        The runner then holds the check back (the hang backoff) before sending it again, so a stuck or
        saturated server is not fed a growing backlog; meanwhile these results stand."""
        ...

    async def explain_timeout(self, after: float) -> Sequence[CheckResult]:
        """The results when the runner cancelled `run()` after `after` seconds, with what the check can learn now
        about why (one per name): a canary asks Triton whether its model kept completing other requests, i.e.
        whether it is saturated rather than hung (`probe.saturation`).

        The runner awaits this right after the deadline, bounded by what is left of the probe budget; if that runs
        out first, `timed_out(after)` stands. A check with nothing to ask returns `timed_out(after)`."""
        ...


class InstantCheck(Protocol):
    """A check of the sidecar's own state, read on every request (never cached, never waits)."""

    @property
    def name(self) -> str: ...

    def now(self) -> CheckResult: ...
