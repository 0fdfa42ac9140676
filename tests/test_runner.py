"""The runner owns deadlines, single-flight, caching and backoff; the liveness policy follows the contract."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from probe.checks.base import CheckResult, Kind, failed, passed
from probe.checks.lifecycle import Lifecycle, ShutdownCheck
from probe.liveness import Liveness
from probe.runner import Runner
from tests.helpers import async_wait_for


class FakeCheck:
    """One result named `name`; `timed_out` reports a restart-worthy timeout, as a canary does."""

    def __init__(self, name: str, timeout: float | None = None) -> None:
        self.name = name
        self.names = (name,)
        self.timeout = timeout

    def timed_out(self, after: float) -> Sequence[CheckResult]:
        return [failed(self.name, Kind.CANARY, f"timed out after {after:.2f}s", restart_worthy=True)]

    async def explain_timeout(self, after: float) -> Sequence[CheckResult]:
        return self.timed_out(after)


class HangingCheck(FakeCheck):
    """A check whose call never returns (a hung Triton): it must be cut at its deadline and cancelled."""

    def __init__(self, name: str = "canary/hang", timeout: float | None = None) -> None:
        super().__init__(name, timeout)
        self.calls = 0
        self.cancelled = 0

    async def run(self) -> Sequence[CheckResult]:
        self.calls += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")


class CountingCheck(FakeCheck):
    """A healthy check that counts how often it really ran (how many canaries reached Triton)."""

    def __init__(self, name: str = "canary/count", delay: float = 0.0) -> None:
        super().__init__(name)
        self.calls = 0
        self.delay = delay

    async def run(self) -> Sequence[CheckResult]:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)  # simulated inference time, not a wait in the test
        return [passed(self.name, Kind.CANARY)]


class ExplainingCheck(HangingCheck):
    """A hung check that asks why after its deadline, taking `explain_s` to find out (a canary asking Triton's
    statistics whether its model is saturated)."""

    def __init__(self, explain_s: float, timeout: float) -> None:
        super().__init__("canary/explained", timeout)
        self.explain_s = explain_s
        self.explained = 0

    async def explain_timeout(self, after: float) -> Sequence[CheckResult]:
        await asyncio.sleep(self.explain_s)  # simulated Triton round trip, not a wait in the test
        self.explained += 1
        return [failed(self.name, Kind.CANARY, f"timed out after {after:.2f}s; explained")]


class BuggyCheck(FakeCheck):
    """A check with a bug: the runner turns the exception into a failed result instead of crashing."""

    def __init__(self) -> None:
        super().__init__("buggy")

    async def run(self) -> Sequence[CheckResult]:
        raise ZeroDivisionError("oops")


class ThreeResultCheck(FakeCheck):
    """A canary-like check reporting three results from one run."""

    def __init__(self) -> None:
        super().__init__("canary/x")
        self.names = ("model/x", "canary/x", "latency/x")

    async def run(self) -> Sequence[CheckResult]:
        return [passed("model/x", Kind.MODEL), passed("canary/x", Kind.CANARY), passed("latency/x", Kind.LATENCY)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_deadline_cuts_a_hung_check_and_cancels_it() -> None:
    hang = HangingCheck(timeout=0.2)
    runner = Runner([hang, CountingCheck()], timeout=0.8)
    start = time.monotonic()
    run = await runner.run_once()
    elapsed = time.monotonic() - start
    assert elapsed < 0.6
    r = run.results["canary/hang"]
    assert not r.ok and r.reason == "timed out after 0.20s" and r.restart_worthy
    assert hang.cancelled == 1
    assert run.results["canary/count"].ok


async def test_probe_budget_bounds_checks_without_own_timeout() -> None:
    runner = Runner([HangingCheck()], timeout=0.3)
    start = time.monotonic()
    run = await runner.run_once()
    assert time.monotonic() - start < 0.3 + 0.05
    assert run.results["canary/hang"].reason.startswith("timed out after 0.2")


async def test_a_cut_off_check_explains_itself_in_the_budget_left() -> None:
    check = ExplainingCheck(explain_s=0.01, timeout=0.2)
    run = await Runner([check], timeout=0.5).run_once()
    r = run.results["canary/explained"]
    assert r.reason == "timed out after 0.20s; explained" and not r.restart_worthy
    assert check.explained == 1


async def test_an_explanation_past_the_budget_leaves_timed_out_and_the_answer_in_time() -> None:
    check = ExplainingCheck(explain_s=5.0, timeout=0.2)
    runner = Runner([check], timeout=0.3, min_interval=0.0, hang_backoff=0.0)
    start = time.monotonic()
    run = await runner.run_once()
    assert time.monotonic() - start < 0.3 + 0.05
    r = run.results["canary/explained"]
    assert r.reason == "timed out after 0.20s" and r.restart_worthy
    assert check.explained == 0
    # No budget left at all (the deadline is the whole budget): not even asked.
    flat = ExplainingCheck(explain_s=0.0, timeout=None)
    run = await Runner([flat], timeout=0.3).run_once()
    assert run.results["canary/explained"].reason.startswith("timed out after 0.2") and flat.explained == 0


async def test_concurrent_probes_share_one_run() -> None:
    count = CountingCheck(delay=0.05)
    runner = Runner([count], timeout=0.8, min_interval=0.0)
    runs = await asyncio.gather(*(runner.results() for _ in range(200)))
    assert count.calls == 1
    assert len({id(r) for r in runs}) == 1


async def test_results_younger_than_min_interval_are_reused() -> None:
    clock = FakeClock()
    count = CountingCheck()
    runner = Runner([count], timeout=0.8, min_interval=1.0, clock=clock)
    first = await runner.results()
    clock.now += 0.5
    assert await runner.results() is first
    clock.now += 0.6
    assert await runner.results() is not first
    assert count.calls == 2


async def test_timed_out_check_backs_off_instead_of_piling_up() -> None:
    clock = FakeClock()
    hang = HangingCheck(timeout=0.05)
    runner = Runner([hang], timeout=0.8, min_interval=1.0, hang_backoff=4.0, clock=clock)
    await runner.run_once()
    assert hang.calls == 1
    again = await runner.run_once()  # inside the backoff: the stuck server is not sent another canary
    assert hang.calls == 1
    assert "retrying in" in again.results["canary/hang"].reason
    clock.now += 1.1
    await runner.run_once()
    assert hang.calls == 2
    await runner.run_once()
    clock.now += 1.1  # the delay doubled to 2 s
    await runner.run_once()
    assert hang.calls == 2
    clock.now += 1.0
    await runner.run_once()
    assert hang.calls == 3


async def test_a_bug_in_a_check_is_a_failed_result() -> None:
    run = await Runner([BuggyCheck()], timeout=0.5).run_once()
    assert run.results["buggy"].reason == "internal error: ZeroDivisionError: oops"


async def test_one_check_reports_several_results_in_order() -> None:
    run = await Runner([ThreeResultCheck(), CountingCheck()], timeout=0.5).run_once()
    assert list(run.results) == ["model/x", "canary/x", "latency/x", "canary/count"]
    only = await Runner([ThreeResultCheck(), CountingCheck()], timeout=0.5).run_once(names=["latency/x"])
    assert list(only.results) == ["latency/x"]


async def test_background_loop_runs_and_stops() -> None:
    count = CountingCheck()
    runner = Runner([count], timeout=0.5, min_interval=0, interval=0.01)
    runner.start()

    async def three_runs() -> bool:
        return count.calls >= 3

    await async_wait_for(three_runs, 5, "three background runs")
    await runner.stop()
    calls = count.calls
    for _ in range(20):
        await asyncio.sleep(0)
    assert count.calls == calls


def _results(*results: CheckResult) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def ok(name: str, kind: Kind) -> CheckResult:
    return passed(name, kind)


def test_liveness_waits_after_seconds_of_restart_worthy_failure() -> None:
    clock = FakeClock()
    live = Liveness(after=60, startup=600, clock=clock)
    live.observe(_results(ok("triton", Kind.SERVER), ok("canary/a", Kind.CANARY)), clock.now)
    hung = failed("canary/a", Kind.CANARY, "timed out after 0.70s", restart_worthy=True)
    live.observe(_results(ok("triton", Kind.SERVER), hung), clock.now)
    assert live.verdict({"canary/a": hung}).ok
    clock.now += 59
    live.observe(_results(ok("triton", Kind.SERVER), hung), clock.now)
    assert live.verdict({"canary/a": hung}).ok
    clock.now += 2
    v = live.verdict({"canary/a": hung})
    assert not v.ok
    assert v.checks["canary/a"].reason.startswith("failing for 61s (liveness.after 60s): timed out")
    # one good canary resets the clock
    live.observe(_results(ok("canary/a", Kind.CANARY)), clock.now)
    assert live.verdict({"canary/a": ok("canary/a", Kind.CANARY)}).ok


def test_liveness_ignores_mismatch_loading_and_drift() -> None:
    clock = FakeClock()
    live = Liveness(after=1, startup=600, clock=clock)
    live.observe(_results(ok("canary/a", Kind.CANARY)), clock.now)
    bad = [
        failed("canary/a", Kind.CANARY, "output y digest ... != golden ..."),
        failed("model/a", Kind.MODEL, "model m is not ready"),
        failed("latency/a", Kind.LATENCY, "median ... > 3 x baseline"),
    ]
    for _ in range(3):
        live.observe(_results(*bad), clock.now)
        clock.now += 10
    verdict = live.verdict(_results(*bad))
    assert verdict.ok and all(r.ok for r in verdict.checks.values())
    assert verdict.checks["model/a"].reason == "ok (not restart-worthy: model m is not ready)"


def test_liveness_not_before_first_canary_unless_startup_budget_passes() -> None:
    clock = FakeClock()
    live = Liveness(after=1, startup=100, clock=clock)
    down = failed("triton", Kind.SERVER, "cannot connect", restart_worthy=True)
    live.observe(_results(down), clock.now)
    clock.now += 50
    assert live.verdict({"triton": down}).ok, "never fail before the first good canary"
    clock.now += 51
    v = live.verdict({"triton": down})
    assert not v.ok and v.checks["triton"].reason.startswith("Triton not healthy within 100s of start")


def test_liveness_arms_by_kind_not_by_name() -> None:
    """A check is a canary by its kind: a server check named like a canary does not arm liveness."""
    clock = FakeClock()
    live = Liveness(after=0, startup=600, clock=clock)
    live.observe(_results(ok("canary/not-really", Kind.SERVER)), clock.now)
    assert not live.armed
    live.observe(_results(ok("weird", Kind.CANARY)), clock.now)
    assert live.armed


def test_shutdown_never_fails_liveness() -> None:
    clock = FakeClock()
    live = Liveness(after=0, startup=0, clock=clock)
    verdict = live.verdict({"shutdown": failed("shutdown", Kind.SHUTDOWN, "draining")})
    assert verdict.ok and "shutdown" not in verdict.checks


async def test_instant_checks_are_evaluated_every_time() -> None:
    lc = Lifecycle()
    runner = Runner([CountingCheck()], [ShutdownCheck(lc)], timeout=0.5, min_interval=60)
    run = await runner.results()
    assert runner.current(run)["shutdown"].ok
    lc.begin_shutdown("SIGTERM")
    snap = runner.current(await runner.results())
    assert not snap["shutdown"].ok and "SIGTERM" in snap["shutdown"].reason


def test_drift_waits_for_a_full_window_not_one_cold_sample() -> None:
    """A one-shot `probe check` sees one cold canary: that is no trend, so drift is not judged on it."""
    from probe.checks.latency import LatencyTracker, judge_latency
    from probe.config import LatencyConfig

    cfg = LatencyConfig(drift=5.0, window=3)
    tracker = LatencyTracker(cfg.window)
    baseline = (2.3, "golden, recorded 2026-11-30T10:00:00Z")
    tracker.add(0.0153)
    cold = judge_latency("latency/a", cfg, tracker, baseline)
    assert cold.ok and "drift judged once the window is full" in cold.reason
    tracker.add(0.0151)
    tracker.add(0.0149)
    warm = judge_latency("latency/a", cfg, tracker, baseline)
    assert not warm.ok and warm.reason.startswith("median of last 3 canaries 15.1ms > 5 x baseline 2.3ms")
