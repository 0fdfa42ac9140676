"""(e) The idle sidecar at production defaults: percent of one core while the kubelet probes it.

Two `probe serve` processes run side by side for SECONDS, at the deployment's settings (deploy/kubernetes:
`interval: 10`, `min_interval: 1`, `timeout: 0.8`, one canary, Triton's metrics page read for the queue signal):
one with `gpu.source: triton-metrics` (the deployment's choice, its page read every `gpu.interval` 2 s), one with
`gpu.source: none`. Every PERIOD seconds each gets what a kubelet sends, a `GET /ready` and a `GET /live`. The demo
Triton is CPU-only, so the triton-metrics sidecar finds no GPU lines on the page and its `gpu` check fails: the
page is still fetched and parsed on schedule, which is the cost measured here.

CPU time is utime + stime from /proc/<pid>/stat (clock ticks) before and after, as a percent of the wall time
(one core = 100%); the nanosecond sum from /proc/<pid>/task/*/schedstat is printed beside it.

Run alone: python bench/idle.py
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from common import PRODUCTION, Stack, Summary, cpu_seconds, mark, run_standalone, stat_cpu_seconds, table

SECONDS = 60.0
PERIOD = 5.0
SETTLE_S = 3.0
TARGET_PERCENT = 0.5  # of one core
VARIANTS = {"triton-metrics": {"source": "triton-metrics", "interval": 2.0}, "none": {"source": "none"}}


@dataclass
class Idle:
    wall_s: float
    stat_s: dict[str, float]
    schedstat_s: dict[str, float]
    probes: dict[str, int]
    statuses: dict[str, set[int]]
    runs: dict[str, int]
    """Check runs in the window: one per `interval` plus one per kubelet /ready that found the cache expired."""

    def percent(self, name: str) -> float:
        return self.stat_s[name] / self.wall_s * 100

    @property
    def ok(self) -> bool:
        return all(self.percent(n) <= TARGET_PERCENT for n in self.stat_s)

    def report(self) -> str:
        rows: list[list[object]] = [
            [
                f"gpu.source: {name}",
                self.probes[name],
                ",".join(str(s) for s in sorted(self.statuses[name])),
                self.runs[name],
                f"{self.stat_s[name] * 1000:.0f}",
                f"{self.percent(name):.3f}%",
                f"{self.schedstat_s[name] / self.wall_s * 100:.3f}%",
            ]
            for name in self.stat_s
        ]
        return "\n".join(
            [
                f"== (e) idle sidecar at production defaults, {self.wall_s:.0f} s, /ready + /live every {PERIOD:g} s",
                table(rows, ["probe serve", "probes", "answers", "runs", "CPU ms", "of one core", "(schedstat)"]),
                "an answer 0 (no answer) or far more runs than probes would mean traffic from outside this benchmark",
                f"target: <= {TARGET_PERCENT}% of one core -> {mark(self.ok)}",
            ]
        )

    def summary(self) -> Summary:
        worst = max(self.stat_s, key=self.percent)
        others = ", ".join(f"{n} {self.percent(n):.3f}%" for n in self.stat_s if n != worst)
        return [
            (
                f"(e) idle sidecar, production defaults, {self.wall_s:.0f} s (gpu.source {worst}; {others})",
                f"{self.percent(worst):.3f}% of one core",
                f"<= {TARGET_PERCENT}%",
                self.ok,
            )
        ]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def _runs(base: str) -> int:
    with urllib.request.urlopen(base + "/metrics", timeout=2) as r:
        m = re.search(r"^probe_runs_total (\S+)$", r.read().decode(), re.M)
    return int(float(m.group(1))) if m else -1


def measure(stack: Stack) -> Idle:
    metrics_url = f"http://127.0.0.1:{stack.triton.metrics_port}/metrics"
    procs = {
        name: stack.serve(f"idle-{name}", PRODUCTION, triton={"metrics_url": metrics_url}, gpu=gpu)
        for name, gpu in VARIANTS.items()
    }
    try:
        for proc in procs.values():  # the first run (canary, environment) is startup, not idling
            _get(proc.base + "/ready")
        time.sleep(SETTLE_S)
        pids = {name: p.process.pid for name, p in procs.items()}
        stat0 = {n: stat_cpu_seconds(pid) for n, pid in pids.items()}
        sched0 = {n: cpu_seconds(pid) for n, pid in pids.items()}
        runs0 = {n: _runs(p.base) for n, p in procs.items()}
        probes = dict.fromkeys(procs, 0)
        statuses: dict[str, set[int]] = {n: set() for n in procs}
        start = time.monotonic()
        tick = start
        while tick < start + SECONDS:
            for name, proc in procs.items():
                for path in ("/ready", "/live"):
                    statuses[name].add(_get(proc.base + path))
                    probes[name] += 1
            tick += PERIOD
            time.sleep(max(0.0, tick - time.monotonic()))
        wall = time.monotonic() - start
        stat1 = {n: stat_cpu_seconds(pid) for n, pid in pids.items()}
        sched1 = {n: cpu_seconds(pid) for n, pid in pids.items()}
        return Idle(
            wall_s=wall,
            stat_s={n: stat1[n] - stat0[n] for n in pids},
            schedstat_s={n: sched1[n] - sched0[n] for n in pids},
            probes=probes,
            statuses=statuses,
            runs={n: _runs(p.base) - runs0[n] for n, p in procs.items()},
        )
    finally:
        for proc in procs.values():
            stack.stop(proc)


if __name__ == "__main__":
    run_standalone(measure)
