"""`shutdown` and `ping`: the sidecar's own state, evaluated on every request (never cached)."""

from __future__ import annotations

from probe.checks.base import CheckResult, Kind, failed, passed


class Lifecycle:
    """Shared flag flipped by SIGTERM/SIGINT; `shutdown` fails from then on so the pod drains."""

    def __init__(self) -> None:
        self.shutting_down = False
        self.signal_name = ""

    def begin_shutdown(self, signal_name: str) -> None:
        self.shutting_down = True
        self.signal_name = signal_name


class ShutdownCheck:
    """Fails once the sidecar received SIGTERM or SIGINT: the pod is going away, stop sending traffic.

    Never fails liveness: draining must not restart the container."""

    name = "shutdown"

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle
        self._running = passed(self.name, Kind.SHUTDOWN)  # one result while nothing changes: read on every probe

    def now(self) -> CheckResult:
        if self._lifecycle.shutting_down:
            reason = f"shutting down ({self._lifecycle.signal_name or 'signal'} received): draining"
            return failed(self.name, Kind.SHUTDOWN, reason)
        return self._running


class PingCheck:
    """Always passes: answering at all is the sidecar's own liveness (`/live/ping`)."""

    name = "ping"

    def __init__(self) -> None:
        self._ok = passed(self.name, Kind.PING)

    def now(self) -> CheckResult:
        return self._ok
