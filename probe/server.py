"""The HTTP face of `probe serve`: /ready, /live, per-check paths, /metrics. It aggregates, never probes.

aiohttp serves every request. Every answer comes from the runner (a cached or shared run, bounded by
`probe.timeout`) and is itself bounded by `probe.timeout` plus a small margin, whatever Triton or the GPU driver
does. Request bodies are never read. Verbose and JSON formats follow Kubernetes' healthz and the IETF
health-check draft.

What the listener guards against, since the pod IP is reachable by anything in the cluster:
- a request head must arrive whole within `HEAD_DEADLINE_S` of the connection opening or of the previous answer
  (aiohttp's keep-alive timer runs from the connection's start and closes a handler still waiting for its head);
- connections are capped below the fd limit with a reserve kept back, and at the cap the oldest connection that
  is not being answered is closed for the new one: slow or idle clients are evicted, and a kubelet probe always
  gets through; one log line per interval says so, never a traceback per accept;
- aiohttp's own error pages (bad request heads) are replaced by one short line that echoes nothing, with
  `Server: probe/<version>` like every other answer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from probe import __version__
from probe.checks.base import CheckResult
from probe.liveness import Liveness
from probe.logs import log
from probe.runner import Runner
from probe.saturation import verified_age
from probe.verdict import Verdict, readiness

HEALTH_JSON = "application/health+json"
SERVER = f"probe/{__version__}"
# Slack over probe.timeout for the answer's own work; the runner already keeps ANSWER_MARGIN back.
ANSWER_SLACK = 0.05
# A request head must arrive within this long; an idle keep-alive connection is closed after it too.
HEAD_DEADLINE_S = 5.0
# File descriptors kept back from the connection cap: Triton connections, golden files, NVML, logs.
FD_RESERVE = 64
# asyncio accepts up to `backlog` connections per wake-up of the listening socket, and an accepted connection holds
# its fd for about three loop turns before the eviction it triggers has closed another one. With the usual 128 a
# reconnecting flood at the cap ran the process out of fds, and asyncio then stops accepting for a whole second
# (kubelet probes took 1-2 s). So the burst is small, and the cap keeps room for three of them...
ACCEPT_BURST = 16
# ...while the kernel's queue of connections not yet accepted, which hold no fd of ours, stays long: a kubelet
# connecting amid the flood waits in it for a few ms instead of having its SYN dropped (a 1 s retransmit).
LISTEN_QUEUE = 1024
MAX_CONNECTIONS = 4096
LIMIT_LOG_EVERY_S = 10.0
READY, LIVE = "ready", "live"
_PLAIN = {
    (READY, True): "ok",
    (READY, False): "ready check failed",
    (LIVE, True): "ok",
    (LIVE, False): "live check failed",
}
_FALSE = ("0", "false", "no", "off")
_HEADERS = {"Server": SERVER, "X-Content-Type-Options": "nosniff"}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def full_reason(r: CheckResult) -> str:
    """The reason as the per-check and JSON views show it: a saturated canary's says how old its last verified output
    is now (the result itself may be held for a while by the hang backoff)."""
    age = verified_age(r, time.time())
    return r.reason if age is None else f"{r.reason}; {age}"


def check_json(r: CheckResult) -> dict[str, Any]:
    d: dict[str, Any] = {"status": r.status, "time": _iso(r.time), "output": full_reason(r)}
    if r.observed_value is not None:
        d["observedValue"] = r.observed_value
    if r.observed_unit is not None:
        d["observedUnit"] = r.observed_unit
    d["durationSeconds"] = round(r.duration, 6)
    return d


class Health:
    """Readiness and liveness over the runner's results, each answer within `timeout` (plus slack)."""

    def __init__(self, runner: Runner, liveness: Liveness, *, timeout: float) -> None:
        self.runner = runner
        self.liveness = liveness
        self.timeout = timeout
        self._ready: tuple[Mapping[str, CheckResult], Verdict] | None = None

    async def results(self) -> Mapping[str, CheckResult]:
        run = self.runner.cached()
        if run is None:
            try:
                async with asyncio.timeout(self.timeout + ANSWER_SLACK / 2):
                    run = await self.runner.results()
            except TimeoutError:  # pragma: no cover - the runner's budget should make this impossible
                return self.runner.unfinished("probe run did not finish in time")
        return self.runner.current(run)

    async def ready(self) -> Verdict:
        results = await self.results()
        last = self._ready
        if last is not None and last[0] is results:  # the same results: the same verdict (cached probes)
            return last[1]
        verdict = readiness(results)
        self._ready = (results, verdict)
        return verdict

    async def live(self) -> Verdict:
        return self.liveness.verdict(await self.results())


# ------------------------------------------------------------------------------------------------ answers


def _text(status: int, text: str, *, content_type: str = "text/plain") -> web.Response:
    return web.Response(status=status, text=text, content_type=content_type, headers=_HEADERS)


def _wants_json(request: web.BaseRequest) -> bool:
    accept = request.headers.get("Accept", "")
    return "application/json" in accept or HEALTH_JSON in accept


