"""Golden files: what a canary's outputs must be, per environment, and how a live output is compared.

One JSON file per canary, `<golden_dir>/<canary>.json`, holding a `format` version, the digest of the canary's
inputs (for a generate canary, of its `request`), and one or more records (one per environment fingerprint). An
`infer` record holds each output's datatype, shape and digest; in tolerance mode the output tensors are stored
too, in a sidecar `<canary>.npz` keyed by record id. A `generate` / `generate_stream` record holds each compared
field's digest (and, in text and tolerance mode, its value) and the time to the first event. Format 1 files
(infer only, before generate canaries) are read as they are. Every write is atomic (temp file in the same
directory, fsync, rename), so a failed write leaves the previous file byte-identical.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import stat
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from probe.config import CANARY_INPUT_MAX_BYTES, CompareConfig, brief, clip, finite, format_bytes, type_name
from probe.tensors import DIGEST_PREFIX, NPY_HEADER_MAX, NUMPY_DTYPES, NpyHeaderError, digest, read_npy_header

GOLDEN_FORMAT = 2
READ_FORMATS = (1, 2)
"""Format 2 added `protocol`, records' `fields` and `first_event`; format 1 files (infer canaries) still load."""

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
    fields: Mapping[str, Mapping[str, Any]] | None = None
    """Generate canaries: field -> {"digest"[, "value"]} (see `probe.answers.record_fields`); None for infer."""
    first_event: LatencyBaseline | None = None
    """generate_stream canaries: the recorded runs' time to the first event."""

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
        for name in sorted(self.fields or {}):
            h.update(name.encode() + b"\1" + str((self.fields or {})[name].get("digest", "")).encode())
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
    protocol: str = "infer"


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

# Caps on what a golden file may make the probe read (see the README, "Golden files"). A golden JSON holds digests,
# not tensors: a few KiB per record, so 4 MiB is hundreds of records. The .npz cap is derived from the records.
GOLDEN_MAX_BYTES = 4 * 1024**2
TENSOR_MAX_BYTES = CANARY_INPUT_MAX_BYTES
"""One stored golden tensor, as declared by its record; the same cap as a canary input."""
TENSORS_MAX_BYTES = 256 * 1024**2
"""All the tensors one golden file's records reference, together."""
NPZ_SLACK_BYTES = 1024**2
"""The .npz may be 2 x its referenced tensors + this: it also keeps the tensors of the record the last `record`
replaced (written before the JSON, so a failed JSON write leaves a consistent pair), plus zip and npy headers."""
MAX_RANK = 32
MAX_DIM = 2**63 - 1  # Triton's dims are int64
_TEXT_MAX = 256
_HEX = frozenset("0123456789abcdef")


def _text(v: Any, where: str, *, empty: bool = True) -> str:
    """A string the probe prints in reasons: bounded and on one line."""
    if not isinstance(v, str):
        raise GoldenError(f"{where}: expected a string, got {type_name(v)}")
    if len(v) > _TEXT_MAX or not v.isprintable() or (not empty and not v):
        raise GoldenError(
            f"{where}: expected a {'non-empty ' if not empty else ''}printable string of at most "
            f"{_TEXT_MAX} characters, got {brief(v)}"
        )
    return v


