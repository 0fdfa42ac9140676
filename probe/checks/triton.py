"""`triton`: is the server live and ready?"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from probe.checks.base import CheckResult, failed, passed
from probe.checks.canary import CanaryCheck
from probe.triton import TritonClient, TritonRequestError, TritonUnreachable

# While canaries keep getting answers, Triton's own readiness is re-asked at most this often: a canary that
# Triton answered already proves it live and serving, and one less request per run is what keeps a fresh
# /ready close to the cost of a bare inference.
READY_EVERY_S = 5.0


class TritonCheck:
    """Fails when Triton is unreachable or not live (restart-worthy), or live but not ready (not restart-worthy).

    Ready implies live, so asking costs one request; liveness is asked only to explain "not ready". When the
    previous run's canaries were all answered by Triton and readiness was confirmed less than READY_EVERY_S
    ago, no request is sent at all. A failing canary makes the next run ask again.
    """

    name = "triton"
    timeout: float | None = None
    derived = False

    def __init__(
        self,
        client: TritonClient,
        canaries: Sequence[CanaryCheck] = (),
        *,
        ready_every: float = READY_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._canaries = list(canaries)
        self._ready_every = ready_every
        self._clock = clock
        self._confirmed_at: float | None = None

    def _vouched(self) -> bool:
        """The canaries' last completed runs were answered and readiness was confirmed recently.

        Reads `answered`, not `finished`: this run's canaries start first and are still in flight here."""
        if not self._canaries or self._confirmed_at is None:
            return False
        if self._clock() - self._confirmed_at >= self._ready_every:
            return False
        return all(c.answered for c in self._canaries)

    def now(self) -> CheckResult | None:
        """Passed without a request while the canaries vouch for Triton; None when it must be asked."""
        return passed(self.name) if self._vouched() else None

    async def run(self) -> CheckResult:
        if self._vouched():
            return passed(self.name)
        self._confirmed_at = None
        try:
            if await self._client.ready():
                self._confirmed_at = self._clock()
                return passed(self.name)
            if not await self._client.live():
                return failed(self.name, f"Triton at {self._client.url} is not live", restart_worthy=True)
        except (TritonUnreachable, TritonRequestError) as e:
            return failed(self.name, str(e), restart_worthy=True)
        return failed(self.name, f"Triton at {self._client.url} is live but not ready")
