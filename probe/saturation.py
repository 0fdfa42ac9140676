"""Saturated or hung: what a canary that missed its deadline says about Triton, judged from Triton's own evidence.

A kubelet that restarts a Triton because its queue is long only moves the load onto the other pods, which then
saturate in turn. So a missed deadline is judged before it counts: around each miss the model's progress is read
from Triton, and the rule below tells a saturated model (serving, behind a queue) from a hung one.

The evidence, per canary model:
- the success count of `/v2/models/<m>[/versions/<v>]/stats` (`inference_stats.success.count`, summed over the
  versions it lists), twice: the latest reading taken before the canary was sent (the queue watcher's poll, or the
  previous miss's own read; no second poller) and one read right after the miss;
- the requests pending for the model (`nv_inference_pending_request_count` on Triton's metrics page: requests
  waiting in the queue, not those executing), read at the miss through the shared `MetricsPage`;
- the probe's own canaries: those Triton answered within the window are taken off the completed count; and Triton
  does not cancel a request whose client gave up, so each abandoned canary is still queued, or completes later:
  those abandoned (since the last canary Triton answered) within the window plus the time the queue takes to drain,
  at most `liveness.after` (all of them when nothing completed), are taken off both counts. The probe's own
  requests are never the evidence that the model is busy.

The rule, with C other requests completed over the `window` seconds between the two readings and P others pending:
- saturated iff C >= 1 and P >= 1 and the queue drains within `liveness.after` at that rate (P * window / C <=
  liveness.after);
- otherwise hung: nothing completing, whatever is pending (the starvation of requests queued for GPU memory that
  never comes); a trickle too slow to drain the queue within `liveness.after` (one request a minute with hundreds
  waiting: a request joining now would wait longer than the operator lets Triton fail to serve); or no queue at all
  (the canary itself took too long). With `liveness.after: 0` every miss is hung.
- When the evidence cannot be had (statistics refused, as pytriton's default restricted endpoints answer 403; no
  metrics page, or no pending series on it; no earlier reading; no time left in `probe.timeout`), the miss counts
  as hung, and the reason says why saturation could not be told apart. `probe serve` logs that once, when the queue
  watcher's first poll gets an answer, never per probe.

A saturated miss is never restart-worthy. With `probe.saturated: ready` the canary passes on the last verified
output (when the last canary Triton answered passed), so the pod keeps taking traffic; with `not-ready` it fails
/ready to shed load. Either way `details["saturated"]` is True (the `probe_saturated{canary}` gauge) and
`details["verified_at"]` says when the output was last verified (the HTTP views render its age when answering).

For a canary check, the interface is `CanarySaturation` (from `Saturation.canary()`): `answered(result)` after every
canary Triton answered, `unjudged(result)` in `timed_out()`, and `await judge_miss(result, waited)` in
`explain_timeout()`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from probe.checks.base import CheckResult
from probe.config import CanaryConfig
from probe.logs import log
from probe.queue import pending_requests
from probe.runner import ANSWER_MARGIN
from probe.triton import TritonClient, TritonRequestError, TritonUnreachable
from probe.triton_metrics import MetricsPage, Page

Clock = Callable[[], float]

READY = "ready"
NOT_READY = "not-ready"
SETTINGS = (READY, NOT_READY)
PREFIX = "saturated:"
PENDING_METRIC = "nv_inference_pending_request_count"
# Time kept back from probe.timeout, when a canary sets no timeout of its own, to read the evidence after a miss
# (a /stats GET and the metrics page, concurrently; a few ms on loopback, tens under CPU contention).
EVIDENCE_RESERVE_S = 0.1
MIN_ROOM_S = 0.01
NO_TIME = "no time left in probe.timeout after the canary's deadline to read Triton's statistics and metrics"
READINGS_KEPT = 8
ABANDONED_KEPT = 1024


def default_deadline(probe_timeout: float) -> float:
    """A canary's deadline when it sets none: the probe budget less the time kept to read the evidence."""
    reserve = min(EVIDENCE_RESERVE_S, probe_timeout / 5)
    return max(probe_timeout - ANSWER_MARGIN - reserve, 0.01)


def canary_deadline(canary: CanaryConfig, probe_timeout: float) -> float:
    """The deadline a canary runs under: its own `timeout`, else `default_deadline` (serve, check and record alike)."""
    return canary.timeout if canary.timeout is not None else default_deadline(probe_timeout)


