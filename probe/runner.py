"""Runs the checks: deadlines, single-flight, result cache, hang backoff.

The runner owns every timing decision so checks stay simple:
- a run executes all checks concurrently, each under min(its own timeout, the run budget); when a deadline passes
  the check's task is cancelled (its HTTP request to Triton is aborted) and the check says what that means
  (`Check.timed_out`);
- concurrent callers share one run (single-flight); a run younger than `min_interval` is reused;
- a check cut off at its deadline may ask why in what is left of the run budget (`Check.explain_timeout`: a canary
  asks Triton whether its model is saturated or hung); if that runs out too, `Check.timed_out` stands;
- a check that was cut off is not sent again until a backoff passes: the first pause is `min_interval` (so a
  cut-off check is never re-sent sooner than a healthy one), doubling up to `hang_backoff`, so a stuck or saturated
  server is not fed a growing backlog of canaries; meanwhile its timed-out results stand;
- instant checks (shutdown, ping) are read on every request, never run or cached here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from probe.checks.base import FAIL, Check, CheckResult, InstantCheck

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


@dataclass
class _Backoff:
    until: float = 0.0
    delay: float = 0.0
    results: Sequence[CheckResult] = field(default_factory=tuple)
    """The timed-out results themselves: what probes get while the backoff holds."""


def _tell(listeners: list[Callable[[Run], None]], run: Run) -> None:
    for fn in listeners:
        try:
            fn(run)
        except Exception:  # metrics or logging must never take the sidecar down
            logging.getLogger("probe").exception("listener failed")


def _timed(r: CheckResult, wall: float, duration: float) -> CheckResult:
    # The constructor, not dataclasses.replace: this runs for every result of every fresh run.
    return CheckResult(
        r.name,
        r.kind,
        r.status,
        r.reason,
        r.observed_value,
        r.observed_unit,
        r.restart_worthy,
        wall,
        duration,
        r.details,
    )


def _all_failed(check: Check, reason: str) -> list[CheckResult]:
    """Every result of `check` failed with `reason` (not restart-worthy): its names and kinds as it declares them."""
    return [replace(r, status=FAIL, reason=reason, restart_worthy=False, details={}) for r in check.timed_out(0.0)]


class Runner:
    """Runs `checks` under `timeout`; see the module docstring for the rules."""

    def __init__(
        self,
        checks: Sequence[Check],
        instant: Sequence[InstantCheck] = (),
        *,
        timeout: float,
        min_interval: float = 1.0,
        interval: float = 0.0,
        hang_backoff: float = 10.0,
        clock: Clock = time.monotonic,
    ) -> None:
        names = [n for c in checks for n in c.names] + [c.name for c in instant]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate check names: {names}")
        self.checks = list(checks)
        self.instant = list(instant)
        self.names = names
        self.timeout = timeout
        self.min_interval = min_interval
        self.interval = interval
        self.hang_backoff = hang_backoff
        self.clock = clock
        self._last: Run | None = None
        self._inflight: asyncio.Future[Run] | None = None
        self._backoff: dict[int, _Backoff] = {}
        self._listeners: list[Callable[[Run], None]] = []
        self._later: list[Callable[[Run], None]] = []
        self._took: dict[int, float] = {}
        """How long each check took in its last run: the slowest runs first, in the run's own task."""
        self._loop_task: asyncio.Task[None] | None = None
        self._current: tuple[tuple[Run, tuple[CheckResult, ...]], dict[str, CheckResult]] | None = None
        self._sequence = 0

    def add_listener(self, fn: Callable[[Run], None], *, after_answer: bool = False) -> None:
        """Call `fn(run)` after every full run; an exception there is logged, not raised. With `after_answer`, on the
        event loop's next turn: the probes waiting on the run are answered first (metrics and logs can wait a turn;
        liveness cannot, since the answers judge by it)."""
        (self._later if after_answer else self._listeners).append(fn)

    # ------------------------------------------------------------------------------------------ running

    def _budget(self) -> float:
        return max(self.timeout - ANSWER_MARGIN, 0.01)

    async def _run_check(self, check: Check, deadline: float) -> Sequence[CheckResult]:
        backoff = self._backoff.get(id(check))
        now = self.clock()
        if backoff is not None and now < backoff.until:
            note = f" (retrying in {backoff.until - now:.1f}s)"
            return [r if r.ok else replace(r, reason=r.reason + note) for r in backoff.results]
        wall = time.time()
        limit = deadline - now
        if check.timeout is not None:
            limit = min(limit, check.timeout)
        if limit <= 0:
            return _all_failed(check, "no time left in the probe budget")
        try:
            # asyncio.timeout, not wait_for: no extra task per check; cancellation aborts the check's request.
            async with asyncio.timeout(limit):
                results = await check.run()
            self._backoff.pop(id(check), None)
        except TimeoutError:
            results = await self._explain(check, limit, deadline)
            b = self._backoff.setdefault(id(check), _Backoff())
            b.delay = min(self.hang_backoff, max(b.delay * 2, self.min_interval, 0.1))
            b.until = self.clock() + b.delay
            b.results = results
        except Exception as e:  # a bug in a check must not take the sidecar down; report it as a failure
            logging.getLogger("probe").exception("check %s raised", check.names[0])
            results = _all_failed(check, f"internal error: {type(e).__name__}: {e}")
        duration = self.clock() - now
        return [_timed(r, wall, duration) for r in results]

    async def _explain(self, check: Check, after: float, deadline: float) -> Sequence[CheckResult]:
        """What `check`, cut off after `after` seconds, learns about why in the budget left before `deadline`."""
        left = deadline - self.clock()
        if left > 0:
            try:
                async with asyncio.timeout(left):
                    return await check.explain_timeout(after)
            except TimeoutError:
                pass
            except Exception:  # a bug in the explanation: the plain timed-out results stand
                logging.getLogger("probe").exception("check %s raised explaining its timeout", check.names[0])
        return check.timed_out(after)

    async def run_once(self, *, names: Iterable[str] | None = None) -> Run:
        """Run the (selected) checks now, bounded by the probe budget; a full run is cached and told to listeners."""
        wanted = set(names) if names is not None else None
        selected = [c for c in self.checks if wanted is None or wanted.intersection(c.names)]
        started = self.clock()
        wall = time.time()
        deadline = started + self._budget()
        # The check that took longest last time (a canary, not the quick `triton`) runs in this task, so its request
        # goes out now rather than a loop turn later; the others run beside it in their own tasks.
        slowest = max(selected, key=lambda c: self._took.get(id(c), 0.0)) if selected else None
        tasks = {id(c): asyncio.ensure_future(self._run_check(c, deadline)) for c in selected if c is not slowest}
        try:
            inline = await self._run_check(slowest, deadline) if slowest is not None else []
            others = dict(zip(tasks, await asyncio.gather(*tasks.values()), strict=True))
        finally:
            for t in tasks.values():
                t.cancel()  # only matters when this run itself is cancelled
        done = [inline if c is slowest else others[id(c)] for c in selected]
        for c, rs in zip(selected, done, strict=True):
            self._took[id(c)] = max((r.duration for r in rs), default=0.0)
        results = {r.name: r for rs in done for r in rs if wanted is None or r.name in wanted}
        self._sequence += 1
        run = Run(started=started, wall=wall, duration=self.clock() - started, results=results, sequence=self._sequence)
        if wanted is None:
            self._last = run
            _tell(self._listeners, run)
            if self._later:
                asyncio.get_running_loop().call_soon(_tell, self._later, run)
        return run

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
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self.run_once())
        return await asyncio.shield(self._inflight)

    def current(self, run: Run) -> dict[str, CheckResult]:
        """A run's results plus the instant checks read now, in check order. The same mapping is handed out while
        neither the run nor an instant result changed (cached answers, and the verdicts judged from them, are
        then reused as they are)."""
        if not self.instant:
            return run.results
        instant = tuple(c.now() for c in self.instant)
        key = (run, instant)
        cached = self._current
        if (
            cached is not None
            and cached[0][0] is run
            and all(a is b for a, b in zip(cached[0][1], instant, strict=True))
        ):
            return cached[1]
        merged = dict(run.results)
        for r in instant:
            merged[r.name] = r
        out = {n: merged[n] for n in self.names if n in merged}
        self._current = (key, out)
        return out

    def unfinished(self, reason: str) -> dict[str, CheckResult]:
        """Every result failed with `reason` (not restart-worthy), for an answer that cannot wait for its run."""
        out = {r.name: r for c in self.checks for r in _all_failed(c, reason)}
        return self.current(Run(started=self.clock(), wall=time.time(), duration=0.0, results=out))

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
        tasks: list[asyncio.Future[Any]] = [t for t in (self._loop_task, self._inflight) if t is not None]
        self._loop_task = None
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
