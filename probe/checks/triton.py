"""`triton`: is the server live and ready?"""

from __future__ import annotations

import time
from collections.abc import Callable

from probe.checks.base import CheckResult, Kind, failed, passed
from probe.triton import TritonClient, TritonRequestError, TritonUnreachable

# While canaries keep getting answers, Triton's own readiness is re-asked at most this often: a canary that
# Triton answered already proves it live and serving, so the healthy path is one inference per run.
READY_EVERY_S = 5.0


class TritonCheck:
    """Fails when Triton is unreachable or not live (restart-worthy), or live but not ready (not restart-worthy).

    Ready implies live, so asking costs one request; liveness is asked only to explain "not ready". With
    `vouch` (canaries configured), readiness confirmed less than READY_EVERY_S ago stands without a request as long
    as no call to Triton has failed since: the client records every failure, a timed-out canary included.
    """

    names = ("triton",)
    timeout: float | None = None

    def __init__(
        self,
        client: TritonClient,
        *,
        vouch: bool,
        ready_every: float = READY_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._vouch = vouch
        self._ready_every = ready_every
        self._clock = clock
        self._confirmed_at: float | None = None
        self._failures_then = 0

    def _vouched(self) -> bool:
        at = self._confirmed_at
        if not self._vouch or at is None:
            return False
        return self._clock() - at < self._ready_every and self._client.failures == self._failures_then

    async def run(self) -> tuple[CheckResult]:
        if self._vouched():
            return (passed("triton", Kind.SERVER),)
        self._confirmed_at = None
        try:
            failures = self._client.failures
            if await self._client.ready():
                self._confirmed_at, self._failures_then = self._clock(), failures
                return (passed("triton", Kind.SERVER),)
            if not await self._client.live():
                return (
                    failed("triton", Kind.SERVER, f"Triton at {self._client.url} is not live", restart_worthy=True),
                )
        except (TritonUnreachable, TritonRequestError) as e:
            return (failed("triton", Kind.SERVER, str(e), restart_worthy=True),)
        return (failed("triton", Kind.SERVER, f"Triton at {self._client.url} is live but not ready"),)

    def timed_out(self, after: float) -> tuple[CheckResult]:
        return (failed("triton", Kind.SERVER, f"timed out after {after:.2f}s", restart_worthy=True),)

    async def explain_timeout(self, after: float) -> tuple[CheckResult]:
        return self.timed_out(after)