def cannot_tell(why: str) -> str:
    return f"cannot tell saturated from hung: {why}"


def success_count(stats: Mapping[str, Any]) -> int:
    """Requests the model completed successfully, summed over the versions a /stats answer lists. A reply that is
    not shaped like Triton's raises ValueError."""
    total = 0
    try:
        for entry in stats.get("model_stats") or ():
            success = ((entry or {}).get("inference_stats") or {}).get("success") or {}
            total += int(success.get("count", 0))
    except (AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"statistics not shaped like Triton's: {type(e).__name__}") from None
    return total


def pending_of(text: str, model: str) -> int | None:
    """The model's pending requests on Triton's metrics page (summed over versions), None when it has no series."""
    lines = "\n".join(ln for ln in text.splitlines() if PENDING_METRIC in ln) + "\n"
    try:
        found = pending_requests(lines, {model})
    except ValueError:
        return None
    value = found.get(model)
    return int(value) if value is not None and math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------- the rule


@dataclass(frozen=True)
class Evidence:
    """What Triton showed around one miss, the probe's own abandoned canaries already taken off."""

    model: str
    window: float
    """Seconds between the reading before the canary and the one after its miss."""
    completed: int
    pending: int
    own: int = 0
    """The probe's own canaries not counted (they may be among the completed or the pending)."""

    @property
    def drain_s(self) -> float:
        """Seconds the pending queue takes to drain at the rate observed (inf when nothing completed)."""
        return self.pending * self.window / self.completed if self.completed else math.inf


@dataclass(frozen=True)
class Judgement:
    saturated: bool
    text: str
    """`saturated: ...`, or why the miss counts as hung."""


def _requests(n: int) -> str:
    return f"{n} request" if n == 1 else f"{n} requests"


def judge(e: Evidence, *, waited: float, drain_limit: float) -> Judgement:
    """The rule of the module docstring, on evidence already read."""
    own = f"; not counting the probe's own {e.own} canar{'y' if e.own == 1 else 'ies'}" if e.own else ""
    done = f"{_requests(e.completed)} of model {e.model} completed in {e.window:.1f}s"
    if e.completed <= 0:
        return Judgement(
            False, f"hung: no request of model {e.model} completed in {e.window:.1f}s ({e.pending} pending{own})"
        )
    if e.pending <= 0:
        return Judgement(False, f"not saturated: {done} but none is waiting: the canary itself is stuck or slow{own}")
    if e.drain_s > drain_limit:
        return Judgement(
            False,
            f"too little progress: {done} with {e.pending} pending; at that rate the queue takes {e.drain_s:.1f}s "
            f"to drain, over liveness.after {drain_limit:g}s{own}",
        )
    return Judgement(
        True,
        f"{PREFIX} {_requests(e.completed)} completed in {e.window:.1f}s and {e.pending} pending while the canary "
        f"waited {waited:.2f}s (the queue drains in about {e.drain_s:.1f}s at that rate{own})",
    )


# ---------------------------------------------------------------------------------------------- the judge


@dataclass(frozen=True)
class Reading:
    at: float
    """monotonic"""
    success: int


class _NoEvidence(Exception):
    """Why saturation could not be told apart this time (a value, not a bug)."""


@dataclass
class _Model:
    model: str
    version: str
    canaries: list[str] = field(default_factory=list)
    readings: deque[Reading] = field(default_factory=lambda: deque(maxlen=READINGS_KEPT))
    abandoned: deque[float] = field(default_factory=lambda: deque(maxlen=ABANDONED_KEPT))
    """When the probe gave up on each of its canaries since Triton last answered one (monotonic)."""
    answered: deque[float] = field(default_factory=lambda: deque(maxlen=ABANDONED_KEPT))
    """When Triton answered each of the probe's canaries lately (monotonic)."""

    @property
    def label(self) -> str:
        return f"model {self.model}" + (f" version {self.version}" if self.version else "")

    def before(self, sent: float) -> Reading | None:
        """The newest reading taken no later than `sent` (when the canary went out), else the oldest one."""
        chosen = None
        for r in self.readings:
            if r.at <= sent:
                chosen = r
        return chosen or (self.readings[0] if self.readings else None)

    def abandoned_since(self, since: float) -> int:
        return sum(1 for t in self.abandoned if t >= since)

    def answered_since(self, since: float) -> int:
        return sum(1 for t in self.answered if t > since)


