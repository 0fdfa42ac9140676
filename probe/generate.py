"""Triton's generate extension over a caller's aiohttp session: `generate` (one JSON answer) and
`generate_stream` (server-sent events, joined into one answer).

What counts as failure, each a `GenerateFailure` with a one-line reason (never an exception):
- the connection fails or drops before the reply headers (`connection`);
- a status other than 200 (`status`), with the error Triton put in the body (JSON or an event);
- an `error` field in the answer or in any event (`error`): Triton sends these under 200, for a model that
  raised mid-stream and for `generate` on a model that answers more than once; a forwarded Python traceback
  is reported by its last line, the exception;
- a reply that is not what the protocol says (`malformed`): an event or answer that is not a JSON object, a
  stream that ends inside an event, a `Content-Encoding` that was not asked for;
- a reply over a bound (`too_large`, the reason starts with `reply too large`): total bytes, one line or
  event, the number of events;
- a 200 stream with no event, or an empty answer (`empty`);
- a stream or answer cut short (`cut_short`): the connection closed before the end of the body (for chunked
  framing, before the terminating zero-length chunk).

Time is not a failure here: these functions set no timeout of their own. The caller bounds them (e.g. with
`asyncio.timeout`); cancelling aborts the connection (it is never returned to the pool half read), and the
caller's `Progress` says what had arrived: `progress.timed_out()` -> "timed out after 0.70s: 3 events, first
after 12 ms". The session should have no timeouts of its own either; one that fires is a `connection` failure.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import aiohttp

FailureKind = Literal["connection", "status", "error", "malformed", "too_large", "empty", "cut_short"]

MAX_EVENT_BYTES = 1024 * 1024
"""Default bound on one line and on one event's data."""
MAX_EVENTS = 65536
"""Default bound on the number of events in one stream."""
READ_SIZE = 64 * 1024
"""Most bytes taken from the connection's buffer per read."""
ERROR_BODY_BYTES = 64 * 1024
"""Most bytes of a non-200 body read for its error message."""
REASON_CHARS = 400
"""An error message from Triton is cut to this many characters in a reason."""

REQUEST_HEADERS = {"Content-Type": "application/json", "Accept-Encoding": "identity"}

_EOL = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b.*")


# ---------------------------------------------------------------------------------------------- progress


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


