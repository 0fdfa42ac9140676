"""Saturated or hung, without a Triton: the rule on evidence, the probe's own canaries taken off, what the canary
reports under each probe.saturated setting, the once-only log line, and what /metrics and the views show.

Against the real Triton: tests/test_saturation_triton.py."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from probe.checks.base import CheckResult, Kind, failed, passed
from probe.metrics import Metrics
from probe.runner import Run
from probe.saturation import (
    NOT_READY,
    READY,
    CanarySaturation,
    Evidence,
    Saturation,
    default_deadline,
    judge,
    success_count,
    verified_age,
)
from probe.server import full_reason
from probe.triton import TritonRequestError
from probe.triton_metrics import Page


def test_saturated_needs_completions_pending_and_a_queue_that_drains_within_liveness_after() -> None:
    busy = judge(Evidence("m", window=1.0, completed=14, pending=16), waited=0.68, drain_limit=4)
    assert busy.saturated
    assert busy.text == (
        "saturated: 14 requests completed in 1.0s and 16 pending while the canary waited 0.68s "
        "(the queue drains in about 1.1s at that rate)"
    )
    stuck = judge(Evidence("m", window=3.0, completed=0, pending=16), waited=0.68, drain_limit=4)
    assert not stuck.saturated and stuck.text == "hung: no request of model m completed in 3.0s (16 pending)"
    idle = judge(Evidence("m", window=3.0, completed=0, pending=0), waited=0.68, drain_limit=4)
    assert not idle.saturated and idle.text.startswith("hung: no request")
    alone = judge(Evidence("m", window=3.0, completed=5, pending=0), waited=0.68, drain_limit=4)
    assert not alone.saturated and "none is waiting: the canary itself is stuck or slow" in alone.text


def test_a_trickle_with_hundreds_waiting_is_hung() -> None:
    """One request a minute with 300 waiting: a request joining now would wait five hours."""
    trickle = judge(Evidence("m", window=60.0, completed=1, pending=300), waited=0.7, drain_limit=60)
    assert not trickle.saturated
    assert trickle.text == (
        "too little progress: 1 request of model m completed in 60.0s with 300 pending; at that rate the queue "
        "takes 18000.0s to drain, over liveness.after 60s"
    )
    # With liveness.after 0 nothing drains in time: every miss is hung.
    assert not judge(Evidence("m", 1.0, 100, 1), waited=0.7, drain_limit=0).saturated


def test_success_count_sums_versions_and_default_deadline_keeps_time_for_the_read() -> None:
    stats = {
        "model_stats": [
            {"inference_stats": {"success": {"count": 4}}},
            {"inference_stats": {"success": {"count": 3}}},
        ]
    }
    assert success_count(stats) == 7
    assert success_count({}) == 0
    with pytest.raises(ValueError, match="statistics not shaped like Triton's"):
        success_count({"model_stats": [{"inference_stats": {"success": {"count": "many"}}}]})
    with pytest.raises(ValueError):
        success_count({"model_stats": [["not", "a", "mapping"]]})
    assert default_deadline(0.8) == pytest.approx(0.68)
    assert default_deadline(0.2) == pytest.approx(0.14)


# ---------------------------------------------------------------------------------------------- fakes


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedTriton:
    """A Triton whose success count and pending queue the test sets; /stats may refuse as restricted."""

    def __init__(self) -> None:
        self.success = 0
        self.pending = 0
        self.refuse: str | None = None
        self.stats_calls = 0

    async def statistics(self, model: str, version: str = "") -> dict[str, Any]:
        self.stats_calls += 1
        if self.refuse is not None:
            raise TritonRequestError(f"model {model} statistics: {self.refuse}")
        return {"model_stats": [{"inference_stats": {"success": {"count": self.success}}}]}

    def page(self) -> Page:
        text = f'nv_inference_pending_request_count{{model="m",version="1"}} {self.pending}\n'
        return Page(0.0, text)


class ScriptedPage:
    def __init__(self, triton: ScriptedTriton) -> None:
        self.triton = triton
        self.override: Page | None = None

    async def get(self, max_age: float) -> Page:
        return self.override or self.triton.page()


HUNG = failed("canary/c", Kind.CANARY, "timed out after 0.68s", restart_worthy=True)


def build(
    setting: str = READY, drain_limit: float = 4.0, logger: logging.Logger | None = None
) -> tuple[Saturation, CanarySaturation, ScriptedTriton, ScriptedPage, FakeClock]:
    triton = ScriptedTriton()
    page = ScriptedPage(triton)
    clock = FakeClock()
    sat = Saturation(
        triton,  # type: ignore[arg-type]
        page,  # type: ignore[arg-type]
        drain_limit=drain_limit,
        setting=setting,
        logger=logger,
        clock=clock,
        wall=clock,
    )
    return sat, sat.canary("c", "m"), triton, page, clock


def verified(name: str = "canary/c") -> CheckResult:
    return passed(name, Kind.CANARY, "output matches golden")


# ---------------------------------------------------------------------------------------------- judged misses


async def test_saturated_passes_on_the_last_verified_output_under_ready() -> None:
    sat, canary, triton, _, clock = build(READY)
    canary.answered(verified())
    triton.success = 100
    sat.observe_stats("m", "", await triton.statistics("m"))  # the queue watcher's poll
    clock.now += 2.0
    triton.success, triton.pending = 120, 16
    r = await canary.judge_miss(HUNG, 0.68)
    assert r.ok and not r.restart_worthy
    assert r.reason.startswith("saturated: 19 requests completed in 2.0s and 15 pending while the canary waited 0.68s")
    assert "not counting the probe's own 1 canary)" in r.reason
    assert r.details["saturated"] is True and r.details["verified_at"] == 1000.0
    assert verified_age(r, 1003.2) == "last verified output 3.2s ago"
    shown = replace(r, details={**r.details, "verified_at": time.time() - 3.0})
    assert full_reason(shown) == f"{r.reason}; last verified output 3.0s ago"


async def test_saturated_fails_ready_but_never_restart_worthy_under_not_ready() -> None:
    sat, canary, triton, _, clock = build(NOT_READY)
    canary.answered(verified())
    sat.observe_stats("m", "", await triton.statistics("m"))
    clock.now += 1.0
    triton.success, triton.pending = 10, 8
    r = await canary.judge_miss(HUNG, 0.68)
    assert not r.ok and not r.restart_worthy and r.details["saturated"] is True
    assert r.reason.startswith("saturated: ") and r.reason.endswith("(probe.saturated: not-ready)")


async def test_saturated_without_a_verified_output_or_after_a_mismatch_does_not_pass() -> None:
    sat, canary, triton, _, clock = build(READY)
    sat.observe_stats("m", "", await triton.statistics("m"))
    clock.now += 1.0
    triton.success, triton.pending = 10, 8
    first = await canary.judge_miss(HUNG, 0.68)
    assert not first.ok and not first.restart_worthy and first.reason.endswith("; no output verified yet")
    canary.answered(failed("canary/c", Kind.CANARY, "output differs from golden"))
    clock.now += 1.0
    triton.success, triton.pending = 20, 8
    second = await canary.judge_miss(HUNG, 0.68)
    assert not second.ok and not second.restart_worthy
    assert second.reason.endswith("; the last canary Triton answered failed: output differs from golden")


async def test_nothing_completing_with_requests_pending_is_hung() -> None:
    """The starvation of the incident: requests queued for GPU memory that never comes."""
    sat, canary, triton, _, clock = build()
    canary.answered(verified())
    triton.success = 50
    sat.observe_stats("m", "", await triton.statistics("m"))
    clock.now += 3.0
    triton.pending = 40
    r = await canary.judge_miss(HUNG, 0.68)
    assert not r.ok and r.restart_worthy
    assert r.reason == (
        "timed out after 0.68s; hung: no request of model m completed in 3.0s "
        "(39 pending; not counting the probe's own 1 canary)"
    )


async def test_a_slow_model_fed_only_by_the_probes_own_canaries_is_not_saturated() -> None:
    """No traffic, a model slower than the deadline: Triton completes and queues only the canaries the probe
    abandoned; those are never evidence of a busy model."""
    sat, canary, triton, _, clock = build()
    canary.answered(verified())
    sat.observe_stats("m", "", await triton.statistics("m"))
    results = []
    for _ in range(6):  # one canary a second, each 1.5 s in Triton: they complete late, and queue behind each other
        clock.now += 1.0
        triton.success += 1 if clock.now > 1001.5 else 0
        triton.pending = 1
        results.append(await canary.judge_miss(HUNG, 0.68))
    assert all(r.restart_worthy and not r.ok for r in results), [r.reason for r in results]
    assert all("saturated:" not in r.reason for r in results)


async def test_the_probes_own_abandoned_canaries_are_forgotten_once_triton_answers_one() -> None:
    sat, canary, triton, _, clock = build()
    sat.observe_stats("m", "", await triton.statistics("m"))
    for _ in range(3):
        clock.now += 1.0
        await canary.judge_miss(HUNG, 0.68)
    canary.answered(verified())
    clock.now += 1.0
    triton.success, triton.pending = 3, 2
    r = await canary.judge_miss(HUNG, 0.68)
    assert r.ok and "3 requests completed" not in r.reason and "2 requests completed in 1.0s and 1 pending" in r.reason


async def test_evidence_that_cannot_be_had_counts_as_hung_and_says_why() -> None:
    _, canary, triton, page, clock = build()
    canary.answered(verified())
    first = await canary.judge_miss(HUNG, 0.68)  # no reading before this one
    assert first.restart_worthy and first.reason == (
        "timed out after 0.68s; cannot tell saturated from hung: "
        "no earlier reading of model m statistics to compare with"
    )
    clock.now += 1.0
    triton.refuse = "[403] This API is restricted, expecting header 'triton-access-token'"
    refused = await canary.judge_miss(HUNG, 0.68)
    assert refused.restart_worthy and refused.reason == (
        "timed out after 0.68s; cannot tell saturated from hung: model m statistics: [403] This API is restricted, "
        "expecting header 'triton-access-token'"
    )
    triton.refuse = None
    page.override = Page(0.0, None, "cannot read Triton metrics http://127.0.0.1:8002/metrics: connection refused")
    clock.now += 1.0
    no_page = await canary.judge_miss(HUNG, 0.68)
    assert no_page.restart_worthy and no_page.reason.endswith(
        "cannot tell saturated from hung: pending requests unknown: cannot read Triton metrics "
        "http://127.0.0.1:8002/metrics: connection refused"
    )
    page.override = Page(0.0, 'nv_inference_count{model="m",version="1"} 3\n')
    clock.now += 1.0
    old = await canary.judge_miss(HUNG, 0.68)
    assert old.reason.endswith("Triton's metrics page has no nv_inference_pending_request_count for model m")
    assert canary.unjudged(HUNG).reason == (
        "timed out after 0.68s; cannot tell saturated from hung: no time left in probe.timeout after the canary's "
        "deadline to read Triton's statistics and metrics"
    )


def test_unreadable_statistics_are_logged_once_per_model(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("probe.test-saturation")
    sat, _, triton, _, _ = build(logger=logger)
    sat.canary("c2", "m")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for _ in range(5):  # five watcher polls
            sat.refused("m", "", "model m statistics: [403] This API is restricted")
            sat.observe_page(triton.page())
    records = [r for r in caplog.records if r.name == logger.name]
    assert len(records) == 1
    assert records[0].getMessage().startswith("saturation cannot be told from a hang")
    assert records[0].fields == {  # type: ignore[attr-defined]
        "canaries": ["c", "c2"],
        "model": "m",
        "reason": "model m statistics: [403] This API is restricted",
    }


async def test_a_page_without_the_pending_series_is_logged_once_and_a_good_one_not_at_all(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("probe.test-saturation-page")
    sat, _, triton, _, _ = build(logger=logger)
    with caplog.at_level(logging.INFO, logger=logger.name):
        for _ in range(3):
            sat.observe_stats("m", "", await triton.statistics("m"))
            sat.observe_page(Page(0.0, "nv_gpu_utilization 0\n"))
    assert [r.fields["reason"] for r in caplog.records if r.name == logger.name] == [  # type: ignore[attr-defined]
        "Triton's metrics page has no nv_inference_pending_request_count for model m"
    ]
    good, _, _, _, _ = build(logger=logger)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=logger.name):
        good.observe_stats("m", "", await triton.statistics("m"))
        good.observe_page(triton.page())
    assert [r for r in caplog.records if r.name == logger.name] == []


def test_a_deadline_that_leaves_no_time_for_the_read_is_logged_when_built(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("probe.test-saturation-room")
    sat, _, _, _, _ = build(logger=logger)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        sat.check_room("tight", 0.0)
        sat.check_room("roomy", 0.1)
    [record] = [r for r in caplog.records if r.name == logger.name]
    assert record.fields["canaries"] == ["tight"]  # type: ignore[attr-defined]


def test_probe_saturated_is_exported_from_the_start_and_follows_the_canary() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, canaries=["c"])
    assert registry.get_sample_value("probe_saturated", {"canary": "c"}) == 0.0
    saturated = passed("canary/c", Kind.CANARY, "saturated: ...", details={"saturated": True, "verified_at": 1.0})
    metrics.observe_run(Run(0.0, 0.0, 0.0, {"canary/c": saturated}), ready=True, live=True)
    assert registry.get_sample_value("probe_saturated", {"canary": "c"}) == 1.0
    metrics.observe_run(Run(0.0, 0.0, 0.0, {"canary/c": verified()}), ready=True, live=True)
    assert registry.get_sample_value("probe_saturated", {"canary": "c"}) == 0.0
