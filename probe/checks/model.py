"""`model/<canary>`: is the canary's model loaded and ready?"""

from __future__ import annotations

from probe.checks.base import CheckResult, failed, passed
from probe.config import CanaryConfig
from probe.triton import TritonClient, TritonRequestError, TritonUnreachable


class ModelCheck:
    """Fails while the model is loading, unloaded or failed to load; never restart-worthy (loading takes time)."""

    timeout: float | None = None
    derived = False

    def __init__(self, client: TritonClient, canary: CanaryConfig) -> None:
        self._client = client
        self._canary = canary
        self.name = f"model/{canary.name}"

    async def run(self) -> CheckResult:
        c = self._canary
        label = f"model {c.model}" + (f" version {c.version}" if c.version else "")
        try:
            if await self._client.model_ready(c.model, c.version):
                return passed(self.name)
        except (TritonUnreachable, TritonRequestError) as e:
            return failed(self.name, str(e))
        return failed(self.name, f"{label} is not ready (loading, unloaded or failed to load)")