@dataclass
class Progress:
    """What a request has received so far. The caller owns it and reads it after cancelling the request on
    its deadline; `generate` and `generate_stream` reset it when they start and update it as data arrives.
    Times are seconds since the request started (time.monotonic)."""

    started: float = 0.0
    stream: bool = True
    headers_s: float | None = None
    events: int = 0
    first_event_s: float | None = None
    received: int = 0
    """Body bytes received."""

    def start(self, *, stream: bool) -> None:
        self.started = time.monotonic()
        self.stream = stream
        self.headers_s = None
        self.events = 0
        self.first_event_s = None
        self.received = 0

    def elapsed(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.started

    def describe(self) -> str:
        """'no reply headers', 'reply headers after 3 ms, no event', '3 events, first after 12 ms'."""
        if self.headers_s is None:
            return "no reply headers"
        if not self.stream:
            return f"reply headers after {_ms(self.headers_s)}, answer incomplete ({self.received} bytes)"
        if self.events == 0 or self.first_event_s is None:
            return f"reply headers after {_ms(self.headers_s)}, no event"
        noun = "event" if self.events == 1 else "events"
        return f"{self.events} {noun}, first after {_ms(self.first_event_s)}"

    def timed_out(self, now: float | None = None) -> str:
        """The reason for a request cancelled at its deadline: 'timed out after 0.70s: 3 events, first after
        12 ms'."""
        return f"timed out after {self.elapsed(now):.2f}s: {self.describe()}"


# ---------------------------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class GenerateAnswer:
    """A complete answer: for a stream, the events joined (see `join_events`)."""

    answer: dict[str, Any]
    events: int
    first_event_s: float | None
    """Seconds from the request's start to the first event; None for `generate`."""
    total_s: float


@dataclass(frozen=True)
class GenerateFailure:
    kind: FailureKind
    reason: str
    """One line, e.g. 'HTTP 400: ValueError: max_tokens must be ...', 'reply too large: over 4.0MiB'."""
    status: int | None
    events: int
    first_event_s: float | None
    total_s: float


GenerateOutcome = GenerateAnswer | GenerateFailure


class _Failed(Exception):
    """Internal: unwinds a read to the one place that turns it into a GenerateFailure."""

    def __init__(self, kind: FailureKind, reason: str) -> None:
        super().__init__(reason)
        self.kind: FailureKind = kind
        self.reason = reason


# ---------------------------------------------------------------------------------------------- pure helpers


def generate_url(base_url: str, model: str, version: str = "", *, stream: bool) -> str:
    """`<base>/v2/models/<m>[/versions/<v>]/generate[_stream]`; `base_url` is `http(s)://host:port`."""
    url = f"{base_url.rstrip('/')}/v2/models/{quote(model, safe='')}"
    if version:
        url += f"/versions/{quote(version, safe='')}"
    return url + ("/generate_stream" if stream else "/generate")


def encode_request(request: Mapping[str, Any]) -> bytes:
    """The request body as sent: JSON, UTF-8, keys in the order the config gave them."""
    return json.dumps(request, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def one_line(text: str, limit: int = REASON_CHARS) -> str:
    """Whitespace runs (line breaks included) become one space; other control characters are dropped."""
    flat = " ".join("".join(c if c.isprintable() or c.isspace() else " " for c in text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def error_message(value: Any) -> str:
    """An `error` field as one line: a forwarded Python traceback becomes its last line (the exception)."""
    if not isinstance(value, str):
        value = json.dumps(value, ensure_ascii=False)
    lines = [ln.strip() for ln in value.strip().splitlines() if ln.strip()]
    if not lines:
        return "(empty error message)"
    if any(ln.startswith("Traceback (most recent call last)") for ln in lines):
        exceptions = [ln for ln in lines if _EXCEPTION_LINE.match(ln)]
        return one_line(exceptions[-1] if exceptions else lines[-1])
    return one_line(" ".join(lines))


def join_events(events: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Join a stream's events into one answer, field by field in order of first appearance: a field whose
    every value is a string is concatenated; any other field becomes the list of its values, in order."""
    values: dict[str, list[Any]] = {}
    for event in events:
        for key, value in event.items():
            values.setdefault(key, []).append(value)
    return {k: "".join(v) if all(isinstance(x, str) for x in v) else v for k, v in values.items()}


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise _Failed("malformed", f"malformed {what}: not UTF-8") from None
    except RecursionError:
        raise _Failed("malformed", f"malformed {what}: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, or an integer beyond the conversion limit
        raise _Failed("malformed", f"malformed {what}: not JSON ({one_line(str(e), 120)})") from None
    if not isinstance(value, dict):
        kind = "an array" if isinstance(value, list) else "a JSON " + type(value).__name__
        raise _Failed("malformed", f"malformed {what}: {kind}, not an object")
    return value


def _too_large(what: str, limit: int) -> _Failed:
    return _Failed("too_large", f"reply too large: {what} over {_size(limit)}")


def _size(n: int) -> str:
    for unit, scale in (("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n} bytes"


class EventStreamParser:
    """Server-sent events, the WHATWG line rules: lines end with CR, LF or CRLF; `data:` lines (one space after
    the colon dropped) are joined with LF; a blank line ends an event; a line starting with `:` is a comment;
    other fields (event, id, retry) are ignored; a leading BOM is dropped. Bounded: a line and an event's data
    each at most `max_event_bytes`. Feed bytes in, get each finished event's data out."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self._partial = b""
        self._data: list[bytes] = []
        self._data_bytes = 0
        self._has_data = False
        self._skip_lf = False  # the last line ended with CR: an LF at the start of the next chunk is its pair
        self._start = True

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of each event that `chunk` completes. Raises _Failed('too_large') over a bound."""
        buf = self._partial + chunk if self._partial else chunk
        if self._start:
            if len(buf) < len(_BOM) and _BOM.startswith(buf):
                self._partial = buf
                return []
            self._start = False
            if buf.startswith(_BOM):
                buf = buf[len(_BOM) :]
        pos = 0
        if self._skip_lf and buf[:1] == b"\n":
            pos = 1
        self._skip_lf = False
        events: list[bytes] = []
        while True:
            m = _EOL.search(buf, pos)
            if m is None:
                break
            if m.end() == len(buf) and m.group() == b"\r":
                self._skip_lf = True
            line = buf[pos : m.start()]
            pos = m.end()
            if len(line) > self.max_event_bytes:
                raise _too_large("a line", self.max_event_bytes)
            event = self._line(line)
            if event is not None:
                events.append(event)
        self._partial = buf[pos:]
        if len(self._partial) > self.max_event_bytes:
            raise _too_large("a line", self.max_event_bytes)
        return events

    def _line(self, line: bytes) -> bytes | None:
        if not line:
            if not self._has_data:
                return None
            data = b"\n".join(self._data)
            self._data, self._data_bytes, self._has_data = [], 0, False
            return data
        if line.startswith(b":"):
            return None
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data_bytes += len(value) + 1
            if self._data_bytes > self.max_event_bytes:
                raise _too_large("an event", self.max_event_bytes)
            self._data.append(value)
            self._has_data = True
        return None

    @property
    def inside_event(self) -> bool:
        """True when the bytes so far end inside an event (data without its blank line, or a partial line)."""
        return self._has_data or bool(self._partial.strip(b"\r\n"))


# ---------------------------------------------------------------------------------------------- requests


async def generate(
    session: aiohttp.ClientSession,
    base_url: str,
    model: str,
    version: str,
    body: bytes,
    *,
    max_bytes: int,
    progress: Progress | None = None,
) -> GenerateOutcome:
    """POST `body` to the model's `/generate` and read its one JSON answer (at most `max_bytes`)."""
    progress = progress if progress is not None else Progress()
    progress.start(stream=False)
    url = generate_url(base_url, model, version, stream=False)
    return await _request(session, url, body, progress, stream=False, max_bytes=max_bytes)


async def generate_stream(
    session: aiohttp.ClientSession,
    base_url: str,
    model: str,
    version: str,
    body: bytes,
    *,
    max_bytes: int,
    progress: Progress | None = None,
    max_event_bytes: int = MAX_EVENT_BYTES,
    max_events: int = MAX_EVENTS,
) -> GenerateOutcome:
    """POST `body` to the model's `/generate_stream`, read its events and join them (see `join_events`).

    Bounded: at most `max_bytes` of body in all, `max_event_bytes` per line or event, `max_events` events."""
    progress = progress if progress is not None else Progress()
    progress.start(stream=True)
    url = generate_url(base_url, model, version, stream=True)
    return await _request(
        session,
        url,
        body,
        progress,
        stream=True,
        max_bytes=max_bytes,
        max_event_bytes=min(max_event_bytes, max_bytes),
        max_events=max_events,
    )


async def _request(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    progress: Progress,
    *,
    stream: bool,
    max_bytes: int,
    max_event_bytes: int = MAX_EVENT_BYTES,
    max_events: int = MAX_EVENTS,
) -> GenerateOutcome:
    headers = {**REQUEST_HEADERS, "Accept": "text/event-stream" if stream else "application/json"}
    status: int | None = None
    answer: dict[str, Any] | None = None
    try:
        try:
            # Whatever the session's defaults: a status is read here, and a redirect is a status, not followed.
            resp = await session.post(url, data=body, headers=headers, raise_for_status=False, allow_redirects=False)
        except aiohttp.ClientError as e:
            raise _Failed("connection", f"no reply: {_client_error(e)}") from None
        complete = False
        try:
            progress.headers_s = progress.elapsed()
            status = resp.status
            _check_encoding(resp)
            if status != 200:
                raise _Failed("status", await _status_reason(resp))
            if stream:
                answer = await _read_events(resp, progress, max_bytes, max_event_bytes, max_events)
            else:
                answer = await _read_answer(resp, progress, max_bytes)
            complete = True
        except aiohttp.ClientPayloadError as e:
            what = f"stream cut short after {_events(progress.events)}" if stream else "answer cut short"
            raise _Failed("cut_short", f"{what}: {_client_error(e)}") from None
        except aiohttp.ClientError as e:
            raise _Failed("connection", f"connection lost while reading the reply: {_client_error(e)}") from None
        finally:
            # A reply read to its end goes back to the pool; anything else (a failure, a cancellation on the
            # caller's deadline) closes the connection, so no half-read stream is ever reused.
            if complete:
                resp.release()
            else:
                resp.close()
    except _Failed as f:
        return GenerateFailure(
            kind=f.kind,
            reason=f.reason,
            status=status,
            events=progress.events,
            first_event_s=progress.first_event_s,
            total_s=progress.elapsed(),
        )
    return GenerateAnswer(
        answer=answer,
        events=progress.events if stream else 1,
        first_event_s=progress.first_event_s if stream else None,
        total_s=progress.elapsed(),
    )


def _events(n: int) -> str:
    return f"{n} event" if n == 1 else f"{n} events"


def _client_error(e: BaseException) -> str:
    text = one_line(str(e), 200)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _check_encoding(resp: aiohttp.ClientResponse) -> None:
    """Identity was asked for; a compressed body is refused before a byte of it is read (no inflation)."""
    encoding = resp.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise _Failed("malformed", f"reply compressed ({one_line(encoding, 40)}) though identity was asked for")


async def _status_reason(resp: aiohttp.ClientResponse) -> str:
    """'HTTP 400: <Triton's error>' from a JSON or event-stream body, read up to ERROR_BODY_BYTES."""
    head = f"HTTP {resp.status}"
    body = b""
    try:
        while len(body) < ERROR_BODY_BYTES:
            chunk = await resp.content.read(ERROR_BODY_BYTES - len(body))
            if not chunk:
                break
            body += chunk
    except aiohttp.ClientError:
        pass  # the status says enough; the message is whatever arrived
    text = body.strip()
    if text.startswith(b"data:") or resp.content_type == "text/event-stream":
        try:
            events = EventStreamParser(ERROR_BODY_BYTES).feed(body + b"\n\n")
        except _Failed:
            events = []
        text = events[0].strip() if events else text
    if not text:
        return f"{head} {one_line(resp.reason or '', 80)}".rstrip()
    try:
        value = json.loads(text.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        value = None
    if isinstance(value, dict) and "error" in value:
        return f"{head}: {error_message(value['error'])}"
    return f"{head}: {one_line(text.decode('utf-8', 'replace'))}"


async def _read_answer(resp: aiohttp.ClientResponse, progress: Progress, max_bytes: int) -> dict[str, Any]:
    if resp.content_length is not None and resp.content_length > max_bytes:
        raise _too_large("the answer", max_bytes)
    parts: list[bytes] = []
    while chunk := await resp.content.read(READ_SIZE):
        progress.received += len(chunk)
        if progress.received > max_bytes:
            raise _too_large("the answer", max_bytes)
        parts.append(chunk)
    data = b"".join(parts)
    if not data.strip():
        raise _Failed("empty", "empty answer: 200 with no body")
    answer = _json_object(data, "answer")
    if "error" in answer:
        raise _Failed("error", f"error: {error_message(answer['error'])}")
    return answer


async def _read_events(
    resp: aiohttp.ClientResponse, progress: Progress, max_bytes: int, max_event_bytes: int, max_events: int
) -> dict[str, Any]:
    if resp.content_type != "text/event-stream":
        raise _Failed(
            "malformed", f"malformed reply: Content-Type {one_line(resp.content_type, 60)}, not an event stream"
        )
    parser = EventStreamParser(max_event_bytes)
    events: list[dict[str, Any]] = []
    while chunk := await resp.content.read(READ_SIZE):
        progress.received += len(chunk)
        if progress.received > max_bytes:
            raise _too_large("the stream", max_bytes)
        for data in parser.feed(chunk):
            if progress.events >= max_events:
                raise _Failed("too_large", f"reply too large: over {max_events} events")
            progress.events += 1
            if progress.first_event_s is None:
                progress.first_event_s = progress.elapsed()
            event = _json_object(data, f"event {progress.events}")
            if "error" in event:
                raise _Failed("error", f"error in event {progress.events}: {error_message(event['error'])}")
            events.append(event)
    if parser.inside_event:
        raise _Failed("malformed", f"malformed stream: it ended inside event {progress.events + 1}")
    if not events:
        raise _Failed("empty", "empty stream: 200 with no event")
    return join_events(events)
