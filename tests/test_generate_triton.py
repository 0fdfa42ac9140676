"""probe.generate and probe.answers against the real Triton's generate extension, with the decoupled demo_llm
and its faults: a healthy stream, a stall cancelled at the caller's deadline, a wrong token, an error mid-stream,
a slow first token, an empty stream, `generate` on a model that answers more than once, and a Triton that dies
mid-stream."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from demo.launcher import TritonServer, start_triton, stop_triton
from demo.triton_server import continuation, token
from probe.answers import choose_fields, compare_answer, record_fields
from probe.config import CompareConfig
from probe.generate import (
    GenerateAnswer,
    GenerateFailure,
    GenerateOutcome,
    Progress,
    encode_request,
    generate,
    generate_stream,
)
from tests.helpers import async_wait_for

pytestmark = pytest.mark.triton

MODEL = "demo_llm"
PROMPT = "The capital of France is"
MAX_BYTES = 1 << 20


def body(max_tokens: int | None = 8, **extra: Any) -> bytes:
    request: dict[str, Any] = {"text_input": PROMPT, **extra}
    if max_tokens is not None:
        request["max_tokens"] = max_tokens
    return encode_request(request)


def answered(outcome: GenerateOutcome) -> GenerateAnswer:
    assert isinstance(outcome, GenerateAnswer), outcome
    return outcome


def failed(outcome: GenerateOutcome) -> GenerateFailure:
    assert isinstance(outcome, GenerateFailure), outcome
    return outcome


async def stream(triton: TritonServer, session: aiohttp.ClientSession, data: bytes, **kw: Any) -> GenerateOutcome:
    return await generate_stream(session, f"http://{triton.url}", MODEL, "", data, max_bytes=MAX_BYTES, **kw)


async def drained(triton: TritonServer, session: aiohttp.ClientSession) -> None:
    """Wait until demo_llm answers a one-token stream again: a stalled generator keeps the model busy after its
    client gave up, and the next request waits behind it."""

    async def one_token() -> bool:
        try:
            async with asyncio.timeout(2):
                return isinstance(await stream(triton, session, body(1)), GenerateAnswer)
        except TimeoutError:
            return False

    await async_wait_for(one_token, 60, "demo_llm to answer again")


@pytest.fixture
async def llm(triton: TritonServer) -> AsyncIterator[tuple[TritonServer, aiohttp.ClientSession]]:
    """The session Triton with demo_llm's fault cleared and its queue drained, before and after the test."""
    async with aiohttp.ClientSession() as session:
        triton.fault(MODEL, "ok")
        await drained(triton, session)
        try:
            yield triton, session
        finally:
            triton.fault(MODEL, "ok")
            await drained(triton, session)


LLM = tuple[TritonServer, aiohttp.ClientSession]


async def test_a_healthy_stream_joins_to_the_models_answer(llm: LLM) -> None:
    triton, session = llm
    out = answered(await stream(triton, session, body(8)))
    assert out.answer["text_output"] == continuation(PROMPT, 8)
    assert out.events == 8
    assert out.first_event_s is not None and 0 < out.first_event_s <= out.total_s < 5
    # Without max_tokens the model's default applies; parameters map to its optional inputs.
    out = answered(await stream(triton, session, body(None, parameters={"temperature": 0})))
    assert out.answer["text_output"] == continuation(PROMPT)
    # What a canary does with it: the answer matches a golden recorded from the same request.
    fields = choose_fields(out.answer, None)
    assert fields.fields == ("text_output",)
    golden = record_fields(out.answer, fields.fields, "exact")
    again = answered(await stream(triton, session, body(None)))
    assert compare_answer(again.answer, golden, CompareConfig()).ok


async def test_a_stall_is_cancelled_at_the_callers_deadline_with_what_had_arrived(llm: LLM) -> None:
    triton, session = llm
    triton.fault(MODEL, "stall")
    progress = Progress()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.7):
            await stream(triton, session, body(8), progress=progress)
    assert time.monotonic() - t0 < 1.5
    assert progress.events == 4  # stall: half the tokens, then nothing
    assert progress.first_event_s is not None and progress.first_event_s < 0.7
    reason = progress.timed_out()
    assert reason.startswith("timed out after 0.") and ": 4 events, first after " in reason and reason.endswith(" ms")
    triton.fault(MODEL, "ok")  # releases the stalled generator; the next request is served again
    await drained(triton, session)


async def test_a_stall_before_the_first_token_has_no_reply_headers(llm: LLM) -> None:
    triton, session = llm
    triton.fault(MODEL, "stall:0")
    progress = Progress()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await stream(triton, session, body(8), progress=progress)
    assert progress.describe() == "no reply headers"


