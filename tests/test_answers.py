"""probe.answers: compared fields, digests of canonical JSON, the exact / tolerance / text modes, and the
agreement of recorded runs."""

from __future__ import annotations

import random
import time

import pytest
import xxhash

from demo.triton_server import continuation
from probe.answers import (
    MAX_TEXT_CHARS,
    accept_runs,
    canonical_json,
    choose_fields,
    compare_answer,
    divergence,
    fields_record_problem,
    first_difference,
    lcs_length,
    record_fields,
    request_digest,
    similarity,
    value_digest,
)
from probe.config import CompareConfig

EXACT = CompareConfig()
TEXT = CompareConfig(mode="text", min_similarity=0.9)
TOLERANCE = CompareConfig(mode="tolerance", rtol=1e-3, atol=1e-6)

GOLDEN_TEXT = " Paris. It is the largest city of France and its seat of government."
ANSWER = {"model_name": "demo_llm", "model_version": "1", "text_output": GOLDEN_TEXT, "logprob": [-0.5, -0.25]}


def golden_of(answer: dict[str, object], mode: str, outputs: list[str] | None = None) -> dict[str, dict[str, object]]:
    choice = choose_fields(answer, outputs)
    assert choice.problem is None
    return record_fields(answer, choice.fields, mode)


# ---------------------------------------------------------------------------------------------- digests


def test_canonical_json_sorts_keys_drops_spaces_and_keeps_utf8() -> None:
    assert canonical_json({"b": [1, 2.5], "a": "é"}) == '{"a":"é","b":[1,2.5]}'.encode()
    assert value_digest({"b": [1, 2.5], "a": "é"}) == "xxh3_128:" + xxhash.xxh3_128_hexdigest(
        '{"a":"é","b":[1,2.5]}'.encode()
    )
    assert value_digest({"a": 1, "b": 2}) == value_digest({"b": 2, "a": 1})
    assert value_digest(1) != value_digest(1.0) != value_digest("1")


def test_request_digest_changes_with_the_request() -> None:
    a = {"text_input": "The capital of France is", "parameters": {"temperature": 0}}
    assert request_digest(a) == request_digest({"parameters": {"temperature": 0}, "text_input": a["text_input"]})
    assert request_digest(a) != request_digest({**a, "max_tokens": 16})


# ---------------------------------------------------------------------------------------------- fields


def test_default_fields_leave_out_who_answered() -> None:
    choice = choose_fields({**ANSWER, "id": "42"}, None)
    assert choice.fields == ("text_output", "logprob") and choice.problem is None


def test_listed_fields_the_answer_lacks_are_named() -> None:
    choice = choose_fields(ANSWER, ["text_output", "output_ids", "cum_log_probs"])
    assert choice.problem == (
        "outputs lists fields output_ids, cum_log_probs that the answer does not have "
        "(it has: model_name, model_version, text_output, logprob)"
    )
    assert choose_fields(ANSWER, ["model_name"]).fields == ("model_name",)


def test_an_answer_with_nothing_to_compare() -> None:
    choice = choose_fields({"model_name": "m", "model_version": "1"}, None)
    assert choice.problem == "the answer has no field to compare (it has only: model_name, model_version)"


def test_record_fields_keep_values_in_text_and_tolerance_mode() -> None:
    exact = record_fields(ANSWER, ["text_output"], "exact")
    assert exact == {"text_output": {"digest": value_digest(GOLDEN_TEXT)}}
    text = record_fields(ANSWER, ["text_output", "logprob"], "text")
    assert text["logprob"] == {"digest": value_digest([-0.5, -0.25]), "value": [-0.5, -0.25]}
    assert fields_record_problem(exact, "exact") is None
    assert fields_record_problem(text, "tolerance") is None


@pytest.mark.parametrize(
    ("raw", "mode", "problem"),
    [
        ({}, "exact", "expected a non-empty mapping of field names"),
        ({"t": "xxh3_128:00"}, "exact", "t: expected a mapping with a digest"),
        ({"t": {"digest": "sha256:" + "0" * 32}}, "exact", "t.digest: expected xxh3_128:<32 hex digits>"),
        ({"t": {"digest": "xxh3_128:" + "0" * 31}}, "exact", "t.digest: expected xxh3_128:<32 hex digits>"),
        ({"t": {"digest": "xxh3_128:" + "0" * 32, "valeu": 1}}, "exact", "t.valeu: unknown key"),
        (
            {"t": {"digest": "xxh3_128:" + "0" * 32}},
            "text",
            "t.value: required in text mode (record again with this mode)",
        ),
    ],
)
def test_malformed_fields_records(raw: object, mode: str, problem: str) -> None:
    assert fields_record_problem(raw, mode) == problem


# ---------------------------------------------------------------------------------------------- similarity


