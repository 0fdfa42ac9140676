"""One canary: a fixed-input inference whose output must match the recorded golden file.

One object, one run, three results: `model/<canary>` (is the model ready), `canary/<canary>` (did the inference
complete in time and match the golden) and `latency/<canary>` (is it as fast as when recorded). A healthy run is
one inference: a canary Triton answered proves its model ready, so Triton is asked about the model only when the
inference did not tell.

The runner bounds the run with the canary's deadline and cancels it when the deadline passes, so a hang becomes a
fast, explained failure; in the budget left, `explain_timeout` asks Triton whether the model kept completing other
requests meanwhile (`probe.saturation`): saturated is never restart-worthy, hung is. A slow but correct canary passes
`canary/` (latency is `latency/`'s to judge); a mismatch fails it but is never restart-worthy: restarting will not
fix a wrong model.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np

from probe.checks.base import CheckResult, Kind, failed, passed
from probe.checks.latency import LatencyTracker, judge_latency
from probe.checks.model import ModelVerdict
from probe.config import CanaryConfig
from probe.environment import EnvironmentProbe
from probe.golden import Golden, GoldenError, GoldenStore, check_golden_for, compare_outputs, explain_mismatch
from probe.saturation import CanarySaturation, canary_deadline
from probe.tensors import NUMPY_DTYPES, InputError, build_inputs, input_digest
from probe.triton import JSON_CAP, ReplyTooLarge, TritonClient, TritonRequestError, TritonUnreachable, input_mismatches

OFF_LOOP_BYTES = 1024 * 1024
"""Outputs larger than this are compared in tolerance mode on a worker thread (exact mode hashes in place: fast)."""


def reply_cap(golden: Golden, fallback: int) -> int:
    """The most bytes a canary's reply may take: twice what its golden records hold, plus room for the JSON
    header; `fallback` (triton.max_reply) when a record has a BYTES output, whose size the golden cannot tell."""
    expected = 0
    for rec in golden.records:
        size = 0
        for out in rec.outputs.values():
            if out.datatype == "BYTES":
                return fallback
            size += math.prod(out.shape) * NUMPY_DTYPES[out.datatype].itemsize
        expected = max(expected, size)
    return 2 * expected + JSON_CAP


class Canary:
    """What both kinds of canary share: three results from one run (`model/`, `canary/`, `latency/`), the deadline
    (its own `timeout`, else the probe budget less the time kept to read Triton's statistics after a miss:
    `saturation.default_deadline`), and a miss judged saturated or hung in the budget left. A kind supplies `_run`
    (the model verdict it saw, or None; and the canary verdict), `_latency`, and `_missed` (the timed-out reason)."""

    def __init__(
        self,
        client: TritonClient,
        canary: CanaryConfig,
        golden: GoldenStore,
        environment: EnvironmentProbe,
        *,
        probe_timeout: float,
        max_reply: int,
        saturation: CanarySaturation,
    ) -> None:
        self._client = client
        self.saturation = saturation
        self.canary = canary
        self.golden = golden
        self.tracker = LatencyTracker(canary.latency.window)
        self._environment = environment
        self._max_reply = max_reply
        self.model = ModelVerdict(client, canary)
        self.model_name = self.model.name
        self.canary_name = f"canary/{canary.name}"
        self.latency_name = f"latency/{canary.name}"
        self.names = (self.model_name, self.canary_name, self.latency_name)
        self.timeout = canary_deadline(canary, probe_timeout)
        self._prepare()

    def _prepare(self) -> None:
        """A kind's own state, set up once the shared part is."""

    async def _run(self) -> tuple[CheckResult | None, CheckResult]:
        raise NotImplementedError

    def _latency(self) -> CheckResult:
        raise NotImplementedError

    def _missed(self, after: float) -> str:
        return f"timed out after {after:.2f}s"

    async def run(self) -> tuple[CheckResult, CheckResult, CheckResult]:
        seen, canary = await self._run()
        return await self.model.settle(seen), canary, self._latency()

    def timed_out(self, after: float) -> tuple[CheckResult, CheckResult, CheckResult]:
        model, canary, latency = self._cut_off(after)
        return model, self.saturation.unjudged(canary), latency

    async def explain_timeout(self, after: float) -> tuple[CheckResult, CheckResult, CheckResult]:
        model, canary, latency = self._cut_off(after)
        return model, await self.saturation.judge_miss(canary, after), latency

    def _cut_off(self, after: float) -> tuple[CheckResult, CheckResult, CheckResult]:
        canary = failed(self.canary_name, Kind.CANARY, self._missed(after), restart_worthy=True)
        return self.model.carried(), canary, self._latency()


