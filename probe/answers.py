"""A generate / generate_stream answer against its golden values: which fields count, their digests, the three
compare modes, and whether recorded runs agree. Pure functions over decoded JSON; no I/O.

A golden record keeps, per compared field, `{"digest": "xxh3_128:<hex>"}` (the digest of the canonical JSON of
the field's joined value) and, in text and tolerance mode, `"value"` too (see `record_fields`).

What counts as a mismatch (`AnswerComparison.ok` False, with a one-line reason):
- exact: a field's digest differs from the golden's;
- tolerance: a number beyond `atol + rtol * |golden|` (numpy's allclose rule), or any other value that differs;
- text: a string field's similarity to its golden below `min_similarity`; other fields as in exact mode.
  The reason names the first character where the answer leaves the golden, with a snippet of each side;
- in every mode, a golden field the answer lacks.

Similarity (text mode) is the ratio difflib defines, 2·M / (len(a) + len(b)), with M the length of the longest
common subsequence of the two strings' characters: 1.0 for equal strings, 0.0 for strings with no character in
common (unrelated English text of the same length scores about 0.5, so useful thresholds are high: 0.9 and up).
M is exact (difflib's SequenceMatcher finds it only greedily, and with `autojunk` treats frequent characters as
junk in strings of 200 or more characters) and computed bit-parallel over Python integers: O(len(a)·len(b)/64)
machine words, about 3 ms for two 4 KB answers (SequenceMatcher with autojunk off: 0.5 s).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from probe.config import CompareConfig

DIGEST_PREFIX = "xxh3_128:"
IDENTITY_FIELDS = ("model_name", "model_version", "id")
"""Fields that say who answered, not what: left out unless `outputs` names them."""
MAX_TEXT_CHARS = 65536
"""Longest string text mode compares (similarity costs O(n·m/64)); a longer one is a mismatch that says so."""
SNIPPET_BEFORE = 16
SNIPPET_AFTER = 24
MAX_DEPTH = 64
"""Nesting depth tolerance mode descends; deeper values are compared whole (exactly)."""


# ---------------------------------------------------------------------------------------------- digests


def canonical_json(value: Any) -> bytes:
    """The canonical JSON of a value: sorted keys, no spaces, UTF-8 (not \\u escapes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def value_digest(value: Any) -> str:
    """`xxh3_128:<hex>` of the value's canonical JSON."""
    return DIGEST_PREFIX + xxhash.xxh3_128_hexdigest(canonical_json(value))


def request_digest(request: Mapping[str, Any]) -> str:
    """The digest of a canary's `request` (a changed request invalidates its golden)."""
    return value_digest(request)


# ---------------------------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class FieldChoice:
    fields: tuple[str, ...]
    problem: str | None = None
    """One line when the fields cannot be chosen: `outputs` names fields the answer lacks, or nothing is left."""


def choose_fields(answer: Mapping[str, Any], outputs: Sequence[str] | None) -> FieldChoice:
    """The compared fields: `outputs` as given, or every field of the answer but model_name, model_version
    and id, in the answer's order."""
    if outputs is not None:
        unknown = [f for f in outputs if f not in answer]
        if unknown:
            return FieldChoice(
                tuple(outputs),
                f"outputs lists {_fields(unknown)} that the answer does not have (it has: {', '.join(answer)})",
            )
        return FieldChoice(tuple(outputs))
    fields = tuple(f for f in answer if f not in IDENTITY_FIELDS)
    if not fields:
        return FieldChoice((), f"the answer has no field to compare (it has only: {', '.join(answer) or 'nothing'})")
    return FieldChoice(fields)


def _fields(names: Sequence[str]) -> str:
    return ("field " if len(names) == 1 else "fields ") + ", ".join(names)


def record_fields(answer: Mapping[str, Any], fields: Sequence[str], mode: str) -> dict[str, dict[str, Any]]:
    """The per-record structure of a golden: field -> {"digest": ...}, plus "value" in text and tolerance mode.
    Plain JSON-able dicts, in `fields` order."""
    out: dict[str, dict[str, Any]] = {}
    for f in fields:
        entry: dict[str, Any] = {"digest": value_digest(answer[f])}
        if mode in ("text", "tolerance"):
            entry["value"] = answer[f]
        out[f] = entry
    return out


def fields_record_problem(raw: Any, mode: str) -> str | None:
    """What is wrong with a per-record structure read back from a golden file (None when it is well formed):
    a mapping of field names to {"digest": "xxh3_128:<32 hex>"[, "value": V]}, values present in text and
    tolerance mode. The message starts with the offending field."""
    if not isinstance(raw, Mapping) or not raw:
        return "expected a non-empty mapping of field names"
    for name, entry in raw.items():
        if not isinstance(name, str) or not name:
            return f"{name!r}: field names must be non-empty strings"
        if not isinstance(entry, Mapping):
            return f"{name}: expected a mapping with a digest"
        extra = set(entry) - {"digest", "value"}
        if extra:
            return f"{name}.{sorted(map(str, extra))[0]}: unknown key"
        digest = entry.get("digest")
        if not isinstance(digest, str) or not _is_digest(digest):
            return f"{name}.digest: expected {DIGEST_PREFIX}<32 hex digits>"
        if mode in ("text", "tolerance") and "value" not in entry:
            return f"{name}.value: required in {mode} mode (record again with this mode)"
    return None


def _is_digest(text: str) -> bool:
    hexpart = text.removeprefix(DIGEST_PREFIX)
    return text.startswith(DIGEST_PREFIX) and len(hexpart) == 32 and all(c in "0123456789abcdef" for c in hexpart)


# ---------------------------------------------------------------------------------------------- text


def similarity(a: str, b: str) -> float:
    """2·LCS / (len(a) + len(b)) over characters: 1.0 equal, 0.0 nothing in common (see the module doc)."""
    if a == b:
        return 1.0
    return 2.0 * lcs_length(a, b) / (len(a) + len(b))


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison–Dix / Hyyrö): one bit per character of
    the shorter string, one big-integer step per character of the longer."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    masks: dict[str, int] = {}
    for i, ch in enumerate(b):
        masks[ch] = masks.get(ch, 0) | (1 << i)
    full = (1 << len(b)) - 1
    v = full
    for ch in a:
        m = masks.get(ch)
        if m is not None:
            u = v & m
            v = ((v + u) | (v - u)) & full
    return len(b) - v.bit_count()