async def test_a_wrong_token_changes_the_joined_answer(llm: LLM) -> None:
    triton, session = llm
    healthy = answered(await stream(triton, session, body(16))).answer
    golden = record_fields(healthy, ["text_output"], "text")
    triton.fault(MODEL, "wrong_token")
    wrong = answered(await stream(triton, session, body(16))).answer
    assert wrong["text_output"] != healthy["text_output"]
    at = len(continuation(PROMPT, 8)) + 1  # the 9th token differs after its leading space
    exact = compare_answer(wrong, golden, CompareConfig())
    assert not exact.ok and f"leaves the golden at character {at}:" in exact.reason
    strict = compare_answer(wrong, golden, CompareConfig(mode="text", min_similarity=0.99))
    assert not strict.ok and strict.reason.startswith("text_output: similarity 0.9")
    lenient = compare_answer(wrong, golden, CompareConfig(mode="text", min_similarity=0.8))
    assert lenient.ok and f"leaves the golden at character {at}:" in lenient.reason


async def test_an_error_mid_stream_is_the_exception_line(llm: LLM) -> None:
    triton, session = llm
    triton.fault(MODEL, "error_mid")
    out = failed(await stream(triton, session, body(8)))
    assert (out.kind, out.status, out.events) == ("error", 200, 5)
    assert out.reason == "error in event 5: RuntimeError: fault injected into demo_llm: error_mid after 4 tokens"


async def test_an_error_before_the_first_token_is_a_400(llm: LLM) -> None:
    triton, session = llm
    triton.fault(MODEL, "fail")
    out = failed(await stream(triton, session, body(8)))
    assert (out.kind, out.status) == ("status", 400)
    assert out.reason == "HTTP 400: RuntimeError: fault injected into demo_llm: fail"
    triton.fault(MODEL, "ok")
    out = failed(await stream(triton, session, body(99999)))
    assert out.reason == "HTTP 400: ValueError: max_tokens must be between 0 and 4096, got 99999"


async def test_a_slow_first_token_is_measured(llm: LLM) -> None:
    triton, session = llm
    triton.fault(MODEL, "slow_first:0.3")
    out = answered(await stream(triton, session, body(8)))
    assert out.first_event_s is not None and out.first_event_s >= 0.3
    assert out.answer["text_output"] == continuation(PROMPT, 8)
    # Cancelled before it: the status line comes with the first token, so there are no headers yet.
    progress = Progress()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.15):
            await stream(triton, session, body(8), progress=progress)
    assert progress.describe() == "no reply headers"


async def test_an_empty_stream_fails(llm: LLM) -> None:
    triton, session = llm
    out = failed(await stream(triton, session, body(0)))
    assert (out.kind, out.status, out.reason) == ("empty", 200, "empty stream: 200 with no event")


async def test_generate_on_a_model_that_answers_more_than_once_quotes_its_error(llm: LLM) -> None:
    triton, session = llm
    base = f"http://{triton.url}"
    out = failed(await generate(session, base, MODEL, "", body(4), max_bytes=MAX_BYTES))
    assert (out.kind, out.status) == ("error", 200)
    assert out.reason == (
        "error: generate expects model to produce exactly 1 response, use generate stream for model that "
        "generates various number of responses"
    )
    one = answered(await generate(session, base, MODEL, "1", body(1), max_bytes=MAX_BYTES))
    assert one.answer == {"model_name": MODEL, "model_version": "1", "text_output": token(PROMPT, 0)}


async def test_an_unknown_model(llm: LLM) -> None:
    triton, session = llm
    out = failed(await generate_stream(session, f"http://{triton.url}", "nope", "", body(1), max_bytes=MAX_BYTES))
    assert (out.kind, out.status, out.reason) == (
        "status",
        404,
        "HTTP 404: Request for unknown model: 'nope' is not found",
    )


@pytest.fixture
def private_triton(tmp_path: Path) -> Iterator[TritonServer]:
    """A Triton of our own with demo_llm alone, for a test that kills it."""
    server = start_triton(tmp_path, (MODEL,))
    try:
        yield server
    finally:
        stop_triton(server)


async def test_triton_dying_mid_stream_cuts_it_short(private_triton: TritonServer) -> None:
    triton = private_triton
    triton.fault(MODEL, "stall")
    async with aiohttp.ClientSession() as session:
        progress = Progress()
        task = asyncio.create_task(stream(triton, session, body(8), progress=progress))
        await async_wait_for(lambda: _now(progress.events == 4), 30, "the first half of the stream")
        stop_triton(triton, signal.SIGKILL)
        async with asyncio.timeout(10):
            out = failed(await task)
    assert out.kind == "cut_short" and out.events == 4
    assert out.reason.startswith("stream cut short after 4 events: ClientPayloadError")


async def _now(value: bool) -> bool:
    return value