def _verbose(request: web.BaseRequest) -> bool:
    values = request.query.getall("verbose", None)
    return values is not None and values[-1].strip().lower() not in _FALSE


WITHHELD = "reason withheld"


def _loopback(request: web.BaseRequest) -> bool:
    """The peer is this pod itself (kubectl port-forward and kubectl exec arrive on loopback)."""
    try:
        addr = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _shown(r: CheckResult, reveal: bool) -> CheckResult:
    return r if reveal or r.ok else replace(r, reason=WITHHELD)


def _times(r: CheckResult) -> str:
    """A streaming canary's two times on its verbose line: the whole answer and the first event."""
    first = r.details.get("first_event_s")
    total = r.details.get("latency_s")
    if not isinstance(first, float) or not isinstance(total, float):
        return ""
    return f" (answer {total * 1000.0:.1f}ms, first event {first * 1000.0:.1f}ms)"


def _aggregate(kind: str, verdict: Verdict, request: web.BaseRequest, reveal: bool) -> web.Response:
    if not request.query_string and not _wants_json(request):  # the kubelet's probe: the verdict, nothing else
        return _text(200 if verdict.ok else 503, _PLAIN[kind, verdict.ok])
    excluded = request.query.getall("exclude", [])
    shown = {n: r for n, r in verdict.checks.items() if n not in excluded}
    ok = verdict.ok if not excluded else all(r.ok for r in shown.values())
    status = 200 if ok else 503
    if _wants_json(request):
        body = {
            "status": "pass" if ok else "fail",
            "description": f"{kind} of the Triton server as seen by probe",
            "checks": {n: [check_json(_shown(r, reveal))] for n, r in shown.items()},
        }
        return _text(status, json.dumps(body), content_type=HEALTH_JSON)
    if not _verbose(request):
        return _text(status, _PLAIN[kind, ok])
    lines = [_verbose_line(n, r, reveal) for n, r in shown.items()]
    unknown = [e for e in excluded if e not in verdict.checks]
    if unknown:
        names = ", ".join(repr(e[:64]) for e in unknown[:8])
        lines.append(f"warn: some health checks cannot be excluded: no matches for {names}")
    lines.append(f"{kind} check passed" if ok else f"{kind} check failed")
    return _text(status, "\n".join(lines) + "\n")


def _verbose_line(name: str, r: CheckResult, reveal: bool) -> str:
    """`[+]name ok`; a saturated canary passing on its last verified output says so, and how old it is."""
    if not r.ok:
        return f"[-]{name} failed: {WITHHELD}"
    age = verified_age(r, time.time()) if reveal else None
    return f"[+]{name} ok{_times(r)}" if age is None else f"[+]{name} ok (saturated; {age})"


def _single(verdict: Verdict, name: str, request: web.BaseRequest, reveal: bool) -> web.Response:
    r = verdict.checks.get(name)
    if r is None:
        return _text(404, "no such check\n")
    r = _shown(r, reveal)
    status = 200 if r.ok else 503
    if _wants_json(request):
        body = {"status": r.status, "checks": {name: [check_json(r)]}}
        return _text(status, json.dumps(body), content_type=HEALTH_JSON)
    text = full_reason(r) if r.ok else f"{name} failed: {full_reason(r)}"
    return _text(status, text + "\n")


Metrics = Callable[[bool], tuple[bytes, str]]
"""`/metrics`: the exposition and its content type; the flag says whether environment labels may be shown."""


def make_handler(
    health: Health, *, metrics: Metrics | None = None, reasons: str = "everyone"
) -> Callable[[web.BaseRequest], Any]:
    """The one request handler: routes only; everything it needs is passed in (no globals). With
    `reasons="loopback"`, failure reasons and environment labels go to loopback peers only."""
    everyone = reasons == "everyone"

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        known = path in ("/ready", "/live", "/metrics") or (
            path.startswith(("/ready/", "/live/")) and path not in ("/ready/", "/live/")
        )
        if not known or (path == "/metrics" and metrics is None):
            return _text(404, "not found\n")
        if request.method not in ("GET", "HEAD"):
            resp = _text(405, "method not allowed\n")
            resp.headers["Allow"] = "GET, HEAD"
            return resp
        if path == "/live/ping":  # the sidecar's own liveness: answering is enough, no run is triggered
            return _text(200, "ok\n")
        if path == "/metrics":
            assert metrics is not None
            body, ctype = metrics(everyone or _loopback(request))
            resp = web.Response(body=body)
            resp.headers["Content-Type"] = ctype
            resp.headers["Server"] = SERVER
            resp.headers["X-Content-Type-Options"] = "nosniff"  # like every other answer
            return resp
        kind, _, name = path[1:].partition("/")
        if name and name not in health.runner.names:  # answered without running anything
            return _text(404, "no such check\n")
        verdict = await (health.ready() if kind == READY else health.live())
        reveal = everyone or _loopback(request)
        if name:
            return _single(verdict, name, request, reveal)
        return _aggregate(kind, verdict, request, reveal)

    return handle


