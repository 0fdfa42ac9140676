"""Recording golden files from the live server.

After one unrecorded warm-up inference the canary runs `runs` times; in exact mode every run must give
identical outputs (else the model is not deterministic on this input and recording is refused); in tolerance
mode the runs must agree within the tolerance and the first run's tensors are stored. A record is per
environment fingerprint: a new environment adds a record, an existing one is replaced only with `force`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from probe import __version__
from probe.config import CanaryConfig, Config
from probe.environment import EnvironmentProbe
from probe.golden import (
    EXACT_ONLY,
    Golden,
    GoldenError,
    LatencyBaseline,
    OutputGolden,
    Record,
    compare_outputs,
    describe_environment,
    load_golden,
    write_golden,
)
from probe.saturation import canary_deadline
from probe.tensors import build_inputs, digest, input_digest
from probe.triton import InferOutcome, TritonClient, input_mismatches

# A recording run may take longer than a probe (a cold model); it is still bounded.
RECORD_RUN_TIMEOUT = 60.0


class RecordRefused(Exception):
    """Recording would store a golden that cannot judge the model (nondeterministic, too slow, clash)."""


@dataclass(frozen=True)
class Recorded:
    canary: str
    path: str
    summary: str


def _outputs_golden(outcome: InferOutcome) -> dict[str, OutputGolden]:
    return {
        n: OutputGolden(dt, tuple(int(d) for d in a.shape), digest(dt, a)) for n, (dt, a) in outcome.outputs.items()
    }


async def record_canary(
    cfg: Config,
    canary: CanaryConfig,
    client: TritonClient,
    environment: EnvironmentProbe,
    *,
    runs: int,
    force: bool,
) -> Recorded:
    """Record (or add a record to) one canary's golden file. Raises RecordRefused, GoldenError, OSError."""
    if canary.protocol != "infer":
        return await _record_generate(cfg, canary, client, environment, runs=runs, force=force)
    path = cfg.golden_path(canary.name)
    inputs = build_inputs(canary)
    in_digest = input_digest(canary, inputs)
    existing = _existing(path, force)
    if existing is not None and existing.protocol != canary.protocol:
        if not force:
            raise RecordRefused(
                f"{path}: recorded with protocol {existing.protocol}, the canary now uses {canary.protocol}; "
                "--force discards its records and records anew"
            )
        existing = None
    if existing is not None and existing.input_digest != in_digest:
        if not force:
            raise RecordRefused(
                f"{path}: its {len(existing.records)} record(s) were made for different canary inputs; "
                "--force discards them and records anew"
            )
        existing = None

    info = await client.model_info(canary.model, canary.version)
    if info.decoupled:
        raise RecordRefused(
            f"canary {canary.name}: model {canary.model} is decoupled (it streams its answers), and Triton answers "
            "/infer on such a model with 501: use protocol: generate_stream for this canary"
        )
    problems = input_mismatches(canary, info)
    if problems:
        raise RecordRefused(f"canary {canary.name} does not fit the model: " + "; ".join(problems))
    env = await environment.fingerprint(canary.model, canary.version)

    # One unrecorded warm-up first: the first request pays for connection setup and cold caches, which would
    # inflate the latency baseline that drift is judged against.
    # Every output as binary data, as the canary asks for them: JSON-encoded tensors would be larger and slower.
    wanted = canary.outputs or tuple(t.name for t in info.outputs)
    cap = cfg.triton.max_reply
    await asyncio.wait_for(client.infer(canary, inputs, wanted, max_reply=cap), RECORD_RUN_TIMEOUT)
    outcomes: list[InferOutcome] = []
    for _ in range(runs):
        outcomes.append(await asyncio.wait_for(client.infer(canary, inputs, wanted, max_reply=cap), RECORD_RUN_TIMEOUT))
    first = outcomes[0]
    if not first.outputs:
        raise RecordRefused(f"canary {canary.name}: the model returned no outputs")
    outputs = _outputs_golden(first)
    mode = canary.compare.mode
    record_tensors = mode == "tolerance"
    reference: Golden | None = None
    if mode == "tolerance":
        rec = _record(env, outputs, first, outcomes, tensors=True)
        reference = _golden_with(canary, in_digest, [rec], _tensors_for(rec, first), mode)
    for i, o in enumerate(outcomes[1:], start=2):
        if reference is None:
            if _outputs_golden(o) != outputs:
                names = [n for n, g in _outputs_golden(o).items() if outputs.get(n) != g]
                raise RecordRefused(
                    f"canary {canary.name}: the model is not deterministic on this input (run {i} output "
                    f"{', '.join(names) or '?'} differs from run 1); use compare.mode: tolerance"
                )
        else:
            cmp = compare_outputs(reference, o.outputs, canary.compare)
            if not cmp.ok:
                raise RecordRefused(
                    f"canary {canary.name}: runs disagree beyond the tolerance (run {i}: {cmp.reason}); "
                    "widen compare.rtol/atol or fix the input"
                )
    latencies = sorted(o.latency_s for o in outcomes)
    median_s = float(np.median(latencies))
    deadline = canary_deadline(canary, cfg.probe.timeout)
    if median_s > deadline:
        raise RecordRefused(
            f"canary {canary.name} takes {median_s * 1000:.0f}ms, more than its deadline {deadline:g}s; "
            "raise the canary's timeout (and probe.timeout) or pick a smaller input"
        )

    new_rec = _record(env, outputs, first, outcomes, tensors=record_tensors)
    merged = _merge(existing, new_rec, path, force=force, what="output")
    if isinstance(merged, str):
        return Recorded(canary.name, str(path), merged)
    records, action = merged
    tensors: dict[str, np.ndarray[Any, Any]] = dict(existing.tensors) if existing is not None else {}
    if record_tensors:
        tensors.update(_tensors_for(new_rec, first))
    live_keys = {f"{r.record_id}/{n}" for r in records if r.tensors for n in r.outputs}
    # Keep the old records' tensors as well, so a JSON write failing after the .npz leaves a consistent pair.
    old_keys = {f"{r.record_id}/{n}" for r in (existing.records if existing else ()) if r.tensors for n in r.outputs}
    tensors = {k: v for k, v in tensors.items() if k in live_keys | old_keys}
    golden = _golden_with(canary, in_digest, records, tensors, mode)
    write_golden(path, golden)
    lat = new_rec.latency
    return Recorded(
        canary.name,
        str(path),
        f"{action} record {len(records)} of {path}: {runs} runs, median {lat.median_ms:.2f}ms, "
        f"environment {describe_environment(env)}",
    )


