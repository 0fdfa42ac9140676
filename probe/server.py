"""The HTTP face of `probe serve`: /ready, /live, per-check paths, /metrics. It aggregates, never probes.

Every answer comes from the runner (cached or single-flight run, bounded by probe.timeout) and is itself
bounded by `probe.timeout` plus a small margin, whatever Triton or the GPU driver does. Request bodies are never
read. Verbose and JSON formats follow Kubernetes' healthz and the IETF health-check draft.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from probe.checks.base import CheckResult, failed
from probe.runner import Liveness, Run, Runner

HEALTH_JSON = "application/health+json"
# Slack over probe.timeout for the answer's own work; the runner already keeps ANSWER_MARGIN back.
ANSWER_SLACK = 0.05

Hook = Callable[[web.Application], Awaitable[None]]
READY, LIVE = "ready", "live"
Deliver = Callable[[bool], None]


def _deliver(deliver: Deliver, ok: bool) -> None:
    try:
        deliver(ok)
    except Exception:  # one broken connection must not keep the other waiting probes from their answers
        logging.getLogger("probe").exception("delivering a probe answer failed")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check_json(r: CheckResult) -> dict[str, Any]:
    d: dict[str, Any] = {"status": r.status, "time": _iso(r.time), "output": r.reason}
    if r.observed_value is not None:
        d["observedValue"] = r.observed_value
    if r.observed_unit is not None:
        d["observedUnit"] = r.observed_unit
    d["durationSeconds"] = round(r.duration, 6)
    return d


@dataclass
class _Waiting:
    """The plain probes waiting on one run, and the timer that answers them if the run never finishes."""

    guard: asyncio.TimerHandle
    probes: list[tuple[str, Deliver]] = field(default_factory=list)


class Health:
    """Readiness and liveness views over the runner's results."""

    def __init__(self, runner: Runner, liveness: Liveness, *, timeout: float) -> None:
        self.runner = runner
        self.liveness = liveness
        self.timeout = timeout
        self._waiting: dict[asyncio.Future[Any], _Waiting] = {}
        runner.add_done_hook(self._run_done)

    # ------------------------------------------------------------------ plain verdicts, for the probe front

    def now(self, kind: str) -> bool | None:
        """The plain verdict of `kind` ("ready" or "live") from the cached run, or None when it needs a run."""
        return self.ready_now() if kind == READY else self.live_now()

    def later(self, kind: str, deliver: Deliver) -> None:
        """Call `deliver(ok)` with the plain verdict of `kind` once the shared run in flight finishes (starting
        one if none is), and never later than `timeout` plus a little slack: no task per waiting probe, and
        one guard timer per run however many probes wait on it."""
        if kind == READY and self.runner.instant_passing() is None:  # an instant check without passing()
            task = asyncio.ensure_future(self.ready_ok())
            task.add_done_callback(lambda t: deliver(False if t.cancelled() or t.exception() else t.result()))
            return
        fut = self.runner.run_future()
        waiting = self._waiting.get(fut)
        if waiting is None:
            guard = asyncio.get_running_loop().call_later(self.timeout + ANSWER_SLACK / 2, self._late, fut)
            waiting = self._waiting[fut] = _Waiting(guard)
            fut.add_done_callback(self._settled)  # only if the run ended without reaching its done hook
        waiting.probes.append((kind, deliver))

    def _run_done(self, run: Run) -> None:
        """The runner's done hook: answer the probes waiting on this run (it runs in the run's own task)."""
        if not self._waiting:
            return
        task = asyncio.current_task()
        waiting = self._waiting.pop(task, None) if task is not None else None
        if waiting is not None:
            self._answer(waiting, run)

    def _settled(self, fut: asyncio.Future[Any]) -> None:
        waiting = self._waiting.pop(fut, None)
        if waiting is not None:  # cancelled or crashed before its done hook: nothing to judge by
            run = None if fut.cancelled() or fut.exception() is not None else fut.result()
            self._answer(waiting, run)

    def _late(self, fut: asyncio.Future[Any]) -> None:
        waiting = self._waiting.pop(fut, None)
        if waiting is not None:
            self._answer(waiting, None)

    def _answer(self, waiting: _Waiting, run: Run | None) -> None:
        waiting.guard.cancel()
        if run is None:  # as when a run does not finish in time: readiness fails, liveness holds
            verdicts = {READY: False, LIVE: True}
        else:  # judged once for every probe waiting on this run, however many there are
            verdicts = {
                READY: run.ok and bool(self.runner.instant_passing()),
                LIVE: self.liveness.is_live(run.results),
            }
        for kind, deliver in waiting.probes:
            _deliver(deliver, verdicts[kind])

    # ------------------------------------------------------------------------------ full results, for the app

    async def results(self) -> dict[str, CheckResult]:
        run = self.runner.cached()
        if run is not None:  # the common case under load: nothing to wait for, so no deadline to arm
            return await self.runner.merge(run)
        try:
            async with asyncio.timeout(self.timeout + ANSWER_SLACK / 2):
                return await self.runner.snapshot()
        except TimeoutError:  # pragma: no cover - the runner's budget should make this impossible
            return {n: failed(n, "probe run did not finish in time") for n in self.runner.names}

    async def ready(self) -> dict[str, CheckResult]:
        return await self.results()

    def ready_now(self) -> bool | None:
        """Readiness from the cached run without waiting, or None when answering needs a run."""
        run = self.runner.cached()
        if run is None:
            return None
        instant = self.runner.instant_passing()
        return None if instant is None else run.ok and instant

    async def ready_ok(self) -> bool:
        """Just the aggregate readiness, for the plain `/ready` every kubelet sends: no per-check rendering."""
        run = self.runner.cached()
        if run is None:
            return all(r.ok for r in (await self.results()).values())
        return run.ok and await self.runner.instant_ok()

    def live_now(self) -> bool | None:
        """Liveness from the cached run without waiting, or None when answering needs a run.

        Instant checks never fail liveness (`ping` always passes, `shutdown` drains without a restart)."""
        run = self.runner.cached()
        return None if run is None else self.liveness.is_live(run.results)

    async def live_ok(self) -> bool:
        now = self.live_now()
        if now is not None:
            return now
        return all(r.ok for r in (await self.live()).values())

    async def live(self) -> dict[str, CheckResult]:
        return self.liveness.verdict(await self.results())


