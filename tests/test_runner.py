"""The runner owns deadlines, single-flight, caching and backoff; the liveness policy follows the contract."""

from __future__ import annotations

import asyncio
import time

import pytest

from probe.checks.base import CheckResult, failed, passed
from probe.runner import Liveness, Run, Runner
from tests.helpers import async_wait_for


class HangingCheck:
    """A check whose call never returns (a hung Triton): it must be cut at its deadline and cancelled."""

    derived = False

    def __init__(self, name: str = "canary/hang", timeout: float | None = None) -> None:
        self.name = name
        self.timeout = timeout
        self.calls = 0
        self.cancelled = 0

    async def run(self) -> CheckResult:
        self.calls += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")


class CountingCheck:
    """A healthy check that counts how often it really ran (how many canaries reached Triton)."""

    timeout: float | None = None
    derived = False

    def __init__(self, name: str = "canary/count", delay: float = 0.0) -> None:
        self.name = name
        self.calls = 0
        self.delay = delay

    async def run(self) -> CheckResult:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)  # simulated inference time, not a wait in the test
        return passed(self.name)


class BuggyCheck:
    """A check with a bug: the runner turns the exception into a failed result instead of crashing."""

    name = "buggy"
    timeout: float | None = None
    derived = False

    async def run(self) -> CheckResult:
        raise ZeroDivisionError("oops")


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


async def test_history_is_bounded() -> None:
    runner = Runner([CountingCheck()], timeout=0.5, min_interval=0, history=5)
    for _ in range(12):
        await runner.run_once()
    assert len(runner.history) == 5
    assert runner.history[-1].sequence == 12


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


def _run(clock: FakeClock, *results: CheckResult) -> Run:
    return Run(started=clock.now, wall=time.time(), duration=0.0, results={r.name: r for r in results})


def test_liveness_waits_after_seconds_of_restart_worthy_failure() -> None:
    clock = FakeClock()
    live = Liveness(after=60, startup=600, clock=clock)
    live.observe(_run(clock, passed("triton"), passed("canary/a")))
    hung = failed("canary/a", "timed out after 0.70s", restart_worthy=True)
    live.observe(_run(clock, passed("triton"), hung))
    assert live.verdict({"canary/a": hung})["canary/a"].ok
    clock.now += 59
    live.observe(_run(clock, passed("triton"), hung))
    assert live.verdict({"canary/a": hung})["canary/a"].ok
    clock.now += 2
    v = live.verdict({"canary/a": hung})["canary/a"]
    assert not v.ok and v.reason.startswith("failing for 61s (liveness.after 60s): timed out")
    # one good canary resets the clock
    live.observe(_run(clock, passed("canary/a")))
    assert live.verdict({"canary/a": passed("canary/a")})["canary/a"].ok


def test_liveness_ignores_mismatch_loading_and_drift() -> None:
    clock = FakeClock()
    live = Liveness(after=1, startup=600, clock=clock)
    live.observe(_run(clock, passed("canary/a")))
    bad = [
        failed("canary/a", "output y digest ... != golden ..."),
        failed("model/a", "model m is not ready"),
        failed("latency/a", "median ... > 3 x baseline"),
    ]
    for _ in range(3):
        live.observe(_run(clock, *bad))
        clock.now += 10
    assert all(r.ok for r in live.verdict({r.name: r for r in bad}).values())


def test_liveness_not_before_first_canary_unless_startup_budget_passes() -> None:
    clock = FakeClock()
    live = Liveness(after=1, startup=100, clock=clock)
    down = failed("triton", "cannot connect", restart_worthy=True)
    live.observe(_run(clock, down))
    clock.now += 50
    assert live.verdict({"triton": down})["triton"].ok, "never fail before the first good canary"
    clock.now += 51
    v = live.verdict({"triton": down})["triton"]
    assert not v.ok and v.reason.startswith("Triton not healthy within 100s of start")


def test_shutdown_never_fails_liveness() -> None:
    clock = FakeClock()
    live = Liveness(after=0, startup=0, clock=clock)
    assert "shutdown" not in live.verdict({"shutdown": failed("shutdown", "draining")})


@pytest.mark.parametrize("interval", [0.0])
async def test_instant_checks_are_evaluated_every_time(interval: float) -> None:
    from probe.checks.lifecycle import Lifecycle, ShutdownCheck

    lc = Lifecycle()
    runner = Runner([CountingCheck(), ShutdownCheck(lc)], timeout=0.5, min_interval=60, interval=interval)
    assert (await runner.snapshot())["shutdown"].ok
    lc.begin_shutdown("SIGTERM")
    snap = await runner.snapshot()
    assert not snap["shutdown"].ok and "SIGTERM" in snap["shutdown"].reason
