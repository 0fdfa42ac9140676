"""Runs the checks: deadlines, single-flight, result cache, hang backoff, history, liveness policy.

The runner owns every timing decision so checks stay simple:
- a run executes all checks concurrently, each under min(its own timeout, the run budget); when a deadline
  passes the check's task is cancelled (its HTTP request to Triton is closed) and it fails as timed out;
- derived checks (latency) run after the others, inside the same budget, and read what they measured;
- concurrent callers share one run (single-flight); a run younger than `min_interval` is reused;
- a check that timed out is not re-sent to Triton until a backoff passes (doubling up to `hang_backoff`),
  so a stuck server is not fed a growing backlog of canaries; meanwhile its last result stands;
- `instant` checks (shutdown, ping) are evaluated on every request, never cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from probe.checks.base import Check, CheckResult, failed

Clock = Callable[[], float]
# Time kept back from the probe budget so the HTTP answer itself fits inside probe.timeout.
ANSWER_MARGIN = 0.02


@dataclass(frozen=True)
class Run:
    """The results of one run of the checks."""

    started: float
    """monotonic"""
    wall: float
    duration: float
    results: dict[str, CheckResult]
    sequence: int = 0
    ok: bool = field(init=False)
    """Every check of the run passed (computed once: cached answers read it on every probe)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", all(r.ok for r in self.results.values()))


@dataclass
class _Backoff:
    until: float = 0.0
    delay: float = 0.0
    result: CheckResult | None = None
    """The timed-out result itself: what probes get while the backoff holds (its reason suffixed once)."""


def _is_instant(check: Check) -> bool:
    return bool(getattr(check, "instant", False))


def _is_derived(check: Check) -> bool:
    return bool(getattr(check, "derived", False))


