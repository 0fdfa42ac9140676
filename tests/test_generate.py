"""probe.generate against scripted servers on 127.0.0.1:0: the replies a real Triton cannot be made to send
(a stream cut short, a huge event, an unasked gzip, odd line endings), and the SSE line rules."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from probe.generate import (
    EventStreamParser,
    GenerateAnswer,
    GenerateFailure,
    GenerateOutcome,
    Progress,
    encode_request,
    error_message,
    generate,
    generate_stream,
    generate_url,
    join_events,
)
from tests.helpers import async_wait_for

BODY = encode_request({"text_input": "The capital of France is", "max_tokens": 3})
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/models/llm.py", line 190, in infer\n'
    "    raise RuntimeError(f'fault')\n"
    "RuntimeError: fault injected into demo_llm: error_mid after 2 tokens\n"
)


def event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def token_event(text: str) -> bytes:
    return event({"model_name": "demo_llm", "model_version": "1", "text_output": text})


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n"


# ---------------------------------------------------------------------------------------------- scripted server

Script = Callable[[asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Request:
    head: str
    body: bytes

    @property
    def path(self) -> str:
        return self.head.split(" ", 2)[1]

    def header(self, name: str) -> str:
        for line in self.head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return ""


@dataclass
class ScriptedTriton:
    """An HTTP/1.1 server that answers each request with the next script's raw bytes; it records the requests,
    counts connections, and counts the clients that hung up (also in the middle of an answer)."""

    scripts: list[Script]
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    client_closed: int = 0
    server: asyncio.Server | None = None
    handlers: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.connections += 1
        # The next request's head is read while an answer is written: a client that hangs up mid-answer ends
        # that read (HTTP/1.1 without pipelining sends nothing else before the answer is complete).
        next_head = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
        script_task: asyncio.Future[None] | None = None
        try:
            while True:
                try:
                    head = (await next_head).decode()
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.client_closed += 1
                    return
                req = Request(head, b"")
                req.body = await reader.readexactly(int(req.header("Content-Length") or 0))
                self.requests.append(req)
                if not self.scripts:
                    return
                script = self.scripts.pop(0)
                next_head = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
                script_task = asyncio.ensure_future(script(writer))
                await asyncio.wait({script_task, next_head}, return_when=asyncio.FIRST_COMPLETED)
                if not script_task.done():
                    continue  # the client hung up (or misbehaved) mid-answer: counted at the top
                await script_task
                if getattr(script, "closes", False):
                    return
        finally:
            for t in (next_head, script_task):
                if t is not None:
                    t.cancel()
            writer.close()
            self.handlers.discard(task)


def closes(script: Script) -> Script:
    """Mark a script after which the server closes the connection."""
    script.closes = True  # type: ignore[attr-defined]
    return script


def raw(*parts: bytes, pause: asyncio.Event | None = None, after: int = 0) -> Script:
    """Send `parts` in order; with `pause`, stop after `after` parts until the event is set."""

    async def script(writer: asyncio.StreamWriter) -> None:
        for i, part in enumerate(parts):
            if pause is not None and i == after:
                await pause.wait()
            writer.write(part)
            await writer.drain()

    return script


def sse(*events: bytes, end: bool = True) -> Script:
    """A 200 event stream, one chunk per event, the terminating zero-length chunk when `end`."""
    parts = [SSE_HEAD, *(chunk(e) for e in events)]
    if end:
        parts.append(b"0\r\n\r\n")
    return raw(*parts)


def answer(status: str, content_type: str, body: bytes, extra: str = "") -> Script:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return raw(head.encode() + body)


Start = Callable[..., Awaitable[ScriptedTriton]]


@pytest.fixture
async def scripted() -> AsyncIterator[Start]:
    servers: list[ScriptedTriton] = []

    async def start(*scripts: Script) -> ScriptedTriton:
        s = ScriptedTriton(list(scripts))
        s.server = await asyncio.start_server(s.handle, "127.0.0.1", 0)
        servers.append(s)
        return s

    yield start
    for s in servers:
        assert s.server is not None
        s.server.close()
        for task in list(s.handlers):
            task.cancel()
        await asyncio.gather(*s.handlers, return_exceptions=True)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def stream(session: aiohttp.ClientSession, server: ScriptedTriton, **kw: Any) -> GenerateOutcome:
    return await generate_stream(session, server.url, "demo_llm", "", BODY, **{"max_bytes": 1 << 20, **kw})


def failed(outcome: GenerateOutcome) -> GenerateFailure:
    assert isinstance(outcome, GenerateFailure), outcome
    assert "\n" not in outcome.reason
    return outcome


def answered(outcome: GenerateOutcome) -> GenerateAnswer:
    assert isinstance(outcome, GenerateAnswer), outcome
    return outcome


# ---------------------------------------------------------------------------------------------- the SSE line rules


def parse_all(data: bytes, max_event_bytes: int = 1 << 20) -> list[bytes]:
    p = EventStreamParser(max_event_bytes)
    return p.feed(data)


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_line_endings_end_lines_and_events(eol: bytes) -> None:
    data = b"data: a" + eol + b"data: b" + eol + eol + b"data: c" + eol + eol
    assert parse_all(data) == [b"a\nb", b"c"]


def test_every_split_of_a_stream_parses_the_same() -> None:
    """CR at the end of one chunk and LF at the start of the next are one line ending, not two."""
    data = b"\xef\xbb\xbfdata: one\r\n\r\n: comment\rdata:two\r\rdata: x\ndata: y\n\r\nevent: ignored\nid: 7\ndata\n\n"
    want = [b"one", b"two", b"x\ny", b""]
    assert parse_all(data) == want
    for cut in range(len(data) + 1):
        for cut2 in range(cut, len(data) + 1, 7):
            p = EventStreamParser()
            got = p.feed(data[:cut]) + p.feed(data[cut:cut2]) + p.feed(data[cut2:])
            assert got == want, (cut, cut2)
            assert not p.inside_event


def test_comments_fields_and_spaces() -> None:
    assert parse_all(b": keep-alive\n\n") == []  # a comment alone dispatches nothing
    assert parse_all(b"data:  two spaces\n\n") == [b" two spaces"]  # only one space is dropped
    assert parse_all(b"retry: 10\nevent: x\n\n") == []  # no data field, no event
    assert parse_all(b"data\n\n") == [b""]  # a field with no colon has an empty value


def test_inside_event_at_the_end() -> None:
    p = EventStreamParser()
    assert p.feed(b"data: a\n\ndata: b\n") == [b"a"]
    assert p.inside_event
    p = EventStreamParser()
    p.feed(b"data: a\n\ndata: partial")
    assert p.inside_event


def test_parser_bounds() -> None:
    p = EventStreamParser(max_event_bytes=16)
    with pytest.raises(Exception, match="reply too large: a line over 16 bytes"):
        p.feed(b"data: " + b"x" * 20)
    p = EventStreamParser(max_event_bytes=16)
    with pytest.raises(Exception, match="reply too large: an event over 16 bytes"):
        p.feed(b"data: 12345678\ndata: 12345678\n")


# ---------------------------------------------------------------------------------------------- pure helpers


def test_join_events_concatenates_strings_and_lists_the_rest() -> None:
    joined = join_events(
        [
            {"text_output": "The", "logprob": -0.5, "id": "7"},
            {"text_output": " capital", "logprob": -0.25, "id": "7", "extra": [1]},
            {"text_output": "", "logprob": None, "id": "7"},
        ]
    )
    assert joined == {"text_output": "The capital", "logprob": [-0.5, -0.25, None], "id": "777", "extra": [[1]]}
    assert list(joined) == ["text_output", "logprob", "id", "extra"]
    assert join_events([{"mixed": "a"}, {"mixed": 1}]) == {"mixed": ["a", 1]}


def test_error_message_takes_a_tracebacks_exception_line() -> None:
    assert error_message(TRACEBACK) == "RuntimeError: fault injected into demo_llm: error_mid after 2 tokens"
    assert error_message("line one\nline two") == "line one line two"
    assert error_message({"code": 3}) == '{"code": 3}'
    assert error_message("  ") == "(empty error message)"
    assert len(error_message("x" * 5000)) == 400


def test_generate_url() -> None:
    assert generate_url("http://h:8000/", "m", "", stream=True) == "http://h:8000/v2/models/m/generate_stream"
    assert generate_url("http://h:8000", "m", "2", stream=False) == "http://h:8000/v2/models/m/versions/2/generate"


def test_progress_reasons() -> None:
    p = Progress()
    p.start(stream=True)
    assert p.timed_out(p.started + 0.7) == "timed out after 0.70s: no reply headers"
    p.headers_s = 0.004
    assert p.describe() == "reply headers after 4 ms, no event"
    p.events, p.first_event_s = 3, 0.012
    assert p.timed_out(p.started + 0.7) == "timed out after 0.70s: 3 events, first after 12 ms"
    p.events = 1
    assert p.describe() == "1 event, first after 12 ms"


# ---------------------------------------------------------------------------------------------- streams


async def test_stream_joins_events_and_sends_the_request_as_asked(
    scripted: Start, session: aiohttp.ClientSession
) -> None:
    server = await scripted(sse(token_event(" Paris"), token_event(","), token_event(" France")))
    out = answered(await stream(session, server))
    assert out.answer == {
        "model_name": "demo_llmdemo_llmdemo_llm",
        "model_version": "111",
        "text_output": " Paris, France",
    }
    assert out.events == 3
    assert out.first_event_s is not None and 0 < out.first_event_s <= out.total_s
    (req,) = server.requests
    assert req.path == "/v2/models/demo_llm/generate_stream"
    assert req.header("Accept-Encoding") == "identity"
    assert req.header("Content-Type") == "application/json"
    assert req.header("Accept") == "text/event-stream"
    assert req.body == BODY


async def test_a_complete_stream_keeps_the_connection_for_the_next(
    scripted: Start, session: aiohttp.ClientSession
) -> None:
    server = await scripted(sse(token_event("a")), sse(token_event("b")))
    assert answered(await stream(session, server)).answer["text_output"] == "a"
    assert answered(await stream(session, server)).answer["text_output"] == "b"
    assert server.connections == 1


async def test_stream_cut_short_without_the_last_chunk(scripted: Start, session: aiohttp.ClientSession) -> None:
    server = await scripted(closes(sse(token_event("a"), token_event("b"), end=False)))
    out = failed(await stream(session, server))
    assert out.kind == "cut_short"
    assert out.reason.startswith("stream cut short after 2 events: ClientPayloadError")
    assert out.events == 2


async def test_stream_cut_short_inside_a_content_length_body(scripted: Start, session: aiohttp.ClientSession) -> None:
    body = token_event("a")
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % (len(body) + 50)
    server = await scripted(closes(raw(head + body)))
    out = failed(await stream(session, server))
    assert (out.kind, out.events) == ("cut_short", 1)


async def test_a_closed_connection_before_headers(scripted: Start, session: aiohttp.ClientSession) -> None:
    server = await scripted(closes(raw(b"")))
    out = failed(await stream(session, server))
    assert out.kind == "connection" and out.reason.startswith("no reply: ServerDisconnectedError")


async def test_connection_refused(session: aiohttp.ClientSession) -> None:
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    out = failed(await generate_stream(session, f"http://127.0.0.1:{port}", "m", "", BODY, max_bytes=1024))
    assert out.kind == "connection" and out.reason.startswith("no reply: ClientConnectorError")


async def test_an_error_event_under_200_is_the_exception_line(scripted: Start, session: aiohttp.ClientSession) -> None:
    server = await scripted(sse(token_event("a"), token_event("b"), event({"error": TRACEBACK})))
    out = failed(await stream(session, server))
    assert out.kind == "error" and out.status == 200
    assert out.reason == "error in event 3: RuntimeError: fault injected into demo_llm: error_mid after 2 tokens"


async def test_400_with_an_event_stream_body(scripted: Start, session: aiohttp.ClientSession) -> None:
    body = event({"error": TRACEBACK.replace("error_mid after 2 tokens", "fail")})
    head = SSE_HEAD.replace(b"200 OK", b"400 Bad Request")
    server = await scripted(raw(head, chunk(body), b"0\r\n\r\n"))
    out = failed(await stream(session, server))
    assert (out.kind, out.status) == ("status", 400)
    assert out.reason == "HTTP 400: RuntimeError: fault injected into demo_llm: fail"


async def test_other_statuses(scripted: Start, session: aiohttp.ClientSession) -> None:
    server = await scripted(
        answer("500 Internal Server Error", "application/json", b'{"error":"model crashed"}'),
        answer("503 Service Unavailable", "text/plain", b""),
        answer("404 Not Found", "text/plain", b"no such\nmodel"),
    )
    assert failed(await stream(session, server)).reason == "HTTP 500: model crashed"
    assert failed(await stream(session, server)).reason == "HTTP 503 Service Unavailable"
    assert failed(await stream(session, server)).reason == "HTTP 404: no such model"


async def test_an_empty_stream(scripted: Start, session: aiohttp.ClientSession) -> None:
    server = await scripted(sse())
    out = failed(await stream(session, server))
    assert (out.kind, out.reason) == ("empty", "empty stream: 200 with no event")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"data: {not json\n\n", "malformed event 1: not JSON (Expecting property name enclosed in double quotes:"),
        (b"data: [1, 2]\n\n", "malformed event 1: an array, not an object"),
        (b"data: 3\n\n", "malformed event 1: a JSON int, not an object"),
        (b"data: \xff\n\n", "malformed event 1: not UTF-8"),
        (b"data: " + b"[" * 100_000 + b"\n\n", "malformed event 1: nested too deeply"),
        (b'data: {"text_output": "a"}\n', "malformed stream: it ended inside event 1"),
    ],
    ids=["not-json", "array", "number", "not-utf8", "deep", "unterminated"],
)
async def test_malformed_events(scripted: Start, session: aiohttp.ClientSession, data: bytes, reason: str) -> None:
    server = await scripted(sse(data))
    out = failed(await stream(session, server))
    assert out.kind == "malformed" and out.reason.startswith(reason)


async def test_an_unasked_gzip_is_refused_unread(scripted: Start, session: aiohttp.ClientSession) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\n"
    server = await scripted(raw(head + b"\x1f\x8b\x08\x00"))
    out = failed(await stream(session, server))
    assert (out.kind, out.reason) == ("malformed", "reply compressed (gzip) though identity was asked for")


async def test_a_huge_event(scripted: Start, session: aiohttp.ClientSession) -> None:
    server = await scripted(sse(b"data: " + b"x" * 300_000 + b"\n\n"))
    out = failed(await stream(session, server, max_event_bytes=256 * 1024))
    assert (out.kind, out.reason) == ("too_large", "reply too large: a line over 256.0KiB")


async def test_too_many_bytes_and_too_many_events(scripted: Start, session: aiohttp.ClientSession) -> None:
    many = [token_event("x")] * 50
    server = await scripted(sse(*many), sse(*many))
    out = failed(await stream(session, server, max_bytes=1000))
    assert (out.kind, out.reason) == ("too_large", "reply too large: the stream over 1000 bytes")
    out = failed(await stream(session, server, max_events=10))
    assert (out.kind, out.reason, out.events) == ("too_large", "reply too large: over 10 events", 10)


# ---------------------------------------------------------------------------------------------- cancellation


async def test_cancelled_before_headers_closes_the_connection(scripted: Start, session: aiohttp.ClientSession) -> None:
    release = asyncio.Event()
    server = await scripted(raw(SSE_HEAD, pause=release, after=0))
    progress = Progress()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await stream(session, server, progress=progress)
    assert progress.timed_out().startswith("timed out after 0.2")
    assert progress.describe() == "no reply headers"
    await async_wait_for(lambda: _true(server.client_closed == 1), 5, "the client to close its connection")
    release.set()


async def test_cancelled_mid_stream_reports_progress_and_never_reuses_the_connection(
    scripted: Start, session: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    stalled = raw(SSE_HEAD, chunk(token_event("a")), chunk(token_event("b")), b"", pause=release, after=3)
    server = await scripted(stalled, sse(token_event("next")))
    progress = Progress()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await generate_stream(session, server.url, "demo_llm", "", BODY, max_bytes=1 << 20, progress=progress)
    assert time.monotonic() - t0 < 2
    assert progress.events == 2 and progress.first_event_s is not None and progress.first_event_s < 0.3
    assert progress.describe().startswith("2 events, first after ")
    await async_wait_for(lambda: _true(server.client_closed == 1), 5, "the client to close its connection")
    release.set()
    # The stalled connection is gone: the next request opens a new one and gets a whole answer.
    assert answered(await stream(session, server)).answer["text_output"] == "next"
    assert server.connections == 2


async def _true(value: bool) -> bool:
    return value


# ---------------------------------------------------------------------------------------------- generate


async def test_generate_reads_one_object(scripted: Start, session: aiohttp.ClientSession) -> None:
    body = json.dumps({"model_name": "m", "model_version": "1", "text_output": " Paris"}).encode()
    server = await scripted(answer("200 OK", "application/json", body))
    out = answered(await generate(session, server.url, "m", "3", BODY, max_bytes=4096))
    assert out.answer["text_output"] == " Paris" and out.events == 1 and out.first_event_s is None
    assert server.requests[0].path == "/v2/models/m/versions/3/generate"
    assert server.requests[0].header("Accept") == "application/json"


async def test_generate_failures(scripted: Start, session: aiohttp.ClientSession) -> None:
    many = b'{"error":"generate expects model to produce exactly 1 response, use generate stream for model ..."}'
    server = await scripted(
        answer("200 OK", "application/json", many),
        answer("200 OK", "application/json", b""),
        answer("200 OK", "application/json", b"[]"),
        answer("200 OK", "application/json", b'{"text_output": "' + b"x" * 5000 + b'"}'),
        closes(raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")),
    )

    async def one() -> GenerateFailure:
        return failed(await generate(session, server.url, "m", "", BODY, max_bytes=4096))

    out = await one()
    assert (out.kind, out.status) == ("error", 200)
    assert (
        out.reason == "error: generate expects model to produce exactly 1 response, use generate stream for model ..."
    )
    assert (await one()).reason == "empty answer: 200 with no body"
    assert (await one()).reason == "malformed answer: an array, not an object"
    assert (await one()).reason == "reply too large: the answer over 4.0KiB"
    out = await one()
    assert out.kind == "cut_short" and out.reason.startswith("answer cut short: ClientPayloadError")


async def test_generate_timed_out_waiting_for_headers(scripted: Start, session: aiohttp.ClientSession) -> None:
    release = asyncio.Event()
    server = await scripted(raw(b"", pause=release, after=0))
    progress = Progress()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await generate(session, server.url, "m", "", BODY, max_bytes=4096, progress=progress)
    assert progress.describe() == "no reply headers"
    release.set()


async def test_the_sessions_defaults_do_not_change_what_a_status_means(scripted: Start) -> None:
    server = await scripted(
        answer("500 Internal Server Error", "application/json", b'{"error":"model crashed"}'),
        answer("307 Temporary Redirect", "text/plain", b"", extra="Location: /elsewhere\r\n"),
    )
    async with aiohttp.ClientSession(raise_for_status=True) as strict:
        assert failed(await stream(strict, server)).reason == "HTTP 500: model crashed"
        assert failed(await stream(strict, server)).reason == "HTTP 307 Temporary Redirect"
    assert len(server.requests) == 2
