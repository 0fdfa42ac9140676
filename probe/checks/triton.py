"""`triton`: is the server live and ready?"""

from __future__ import annotations

from probe.checks.base import CheckResult, failed, passed
from probe.triton import TritonClient, TritonRequestError, TritonUnreachable


class TritonCheck:
    """Fails when Triton is unreachable or not live (restart-worthy), or live but not ready (not restart-worthy).

    Ready implies live, so the healthy path costs one request; liveness is asked only to explain "not ready".
    """

    name = "triton"
    timeout: float | None = None
    derived = False

    def __init__(self, client: TritonClient) -> None:
        self._client = client

    async def run(self) -> CheckResult:
        try:
            if await self._client.ready():
                return passed(self.name)
            if not await self._client.live():
                return failed(self.name, f"Triton at {self._client.url} is not live", restart_worthy=True)
        except (TritonUnreachable, TritonRequestError) as e:
            return failed(self.name, str(e), restart_worthy=True)
        return failed(self.name, f"Triton at {self._client.url} is live but not ready")