class Runner:
    """Runs `checks` under `timeout`; see the module docstring for the rules."""

    def __init__(
        self,
        checks: Sequence[Check],
        *,
        timeout: float,
        min_interval: float = 1.0,
        interval: float = 0.0,
        hang_backoff: float = 10.0,
        history: int = 256,
        clock: Clock = time.monotonic,
        on_run: Iterable[Callable[[Run], None]] = (),
    ) -> None:
        names = [c.name for c in checks]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate check names: {names}")
        self.checks = list(checks)
        self._instant = [c for c in self.checks if _is_instant(c)]
        self._scheduled = [c for c in self.checks if not _is_instant(c)]
        self._derived = {c.name for c in self._scheduled if _is_derived(c)}
        self.timeout = timeout
        self.min_interval = min_interval
        self.interval = interval
        self.hang_backoff = hang_backoff
        self.clock = clock
        self.history: deque[Run] = deque(maxlen=history)
        self._on_run = list(on_run)
        self._after_run: list[Callable[[Run], None]] = []
        self._on_done: list[Callable[[Run], None]] = []
        self._pending: list[Run] = []
        self._last: Run | None = None
        self._inflight: asyncio.Future[Run] | None = None
        self._backoff: dict[str, _Backoff] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._sequence = 0
        self.runs_total = 0

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.checks]

    @property
    def last(self) -> Run | None:
        return self._last

    def add_listener(self, fn: Callable[[Run], None], *, deferred: bool = False) -> None:
        """Call `fn(run)` after each run: at once (state the answer depends on, like liveness), or `deferred`
        to just after the answer has been sent (metrics, logs)."""
        (self._after_run if deferred else self._on_run).append(fn)

    def add_done_hook(self, fn: Callable[[Run], None]) -> None:
        """Call `fn(run)` at the very end of each run, after every listener, still inside the run's own task:
        probes waiting on the run are answered there, without waiting for another turn of the event loop."""
        self._on_done.append(fn)

    # ------------------------------------------------------------------------------------------ running

    def _budget(self) -> float:
        return max(self.timeout - ANSWER_MARGIN, 0.01)

    async def _run_one(self, check: Check, deadline: float) -> CheckResult:
        wall = time.time()
        start = self.clock()
        limit = deadline - start
        own = check.timeout
        if own is not None:
            limit = min(limit, own)
        if limit <= 0:
            if not _is_derived(check):
                return failed(check.name, "no time left in the probe budget", restart_worthy=False)
            limit = 0.005  # derived checks mostly read what was measured; let them answer
        try:
            # asyncio.timeout, not wait_for: no extra task per check; cancellation closes the check's request.
            async with asyncio.timeout(limit):
                result = await check.run()
        except TimeoutError:
            result = failed(check.name, f"timed out after {limit:.2f}s", restart_worthy=True, details={"timeout": True})
        except Exception as e:  # a bug in a check must not take the sidecar down; report it as a failure
            result = failed(check.name, f"internal error: {type(e).__name__}: {e}")
        return result.with_timing(wall, self.clock() - start)

    def _now(self, check: Check) -> CheckResult | None:
        """The check's result without waiting, from its optional `now()`, or None when `run()` must wait.

        Checks that mostly read what is already in memory (a vouched `triton`, `model/` and `latency/` after their
        canary, `gpu` from its sampler) answer here: no task, no timer, no coroutine for them."""
        quick = getattr(check, "now", None)
        if quick is None:
            return None
        wall = time.time()
        start = self.clock()
        try:
            result: CheckResult | None = quick()
        except Exception as e:  # a bug in a check must not take the sidecar down; report it as a failure
            result = failed(check.name, f"internal error: {type(e).__name__}: {e}")
        return None if result is None else result.with_timing(wall, self.clock() - start)

    def _backed_off(self, check: Check) -> CheckResult | None:
        b = self._backoff.get(check.name)
        if b is None:
            return None
        now = self.clock()
        if now < b.until and b.result is not None:
            # From the timed-out result, not the last run's: that one already carries a "(retrying in ...)".
            return replace(b.result, reason=f"{b.result.reason} (retrying in {b.until - now:.1f}s)")
        return None

    async def _guarded(self, check: Check, deadline: float) -> CheckResult:
        backed_off = self._backed_off(check)
        if backed_off is not None:
            return backed_off
        return self._settle(check, await self._run_one(check, deadline))

    def _settle(self, check: Check, result: CheckResult) -> CheckResult:
        """Start, double or clear the check's hang backoff from its result."""
        if result.details.get("timeout"):
            b = self._backoff.setdefault(check.name, _Backoff())
            b.delay = min(self.hang_backoff, max(b.delay * 2, self.min_interval, 0.1))
            b.until = self.clock() + b.delay
            b.result = result
        else:
            self._backoff.pop(check.name, None)
        return result

    async def run_once(self, *, names: Iterable[str] | None = None) -> Run:
        """Run the (selected, non-instant) checks now, bounded by the probe budget."""
        wanted = set(names) if names is not None else None
        selected = self._scheduled if wanted is None else [c for c in self._scheduled if c.name in wanted]
        started = self.clock()
        wall = time.time()
        deadline = started + self._budget()
        prev = self._last.results if self._last else {}
        # Slowest first (by the last run): the canary's request reaches Triton before the quick health calls.
        primary = sorted(
            (c for c in selected if c.name not in self._derived),
            key=lambda c: -prev[c.name].duration if c.name in prev else 0.0,
        )
        derived = [c for c in selected if c.name in self._derived]
        results: dict[str, CheckResult] = {}
        waiting = []
        for c in primary:
            quick = self._backed_off(c)
            if quick is None:
                quick = self._now(c)
                if quick is not None:
                    self._settle(c, quick)
            if quick is None:
                waiting.append(c)
            else:
                results[c.name] = quick
        # The slowest check that must wait runs in this task, the others in their own: one task fewer per run,
        # and the slowest still starts first (the tasks start when it first waits, on its request to Triton).
        others = [asyncio.ensure_future(self._guarded(c, deadline)) for c in waiting[1:]]
        try:
            if waiting:
                results[waiting[0].name] = await self._guarded(waiting[0], deadline)
            for c, r in zip(waiting[1:], await asyncio.gather(*others), strict=True):
                results[c.name] = r
        finally:
            for t in others:
                t.cancel()  # only matters when this run itself is cancelled
        for c in derived:
            results[c.name] = self._now(c) or await self._run_one(c, deadline)
        results = {c.name: results[c.name] for c in selected}
        self._sequence += 1
        run = Run(
            started=started,
            wall=wall,
            duration=self.clock() - started,
            results=results,
            sequence=self._sequence,
        )
        self.runs_total += 1
        if wanted is None:
            self._last = run
            self.history.append(run)
        for fn in self._on_run:
            fn(run)
        for fn in self._on_done:
            fn(run)
        if self._after_run:
            self._pending.append(run)
            if len(self._pending) == 1:
                # On the loop's next turn: the done hooks above have already written the waiting probes'
                # answers, and a fixed delay would only land the work inside the next probe. flush() also
                # catches up before a scrape.
                asyncio.get_running_loop().call_soon(self.flush)
        return run

    def flush(self) -> None:
        """Deliver finished runs to the deferred listeners (metrics, logs) now."""
        pending, self._pending = self._pending, []
        for run in pending:
            for fn in self._after_run:
                try:
                    fn(run)
                except Exception:  # metrics or logging must never take the sidecar down
                    logging.getLogger("probe").exception("listener failed")

    def cached(self) -> Run | None:
        """The latest run if it is younger than `min_interval`, else None. Never waits."""
        last = self._last
        if last is not None and self.clock() - last.started < self.min_interval:
            return last
        return None

    async def results(self) -> Run:
        """The latest run if younger than `min_interval`, else a new one shared by concurrent callers."""
        last = self.cached()
        if last is not None:
            return last
        return await asyncio.shield(self.run_future())

    def run_future(self) -> asyncio.Future[Run]:
        """The run in flight, started now if there is none: every caller until it finishes shares it."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self.run_once())
        return self._inflight

    async def instant_results(self) -> dict[str, CheckResult]:
        out = {}
        for c in self._instant:
            try:
                out[c.name] = await c.run()  # an in-memory read: stamped when created, nothing to time
            except Exception as e:  # a bug in a check must not take the sidecar down; report it as a failure
                out[c.name] = failed(c.name, f"internal error: {type(e).__name__}: {e}")
        return out

    async def snapshot(self) -> dict[str, CheckResult]:
        """Every check's current result: cached or fresh run, plus instant checks evaluated now."""
        return await self.merge(await self.results())

    def instant_passing(self) -> bool | None:
        """Do the instant checks pass, from their `passing()` alone? None if one of them has no `passing()`."""
        ok = True
        for c in self._instant:
            passing = getattr(c, "passing", None)
            if passing is None:
                return None
            ok = ok and bool(passing())
        return ok

    async def instant_ok(self) -> bool:
        """Do the instant checks pass? Uses their cheap `passing()` where they have one."""
        for c in self._instant:
            passing = getattr(c, "passing", None)
            if passing is not None:
                if not passing():
                    return False
            elif not (await c.run()).ok:
                return False
        return True

    async def merge(self, run: Run) -> dict[str, CheckResult]:
        """A run's results plus the instant checks evaluated now, in check order."""
        if not self._instant:
            return run.results
        merged = dict(run.results)
        merged.update(await self.instant_results())
        return {c.name: merged[c.name] for c in self.checks if c.name in merged}

    # ------------------------------------------------------------------------------------------ background

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.results()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self.interval > 0 and self._loop_task is None:
            self._loop_task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        self.flush()
        tasks: list[asyncio.Future[Any]] = [t for t in (self._loop_task, self._inflight) if t is not None]
        self._loop_task = None
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


