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
import time
import zipfile
from collections.abc import Callable, Mapping
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
    golden: Golden,
    outputs: Mapping[str, tuple[str, np.ndarray[Any, Any]]],
    cmp: CompareConfig,
    environment: Mapping[str, Any] | None = None,
) -> Comparison:
    """Does the live output equal (exact) or lie within tolerance of any record? The reason says why not.

    When no record matches, the reason shows the closest record's first mismatch and, if the records came
    from other environments, where each was recorded and what this node is.
    """
    best: tuple[list[str], float | None, float | None, Record] | None = None
    for rec in golden.records:
        problems, max_abs, max_rel = _compare_record(golden, rec, outputs, cmp)
        if not problems:
            reason = "ok"
            if cmp.mode == "tolerance" and max_abs is not None:
                reason = f"ok (max abs error {max_abs:.3g}, max rel {max_rel or 0.0:.3g})"
            return Comparison(True, reason, max_abs, max_rel)
        same_env = environment is not None and rec.env_id == environment_id(environment)
        if best is None or same_env or len(problems) < len(best[0]):
            best = (problems, max_abs, max_rel, rec)
    assert best is not None  # parse_golden guarantees at least one record
    problems, max_abs, max_rel, rec = best
    reason = problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
    if environment is not None:
        this_id = environment_id(environment)
        others = [r for r in golden.records if r.env_id != this_id]
        if others:
            where = "; ".join(sorted({describe_environment(r.environment) for r in others}))
            reason += f"; golden recorded on {where}; this node is {describe_environment(environment)}"
    return Comparison(False, reason, max_abs, max_rel)


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


# ---------------------------------------------------------------------------------------------- the store


class GoldenStore:
    """The canary's golden file, re-read when it changes on disk (a ConfigMap update needs no restart)."""

    # Looking at the files at most this often: a ConfigMap update takes the kubelet far longer to propagate.
    RECHECK_S = 1.0

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._npz = path.with_suffix(".npz")
        self._clock = clock
        self._checked_at = -math.inf
        self._stamp: tuple[int, ...] | None = None
        self._golden: Golden | None = None
        self._error: str | None = None

    def get(self) -> Golden:
        """The current golden; raises GoldenError (cached until the file changes)."""
        now = self._clock()
        if now - self._checked_at >= self.RECHECK_S or self._stamp is None:
            self._checked_at = now
            self._refresh()
        if self._golden is None:
            raise GoldenError(self._error or f"{self.path}: golden file missing")
        return self._golden

    def _refresh(self) -> None:
        # Inode and ctime too: a replaced file (new inode) or one rewritten in place (new ctime) is noticed even
        # when it kept its size and mtime (cp -p, rsync -t, tar, two writes within one timestamp tick).
        stamp = _stamp(self.path) + _stamp(self._npz)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._golden, self._error = load_golden(self.path), None
            except GoldenError as e:
                self._golden, self._error = None, str(e)


def _stamp(path: Path) -> tuple[int, int, int, int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return (0, 0, 0, 0)
    return (st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_size)
