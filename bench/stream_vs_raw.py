"""A streaming canary's request through `probe.generate.generate_stream` vs a raw aiohttp SSE client of the same
request: time to the first event and time to the whole answer.

Both sides post the same body to demo_llm's `/generate_stream` (16 tokens, one event each) on their own
keep-alive aiohttp session with `Accept-Encoding: identity`, and time the same moments: from just before the
POST to the end of the first event (its blank line), and to the end of the body. The raw client is what anyone
would write: `async for line in resp.content`, `data:` lines joined, `json.loads` per event, the text
concatenated. Requests are sequential and interleaved (probe, raw; raw, probe; ...) so drift from other load on
the shared machine hits both alike. Both answers are checked equal on every request.

Run alone: python bench/stream_vs_raw.py
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from dataclasses import dataclass
from typing import Any

from common import LLM_MODEL, Stack, mark, median, percentile, run_standalone, table

from probe.generate import GenerateAnswer, Progress, encode_request, generate_stream

N = 300
WARMUP = 30
TOKENS = 16
TARGET = 1.10  # probe's p50 first-event and total times at most this many times the raw client's
HEADERS = {"Content-Type": "application/json", "Accept-Encoding": "identity", "Accept": "text/event-stream"}


@dataclass
class StreamVsRaw:
    probe_first_ms: list[float]
    probe_total_ms: list[float]
    raw_first_ms: list[float]
    raw_total_ms: list[float]

    @property
    def first_ratio(self) -> float:
        return median(self.probe_first_ms) / median(self.raw_first_ms)

    @property
    def total_ratio(self) -> float:
        return median(self.probe_total_ms) / median(self.raw_total_ms)

    @property
    def ok(self) -> bool:
        return self.first_ratio <= TARGET and self.total_ratio <= TARGET

    def report(self) -> str:
        def row(label: str, first: list[float], total: list[float]) -> list[object]:
            return [
                label,
                len(total),
                f"{median(first):.2f}",
                f"{percentile(first, 90):.2f}",
                f"{median(total):.2f}",
                f"{percentile(total, 90):.2f}",
            ]

        p90_first = percentile(self.probe_first_ms, 90) / percentile(self.raw_first_ms, 90)
        p90_total = percentile(self.probe_total_ms, 90) / percentile(self.raw_total_ms, 90)
        rows: list[list[object]] = [
            row("probe.generate.generate_stream", self.probe_first_ms, self.probe_total_ms),
            row("raw aiohttp SSE client", self.raw_first_ms, self.raw_total_ms),
            [
                "ratio",
                "",
                f"{self.first_ratio:.2f}x",
                f"{p90_first:.2f}x",
                f"{self.total_ratio:.2f}x",
                f"{p90_total:.2f}x",
            ],
        ]
        return "\n".join(
            [
                f"== a {TOKENS}-token generate_stream: probe.generate vs a raw aiohttp SSE client (interleaved) ==",
                table(rows, ["", "n", "first p50 ms", "first p90 ms", "total p50 ms", "total p90 ms"]),
                f"target: p50 first-event and total ratios <= {TARGET}x -> {mark(self.ok)}",
            ]
        )

    def summary(self) -> list[tuple[str, str, str, bool | None]]:
        return [
            (
                "generate_stream via probe.generate vs raw SSE (first event, total; p50)",
                f"{self.first_ratio:.2f}x, {self.total_ratio:.2f}x",
                f"<= {TARGET}x",
                self.ok,
            )
        ]


async def raw_stream(session: Any, url: str, body: bytes) -> tuple[float, float, str]:
    """(seconds to the first event, seconds to the end, joined text_output) with plain aiohttp."""
    t0 = time.monotonic()
    first = 0.0
    data: list[bytes] = []
    text: list[str] = []
    async with session.post(url, data=body, headers=HEADERS) as resp:
        if resp.status != 200:
            raise RuntimeError(f"raw stream: HTTP {resp.status}: {await resp.text()}")
        async for line in resp.content:
            line = line.rstrip(b"\r\n")
            if line.startswith(b"data:"):
                data.append(line[5:].removeprefix(b" "))
            elif not line and data:
                event = json.loads(b"\n".join(data))
                data.clear()
                if not first:
                    first = time.monotonic() - t0
                text.append(event["text_output"])
    return first, time.monotonic() - t0, "".join(text)


async def _measure(base: str) -> StreamVsRaw:
    import aiohttp

    body = encode_request({"text_input": "The capital of France is", "max_tokens": TOKENS})
    url = f"{base}/v2/models/{LLM_MODEL}/generate_stream"
    samples: dict[str, list[float]] = {"pf": [], "pt": [], "rf": [], "rt": []}
    async with aiohttp.ClientSession() as probe_session, aiohttp.ClientSession() as raw_session:
        expected = ""

        async def probe() -> None:
            nonlocal expected
            t0 = time.monotonic()
            progress = Progress()
            out = await generate_stream(probe_session, base, LLM_MODEL, "", body, max_bytes=1 << 20, progress=progress)
            total = time.monotonic() - t0
            if not isinstance(out, GenerateAnswer) or out.first_event_s is None:
                raise RuntimeError(f"probe stream failed: {out}")
            if out.answer["text_output"] != expected:
                raise RuntimeError(f"probe and raw answers differ: {out.answer['text_output']!r} vs {expected!r}")
            # From just before the call, as on the raw side (progress counts from inside it).
            samples["pf"].append(progress.started + out.first_event_s - t0)
            samples["pt"].append(total)

        async def raw() -> None:
            nonlocal expected
            first, total, text = await raw_stream(raw_session, url, body)
            expected = text
            samples["rf"].append(first)
            samples["rt"].append(total)

        await raw()
        for i in range(WARMUP + N):
            if i == WARMUP:
                for s in samples.values():
                    s.clear()
                gc.collect()
            for step in (probe, raw) if i % 2 == 0 else (raw, probe):
                await step()
    return StreamVsRaw(
        probe_first_ms=[s * 1000 for s in samples["pf"]],
        probe_total_ms=[s * 1000 for s in samples["pt"]],
        raw_first_ms=[s * 1000 for s in samples["rf"]],
        raw_total_ms=[s * 1000 for s in samples["rt"]],
    )


def measure(stack: Stack) -> StreamVsRaw:
    return asyncio.run(_measure(stack.triton_url))


if __name__ == "__main__":
    run_standalone(measure)