def first_difference(a: str, b: str) -> int | None:
    """Index of the first character where `a` and `b` differ (the shorter one's length when one is a prefix of
    the other); None when equal."""
    if a == b:
        return None
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def _snippet(text: str, at: int) -> str:
    start = max(0, at - SNIPPET_BEFORE)
    end = at + SNIPPET_AFTER
    part = json.dumps(text[start:end], ensure_ascii=False)[1:-1]
    return f'"{"…" if start > 0 else ""}{part}{"…" if end < len(text) else ""}"'


def divergence(answer: str, golden: str) -> str:
    """'leaves the golden at character 17: "…it from Paris" vs golden "…it from London"' ('' when equal)."""
    at = first_difference(answer, golden)
    if at is None:
        return ""
    return f"leaves the golden at character {at}: {_snippet(answer, at)} vs golden {_snippet(golden, at)}"


# ---------------------------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class AnswerComparison:
    ok: bool
    reason: str
    """One line: why it failed; when it passed, '' or what differed within bounds (text, tolerance)."""
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    """Tolerance mode: the largest errors over every compared number."""
    similarity: float | None = None
    """Text mode: the lowest similarity over the compared string fields."""


@dataclass
class _Errors:
    max_abs: float = 0.0
    max_rel: float = 0.0
    numbers: int = 0


def compare_answer(
    answer: Mapping[str, Any], golden: Mapping[str, Mapping[str, Any]], compare: CompareConfig
) -> AnswerComparison:
    """Compare every field of a golden record (see `record_fields`) with the answer, by `compare.mode`."""
    problems: list[str] = []
    notes: list[str] = []
    errors = _Errors()
    lowest: float | None = None
    for name, entry in golden.items():
        if name not in answer:
            problems.append(f"{name}: missing from the answer (it has: {', '.join(answer) or 'nothing'})")
            continue
        value = answer[name]
        if compare.mode == "text" and isinstance(value, str) and isinstance(entry.get("value"), str):
            sim, problem, note = _compare_text(name, value, entry["value"], compare.min_similarity)
            lowest = sim if lowest is None else min(lowest, sim)
        elif compare.mode == "tolerance" and "value" in entry:
            problem, note = _compare_tolerance(name, value, entry["value"], compare, errors), ""
        else:
            problem, note = _compare_digest(name, value, entry), ""
        if problem:
            problems.append(problem)
        elif note:
            notes.append(note)
    max_abs = errors.max_abs if compare.mode == "tolerance" else None
    max_rel = errors.max_rel if compare.mode == "tolerance" else None
    summary = ""
    if compare.mode == "tolerance" and errors.numbers:
        summary = f"max abs error {errors.max_abs:.3g}, max rel error {errors.max_rel:.3g}"
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        reason = problems[0] + more + (f"; {summary}" if summary else "")
        return AnswerComparison(False, reason, max_abs, max_rel, lowest)
    return AnswerComparison(True, "; ".join([*notes, *([summary] if summary else [])]), max_abs, max_rel, lowest)