class CanaryCheck(Canary):
    """Runs the canary; judges its model's readiness, its output against the golden file, and its latency.

    `canary/` fails when: the golden file is missing, corrupt or recorded for other inputs; the inputs do not fit
    the model; the model is not ready; Triton refuses or errors on the inference (restart-worthy); the reply is
    malformed (restart-worthy) or too large (not: the model answered); the output differs from every golden record
    (names, datatype, shape, digest or tolerance); the inference did not finish by the deadline (restart-worthy,
    unless Triton shows the model saturated: then never restart-worthy, and passing or failing per
    probe.saturated). `model/` fails while the model is loading, unloaded or failed to load, never restart-worthy.

    Without a `timeout` of its own, the canary's deadline keeps back from probe.timeout the time to read Triton's
    statistics after a miss (`saturation.default_deadline`).
    """

    def _prepare(self) -> None:
        self._inputs: dict[str, np.ndarray[Any, Any]] | None = None
        self._input_digest = ""
        self._input_error: str | None = None
        self._validated = False

    def _load_inputs(self) -> None:
        if self._inputs is None and self._input_error is None:
            try:
                self._inputs = build_inputs(self.canary)
                self._input_digest = input_digest(self.canary, self._inputs)
            except InputError as e:
                self._input_error = f"canary input error: {e}"

    def _golden_baseline(self) -> tuple[float, str] | None:
        golden = self.golden.cached()  # never reads a file: this run's canary has just loaded it, if it could
        if golden is None:
            return None
        rec = golden.records[-1]
        return rec.latency.median_ms, f"golden, recorded {rec.recorded_at}"

    def _latency(self) -> CheckResult:
        return judge_latency(self.latency_name, self.canary.latency, self.tracker, self._golden_baseline())

    async def _run(self) -> tuple[CheckResult | None, CheckResult]:
        """(model verdict, or None when the run did not tell; canary verdict)."""
        c = self.canary
        name = self.canary_name
        self._load_inputs()
        if self._input_error is not None:
            return None, failed(name, Kind.CANARY, self._input_error)
        assert self._inputs is not None
        try:
            golden = await self.golden.current()
            check_golden_for(golden, c.name, self._input_digest, c.compare.mode, self.golden.path)
        except GoldenError as e:
            return None, failed(name, Kind.CANARY, str(e))
        try:
            if not self._validated:
                info = await self._client.model_info(c.model, c.version)
                if info.decoupled:
                    reason = (
                        f"model {c.model} is decoupled (it streams its answers), and Triton answers /infer on such "
                        "a model with 501: use protocol: generate_stream for this canary"
                    )
                    return self.model.ready(), failed(name, Kind.CANARY, reason)
                problems = input_mismatches(c, info)
                if problems:
                    return None, failed(name, Kind.CANARY, "canary does not fit the model: " + "; ".join(problems))
                self._validated = True
            outputs = c.outputs or tuple(golden.records[0].outputs)
            cap = reply_cap(golden, self._max_reply)
            outcome = await self._client.infer(c, self._inputs, outputs, max_reply=cap)
        except ReplyTooLarge as e:  # the model answered far more than its golden: a changed model, not a hang
            return None, failed(name, Kind.CANARY, str(e))
        except TritonUnreachable as e:  # says nothing of the model (a malformed reply, a reset): ask
            return None, failed(name, Kind.CANARY, str(e), restart_worthy=True)
        except TritonRequestError as e:
            self._validated = False  # the model may have been replaced; re-check its metadata next time
            model = await self.model.ask()
            if not model.ok:
                return model, failed(name, Kind.CANARY, f"{self.model.label} is not ready: {e}")
            refused = failed(name, Kind.CANARY, str(e), restart_worthy=True)
            self.saturation.answered(refused)
            return model, refused
        model = self.model.ready()
        self.tracker.add(outcome.latency_s)
        if c.compare.mode == "tolerance" and sum(a.nbytes for _, a in outcome.outputs.values()) > OFF_LOOP_BYTES:
            # allclose on a large tensor takes a second at the caps: on a worker thread, so the loop keeps answering
            cmp = await asyncio.to_thread(compare_outputs, golden, outcome.outputs, c.compare)
        else:
            cmp = compare_outputs(golden, outcome.outputs, c.compare)
        latency_ms = round(outcome.latency_s * 1000.0, 3)
        details: dict[str, Any] = {"latency_s": outcome.latency_s, "max_abs_error": cmp.max_abs_error}
        if cmp.ok:
            verified = passed(
                name, Kind.CANARY, cmp.reason, observed_value=latency_ms, observed_unit="ms", details=details
            )
            self.saturation.answered(verified)
            return model, verified
        # Only a mismatch pays for the fingerprint: the reason names where each record came from.
        env = self._environment.known(c.model, c.version)
        details["mismatch"] = True
        reason = explain_mismatch(golden, cmp, env)
        mismatch = failed(name, Kind.CANARY, reason, observed_value=latency_ms, observed_unit="ms", details=details)
        self.saturation.answered(mismatch)
        return model, mismatch
