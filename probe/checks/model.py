"""`model/<canary>`: is the canary's model loaded and ready? Judged by the canary's own run (see `CanaryCheck`)."""

from __future__ import annotations

from probe.checks.base import CheckResult, Kind, failed, passed
from probe.config import CanaryConfig
from probe.triton import TritonClient, TritonRequestError, TritonUnreachable

NOT_RE_ASKED = "not re-asked: the canary did not finish"


class ModelVerdict:
    """A canary's `model/` result: ready when Triton answered the canary, asked of Triton only when the run did not
    tell, and when the canary was cut off the previous verdict stands, marked as not re-asked. Never
    restart-worthy: a model takes its time to load."""

    def __init__(self, client: TritonClient, canary: CanaryConfig) -> None:
        self._client = client
        self._canary = canary
        self.name = f"model/{canary.name}"
        self.label = f"model {canary.model}" + (f" version {canary.version}" if canary.version else "")
        self._last: CheckResult | None = None

    def ready(self) -> CheckResult:
        return passed(self.name, Kind.MODEL)

    def not_ready(self) -> CheckResult:
        return failed(self.name, Kind.MODEL, f"{self.label} is not ready (loading, unloaded or failed to load)")

    async def ask(self) -> CheckResult:
        c = self._canary
        try:
            if await self._client.model_ready(c.model, c.version):
                return self.ready()
        except (TritonUnreachable, TritonRequestError) as e:
            return failed(self.name, Kind.MODEL, str(e))
        return self.not_ready()

    async def settle(self, seen: CheckResult | None) -> CheckResult:
        """This run's verdict: what the run saw, or Triton's answer when it saw nothing."""
        self._last = seen if seen is not None else await self.ask()
        return self._last

    def carried(self) -> CheckResult:
        """The verdict when the canary was cut off: the previous one, marked as not re-asked."""
        last = self._last
        if last is None:
            return passed(self.name, Kind.MODEL, f"ok ({NOT_RE_ASKED})")
        return CheckResult(
            last.name, last.kind, last.status, f"{last.reason.split(' (not re-asked')[0]} ({NOT_RE_ASKED})"
        )