def _excluded(request: web.Request) -> list[str]:
    return request.query.getall("exclude", [])


def _wants_json(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "application/json" in accept or HEALTH_JSON in accept


def _aggregate(kind: str, results: dict[str, CheckResult], request: web.Request) -> web.Response:
    excluded = _excluded(request)
    shown = {n: r for n, r in results.items() if n not in excluded}
    ok = all(r.ok for r in shown.values())
    status = 200 if ok else 503
    if _wants_json(request):
        body = {
            "status": "pass" if ok else "fail",
            "description": f"{kind} of the Triton server as seen by probe",
            "checks": {n: [check_json(r)] for n, r in shown.items()},
        }
        return web.Response(status=status, text=json.dumps(body), content_type=HEALTH_JSON)
    if "verbose" not in request.query:
        return web.Response(status=status, text="ok" if ok else f"{kind} check failed", content_type="text/plain")
    lines = [f"[+]{n} ok" if r.ok else f"[-]{n} failed: reason withheld" for n, r in shown.items()]
    unknown = [e for e in excluded if e not in results]
    if unknown:
        lines.append(f"warn: some health checks cannot be excluded: no matches for {', '.join(map(repr, unknown))}")
    lines.append(f"{kind} check passed" if ok else f"{kind} check failed")
    return web.Response(status=status, text="\n".join(lines) + "\n", content_type="text/plain")


def _single(results: dict[str, CheckResult], name: str, request: web.Request) -> web.Response:
    r = results.get(name)
    if r is None:
        return web.Response(status=404, text=f"no check named {name!r}\n", content_type="text/plain")
    status = 200 if r.ok else 503
    if _wants_json(request):
        body = {"status": r.status, "checks": {name: [check_json(r)]}}
        return web.Response(status=status, text=json.dumps(body), content_type=HEALTH_JSON)
    text = r.reason if r.ok else f"{name} failed: {r.reason}"
    return web.Response(status=status, text=text + "\n", content_type="text/plain")


def make_app(
    health: Health,
    *,
    metrics: Callable[[], tuple[bytes, str]] | None = None,
    on_startup: list[Hook] | None = None,
    on_cleanup: list[Hook] | None = None,
    server_header: str | None = None,
) -> web.Application:
    """The aiohttp app: routes only; everything it needs is passed in (no globals)."""

    async def ready(request: web.Request) -> web.Response:
        if not request.query_string and not _wants_json(request):
            # The kubelet's probe: answered from the run's precomputed verdict, nothing rendered per check.
            if await health.ready_ok():
                return web.Response(text="ok", content_type="text/plain")
            return web.Response(status=503, text="ready check failed", content_type="text/plain")
        return _aggregate("ready", await health.ready(), request)

    async def ready_one(request: web.Request) -> web.Response:
        return _single(await health.ready(), request.match_info["check"], request)

    async def live(request: web.Request) -> web.Response:
        return _aggregate("live", await health.live(), request)

    async def live_one(request: web.Request) -> web.Response:
        name = request.match_info["check"]
        if name == "ping":  # the sidecar's own liveness: answering is enough, no run is triggered
            return web.Response(text="ok\n", content_type="text/plain")
        return _single(await health.live(), name, request)

    async def metrics_view(request: web.Request) -> web.Response:
        if metrics is None:
            raise web.HTTPNotFound()
        body, ctype = metrics()
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = ctype
        return resp

    app = web.Application(client_max_size=1024)
    app.router.add_get("/ready", ready)
    app.router.add_get("/ready/{check:.+}", ready_one)
    app.router.add_get("/live", live)
    app.router.add_get("/live/{check:.+}", live_one)
    app.router.add_get("/metrics", metrics_view)
    if server_header is not None:

        async def name_server(_: web.Request, response: web.StreamResponse) -> None:
            response.headers["Server"] = server_header

        app.on_response_prepare.append(name_server)
    for hook in on_startup or []:
        app.on_startup.append(hook)
    for hook in on_cleanup or []:
        app.on_cleanup.append(hook)
    return app
