"""`shutdown` and `ping`: the sidecar's own state, evaluated on every request (never cached)."""

from __future__ import annotations

from probe.checks.base import CheckResult, failed, passed


class Lifecycle:
    """Shared flag flipped by SIGTERM/SIGINT; `shutdown` fails from then on so the pod drains."""

    def __init__(self) -> None:
        self.shutting_down = False
        self.signal_name = ""

    def begin_shutdown(self, signal_name: str) -> None:
        self.shutting_down = True
        self.signal_name = signal_name


class ShutdownCheck:
    """Fails once the sidecar received SIGTERM or SIGINT: the pod is going away, stop sending traffic."""

    name = "shutdown"
    timeout: float | None = None
    derived = False
    instant = True

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle

    def passing(self) -> bool:
        """The verdict alone, without building a result (read on every cached probe)."""
        return not self._lifecycle.shutting_down

    async def run(self) -> CheckResult:
        if self._lifecycle.shutting_down:
            return failed(self.name, f"shutting down ({self._lifecycle.signal_name or 'signal'} received): draining")
        return passed(self.name)


class PingCheck:
    """Always passes: answering at all is the sidecar's own liveness (`/live/ping`)."""

    name = "ping"
    timeout: float | None = None
    derived = False
    instant = True

    def passing(self) -> bool:
        return True

    async def run(self) -> CheckResult:
        return passed(self.name)
