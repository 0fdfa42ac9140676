"""Golden files: what a canary's outputs must be, per environment, and how a live output is compared.

One JSON file per canary, `<golden_dir>/<canary>.json`, holding a `format` version, the digest of the canary's
inputs, and one or more records (one per environment fingerprint). In tolerance mode the output tensors are
stored too, in a sidecar `<canary>.npz` keyed by record id. Every write is atomic (temp file in the same
directory, fsync, rename), so a failed write leaves the previous file byte-identical.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from probe.config import CompareConfig
from probe.tensors import DIGEST_PREFIX, digest

GOLDEN_FORMAT = 1

# The fields that identify an environment; a different value means another record may be needed.
ENV_KEYS = ("gpus", "driver", "cuda_driver", "triton", "platform", "backend")
# Datatypes compared by digest even in tolerance mode: there is no "close" for strings or booleans.
EXACT_ONLY = ("BYTES", "BOOL")


class GoldenError(ValueError):
    """A golden file is missing, unreadable, corrupt, or does not belong to this canary's inputs."""


@dataclass(frozen=True)
class OutputGolden:
    datatype: str
    shape: tuple[int, ...]
    digest: str


@dataclass(frozen=True)
class LatencyBaseline:
    runs: int
    median_ms: float
    min_ms: float
    max_ms: float
    samples_ms: tuple[float, ...] = ()

    @classmethod
    def from_samples(cls, samples_s: list[float]) -> LatencyBaseline:
        ms = [s * 1000.0 for s in samples_s]
        return cls(
            runs=len(ms),
            median_ms=round(float(np.median(ms)), 3),
            min_ms=round(min(ms), 3),
            max_ms=round(max(ms), 3),
            samples_ms=tuple(round(m, 3) for m in ms),
        )


@dataclass(frozen=True)
class Record:
    environment: dict[str, Any]
    recorded_at: str
    tool_version: str
    outputs: dict[str, OutputGolden]
    latency: LatencyBaseline
    tensors: bool = False
    """True when this record's output tensors are in the sidecar .npz (tolerance mode)."""

    @property
    def env_id(self) -> str:
        return environment_id(self.environment)

    @property
    def record_id(self) -> str:
        """Stable key of this record's tensors in the .npz: its environment and output digests."""
        h = xxhash.xxh3_64()
        h.update(self.env_id.encode())
        for name in sorted(self.outputs):
            h.update(name.encode() + b"\0" + self.outputs[name].digest.encode())
        return h.hexdigest()


@dataclass(frozen=True)
class Golden:
    canary: str
    model: str
    version: str
    input_digest: str
    compare_mode: str
    records: tuple[Record, ...]
    tensors: Mapping[str, np.ndarray[Any, Any]] = field(default_factory=dict)
    """`<record_id>/<output>` -> tensor, loaded from the .npz when any record has tensors."""


@dataclass(frozen=True)
class Comparison:
    ok: bool
    reason: str
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    problems: tuple[tuple[Record, tuple[str, ...]], ...] = ()
    """On a mismatch, each record's problems: `explain_mismatch` builds the reason from them without comparing
    again."""


# ---------------------------------------------------------------------------------------------- environment


def environment_id(env: Mapping[str, Any]) -> str:
    ident = {k: env.get(k) for k in ENV_KEYS}
    return xxhash.xxh3_64_hexdigest(json.dumps(ident, sort_keys=True).encode())


def describe_environment(env: Mapping[str, Any]) -> str:
    """'driver 550.54.15 / CUDA 12.4 / GPU NVIDIA A100 / Triton 2.51.0 / backend python' for reasons."""
    parts = []
    if env.get("driver"):
        parts.append(f"driver {env['driver']}")
        parts.append(f"CUDA {env.get('cuda_driver') or '?'}")
    gpus = env.get("gpus") or []
    if gpus:
        names = sorted(set(gpus))
        parts.append("GPU " + ", ".join(f"{n} x{gpus.count(n)}" if gpus.count(n) > 1 else n for n in names))
    else:
        parts.append("no GPU")
    parts.append(f"Triton {env.get('triton') or '?'}")
    backend = env.get("backend") or env.get("platform")
    if backend:
        parts.append(f"backend {backend}")
    return " / ".join(parts)