# ---------------------------------------------------------------------------------------------- liveness


@dataclass
class Liveness:
    """Turns the stream of runs into the liveness verdict the contract describes.

    A check fails liveness only when its results have been restart-worthy failures continuously for `after`
    seconds, and only once the sidecar is armed (a canary has succeeded at least once; with no canaries, Triton
    was healthy once). Before that, liveness fails only if Triton has never been healthy `startup` seconds after
    start. Output mismatches, a loading model and latency drift are not restart-worthy and never fail /live.
    """

    after: float
    startup: float
    clock: Clock = time.monotonic
    started: float = field(default=0.0)
    armed: bool = False
    triton_ever_healthy: bool = False
    failing_since: dict[str, float] = field(default_factory=dict)
    has_canaries: bool = True

    def __post_init__(self) -> None:
        if not self.started:
            self.started = self.clock()

    def observe(self, run: Run) -> None:
        for name, r in run.results.items():
            if r.ok:
                self.failing_since.pop(name, None)
                if name == "triton":
                    self.triton_ever_healthy = True
                    if not self.has_canaries:
                        self.armed = True
                if name.startswith("canary/"):
                    self.armed = True
            elif r.restart_worthy:
                self.failing_since.setdefault(name, run.started)
            else:
                self.failing_since.pop(name, None)

    def _counts(self, name: str, now: float) -> bool:
        """True when this check's failure fails liveness now (restart-worthy for `after` s, once armed)."""
        since = self.failing_since.get(name)
        return since is not None and self.armed and now - since >= self.after

    def _startup_expired(self, now: float) -> bool:
        return not self.triton_ever_healthy and now - self.started >= self.startup

    def is_live(self, results: dict[str, CheckResult]) -> bool:
        """The aggregate of `verdict()` without building it (cheap enough for every run's gauge)."""
        now = self.clock()
        if "triton" in results and self._startup_expired(now):
            return False
        return not any(self._counts(name, now) for name in results if name != "shutdown")

    def verdict(self, results: dict[str, CheckResult]) -> dict[str, CheckResult]:
        """Each check's liveness result (ping included as given)."""
        now = self.clock()
        out: dict[str, CheckResult] = {}
        for name, r in results.items():
            if name == "shutdown":
                continue  # draining must not restart the container
            since = self.failing_since.get(name)
            if self._counts(name, now):
                assert since is not None
                out[name] = replace(
                    r,
                    reason=f"failing for {now - since:.0f}s (liveness.after {self.after:g}s): {r.reason}",
                    status="fail",
                )
            elif name == "triton" and self._startup_expired(now):
                out[name] = replace(
                    r,
                    status="fail",
                    reason=f"Triton not healthy within {self.startup:g}s of start: {r.reason}",
                )
            elif r.ok:
                out[name] = replace(r, status="pass", reason="ok")
            elif not r.restart_worthy:
                out[name] = replace(r, status="pass", reason=f"ok (not restart-worthy: {r.reason})")
            elif not self.armed:
                out[name] = replace(
                    r, status="pass", reason=f"ok (not counted before the first good canary: {r.reason})"
                )
            else:
                held = now - since if since is not None else 0.0
                out[name] = replace(
                    r,
                    status="pass",
                    reason=f"ok (failing for {held:.0f}s of liveness.after {self.after:g}s: {r.reason})",
                )
        return out