class Saturation:
    """The sidecar's saturation judge: the readings per canary model (fed by the queue watcher and by each miss's
    own read), the rule, and the one log line per model when the evidence cannot be had."""

    def __init__(
        self,
        client: TritonClient,
        page: MetricsPage,
        *,
        drain_limit: float,
        setting: str = READY,
        logger: logging.Logger | None = None,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
    ) -> None:
        if setting not in SETTINGS:
            raise ValueError(f"probe.saturated: {setting!r}")
        self._client = client
        self._page = page
        self.drain_limit = drain_limit
        self.setting = setting
        self._logger = logger
        self.clock = clock
        self.wall = wall
        self._models: dict[tuple[str, str], _Model] = {}
        self._told: set[tuple[str, str]] = set()
        self._awaiting_page: set[tuple[str, str]] = set()

    def canary(self, name: str, model: str, version: str = "") -> CanarySaturation:
        """The view one canary check uses; canaries of the same model share its readings."""
        state = self._models.setdefault((model, version), _Model(model, version))
        state.canaries.append(name)
        return CanarySaturation(self, state, name)

    def check_room(self, name: str, room: float) -> None:
        """Log once, when built, that a canary whose deadline leaves no time to read the evidence after a miss
        (`room` seconds of probe.timeout) will count every miss as hung."""
        if room >= MIN_ROOM_S or self._logger is None:
            return
        log(
            self._logger,
            logging.WARNING,
            "saturation cannot be told from a hang: a canary that misses its deadline counts as hung",
            canaries=[name],
            reason=f"its timeout leaves {max(room, 0.0):.3f}s of probe.timeout to read Triton's statistics after a "
            f"miss; set it at least {EVIDENCE_RESERVE_S:g}s below probe.timeout",
        )

    # ------------------------------------------------------------------------------------ fed by the watcher

    def observe_stats(self, model: str, version: str, stats: Mapping[str, Any]) -> None:
        """A /stats answer for the model (the queue watcher's poll)."""
        state = self._models.get((model, version))
        if state is None:
            return
        try:
            state.readings.append(Reading(self.clock(), success_count(stats)))
        except ValueError as e:
            self._tell(state, f"{state.label} {e}")
            return
        if (model, version) not in self._told:
            self._awaiting_page.add((model, version))

    def refused(self, model: str, version: str, error: str) -> None:
        """Triton answered the model's /stats with an error (403 from restricted endpoints, 404 on an old Triton)."""
        state = self._models.get((model, version))
        if state is not None:
            self._tell(state, error)

    def observe_page(self, page: Page) -> None:
        """The metrics page as the watcher read it: once a model's statistics answered, is its pending series there?"""
        for key in sorted(self._awaiting_page):
            state = self._models[key]
            if page.text is None:
                self._tell(state, page.error or "Triton's metrics page could not be read")
            elif pending_of(page.text, state.model) is None:
                self._tell(state, f"Triton's metrics page has no {PENDING_METRIC} for model {state.model}")
            else:
                self._told.add(key)  # all there: nothing to say
        self._awaiting_page.clear()

    def _tell(self, state: _Model, why: str) -> None:
        """Log once per model that its misses will count as hung, and why."""
        key = (state.model, state.version)
        if key in self._told:
            return
        self._told.add(key)
        self._awaiting_page.discard(key)
        if self._logger is not None:
            log(
                self._logger,
                logging.WARNING,
                "saturation cannot be told from a hang: a canary that misses its deadline counts as hung",
                canaries=state.canaries,
                model=state.model,
                reason=why,
            )

    async def baseline(self) -> None:
        """Read every canary model's statistics once (for `probe check`, which runs no queue watcher)."""
        for state in self._models.values():
            try:
                stats = await self._client.statistics(state.model, state.version)
            except (TritonUnreachable, TritonRequestError):
                continue
            self.observe_stats(state.model, state.version, stats)

    # ------------------------------------------------------------------------------------ at a miss

    async def _evidence(self, state: _Model, waited: float) -> Evidence:
        now = self.clock()
        state.abandoned.append(now)
        before = state.before(now - waited)
        try:
            # A page younger than the canary's wait shows the queue it waited in; else one is fetched (single-flight).
            page, stats = await asyncio.gather(
                self._page.get(max_age=waited), self._client.statistics(state.model, state.version)
            )
        except (TritonUnreachable, TritonRequestError) as e:
            raise _NoEvidence(str(e)) from None
        try:
            after = Reading(self.clock(), success_count(stats))
        except ValueError as e:
            raise _NoEvidence(f"{state.label} {e}") from None
        state.readings.append(after)
        if before is None:
            raise _NoEvidence(f"no earlier reading of {state.label} statistics to compare with")
        if after.success < before.success:
            raise _NoEvidence(f"{state.label} statistics went back (Triton restarted?)")
        if page.text is None:
            raise _NoEvidence(f"pending requests unknown: {page.error}")
        pending = pending_of(page.text, state.model)
        if pending is None:
            raise _NoEvidence(f"Triton's metrics page has no {PENDING_METRIC} for model {state.model}")
        window = max(after.at - before.at, 1e-3)
        completed = after.success - before.success
        # The probe's own canaries that may be among these: abandoned within the window plus the time the queue
        # takes to drain (an older one has left the queue), at most liveness.after (beyond that it is hung anyway).
        # With nothing completing, every one abandoned since Triton last answered a canary may still be queued.
        if completed:
            queued = state.abandoned_since(after.at - window - min(pending * window / completed, self.drain_limit))
        else:
            queued = len(state.abandoned)
        # Subtracted from the completed too, this miss's own canary included: Triton may count a decoupled model's
        # request as a success once it has started answering (a stalled stream was seen counted so), and a miss
        # wrongly judged hung costs a restart after liveness.after, one wrongly judged saturated hides a hang.
        done = queued + state.answered_since(before.at)
        return Evidence(state.model, window, max(completed - done, 0), max(pending - queued, 0), own=done)