# ------------------------------------------------------------------------------------------------ listener


class _Handler(RequestHandler):
    """aiohttp's connection handler with one change: its error pages (a malformed request head, a handler that
    raised) are one short line that echoes nothing of the request."""

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            logging.getLogger("probe").error("error answering a request", exc_info=exc)
        if request.writer.output_size > 0:  # some of an answer went out already: the connection is broken
            raise ConnectionError("answer already started")
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        resp = _text(status, f"{status} {phrase}\n")
        resp.force_close()
        return resp


class ProbeServer(web.Server):
    """aiohttp's low-level server, with the connection cap and eviction described in the module docstring."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Any],
        *,
        max_connections: int,
        logger: logging.Logger | None = None,
        **kwargs: Any,
    ) -> None:
        self._busy: set[RequestHandler] = set()

        async def tracked(request: web.BaseRequest) -> Any:
            self._busy.add(request.protocol)
            try:
                return await handler(request)
            finally:
                self._busy.discard(request.protocol)

        super().__init__(tracked, **kwargs)
        self.max_connections = max_connections
        self._handler_kwargs = kwargs
        self._open: dict[RequestHandler, asyncio.Transport] = {}
        self._logger = logger or logging.getLogger("probe")
        self._evicted = 0
        self._logged_at = -LIMIT_LOG_EVERY_S
        self.evicted_total = 0

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=asyncio.get_running_loop(), **self._handler_kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self._open[handler] = transport
        while len(self._open) > self.max_connections:
            # The oldest connection not being answered: a request in progress (a kubelet probe waiting on a run) is
            # never cut for a newer connection; it ends within probe.timeout anyway. All busy: the oldest.
            oldest = next((h for h in self._open if h not in self._busy), None) or next(iter(self._open))
            self._open.pop(oldest).abort()
            self._evicted += 1
            self.evicted_total += 1
        if self._evicted:
            now = time.monotonic()
            if now - self._logged_at >= LIMIT_LOG_EVERY_S:
                log(
                    self._logger,
                    logging.WARNING,
                    "connection limit reached: closed the oldest connections",
                    limit=self.max_connections,
                    closed=self._evicted,
                )
                self._logged_at, self._evicted = now, 0

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._open.pop(handler, None)
        super().connection_lost(handler, exc)


def connection_cap(reserve: int = FD_RESERVE) -> int:
    """Raise the soft fd limit to the hard one, and cap connections below it with `reserve`, and room for three
    accept bursts, kept back."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return max(8, min(MAX_CONNECTIONS, soft - reserve - 3 * ACCEPT_BURST))


class _Site(web.TCPSite):
    """aiohttp's TCP site accepting ACCEPT_BURST connections per wake-up, with a LISTEN_QUEUE long kernel queue."""

    async def start(self) -> None:
        await super().start()
        if isinstance(self._server, asyncio.Server):
            for sock in self._server.sockets:
                # asyncio's socket wrapper has no listen(); a duplicate fd is the same listening socket.
                widened = sock.dup()
                try:
                    widened.listen(LISTEN_QUEUE)
                finally:
                    widened.close()


class Serving:
    """The listening sidecar; `close()` stops accepting and closes every connection."""

    def __init__(self, runner: web.ServerRunner, site: web.TCPSite, server: ProbeServer) -> None:
        self._runner = runner
        self.site = site
        self.server = server

    @property
    def port(self) -> int:
        return int(self._runner.addresses[0][1])

    async def close(self) -> None:
        await self._runner.cleanup()


async def serve(
    health: Health,
    host: str,
    port: int,
    *,
    metrics: Metrics | None = None,
    reasons: str = "everyone",
    max_connections: int | None = None,
    head_deadline: float = HEAD_DEADLINE_S,
    logger: logging.Logger | None = None,
) -> Serving:
    """Listen on host:port (port 0: any free one) and answer with `make_handler`."""
    server = ProbeServer(
        make_handler(health, metrics=metrics, reasons=reasons),
        max_connections=max_connections if max_connections is not None else connection_cap(),
        logger=logger,
        keepalive_timeout=head_deadline,
        access_log=None,
        lingering_time=1.0,  # a request body is never read: drain at most this long before closing
    )
    runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = _Site(runner, host, port, backlog=ACCEPT_BURST, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return Serving(runner, site, server)


def quiet_accept_errors(logger: logging.Logger, loop: asyncio.AbstractEventLoop) -> None:
    """asyncio logs a traceback for every failed accept (EMFILE at the fd limit): log one line per interval."""
    default = loop.get_exception_handler()
    state = {"at": -LIMIT_LOG_EVERY_S, "count": 0}

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and "accept" in str(context.get("message", "")):
            state["count"] += 1
            now = time.monotonic()
            if now - state["at"] >= LIMIT_LOG_EVERY_S:
                log(logger, logging.WARNING, "cannot accept connections", error=str(exc), times=state["count"])
                state["at"], state["count"] = now, 0
            return
        if default is not None:
            default(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)