def lcs_by_table(a: str, b: str) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def test_lcs_matches_the_textbook_table() -> None:
    rng = random.Random(12)
    for _ in range(1500):
        a = "".join(rng.choice("ab é😀") for _ in range(rng.randint(0, 40)))
        b = "".join(rng.choice("ab é😀") for _ in range(rng.randint(0, 40)))
        assert lcs_length(a, b) == lcs_by_table(a, b) == lcs_length(b, a), (a, b)


def test_similarity_scale() -> None:
    assert similarity("", "") == similarity("abc", "abc") == 1.0
    assert similarity("abc", "") == similarity("abc", "xyz") == 0.0
    assert similarity("abcd", "abXd") == 0.75  # 2 * 3 / 8
    one_word = GOLDEN_TEXT.replace("largest", "biggest")
    assert 0.9 < similarity(one_word, GOLDEN_TEXT) < 1.0
    # Unrelated text from the same vocabulary still shares half its characters: thresholds belong near 1.
    assert 0.4 < similarity(continuation("a", 64), continuation("b", 64)) < 0.65


def test_similarity_cost_on_long_answers() -> None:
    a = continuation("p", MAX_TEXT_CHARS // 5)[:MAX_TEXT_CHARS]
    b = continuation("q", MAX_TEXT_CHARS // 5)[:MAX_TEXT_CHARS]
    t = time.perf_counter()
    assert 0 < similarity(a[:4096], b[:4096]) < 1
    assert time.perf_counter() - t < 0.25  # ~3 ms here; difflib with autojunk off takes ~0.5 s
    t = time.perf_counter()
    similarity(a, b)
    assert time.perf_counter() - t < 5  # the worst case text mode accepts: ~0.4 s here


def test_first_difference_and_its_snippets() -> None:
    assert first_difference("abc", "abc") is None
    assert first_difference("abc", "abd") == 2
    assert first_difference("ab", "abc") == 2
    got = GOLDEN_TEXT.replace("largest", "smallest")
    assert divergence(got, GOLDEN_TEXT) == (
        'leaves the golden at character 18: "…aris. It is the smallest city of France …" vs golden '
        '"…aris. It is the largest city of France a…"'
    )
    assert divergence("a\nb", "a\nc") == 'leaves the golden at character 2: "a\\nb" vs golden "a\\nc"'
    assert divergence("x", "x") == ""


# ---------------------------------------------------------------------------------------------- exact


def test_exact_match_and_mismatch() -> None:
    golden = golden_of(ANSWER, "exact")
    assert compare_answer(ANSWER, golden, EXACT) == compare_answer({**ANSWER, "model_version": "2"}, golden, EXACT)
    assert compare_answer(ANSWER, golden, EXACT).ok
    wrong = {**ANSWER, "text_output": " Lyon. It is", "logprob": [-0.5, -0.3]}
    out = compare_answer(wrong, golden, EXACT)
    assert not out.ok
    assert out.reason == 'text_output: digest differs from the golden (got " Lyon. It is") (and 1 more)'


def test_a_golden_field_missing_from_the_answer() -> None:
    golden = golden_of(ANSWER, "exact", ["text_output"])
    out = compare_answer({"model_name": "demo_llm", "error_text": "x"}, golden, EXACT)
    assert out.reason == "text_output: missing from the answer (it has: model_name, error_text)"


# ---------------------------------------------------------------------------------------------- tolerance


def test_tolerance_within_and_beyond() -> None:
    golden = golden_of(ANSWER, "tolerance")
    near = {**ANSWER, "logprob": [-0.5002, -0.25]}
    out = compare_answer(near, golden, TOLERANCE)
    assert out.ok and out.max_abs_error == pytest.approx(2e-4) and out.max_rel_error == pytest.approx(4e-4)
    assert out.reason == "max abs error 0.0002, max rel error 0.0004"
    far = {**ANSWER, "logprob": [-0.5, -0.3]}
    out = compare_answer(far, golden, TOLERANCE)
    assert not out.ok and out.max_abs_error == pytest.approx(0.05)
    assert out.reason == (
        "logprob[1]: -0.3 vs golden -0.25 (abs error 0.05, rel error 0.2; rtol 0.001, atol 1e-06); "
        "max abs error 0.05, max rel error 0.2"
    )


def test_tolerance_compares_other_values_exactly() -> None:
    golden = golden_of({"text_output": "abc", "n": [1, {"k": True}], "x": float("nan")}, "tolerance")
    assert compare_answer({"text_output": "abc", "n": [1, {"k": True}], "x": float("nan")}, golden, TOLERANCE).ok
    out = compare_answer({"text_output": "abd", "n": [1, {"k": True}], "x": float("nan")}, golden, TOLERANCE)
    assert out.reason.startswith('text_output: differs from the golden, leaves the golden at character 2: "abd"')
    out = compare_answer({"text_output": "abc", "n": [1, {"k": 1}], "x": float("nan")}, golden, TOLERANCE)
    assert out.reason.startswith("n[1].k: 1 vs golden true")
    out = compare_answer({"text_output": "abc", "n": [1], "x": 0.0}, golden, TOLERANCE)
    assert out.reason.startswith("n: 1 values, golden has 2 (and 1 more)")


# ---------------------------------------------------------------------------------------------- text


def test_text_mode_accepts_a_close_answer_and_says_where_it_left() -> None:
    golden = golden_of(ANSWER, "text", ["text_output"])
    close = {**ANSWER, "text_output": GOLDEN_TEXT.replace("largest", "biggest")}
    out = compare_answer(close, golden, TEXT)
    assert out.ok and out.similarity is not None and 0.9 < out.similarity < 1
    assert out.reason.startswith("text_output: similarity 0.9")
    assert "leaves the golden at character 18" in out.reason
    assert compare_answer(ANSWER, golden, TEXT).similarity == 1.0


def test_text_mode_refuses_a_different_answer() -> None:
    golden = golden_of(ANSWER, "text", ["text_output"])
    other = {**ANSWER, "text_output": " Lyon, on the Rhône, which is not the seat of government."}
    out = compare_answer(other, golden, TEXT)
    assert not out.ok
    assert out.reason.startswith("text_output: similarity 0.")
    assert out.reason.endswith(
        'below min_similarity 0.9, leaves the golden at character 1: " Lyon, on the Rhône, whic…" vs golden '
        '" Paris. It is the largest…"'
    )


def test_text_mode_compares_non_text_fields_exactly() -> None:
    golden = golden_of(ANSWER, "text")
    out = compare_answer({**ANSWER, "logprob": [-0.5, -0.2500001]}, golden, TEXT)
    assert out.reason == "logprob: digest differs from the golden (got [-0.5,-0.2500001])"


def test_text_mode_bounds_the_length_it_compares() -> None:
    long = "x" * (MAX_TEXT_CHARS + 1)
    golden = golden_of({"text_output": long}, "text")
    out = compare_answer({"text_output": long[:-1] + "y"}, golden, TEXT)
    assert out.reason == f"text_output: {MAX_TEXT_CHARS + 1} characters, over the {MAX_TEXT_CHARS} text mode compares"


# ---------------------------------------------------------------------------------------------- recording


def runs(*texts: str) -> list[dict[str, object]]:
    return [{**ANSWER, "text_output": t} for t in texts]


def test_exact_recording_needs_identical_runs() -> None:
    ok = accept_runs(runs(GOLDEN_TEXT, GOLDEN_TEXT, GOLDEN_TEXT), ["text_output"], EXACT)
    assert ok.accepted and ok.reason == "3 runs, identical"
    varied = GOLDEN_TEXT.replace("largest", "biggest")
    no = accept_runs(runs(GOLDEN_TEXT, GOLDEN_TEXT, varied), ["text_output"], EXACT)
    assert not no.accepted
    assert no.reason.startswith(
        "the model is not deterministic on this request: text_output differs between run 1 and run 3 "
        '(leaves run 1 at character 18: "…aris. It is the biggest city'
    )
    assert no.reason.endswith("or compare.mode: text with min_similarity to accept answers that agree closely")


def test_text_recording_accepts_runs_that_agree_closely() -> None:
    varied = GOLDEN_TEXT.replace("largest", "biggest")
    ok = accept_runs(runs(GOLDEN_TEXT, varied, GOLDEN_TEXT), ["text_output"], TEXT)
    assert ok.accepted and ok.reason.startswith("3 runs agree to 0.9") and ok.reason.endswith("(min_similarity 0.9)")
    no = accept_runs(runs(GOLDEN_TEXT, GOLDEN_TEXT, " Lyon."), ["text_output"], TEXT)
    assert not no.accepted
    assert no.reason.startswith(
        "the model is not deterministic on this request even in text mode: text_output of run 1 and run 3 agree to"
    )
    logprobs = [{**ANSWER, "logprob": [-0.5]}, ANSWER]
    assert accept_runs(logprobs, ["text_output", "logprob"], TEXT).reason == (
        "the model is not deterministic on this request: logprob (not text) differs between run 1 and run 2"
    )


def test_tolerance_recording() -> None:
    a, b = {**ANSWER, "logprob": [-0.5, -0.25]}, {**ANSWER, "logprob": [-0.50001, -0.25]}
    assert accept_runs([a, b], ["logprob"], TOLERANCE).accepted
    far = {**ANSWER, "logprob": [-0.6, -0.25]}
    no = accept_runs([a, far], ["logprob"], TOLERANCE)
    assert not no.accepted
    assert no.reason.startswith(
        "the model is not deterministic on this request within rtol 0.001, atol 1e-06: run 2 against run 1: logprob[0]"
    )
    assert "compare.mode: text" in no.reason


def test_recording_needs_every_field_in_every_run() -> None:
    assert accept_runs([], ["text_output"], EXACT).reason == "no run to record"
    assert accept_runs([ANSWER, {"model_name": "m"}], ["text_output"], EXACT).reason == "run 2 has no field text_output"
