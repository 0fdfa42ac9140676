"""`model/<canary>`: is the canary's model loaded and ready?"""

from __future__ import annotations

from dataclasses import replace

from probe.checks.base import CheckResult, failed, passed
from probe.checks.canary import CanaryCheck
from probe.config import CanaryConfig
from probe.triton import TritonClient, TritonRequestError, TritonUnreachable


class ModelCheck:
    """Fails while the model is loading, unloaded or failed to load; never restart-worthy (loading takes time).

    It runs after its canary in the same run and asks Triton only when the canary learnt nothing: a canary
    that Triton answered proves the model ready, so the healthy path costs no extra request. If the canary
    did not finish (hung), the previous verdict stands, marked as not re-asked.
    """

    timeout: float | None = None
    derived = True

    def __init__(self, client: TritonClient, canary: CanaryConfig, canary_check: CanaryCheck | None = None) -> None:
        self._client = client
        self._canary = canary
        self._canary_check = canary_check
        self.name = f"model/{canary.name}"
        self._last: CheckResult | None = None

    def _label(self) -> str:
        c = self._canary
        return f"model {c.model}" + (f" version {c.version}" if c.version else "")

    def now(self) -> CheckResult | None:
        """The verdict from what the canary's run learnt, or None when Triton must be asked."""
        result = self._judge_now()
        if result is not None:
            self._last = result
        return result

    async def run(self) -> CheckResult:
        result = self._judge_now() or await self._ask()
        self._last = result
        return result

    def _judge_now(self) -> CheckResult | None:
        seen = self._canary_check.model_ready_seen if self._canary_check is not None else None
        if seen is True:
            return passed(self.name)
        if seen is False:
            return failed(self.name, f"{self._label()} is not ready (loading, unloaded or failed to load)")
        if self._canary_check is not None and not self._canary_check.finished:
            if self._last is not None:
                note = "not re-asked: the canary did not finish"
                return replace(self._last, reason=f"{self._last.reason.split(' (not re-asked')[0]} ({note})")
            return passed(self.name, "ok (not asked: the canary did not finish)")
        return None

    async def _ask(self) -> CheckResult:
        c = self._canary
        try:
            if await self._client.model_ready(c.model, c.version):
                return passed(self.name)
        except (TritonUnreachable, TritonRequestError) as e:
            return failed(self.name, str(e))
        return failed(self.name, f"{self._label()} is not ready (loading, unloaded or failed to load)")
