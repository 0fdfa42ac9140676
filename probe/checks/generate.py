"""A canary for LLMs and other generative or streaming (decoupled) models: a fixed `request` posted to Triton's
generate extension, its answer (for `generate_stream`, its events joined) compared with the golden record.

Like `CanaryCheck`, one object, one run, three results: `model/<canary>`, `canary/<canary>` and
`latency/<canary>`. The runner cancels a stalled stream at the canary's deadline; the reason then says how many
events had arrived and when the first came. Errors (an `error` field in the answer or any event, which Triton
sends under status 200; an empty stream; a stream cut short; a malformed or oversized reply) and timeouts are
restart-worthy; a mismatch never is.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from probe.checks.base import CheckResult, Kind, failed, passed
from probe.checks.canary import Canary
from probe.checks.latency import LatencyTracker, judge_latency
from probe.generate import GenerateAnswer, Progress, encode_request, generate, generate_stream
from probe.golden import Golden, GoldenError, check_golden_for, compare_answers, explain_mismatch

OFF_LOOP_CHARS = 4096
"""Answers with a longer string field are compared in text mode on a worker thread (about 3 ms at 4 KB)."""


class GenerateCanaryCheck(Canary):
    """Runs a generate / generate_stream canary and judges its model, its answer and its latency.

    `canary/` fails when: the golden file is missing, corrupt or recorded for another request or protocol; the
    model is not ready; Triton answers with an error status, an `error` field, an empty or cut-short stream, or a
    malformed or oversized reply (restart-worthy); the answer differs from every golden record (by digest, within
    tolerance, or below `min_similarity` in text mode); the answer did not finish by the deadline (restart-worthy).
    `latency/` also fails when the first event came later than `latency.first_ms`, or when the recent median time
    to the first event drifts past `drift` x its recorded baseline.
    """

    def _prepare(self) -> None:
        canary = self.canary
        assert canary.request is not None, "a generate canary has a request (config guarantees it)"
        self._stream = canary.protocol == "generate_stream"
        self._body = encode_request(canary.request)
        from probe.answers import request_digest

        self._request_digest = request_digest(canary.request)
        self.first_tracker = LatencyTracker(canary.latency.window)
        self.progress = Progress()

    def _missed(self, after: float) -> str:
        self._client.failures += 1  # readiness is no longer vouched for
        return f"timed out after {after:.2f}s: {self.progress.describe()}"

    async def _run(self) -> tuple[CheckResult | None, CheckResult]:
        c = self.canary
        name = self.canary_name
        try:
            golden = await self.golden.current()
            check_golden_for(golden, c.name, self._request_digest, c.compare.mode, self.golden.path, c.protocol)
        except GoldenError as e:
            return None, failed(name, Kind.CANARY, str(e))
        post = generate_stream if self._stream else generate
        outcome = await post(
            self._client.session,
            self._client.base_url,
            c.model,
            c.version,
            self._body,
            max_bytes=self._max_reply,
            progress=self.progress,
        )
        if not isinstance(outcome, GenerateAnswer):
            self._client.failures += 1
            what = f"canary {c.name} {c.protocol}"
            refused = failed(name, Kind.CANARY, f"{what}: {outcome.reason}", restart_worthy=True)
            if outcome.kind in ("status", "error", "empty"):  # Triton answered this canary, if not well
                self.saturation.answered(refused)
            if outcome.kind == "status":  # Triton refused: is the model still there?
                model = await self.model.ask()
                if not model.ok:
                    return model, failed(name, Kind.CANARY, f"{self.model.label} is not ready: {outcome.reason}")
                return model, refused
            # An error event is the model's own answer, so the model is there; anything else says nothing of it.
            return (self.model.ready() if outcome.kind == "error" else None), refused
        model = self.model.ready()
        self.tracker.add(outcome.total_s)
        if outcome.first_event_s is not None:
            self.first_tracker.add(outcome.first_event_s)
        return model, await self._judge(golden, outcome)

    async def _judge(self, golden: Golden, outcome: GenerateAnswer) -> CheckResult:
        c = self.canary
        if c.compare.mode == "text" and any(
            isinstance(v, str) and len(v) > OFF_LOOP_CHARS for v in outcome.answer.values()
        ):
            # similarity is O(n*m/64): a long answer is compared on a worker thread, so the loop keeps answering
            cmp = await asyncio.to_thread(compare_answers, golden, outcome.answer, c.compare)
        else:
            cmp = compare_answers(golden, outcome.answer, c.compare)
        total_ms = round(outcome.total_s * 1000.0, 3)
        details: dict[str, Any] = {"latency_s": outcome.total_s, "max_abs_error": cmp.max_abs_error}
        times = f"{outcome.events} event{'s' if outcome.events != 1 else ''} in {total_ms:.1f}ms"
        if outcome.first_event_s is not None:
            details["first_event_s"] = outcome.first_event_s
            times += f", first after {outcome.first_event_s * 1000.0:.1f}ms"
        kw: dict[str, Any] = {"observed_value": total_ms, "observed_unit": "ms", "details": details}
        if cmp.ok:
            note = f"; {cmp.reason}" if cmp.reason not in ("", "ok") else ""
            verified = passed(self.canary_name, Kind.CANARY, f"ok: {times}{note}", **kw)
            self.saturation.answered(verified)
            return verified
        env = self._environment.known(c.model, c.version)
        details["mismatch"] = True
        mismatch = failed(self.canary_name, Kind.CANARY, explain_mismatch(golden, cmp, env), **kw)
        self.saturation.answered(mismatch)
        return mismatch

    def _latency(self) -> CheckResult:
        c = self.canary
        golden = self.golden.cached()
        rec = golden.records[-1] if golden is not None else None
        baseline = (rec.latency.median_ms, f"golden, recorded {rec.recorded_at}") if rec is not None else None
        total = judge_latency(self.latency_name, c.latency, self.tracker, baseline)
        if not self._stream or not total.ok:
            return total
        last = self.first_tracker.last
        if last is None:
            return total
        first_ms = last * 1000.0
        if c.latency.first_ms is not None and first_ms > c.latency.first_ms:
            reason = f"first event after {first_ms:.1f}ms > first_ms {c.latency.first_ms:g}"
            return failed(self.latency_name, Kind.LATENCY, reason, details=total.details)
        first_base = None
        if rec is not None and rec.first_event is not None:
            first_base = (rec.first_event.median_ms, f"golden, recorded {rec.recorded_at}")
        drift_only = replace(c.latency, max_ms=None)  # first_ms is the first event's budget, judged above
        first = judge_latency(self.latency_name, drift_only, self.first_tracker, first_base)
        if not first.ok:
            return failed(
                self.latency_name, Kind.LATENCY, f"time to first event: {first.reason}", details=total.details
            )
        median = self.first_tracker.median() or 0.0
        reason = f"{total.reason}; first event median {median * 1000.0:.1f}ms"
        return passed(
            self.latency_name,
            Kind.LATENCY,
            reason,
            observed_value=total.observed_value,
            observed_unit=total.observed_unit,
            details={**total.details, "first_event_median_ms": median * 1000.0},
        )