# ---------------------------------------------------------------------------------------------- reading


def _require(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise GoldenError(f"{where}: missing field {key!r}")
    v = obj[key]
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
        raise GoldenError(f"{where}: field {key!r} has the wrong type")
    return v


def _parse_record(raw: Any, where: str) -> Record:
    if not isinstance(raw, dict):
        raise GoldenError(f"{where}: expected an object")
    outs_raw = _require(raw, "outputs", dict, where)
    outputs = {}
    for name, o in outs_raw.items():
        ow = f"{where}.outputs.{name if str(name).isprintable() else repr(name)}"
        if not isinstance(o, dict):
            raise GoldenError(f"{ow}: expected an object")
        shape = _require(o, "shape", list, ow)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise GoldenError(f"{ow}: shape must be a list of non-negative integers")
        dg = _require(o, "digest", str, ow)
        if not dg.startswith(DIGEST_PREFIX) or len(dg) != len(DIGEST_PREFIX) + 32:
            raise GoldenError(f"{ow}: digest must be {DIGEST_PREFIX} followed by 32 hex digits")
        outputs[str(name)] = OutputGolden(_require(o, "datatype", str, ow), tuple(shape), dg)
    if not outputs:
        raise GoldenError(f"{where}: no outputs")
    lat = _require(raw, "latency", dict, where)
    try:
        latency = LatencyBaseline(
            runs=int(lat["runs"]),
            median_ms=float(lat["median_ms"]),
            min_ms=float(lat.get("min_ms", lat["median_ms"])),
            max_ms=float(lat.get("max_ms", lat["median_ms"])),
            samples_ms=tuple(float(x) for x in lat.get("samples_ms", ())),
        )
    except (KeyError, TypeError, ValueError, OverflowError):
        raise GoldenError(f"{where}.latency: expected runs and median_ms numbers") from None
    if not math.isfinite(latency.median_ms) or latency.median_ms < 0:
        raise GoldenError(f"{where}.latency.median_ms: must be a finite number >= 0")
    env = _require(raw, "environment", dict, where)
    return Record(
        environment=env,
        recorded_at=str(raw.get("recorded_at", "")),
        tool_version=str(raw.get("tool_version", "")),
        outputs=outputs,
        latency=latency,
        tensors=bool(raw.get("tensors", False)),
    )


def parse_golden(raw: Any, path: Path) -> Golden:
    where = str(path)
    if not isinstance(raw, dict):
        raise GoldenError(f"{where}: corrupt golden file: expected a JSON object")
    fmt = raw.get("format")
    if fmt != GOLDEN_FORMAT:
        raise GoldenError(f"{where}: unsupported golden format {fmt!r} (this probe reads format {GOLDEN_FORMAT})")
    records_raw = _require(raw, "records", list, where)
    if not records_raw:
        raise GoldenError(f"{where}: holds no records; run `probe record`")
    records = tuple(_parse_record(r, f"{where}: records[{i}]") for i, r in enumerate(records_raw))
    mode = _require(raw, "compare", str, where)
    if mode not in ("exact", "tolerance"):
        raise GoldenError(f"{where}: compare must be exact or tolerance, got {mode!r}")
    return Golden(
        canary=_require(raw, "canary", str, where),
        model=_require(raw, "model", str, where),
        version=str(raw.get("version", "")),
        input_digest=_require(raw, "input_digest", str, where),
        compare_mode=mode,
        records=records,
    )


def tensors_path(path: Path) -> Path:
    return path.with_suffix(".npz")


def load_golden(path: Path) -> Golden:
    """Read and validate a golden file (and its .npz when records carry tensors). Raises `GoldenError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GoldenError(f"{path}: golden file missing; record it with `probe record`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GoldenError(f"{path}: cannot read golden file: {e}") from None
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, or an int beyond 4300 digits
        raise GoldenError(f"{path}: corrupt golden file: {e}") from None
    golden = parse_golden(raw, path)
    if any(r.tensors for r in golden.records):
        golden = _with_tensors(golden, path)
    return golden


def _with_tensors(golden: Golden, path: Path) -> Golden:
    npz = tensors_path(path)
    try:
        with np.load(npz, allow_pickle=False) as data:
            tensors = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise GoldenError(f"{npz}: golden tensors missing (tolerance mode needs them); re-record") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise GoldenError(f"{npz}: corrupt golden tensors: {e}") from None
    for rec in golden.records:
        if rec.tensors:
            for name, out in rec.outputs.items():
                if out.datatype not in EXACT_ONLY and f"{rec.record_id}/{name}" not in tensors:
                    raise GoldenError(f"{npz}: no tensor for output {name} of the record from {rec.recorded_at}")
    return Golden(**{**golden.__dict__, "tensors": tensors})


# ---------------------------------------------------------------------------------------------- writing


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, rename. On any failure the old file is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass


def golden_to_json(golden: Golden) -> dict[str, Any]:
    return {
        "format": GOLDEN_FORMAT,
        "canary": golden.canary,
        "model": golden.model,
        "version": golden.version,
        "input_digest": golden.input_digest,
        "compare": golden.compare_mode,
        "records": [
            {
                "environment": r.environment,
                "environment_id": r.env_id,
                "recorded_at": r.recorded_at,
                "tool_version": r.tool_version,
                "outputs": {
                    n: {"datatype": o.datatype, "shape": list(o.shape), "digest": o.digest}
                    for n, o in r.outputs.items()
                },
                "latency": {
                    "runs": r.latency.runs,
                    "median_ms": r.latency.median_ms,
                    "min_ms": r.latency.min_ms,
                    "max_ms": r.latency.max_ms,
                    "samples_ms": list(r.latency.samples_ms),
                },
                "tensors": r.tensors,
            }
            for r in golden.records
        ],
    }


def write_golden(path: Path, golden: Golden) -> None:
    """Atomically write the golden file, and first its .npz when any record carries tensors.

    The .npz is written before the JSON and keyed by record id, so if the JSON write fails the old JSON still
    finds its own tensors in the new .npz (`golden.tensors` holds the old records' tensors too).
    """
    if any(r.tensors for r in golden.records):
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in golden.tensors.items()})
        _atomic_write(tensors_path(path), buf.getvalue())
    text = json.dumps(golden_to_json(golden), indent=2, sort_keys=False) + "\n"
    _atomic_write(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------- comparing


def _short(d: str) -> str:
    return d[: len(DIGEST_PREFIX) + 12] + "…"


def _errors(actual: np.ndarray[Any, Any], expected: np.ndarray[Any, Any]) -> tuple[float, float]:
    a = actual.astype(np.float64)
    b = expected.astype(np.float64)
    if a.size == 0:
        return 0.0, 0.0
    diff = np.abs(a - b)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(np.abs(b) > 0, diff / np.abs(b), np.where(diff > 0, np.inf, 0.0))
    return float(np.nanmax(diff)), float(np.nanmax(rel))


def _compare_record(
    golden: Golden, rec: Record, outputs: Mapping[str, tuple[str, np.ndarray[Any, Any]]], cmp: CompareConfig
) -> tuple[list[str], float | None, float | None]:
    """Mismatches of live outputs against one record, and the max errors seen (tolerance mode)."""
    problems: list[str] = []
    max_abs: float | None = None
    max_rel: float | None = None
    for name, want in rec.outputs.items():
        if name not in outputs:
            problems.append(f"output {name} missing from the response")
            continue
        datatype, arr = outputs[name]
        if datatype != want.datatype:
            problems.append(f"output {name} datatype {datatype} != golden {want.datatype}")
            continue
        if tuple(arr.shape) != want.shape:
            problems.append(f"output {name} shape {list(arr.shape)} != golden {list(want.shape)}")
            continue
        got = digest(datatype, arr)
        if got == want.digest:
            if cmp.mode == "tolerance":
                max_abs, max_rel = max(max_abs or 0.0, 0.0), max(max_rel or 0.0, 0.0)
            continue
        if cmp.mode == "tolerance" and rec.tensors and datatype not in EXACT_ONLY:
            expected = golden.tensors[f"{rec.record_id}/{name}"]
            abs_err, rel_err = _errors(arr, expected)
            max_abs = max(max_abs or 0.0, abs_err)
            max_rel = max(max_rel or 0.0, rel_err)
            close = np.allclose(arr.astype(np.float64), expected.astype(np.float64), rtol=cmp.rtol, atol=cmp.atol)
            if not close:
                problems.append(
                    f"output {name} max abs error {abs_err:.3g} (max rel {rel_err:.3g}) exceeds tolerance "
                    f"rtol {cmp.rtol:g} atol {cmp.atol:g}"
                )
            continue
        problems.append(f"output {name} digest {_short(got)} != golden {_short(want.digest)}")
    return problems, max_abs, max_rel


def compare_outputs(
    golden: Golden, outputs: Mapping[str, tuple[str, np.ndarray[Any, Any]]], cmp: CompareConfig
) -> Comparison:
    """Does the live output equal (exact) or lie within tolerance of any record? Compared once, record by record;
    on a mismatch the reason is the closest record's first problem (`explain_mismatch` adds environments)."""
    problems: list[tuple[Record, tuple[str, ...]]] = []
    max_abs: float | None = None
    max_rel: float | None = None
    for rec in golden.records:
        found, rec_abs, rec_rel = _compare_record(golden, rec, outputs, cmp)
        if not found:
            reason = "ok"
            if cmp.mode == "tolerance" and rec_abs is not None:
                reason = f"ok (max abs error {rec_abs:.3g}, max rel {rec_rel or 0.0:.3g})"
            return Comparison(True, reason, rec_abs, rec_rel)
        problems.append((rec, tuple(found)))
        if rec_abs is not None:
            max_abs, max_rel = rec_abs, rec_rel
    assert problems  # parse_golden guarantees at least one record
    return Comparison(
        False, _first_problem(min(problems, key=lambda p: len(p[1]))[1]), max_abs, max_rel, tuple(problems)
    )


def _first_problem(found: tuple[str, ...]) -> str:
    return found[0] + (f" (+{len(found) - 1} more)" if len(found) > 1 else "")


def explain_mismatch(golden: Golden, comparison: Comparison, environment: Mapping[str, Any] | None) -> str:
    """The reason for a mismatch: the problems of this node's own record if it has one (else the closest record's)
    and, when records came from other environments, where each was recorded and what this node is."""
    if comparison.ok or not comparison.problems:
        return comparison.reason
    if environment is None:
        return comparison.reason
    this_id = environment_id(environment)
    own = [found for rec, found in comparison.problems if rec.env_id == this_id]
    reason = _first_problem(own[0]) if own else comparison.reason
    others = [r for r in golden.records if r.env_id != this_id]
    if others:
        where = "; ".join(sorted({describe_environment(r.environment) for r in others}))
        reason += f"; golden recorded on {where}; this node is {describe_environment(environment)}"
    return reason


def check_golden_for(golden: Golden, canary_name: str, input_digest: str, mode: str, path: Path) -> None:
    """Raise `GoldenError` when this golden file cannot judge the canary as configured now."""
    if golden.canary != canary_name:
        raise GoldenError(f"{path}: recorded for canary {golden.canary!r}, not {canary_name!r}")
    if golden.input_digest != input_digest:
        raise GoldenError(
            f"{path}: recorded for different canary inputs (input digest {_short(golden.input_digest)} != "
            f"{_short(input_digest)} now); re-record with `probe record --force`"
        )
    if mode == "tolerance" and not any(r.tensors for r in golden.records):
        raise GoldenError(f"{path}: recorded in exact mode without tensors; re-record for tolerance mode")