def _compare_digest(name: str, value: Any, entry: Mapping[str, Any]) -> str:
    if value_digest(value) == entry.get("digest"):
        return ""
    if isinstance(value, str) and isinstance(entry.get("value"), str):
        return f"{name}: differs from the golden, {divergence(value, entry['value'])}"
    got = canonical_json(value).decode()
    got = got if len(got) <= 60 else got[:59] + "…"
    return f"{name}: digest differs from the golden (got {got})"


def _compare_text(name: str, value: str, golden: str, min_similarity: float) -> tuple[float, str, str]:
    """(similarity, problem, note) for one string field in text mode."""
    if value == golden:
        return 1.0, "", ""
    longest = max(len(value), len(golden))
    if longest > MAX_TEXT_CHARS:
        return 0.0, f"{name}: {longest} characters, over the {MAX_TEXT_CHARS} text mode compares", ""
    sim = similarity(value, golden)
    where = divergence(value, golden)
    if sim < min_similarity:
        return sim, f"{name}: similarity {_ratio(sim)} below min_similarity {min_similarity:g}, {where}", ""
    return sim, "", f"{name}: similarity {_ratio(sim)} (min_similarity {min_similarity:g}), {where}"


def _ratio(x: float) -> str:
    """Two decimals, rounded down, so a similarity just below a threshold never prints as equal to it."""
    return f"{math.floor(x * 100) / 100:.2f}"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _compare_tolerance(name: str, value: Any, golden: Any, compare: CompareConfig, errors: _Errors) -> str:
    """'' when within tolerance, else the first difference with its path (`field[2].key`)."""
    return _within(name, value, golden, compare, errors, 0) or ""


def _within(path: str, value: Any, golden: Any, compare: CompareConfig, errors: _Errors, depth: int) -> str | None:
    if _is_number(value) and _is_number(golden):
        return _number_within(path, float(value), float(golden), compare, errors)
    if depth < MAX_DEPTH and isinstance(value, list) and isinstance(golden, list):
        if len(value) != len(golden):
            return f"{path}: {len(value)} values, golden has {len(golden)}"
        first: str | None = None
        for i, (v, g) in enumerate(zip(value, golden, strict=True)):
            problem = _within(f"{path}[{i}]", v, g, compare, errors, depth + 1)
            first = first or problem
        return first
    if depth < MAX_DEPTH and isinstance(value, dict) and isinstance(golden, dict):
        if set(value) != set(golden):
            missing, extra = sorted(set(golden) - set(value)), sorted(set(value) - set(golden))
            return f"{path}: keys differ from the golden (missing: {missing}, extra: {extra})"
        first = None
        for k in golden:
            problem = _within(f"{path}.{k}", value[k], golden[k], compare, errors, depth + 1)
            first = first or problem
        return first
    if canonical_json(value) == canonical_json(golden):
        return None
    if isinstance(value, str) and isinstance(golden, str):
        return f"{path}: differs from the golden, {divergence(value, golden)}"
    return f"{path}: {_short(value)} vs golden {_short(golden)}"


def _number_within(path: str, value: float, golden: float, compare: CompareConfig, errors: _Errors) -> str | None:
    errors.numbers += 1
    if math.isnan(value) or math.isnan(golden):
        if math.isnan(value) and math.isnan(golden):
            return None
        errors.max_abs = errors.max_rel = math.inf
        return f"{path}: {value:g} vs golden {golden:g}"
    if value == golden:  # also equal infinities
        return None
    abs_err = abs(value - golden)
    rel_err = abs_err / abs(golden) if golden != 0 else math.inf
    errors.max_abs = max(errors.max_abs, abs_err)
    errors.max_rel = max(errors.max_rel, rel_err)
    if abs_err <= compare.atol + compare.rtol * abs(golden):
        return None
    return (
        f"{path}: {value:.6g} vs golden {golden:.6g} (abs error {abs_err:.3g}, rel error {rel_err:.3g}; "
        f"rtol {compare.rtol:g}, atol {compare.atol:g})"
    )