class CanarySaturation:
    """One canary's side of the judge: its last answered verdict, and the judgement of its misses."""

    def __init__(self, owner: Saturation, state: _Model, name: str) -> None:
        self._owner = owner
        self._state = state
        self.name = name
        self._last: CheckResult | None = None
        self._verified_at: float | None = None

    def answered(self, canary: CheckResult) -> None:
        """Triton answered the canary (`canary` is its verdict, pass or fail): a saturated miss stands on it."""
        self._last = canary
        if canary.ok:
            self._verified_at = self._owner.wall()
        self._state.answered.append(self._owner.clock())
        self._state.abandoned.clear()  # Triton's queue is FIFO: the ones abandoned before this one have gone too

    def unjudged(self, timed_out: CheckResult) -> CheckResult:
        """The restart-worthy timed-out result, saying there was no time to read the evidence."""
        return replace(timed_out, reason=f"{timed_out.reason}; {cannot_tell(NO_TIME)}")

    async def judge_miss(self, timed_out: CheckResult, waited: float) -> CheckResult:
        """`timed_out` (restart-worthy, `timed out after ...`) judged from Triton's evidence: hung (restart-worthy,
        the reason saying why) or saturated (never restart-worthy; passing or failing per probe.saturated)."""
        owner = self._owner
        try:
            evidence = await owner._evidence(self._state, waited)
        except _NoEvidence as e:
            return replace(timed_out, reason=f"{timed_out.reason}; {cannot_tell(str(e))}", restart_worthy=True)
        verdict = judge(evidence, waited=waited, drain_limit=owner.drain_limit)
        if not verdict.saturated:
            return replace(timed_out, reason=f"{timed_out.reason}; {verdict.text}", restart_worthy=True)
        details: dict[str, Any] = {
            "saturated": True,
            "verified_at": self._verified_at,
            "completed": evidence.completed,
            "pending": evidence.pending,
            "window_s": evidence.window,
        }
        last = self._last
        reason = verdict.text
        passing = False
        if last is not None and not last.ok:
            reason += f"; the last canary Triton answered failed: {last.reason}"
        elif self._verified_at is None:
            reason += "; no output verified yet"
        elif owner.setting == NOT_READY:
            reason += "; not ready to shed load (probe.saturated: not-ready)"
        else:
            passing = True
        status = "pass" if passing else "fail"
        return replace(timed_out, status=status, reason=reason, restart_worthy=False, details=details)


def verified_age(r: CheckResult, now: float) -> str | None:
    """`last verified output 3.2s ago` for a saturated result (rendered when answering, so the age is current)."""
    at = r.details.get("verified_at")
    if not r.details.get("saturated") or not isinstance(at, float):
        return None
    return f"last verified output {max(now - at, 0.0):.1f}s ago"