def _field(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise GoldenError(f"{where}: missing field {key!r}")
    return obj[key]


def _digest_field(v: Any, where: str) -> str:
    if (
        not isinstance(v, str)
        or not v.startswith(DIGEST_PREFIX)
        or len(v) != len(DIGEST_PREFIX) + 32
        or not (set(v[len(DIGEST_PREFIX) :]) <= _HEX)
    ):
        raise GoldenError(f"{where}: expected {DIGEST_PREFIX} followed by 32 hex digits, got {brief(v)}")
    return v


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not finite(v) or v < 0:
        raise GoldenError(f"{where}: expected a finite number >= 0, got {brief(v)}")
    return float(v)


def _shape(v: Any, where: str) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > MAX_RANK:
        raise GoldenError(f"{where}: expected a list of at most {MAX_RANK} dimensions, got {brief(v)}")
    for d in v:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= MAX_DIM:
            raise GoldenError(f"{where}: dimensions must be integers from 0 to 2^63-1, got {brief(d)}")
    return tuple(v)


def _environment(v: Any, where: str) -> dict[str, Any]:
    """The fingerprint's fields the probe reads (to identify and to describe an environment) must have the types
    the recorder writes: `gpus` a list of names, the versions strings or null."""
    if not isinstance(v, dict):
        raise GoldenError(f"{where}: expected an object, got {type_name(v)}")
    gpus = v.get("gpus", [])
    if not isinstance(gpus, list):
        raise GoldenError(f"{where}.gpus: expected a list of GPU names, got {type_name(gpus)}")
    for i, name in enumerate(gpus):
        _text(name, f"{where}.gpus[{i}]")
    for key in ENV_KEYS[1:]:
        if v.get(key) is not None:
            _text(v[key], f"{where}.{key}")
    return v


def _latency(v: Any, where: str) -> LatencyBaseline:
    if not isinstance(v, dict):
        raise GoldenError(f"{where}: expected an object, got {type_name(v)}")
    runs = _field(v, "runs", where)
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 0:
        raise GoldenError(f"{where}.runs: expected an integer >= 0, got {brief(runs)}")
    median = _number(_field(v, "median_ms", where), f"{where}.median_ms")
    samples = v.get("samples_ms", [])
    if not isinstance(samples, list):
        raise GoldenError(f"{where}.samples_ms: expected a list of numbers, got {type_name(samples)}")
    return LatencyBaseline(
        runs=runs,
        median_ms=median,
        min_ms=_number(v.get("min_ms", median), f"{where}.min_ms"),
        max_ms=_number(v.get("max_ms", median), f"{where}.max_ms"),
        samples_ms=tuple(_number(x, f"{where}.samples_ms[{i}]") for i, x in enumerate(samples)),
    )


def _parse_fields_record(raw: dict[str, Any], where: str, mode: str) -> Record:
    """A generate canary's record: its fields, latency and time to the first event."""
    from probe.answers import fields_record_problem

    fields = _field(raw, "fields", where)
    problem = fields_record_problem(fields, mode)
    if problem is not None:
        raise GoldenError(f"{where}.fields: {clip(problem)}")
    first_raw = raw.get("first_event")
    return Record(
        environment=_environment(_field(raw, "environment", where), f"{where}.environment"),
        recorded_at=_text(raw.get("recorded_at", ""), f"{where}.recorded_at"),
        tool_version=_text(raw.get("tool_version", ""), f"{where}.tool_version"),
        outputs={},
        latency=_latency(_field(raw, "latency", where), f"{where}.latency"),
        fields=fields,
        first_event=None if first_raw is None else _latency(first_raw, f"{where}.first_event"),
    )


def _parse_record(raw: Any, where: str, protocol: str = "infer", mode: str = "exact") -> Record:
    if not isinstance(raw, dict):
        raise GoldenError(f"{where}: expected an object, got {type_name(raw)}")
    if protocol != "infer":
        return _parse_fields_record(raw, where, mode)
    outs_raw = _field(raw, "outputs", where)
    if not isinstance(outs_raw, dict):
        raise GoldenError(f"{where}.outputs: expected an object, got {type_name(outs_raw)}")
    outputs = {}
    for name, o in outs_raw.items():
        _text(name, f"{where}.outputs: output name", empty=False)
        ow = f"{where}.outputs.{name}"
        if not isinstance(o, dict):
            raise GoldenError(f"{ow}: expected an object, got {type_name(o)}")
        datatype = _field(o, "datatype", ow)
        if not isinstance(datatype, str) or datatype not in NUMPY_DTYPES:
            raise GoldenError(f"{ow}.datatype: expected a Triton datatype, got {brief(datatype)}")
        shape = _shape(_field(o, "shape", ow), f"{ow}.shape")
        outputs[name] = OutputGolden(datatype, shape, _digest_field(_field(o, "digest", ow), f"{ow}.digest"))
    if not outputs:
        raise GoldenError(f"{where}: no outputs")
    latency = _latency(_field(raw, "latency", where), f"{where}.latency")
    env = _environment(_field(raw, "environment", where), f"{where}.environment")
    tensors = raw.get("tensors", False)
    if not isinstance(tensors, bool):
        raise GoldenError(f"{where}.tensors: expected true or false, got {brief(tensors)}")
    return Record(
        environment=env,
        recorded_at=_text(raw.get("recorded_at", ""), f"{where}.recorded_at"),
        tool_version=_text(raw.get("tool_version", ""), f"{where}.tool_version"),
        outputs=outputs,
        latency=latency,
        tensors=tensors,
    )


def parse_golden(raw: Any, path: Path) -> Golden:
    """A `Golden` from decoded JSON, every field the probe reads checked for its type. Raises `GoldenError`."""
    where = str(path)
    if not isinstance(raw, dict):
        raise GoldenError(f"{where}: corrupt golden file: expected a JSON object")
    fmt = raw.get("format")
    if fmt not in READ_FORMATS or isinstance(fmt, bool):
        raise GoldenError(
            f"{where}: unsupported golden format {brief(fmt)} (this probe reads formats "
            f"{', '.join(map(str, READ_FORMATS))})"
        )
    protocol = raw.get("protocol", "infer") if fmt >= 2 else "infer"
    if protocol not in ("infer", "generate", "generate_stream"):
        raise GoldenError(f"{where}: protocol: expected infer, generate or generate_stream, got {brief(protocol)}")
    records_raw = _field(raw, "records", where)
    if not isinstance(records_raw, list):
        raise GoldenError(f"{where}: records: expected a list, got {type_name(records_raw)}")
    if not records_raw:
        raise GoldenError(f"{where}: holds no records; run `probe record`")
    mode = _field(raw, "compare", where)
    modes = ("exact", "tolerance") if protocol == "infer" else ("exact", "tolerance", "text")
    if mode not in modes:
        raise GoldenError(f"{where}: compare: expected {' or '.join(modes)}, got {brief(mode)}")
    records = tuple(_parse_record(r, f"{where}: records[{i}]", protocol, mode) for i, r in enumerate(records_raw))
    return Golden(
        canary=_text(_field(raw, "canary", where), f"{where}: canary", empty=False),
        model=_text(_field(raw, "model", where), f"{where}: model", empty=False),
        version=_text(raw.get("version", ""), f"{where}: version"),
        input_digest=_digest_field(_field(raw, "input_digest", where), f"{where}: input_digest"),
        compare_mode=mode,
        records=records,
        protocol=protocol,
    )


def tensors_path(path: Path) -> Path:
    return path.with_suffix(".npz")


def _open_capped(path: Path, cap: int, what: str, why: str) -> io.BufferedReader:
    """Open a regular file no larger than `cap` bytes; anything else is a `GoldenError`, raised before a byte of
    it is read. O_NONBLOCK: a FIFO put where a golden file should be must not hang the loader."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except NotADirectoryError:
        raise GoldenError(f"golden_dir {path.parent}: is not a directory") from None
    except OSError as e:
        raise GoldenError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise GoldenError(f"{path}: {what} is not a regular file")
        if st.st_size > cap:
            raise GoldenError(f"{path}: {what} is {format_bytes(st.st_size)}, over {why}; not read")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def load_golden(path: Path) -> Golden:
    """Read and validate a golden file (and its .npz when records carry tensors). Raises `GoldenError`.

    Bounded: a JSON file over `GOLDEN_MAX_BYTES`, or an .npz over its derived cap, is refused unread; of the .npz
    only the members the records reference are read, each after its header matched the record.
    """
    try:
        f = _open_capped(
            path, GOLDEN_MAX_BYTES, "golden file", f"the {format_bytes(GOLDEN_MAX_BYTES)} cap on a golden file"
        )
    except FileNotFoundError:
        raise GoldenError(f"{path}: golden file missing; record it with `probe record`") from None
    try:
        with f:
            data = f.read(GOLDEN_MAX_BYTES + 1)
        if len(data) > GOLDEN_MAX_BYTES:  # it grew after the size check
            raise GoldenError(f"{path}: golden file is over its {format_bytes(GOLDEN_MAX_BYTES)} cap; not read")
        raw = json.loads(data.decode("utf-8"))
    except OSError as e:
        raise GoldenError(f"{path}: cannot read golden file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise GoldenError(f"{path}: corrupt golden file: not UTF-8 ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, or an int beyond 4300 digits
        raise GoldenError(f"{path}: corrupt golden file: {clip(str(e))}") from None
    golden = parse_golden(raw, path)
    if any(r.tensors for r in golden.records):
        golden = _with_tensors(golden, path)
    return golden


def _tensor_bytes(out: OutputGolden) -> int:
    return math.prod(out.shape) * NUMPY_DTYPES[out.datatype].itemsize


def _with_tensors(golden: Golden, path: Path) -> Golden:
    npz = tensors_path(path)
    wanted: dict[str, tuple[str, OutputGolden, Record]] = {}
    for i, rec in enumerate(golden.records):
        if not rec.tensors:
            continue
        for name, out in rec.outputs.items():
            if out.datatype in EXACT_ONLY:
                continue
            size = _tensor_bytes(out)
            if size > TENSOR_MAX_BYTES:
                raise GoldenError(
                    f"{path}: records[{i}].outputs.{name}: a stored tensor of shape {list(out.shape)} "
                    f"{out.datatype} is {format_bytes(size)}, over the {format_bytes(TENSOR_MAX_BYTES)} cap"
                )
            wanted[f"{rec.record_id}/{name}"] = (name, out, rec)
    total = sum(_tensor_bytes(out) for _, out, _ in wanted.values())
    if total > TENSORS_MAX_BYTES:
        raise GoldenError(
            f"{path}: its records' tensors are {format_bytes(total)} together, over the "
            f"{format_bytes(TENSORS_MAX_BYTES)} cap"
        )
    cap = 2 * total + NPZ_SLACK_BYTES
    why = f"its {format_bytes(cap)} cap (2 x the {format_bytes(total)} of tensors its records reference, + 1.0MiB)"
    try:
        f = _open_capped(npz, cap, "golden tensors file", why)
    except FileNotFoundError:
        raise GoldenError(f"{npz}: golden tensors missing (tolerance mode needs them); re-record") from None
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    try:
        with f, zipfile.ZipFile(f) as zf:
            for key, (name, out, rec) in wanted.items():
                tensors[key] = _read_member(
                    zf, key, out, f"{npz}: tensor for output {name} of the record from {rec.recorded_at or '?'}"
                )
    except GoldenError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError) as e:
        raise GoldenError(f"{npz}: corrupt golden tensors: {clip(str(e))}") from None
    return Golden(**{**golden.__dict__, "tensors": tensors})


def _read_member(zf: zipfile.ZipFile, key: str, out: OutputGolden, where: str) -> np.ndarray[Any, Any]:
    """One npz member, read only once its npy header declares the record's shape and datatype (no pickles)."""
    try:
        info = zf.getinfo(f"{key}.npy")
    except KeyError:
        raise GoldenError(f"{where}: missing; re-record") from None
    expected = NUMPY_DTYPES[out.datatype]
    nbytes = _tensor_bytes(out)
    if info.file_size > nbytes + NPY_HEADER_MAX:
        raise GoldenError(
            f"{where}: its member is {format_bytes(info.file_size)} uncompressed; the record's shape "
            f"{list(out.shape)} {out.datatype} needs {format_bytes(nbytes)}; not read"
        )
    with zf.open(info) as member:
        try:
            shape, fortran, dtype = read_npy_header(member)
        except NpyHeaderError as e:
            raise GoldenError(f"{where}: {e}") from None
        if dtype.hasobject:
            raise GoldenError(f"{where}: holds Python objects (dtype {dtype}); pickles are refused")
        if tuple(shape) != out.shape or dtype not in (expected, expected.newbyteorder(">")):
            raise GoldenError(
                f"{where}: declares shape {brief(list(shape))} dtype {dtype}, but the record says "
                f"{list(out.shape)} {out.datatype} ({expected}); not read"
            )
        data = member.read(nbytes + 1)
    if len(data) != nbytes:
        raise GoldenError(f"{where}: holds {len(data)} bytes of data, {nbytes} declared")
    return np.frombuffer(data, dtype=dtype).reshape(out.shape, order="F" if fortran else "C")


# ---------------------------------------------------------------------------------------------- writing


def _umask() -> int:
    """The process umask, read without changing it (os.umask sets it, racing other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # pragma: no cover - Linux before 4.7, or no /proc
    os.umask(mask)  # pragma: no cover
    return mask  # pragma: no cover


def ensure_golden_dir(directory: Path) -> None:
    """Create golden_dir if needed; a `GoldenError` naming it when it cannot be (a file there, no permission)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise GoldenError(f"golden_dir {directory}: exists and is not a directory") from None
    except NotADirectoryError:
        raise GoldenError(f"golden_dir {directory}: a parent of it is not a directory") from None
    except OSError as e:
        raise GoldenError(f"golden_dir {directory}: cannot create it: {e.strerror or e}") from None


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, rename. On any failure the old file is untouched.

    The file gets mode 0666 less the umask (0644 usually), as `open()` would give it: mkstemp's 0600 would keep
    a sidecar running as another user (a hostPath or PVC mount, an image built as root) from reading it.
    """
    ensure_golden_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
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


def _latency_json(b: LatencyBaseline) -> dict[str, Any]:
    return {
        "runs": b.runs,
        "median_ms": b.median_ms,
        "min_ms": b.min_ms,
        "max_ms": b.max_ms,
        "samples_ms": list(b.samples_ms),
    }


def _record_json(r: Record) -> dict[str, Any]:
    out: dict[str, Any] = {
        "environment": r.environment,
        "environment_id": r.env_id,
        "recorded_at": r.recorded_at,
        "tool_version": r.tool_version,
    }
    if r.fields is not None:
        out["fields"] = {n: dict(e) for n, e in r.fields.items()}
    else:
        out["outputs"] = {
            n: {"datatype": o.datatype, "shape": list(o.shape), "digest": o.digest} for n, o in r.outputs.items()
        }
    out["latency"] = _latency_json(r.latency)
    if r.first_event is not None:
        out["first_event"] = _latency_json(r.first_event)
    if r.fields is None:
        out["tensors"] = r.tensors
    return out


def golden_to_json(golden: Golden) -> dict[str, Any]:
    return {
        "format": GOLDEN_FORMAT,
        "protocol": golden.protocol,
        "canary": golden.canary,
        "model": golden.model,
        "version": golden.version,
        "input_digest": golden.input_digest,
        "compare": golden.compare_mode,
        "records": [_record_json(r) for r in golden.records],
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


def compare_answers(golden: Golden, answer: Mapping[str, Any], cmp: CompareConfig) -> Comparison:
    """A generate canary's joined answer against every record (see `probe.answers.compare_answer`): the same
    `Comparison` as `compare_outputs`, so `explain_mismatch` names the environments alike."""
    from probe.answers import compare_answer

    problems: list[tuple[Record, tuple[str, ...]]] = []
    closest = None
    for rec in golden.records:
        got = compare_answer(answer, rec.fields or {}, cmp)
        if got.ok:
            return Comparison(True, got.reason or "ok", got.max_abs_error, got.max_rel_error)
        problems.append((rec, (got.reason,)))
        closest = closest or got
    assert closest is not None  # parse_golden guarantees at least one record
    return Comparison(False, closest.reason, closest.max_abs_error, closest.max_rel_error, tuple(problems))


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


def check_golden_for(
    golden: Golden, canary_name: str, input_digest: str, mode: str, path: Path, protocol: str = "infer"
) -> None:
    """Raise `GoldenError` when this golden file cannot judge the canary as configured now."""
    if golden.canary != canary_name:
        raise GoldenError(f"{path}: recorded for canary {golden.canary!r}, not {canary_name!r}")
    if golden.protocol != protocol:
        raise GoldenError(
            f"{path}: recorded with protocol {golden.protocol}, the canary now uses {protocol}; re-record with "
            "`probe record --force`"
        )
    if protocol != "infer":
        if golden.input_digest != input_digest:
            raise GoldenError(
                f"{path}: recorded for a different request (request digest {_short(golden.input_digest)} != "
                f"{_short(input_digest)} now); re-record with `probe record --force`"
            )
        if (
            mode != golden.compare_mode
            and mode in ("text", "tolerance")
            and any("value" not in e for r in golden.records for e in (r.fields or {}).values())
        ):
            raise GoldenError(
                f"{path}: recorded in {golden.compare_mode} mode without values; re-record for {mode} mode"
            )
        return
    if golden.input_digest != input_digest:
        raise GoldenError(
            f"{path}: recorded for different canary inputs (input digest {_short(golden.input_digest)} != "
            f"{_short(input_digest)} now); re-record with `probe record --force`"
        )
    if mode == "tolerance" and not any(r.tensors for r in golden.records):
        raise GoldenError(f"{path}: recorded in exact mode without tensors; re-record for tolerance mode")


# ---------------------------------------------------------------------------------------------- the store


class GoldenStore:
    """The canary's golden file, re-read when it changes on disk (a ConfigMap update needs no restart).

    Loading happens on a worker thread, at most one load at a time per store (a second caller awaits the same
    load), so a large or hostile file never stalls the event loop. A load that fails, for whatever reason, leaves
    no golden behind: every later call reports that failure until the files change and load.
    """

    # Looking at the files at most this often: a ConfigMap update takes the kubelet far longer to propagate.
    RECHECK_S = 1.0

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        loader: Callable[[Path], Golden] | None = None,
    ) -> None:
        self.path = path
        self._npz = tensors_path(path)
        self._clock = clock
        self._loader = loader or load_golden
        self._checked_at = -math.inf
        self._stamp: tuple[int, ...] | None = None
        self._golden: Golden | None = None
        self._error: str | None = None
        self._loading: asyncio.Future[None] | None = None

    async def current(self) -> Golden:
        """The golden as the files are now. Raises `GoldenError` with the reason they cannot be used."""
        now = self._clock()
        if self._loading is None and (self._stamp is None or now - self._checked_at >= self.RECHECK_S):
            self._checked_at = now
            # Inode and ctime too: a replaced file (new inode) or one rewritten in place (new ctime) is noticed
            # even when it kept its size and mtime (cp -p, rsync -t, tar, two writes within one timestamp tick).
            stamp = _stamp(self.path) + _stamp(self._npz)
            if stamp != self._stamp:
                self._loading = asyncio.ensure_future(self._load(stamp))
        if self._loading is not None:
            # Shielded: a caller cancelled by its deadline leaves the load running for the next caller.
            await asyncio.shield(self._loading)
        if self._golden is None:
            raise GoldenError(self._error or f"{self.path}: golden file missing")
        return self._golden

    def cached(self) -> Golden | None:
        """The golden the last load produced; None before one, or while the files fail to load. Never reads."""
        return self._golden

    async def _load(self, stamp: tuple[int, ...]) -> None:
        golden: Golden | None = None
        try:
            golden, error = await asyncio.to_thread(self._loader, self.path), None
        except GoldenError as e:
            error = str(e)
        except Exception as e:  # exhausted memory, or a bug: a reason all the same, never the old golden kept
            error = f"{self.path}: cannot load golden file: {type(e).__name__}: {clip(str(e))}"
        finally:
            self._loading = None
        # The stamp taken before the load: a change during it is seen at the next look and loaded again.
        self._stamp, self._golden, self._error = stamp, golden, error


def _stamp(path: Path) -> tuple[int, int, int, int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return (0, 0, 0, 0)
    except OSError as e:  # golden_dir not a directory, no permission: the loader says which
        return (-1, e.errno or 0, 0, 0)
    return (st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_size)