def _merge(
    existing: Golden | None, new: Record, path: Path, *, force: bool, what: str
) -> tuple[list[Record], str] | str:
    """The records with `new` added (another environment) or, with `force`, in place of this environment's; or a
    summary when this environment's record already says the same. Raises RecordRefused on a clash without force."""
    records = list(existing.records) if existing is not None else []
    same = [i for i, r in enumerate(records) if r.env_id == new.env_id]
    if not same:
        return [*records, new], "added"
    old = records[same[0]]
    if (old.outputs, old.fields) == (new.outputs, new.fields) and not force:
        return f"unchanged: {path} already holds this environment's {what}"
    if not force:
        raise RecordRefused(
            f"{path}: a record for this environment ({describe_environment(new.environment)}) exists with a "
            f"different {what}; --force replaces it"
        )
    records[same[0]] = new
    return records, "replaced"


def _existing(path: Path, force: bool) -> Golden | None:
    if not path.exists():
        return None
    try:
        return load_golden(path)
    except GoldenError as e:
        if not force:
            raise GoldenError(f"{e} (use --force to overwrite it)") from None
    return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def _record_generate(
    cfg: Config,
    canary: CanaryConfig,
    client: TritonClient,
    environment: EnvironmentProbe,
    *,
    runs: int,
    force: bool,
) -> Recorded:
    """A generate / generate_stream canary: `runs` answers after a warm-up, which must agree (exact: identical;
    text: to min_similarity; tolerance: within it); the first run's fields become the record."""
    from probe.answers import accept_runs, choose_fields, record_fields, request_digest
    from probe.generate import GenerateAnswer, encode_request, generate, generate_stream

    assert canary.request is not None
    path = cfg.golden_path(canary.name)
    digest_now = request_digest(canary.request)
    existing = _existing(path, force)
    if existing is not None and (existing.protocol != canary.protocol or existing.input_digest != digest_now):
        if not force:
            what = "another protocol" if existing.protocol != canary.protocol else "a different request"
            raise RecordRefused(
                f"{path}: its {len(existing.records)} record(s) were made for {what}; --force discards them and "
                "records anew"
            )
        existing = None
    env = await environment.fingerprint(canary.model, canary.version)
    post = generate_stream if canary.protocol == "generate_stream" else generate
    body = encode_request(canary.request)
    answers: list[GenerateAnswer] = []
    for i in range(runs + 1):  # run 0 is the unrecorded warm-up
        outcome = await asyncio.wait_for(
            post(client.session, client.base_url, canary.model, canary.version, body, max_bytes=cfg.triton.max_reply),
            RECORD_RUN_TIMEOUT,
        )
        if not isinstance(outcome, GenerateAnswer):
            raise RecordRefused(f"canary {canary.name} {canary.protocol}: {outcome.reason}")
        if i:
            answers.append(outcome)
    first = answers[0]
    choice = choose_fields(first.answer, canary.outputs)
    if choice.problem is not None:
        raise RecordRefused(f"canary {canary.name}: {choice.problem}")
    agreement = accept_runs([a.answer for a in answers], choice.fields, canary.compare)
    if not agreement.accepted:
        raise RecordRefused(f"canary {canary.name}: {agreement.reason}")
    median_s = float(np.median([a.total_s for a in answers]))
    deadline = canary_deadline(canary, cfg.probe.timeout)
    if median_s > deadline:
        raise RecordRefused(
            f"canary {canary.name} takes {median_s * 1000:.0f}ms, more than its deadline {deadline:g}s; "
            "raise the canary's timeout (and probe.timeout), or ask for fewer tokens"
        )
    mode = canary.compare.mode
    firsts = [a.first_event_s for a in answers if a.first_event_s is not None]
    new_rec = Record(
        environment=env,
        recorded_at=_now(),
        tool_version=__version__,
        outputs={},
        latency=LatencyBaseline.from_samples([a.total_s for a in answers]),
        fields=record_fields(first.answer, choice.fields, mode),
        first_event=LatencyBaseline.from_samples(firsts) if firsts else None,
    )
    merged = _merge(existing, new_rec, path, force=force, what="answer")
    if isinstance(merged, str):
        return Recorded(canary.name, str(path), merged)
    records, action = merged
    golden = Golden(
        canary=canary.name,
        model=canary.model,
        version=canary.version,
        input_digest=digest_now,
        compare_mode=mode,
        records=tuple(records),
        protocol=canary.protocol,
    )
    write_golden(path, golden)
    first_ms = f", first event {new_rec.first_event.median_ms:.2f}ms" if new_rec.first_event else ""
    return Recorded(
        canary.name,
        str(path),
        f"{action} record {len(records)} of {path}: {runs} runs ({agreement.reason}), median "
        f"{new_rec.latency.median_ms:.2f}ms{first_ms}, environment {describe_environment(env)}",
    )


def _record(
    env: dict[str, Any],
    outputs: dict[str, OutputGolden],
    first: InferOutcome,
    runs: list[InferOutcome],
    *,
    tensors: bool,
) -> Record:
    return Record(
        environment=env,
        recorded_at=_now(),
        tool_version=__version__,
        outputs=outputs,
        latency=LatencyBaseline.from_samples([o.latency_s for o in runs]),
        tensors=tensors,
    )


def _tensors_for(rec: Record, outcome: InferOutcome) -> dict[str, np.ndarray[Any, Any]]:
    return {f"{rec.record_id}/{n}": a for n, (dt, a) in outcome.outputs.items() if dt not in EXACT_ONLY}


def _golden_with(
    canary: CanaryConfig,
    in_digest: str,
    records: list[Record],
    tensors: dict[str, np.ndarray[Any, Any]],
    mode: str,
) -> Golden:
    return Golden(
        canary=canary.name,
        model=canary.model,
        version=canary.version,
        input_digest=in_digest,
        compare_mode=mode,
        records=tuple(records),
        tensors=tensors,
        protocol=canary.protocol,
    )
