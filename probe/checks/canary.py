"""`canary/<canary>`: a fixed-input inference whose output must match the recorded golden file.

The runner bounds the inference with the canary's deadline and cancels it when the deadline passes, so a hang
becomes a fast, explained failure here. A slow but correct canary passes this check (latency is judged by
`latency/<canary>`); a mismatch fails it but is never restart-worthy (restarting will not fix a wrong model).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from probe.checks.base import CheckResult, failed, passed
from probe.config import CanaryConfig
from probe.environment import EnvironmentProbe
from probe.golden import GoldenError, GoldenStore, check_golden_for, compare_outputs
from probe.tensors import InputError, build_inputs, input_digest
from probe.triton import TritonClient, TritonRequestError, TritonUnreachable, input_mismatches


@dataclass
class LatencyTracker:
    """Recent canary latencies (seconds) shared by the canary check (writer) and the latency check (reader)."""

    window: int
    samples: deque[float]
    last: float | None = None
    last_at: float = 0.0
    startup_baseline: float | None = None
    _startup: list[float] | None = None

    @classmethod
    def create(cls, window: int) -> LatencyTracker:
        return cls(window=window, samples=deque(maxlen=window), _startup=[])

    def add(self, latency_s: float) -> None:
        self.samples.append(latency_s)
        self.last = latency_s
        self.last_at = time.monotonic()
        if self._startup is not None:
            self._startup.append(latency_s)
            if len(self._startup) >= self.window:
                self.startup_baseline = statistics.median(self._startup)
                self._startup = None

    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


class CanaryCheck:
    """Runs the canary and compares its outputs with the golden file.

    Fails when: the golden file is missing, corrupt or recorded for other inputs; the inputs do not fit the
    model; the model is not ready; Triton refuses or errors on the inference (restart-worthy); the output
    differs from every golden record (names, datatype, shape, digest or tolerance).
    """

    timeout: float | None
    derived = False

    def __init__(
        self,
        client: TritonClient,
        canary: CanaryConfig,
        golden: GoldenStore,
        tracker: LatencyTracker,
        environment: EnvironmentProbe,
        *,
        probe_timeout: float,
    ) -> None:
        self._client = client
        self.canary = canary
        self.golden = golden
        self.tracker = tracker
        self._environment = environment
        self.name = f"canary/{canary.name}"
        self.timeout = canary.deadline(probe_timeout)
        self._inputs: dict[str, np.ndarray[Any, Any]] | None = None
        self._input_digest = ""
        self._input_error: str | None = None
        self._validated = False
        # What this run learnt about the model's readiness, for model/<canary>: True once Triton answered the
        # inference, False when it said the model is not ready, None when the run learnt nothing.
        self.model_ready_seen: bool | None = None
        self.finished = True  # False only while a run is in flight, or after the runner cancelled one
        # Whether the last *completed* run's inference got outputs back from Triton. Unlike model_ready_seen it
        # keeps its value while the next run is in flight, so `triton`, running beside that run, can rely on it.
        self.answered = False
        self._answered_now = False

    def _load_inputs(self) -> None:
        if self._inputs is None and self._input_error is None:
            try:
                self._inputs = build_inputs(self.canary)
                self._input_digest = input_digest(self.canary, self._inputs)
            except InputError as e:
                self._input_error = f"canary input error: {e}"

    async def run(self) -> CheckResult:
        self.model_ready_seen = None
        self.finished = False
        self._answered_now = False
        try:
            result = await self._run()
        except BaseException:  # cancelled by the runner's deadline: nothing was answered
            self.answered = False
            raise
        self.finished = True
        self.answered = self._answered_now
        return result

    async def _run(self) -> CheckResult:
        c = self.canary
        self._load_inputs()
        if self._input_error is not None:
            return failed(self.name, self._input_error)
        assert self._inputs is not None
        try:
            golden = await self.golden.current()
            check_golden_for(golden, c.name, self._input_digest, c.compare.mode, self.golden.path)
        except GoldenError as e:
            return failed(self.name, str(e))
        try:
            if not self._validated:
                info = await self._client.model_info(c.model, c.version)
                problems = input_mismatches(c, info)
                if problems:
                    return failed(self.name, "canary does not fit the model: " + "; ".join(problems))
                self._validated = True
            outputs = c.outputs or tuple(golden.records[0].outputs)
            outcome = await self._client.infer(c, self._inputs, outputs)
        except TritonUnreachable as e:
            return failed(self.name, str(e), restart_worthy=True)
        except TritonRequestError as e:
            self._validated = False  # the model may have been replaced; re-check its metadata next time
            return await self._request_failed(e)
        self.model_ready_seen = self._answered_now = True
        self.tracker.add(outcome.latency_s)
        cmp = compare_outputs(golden, outcome.outputs, c.compare)
        if not cmp.ok:
            # Only a mismatch pays for the fingerprint: the reason names where each record came from.
            env = await self._environment.fingerprint_or_none(c.model, c.version)
            cmp = compare_outputs(golden, outcome.outputs, c.compare, env)
        latency_ms = round(outcome.latency_s * 1000.0, 3)
        details: dict[str, Any] = {"latency_s": outcome.latency_s, "max_abs_error": cmp.max_abs_error}
        if not cmp.ok:
            details["mismatch"] = True
            return failed(self.name, cmp.reason, observed_value=latency_ms, observed_unit="ms", details=details)
        return passed(self.name, cmp.reason, observed_value=latency_ms, observed_unit="ms", details=details)

    async def _request_failed(self, e: TritonRequestError) -> CheckResult:
        c = self.canary
        try:
            ready = await self._client.model_ready(c.model, c.version)
        except (TritonUnreachable, TritonRequestError):
            ready = True  # cannot tell; report the inference error as it is
        else:
            self.model_ready_seen = ready
        if not ready:
            return failed(self.name, f"model {c.model} is not ready: {e}")
        return failed(self.name, str(e), restart_worthy=True)