def _short(value: Any) -> str:
    text = canonical_json(value).decode()
    return text if len(text) <= 40 else text[:39] + "…"


# ---------------------------------------------------------------------------------------------- recording


@dataclass(frozen=True)
class RunsAgreement:
    accepted: bool
    reason: str
    """One line: how the runs agreed ('3 runs, identical'), or why recording is refused."""


def accept_runs(answers: Sequence[Mapping[str, Any]], fields: Sequence[str], compare: CompareConfig) -> RunsAgreement:
    """Whether `record --runs N` may keep the first run's answer as golden: in exact mode every run must give
    the same value for every field; in text mode every pair of runs must agree to min_similarity on string
    fields (other fields identical); in tolerance mode every run must be within tolerance of the first."""
    if not answers:
        return RunsAgreement(False, "no run to record")
    for i, answer in enumerate(answers):
        missing = [f for f in fields if f not in answer]
        if missing:
            return RunsAgreement(False, f"run {i + 1} has no {_fields(missing)}")
    n = len(answers)
    runs = f"{n} run" if n == 1 else f"{n} runs"
    if compare.mode == "text":
        return _text_runs(answers, fields, compare.min_similarity, runs)
    if compare.mode == "tolerance":
        errors = _Errors()
        for i, answer in enumerate(answers[1:], start=2):
            for f in fields:
                problem = _within(f, answer[f], answers[0][f], compare, errors, 0)
                if problem:
                    return RunsAgreement(
                        False,
                        f"the model is not deterministic on this request within rtol {compare.rtol:g}, atol "
                        f"{compare.atol:g}: run {i} against run 1: {problem}; widen rtol/atol, or use "
                        "compare.mode: text for text fields",
                    )
        return RunsAgreement(True, f"{runs} within tolerance (max abs error {errors.max_abs:.3g})")
    for f in fields:
        first = value_digest(answers[0][f])
        for i, answer in enumerate(answers[1:], start=2):
            if value_digest(answer[f]) != first:
                value, golden = answer[f], answers[0][f]
                where = divergence(value, golden) if isinstance(value, str) and isinstance(golden, str) else ""
                detail = f" ({where.replace('the golden', 'run 1')})" if where else ""
                return RunsAgreement(
                    False,
                    f"the model is not deterministic on this request: {f} differs between run 1 and run {i}{detail}; "
                    "use greedy decoding (temperature 0), or compare.mode: text with min_similarity to accept "
                    "answers that agree closely",
                )
    return RunsAgreement(True, f"{runs}, identical")


def _text_runs(
    answers: Sequence[Mapping[str, Any]], fields: Sequence[str], min_similarity: float, runs: str
) -> RunsAgreement:
    lowest = 1.0
    for f in fields:
        for (i, a), (j, b) in itertools.combinations(enumerate(answers, start=1), 2):
            va, vb = a[f], b[f]
            if isinstance(va, str) and isinstance(vb, str):
                if max(len(va), len(vb)) > MAX_TEXT_CHARS:
                    return RunsAgreement(False, f"{f}: over the {MAX_TEXT_CHARS} characters text mode compares")
                sim = similarity(va, vb)
                lowest = min(lowest, sim)
                if sim < min_similarity:
                    return RunsAgreement(
                        False,
                        f"the model is not deterministic on this request even in text mode: {f} of run {i} and "
                        f"run {j} agree to {_ratio(sim)}, below min_similarity {min_similarity:g}; use greedy "
                        "decoding (temperature 0) and a short answer, or lower min_similarity",
                    )
            elif value_digest(va) != value_digest(vb):
                return RunsAgreement(
                    False,
                    f"the model is not deterministic on this request: {f} (not text) differs between run {i} "
                    f"and run {j}",
                )
    if lowest == 1.0:
        return RunsAgreement(True, f"{runs}, identical")
    return RunsAgreement(True, f"{runs} agree to {_ratio(lowest)} (min_similarity {min_similarity:g})")
