"""Load the probe's YAML configuration into frozen, typed objects.

Decoding is strict: an unknown key, a wrong type or an impossible value raises `ConfigError` whose message
starts with the key path (`canaries[1].inputs[0].dtype: unknown key`). Every default lives in this module.
Relative paths are resolved against the directory of the config file.
"""

from __future__ import annotations

import json
import math
import os
import re
import reprlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

# Triton's datatypes and the numpy dtype each is carried in (little-endian on the wire); the one table the rest is
# derived from (probe.tensors.NUMPY_DTYPES builds the dtypes; this module stays free of numpy).
DATATYPE_DTYPES = {
    "BOOL": "|b1",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
    "BYTES": "|O",
}
DATATYPES = tuple(DATATYPE_DTYPES)

# Letters, digits, '_', '-', '.'; '.' and '..' alone are refused separately because they name directories.
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


CANARY_INPUT_MAX_BYTES = 64 * 1024**2
"""The cap on one canary input tensor: elements x element size (BYTES: 8 + the value's length each). A 4K frame
in FP16 (1x3x2160x3840) is 47 MiB; a canary is sent on every probe run, and is built in the sidecar's memory."""


class ConfigError(ValueError):
    """A configuration problem; the message names the key path and what was expected."""


def finite(v: float) -> bool:
    """math.isfinite, but False (not OverflowError) for an integer beyond the float range."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxtuple, _BRIEF.maxdict = 1, 3, 3, 3
_BRIEF.maxstring, _BRIEF.maxlong, _BRIEF.maxother = 60, 40, 60
_KEY_MAX = 80


def brief(value: Any) -> str:
    """A value as quoted in an error message: bounded, whatever its size or nesting (a YAML alias bomb, a
    megabyte string), and on one line. Plain `repr()` of such a value can take minutes and gigabytes."""
    text = _BRIEF.repr(value)
    return text if text.isprintable() else repr(text)[1:-1]


def clip(text: str, limit: int = 200) -> str:
    """A message from elsewhere (an exception's text) cut to one bounded line."""
    text = " ".join(text.split()) if not text.isprintable() else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key(key: str) -> str:
    """A key as printed in a key path: quoted when it holds a line break or control character, so every
    message stays on one line, and cut short when it is longer than any real key."""
    if len(key) > _KEY_MAX:
        key = key[: _KEY_MAX - 3] + "..."
    return key if key.isprintable() else repr(key)


# ---------------------------------------------------------------------------------------------- objects


@dataclass(frozen=True)
class TlsConfig:
    """`triton.tls`: how an https:// Triton is trusted."""

    ca_file: Path | None = None
    """PEM bundle of the CAs that sign Triton's certificate; None = the system's."""
    verify: bool = True
    """False accepts any certificate (a self-signed Triton on loopback); the connection is still encrypted."""


@dataclass(frozen=True)
class TritonConfig:
    url: str = "127.0.0.1:8000"
    """host:port (no scheme)."""
    ssl: bool = False
    tls: TlsConfig = field(default_factory=TlsConfig)
    max_reply: int = 64 * 1024**2
    """Cap on a canary's reply when its golden file cannot tell the size to expect (no golden yet, BYTES)."""
    metrics_url: str = ""
    """Triton's Prometheus endpoint (`http://host:8002/metrics`); derived from `url` when empty."""


@dataclass(frozen=True)
class ListenConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    reasons: str = "everyone"
    """Who gets the failure reasons (per-check paths, the JSON view) and the environment labels on /metrics:
    `everyone`, or `loopback` only (kubectl port-forward and kubectl exec arrive there; the kubelet needs none)."""


@dataclass(frozen=True)
class ProbeConfig:
    timeout: float = 0.8
    min_interval: float = 1.0
    interval: float = 10.0
    drain: float = 5.0
    """Seconds `serve` keeps answering (with `shutdown` failing) after SIGTERM before it exits."""
    hang_backoff: float = 10.0
    """Longest pause between canaries sent to a model whose last canary timed out."""
    saturated: str = "ready"
    """What a saturated canary (it missed its deadline while its model kept completing other requests) does to
    /ready: `ready` (the last verified output stands) or `not-ready` (shed load). Never restart-worthy."""


@dataclass(frozen=True)
class LivenessConfig:
    after: float = 60.0
    startup: float = 600.0
    """/live fails if Triton has never been healthy this many seconds after start."""


@dataclass(frozen=True)
class MinFree:
    """GPU headroom threshold: absolute bytes, or a percentage of each device's total memory."""

    bytes: int | None = 2 * 1024**3
    percent: float | None = None

    def threshold(self, total: int) -> int:
        if self.percent is not None:
            return int(total * self.percent / 100.0)
        return self.bytes or 0

    def __str__(self) -> str:
        if self.percent is not None:
            return f"{self.percent:g}%"
        return format_bytes(self.bytes or 0)


@dataclass(frozen=True)
class GpuConfig:
    source: str = "nvml"
    devices: tuple[str, ...] | None = None
    """None means `auto`: NVIDIA_VISIBLE_DEVICES, or every device NVML sees."""
    min_free: MinFree = field(default_factory=MinFree)
    interval: float = 2.0
    """Seconds between NVML (or Triton metrics) samples."""
    stale_after: float = 0.0
    """A sample older than this fails the check; 0 means max(3 x interval, 5 s)."""
    metrics_url: str = ""
    """For source triton-metrics; empty means Triton's host on port 8002."""
    trend_window: float = 600.0
    """Seconds of used-memory samples the leak trend (bytes per minute) is fitted over."""

    @property
    def stale_limit(self) -> float:
        return self.stale_after if self.stale_after > 0 else max(3 * self.interval, 5.0)


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]
    fill: str
    """zeros | ones | value | random | file | data"""
    value: Any = None
    seed: int = 0
    file: Path | None = None
    data: Any = None

    def describe(self) -> dict[str, Any]:
        """A JSON-able description of the spec (the file itself is covered by the input digest)."""
        d: dict[str, Any] = {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}
        d["fill"] = self.fill
        if self.fill == "value":
            d["value"] = self.value
        elif self.fill == "random":
            d["seed"] = self.seed
        elif self.fill == "file":
            d["file"] = str(self.file)
        return d


@dataclass(frozen=True)
class CompareConfig:
    mode: str = "exact"
    rtol: float = 1e-5
    atol: float = 1e-6
    min_similarity: float = 0.9
    """Text mode (generate protocols): each compared string field's similarity to its golden, 0..1."""


@dataclass(frozen=True)
class LatencyConfig:
    max_ms: float | None = None
    drift: float | None = None
    window: int = 5
    """Number of recent canary latencies whose median is compared with the baseline."""
    first_ms: float | None = None
    """generate_stream: budget for the first event (time to first token)."""


@dataclass(frozen=True)
class CanaryConfig:
    name: str
    model: str
    inputs: tuple[InputSpec, ...]
    version: str = ""
    outputs: tuple[str, ...] | None = None
    timeout: float | None = None
    compare: CompareConfig = field(default_factory=CompareConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    protocol: str = "infer"
    """infer | generate | generate_stream"""
    request: Mapping[str, Any] | None = None
    """generate / generate_stream: the JSON body, sent as is (plain dicts and lists; `inputs` is then empty)."""


@dataclass(frozen=True)
class Config:
    path: Path
    triton: TritonConfig = field(default_factory=TritonConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    golden_dir: Path = Path("golden")
    canaries: tuple[CanaryConfig, ...] = ()

    def canary(self, name: str) -> CanaryConfig:
        for c in self.canaries:
            if c.name == name:
                return c
        raise KeyError(name)

    def golden_path(self, canary: str) -> Path:
        return self.golden_dir / f"{canary}.json"


# ---------------------------------------------------------------------------------------------- helpers


def format_bytes(n: float) -> str:
    """2147483648 -> '2.0GiB'; used in reasons so operators read sizes, not byte counts."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TiB"  # pragma: no cover - loop always returns


def parse_size(text: Any, where: str) -> int:
    """`2GiB`, `512MiB`, `1.5GB`, `1048576` -> bytes."""
    if isinstance(text, bool):
        raise ConfigError(f"{where}: expected a size like 2GiB, 512MiB or a byte count, got {brief(text)}")
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"{where}: must not be negative, got {text}")
        return text
    if isinstance(text, str):
        m = _SIZE_RE.match(text)
        if m:
            unit = (m.group(2) or "B").lower()
            size = float(m.group(1)) * _SIZE_UNITS[unit]
            if not math.isfinite(size):
                raise ConfigError(f"{where}: size too large, got {brief(text)}")
            return int(size)
    raise ConfigError(f"{where}: expected a size like 2GiB, 512MiB or a byte count, got {brief(text)}")


def _parse_min_free(raw: Any, where: str) -> MinFree:
    if isinstance(raw, str) and raw.strip().endswith("%"):
        try:
            pct = float(raw.strip()[:-1])
        except ValueError:
            raise ConfigError(f"{where}: expected a percentage like 10%, got {brief(raw)}") from None
        if not 0 <= pct <= 100:
            raise ConfigError(f"{where}: percentage must be between 0% and 100%, got {brief(raw)}")
        return MinFree(bytes=None, percent=pct)
    return MinFree(bytes=parse_size(raw, where), percent=None)


def type_name(v: Any) -> str:
    """What a value is, in YAML's and JSON's words (`mapping`, `list`, `integer`), for error messages."""
    if v is None:
        return "null"
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "list",
        dict: "mapping",
    }.get(type(v), type(v).__name__)


class _Section:
    """Reads one YAML mapping, tracking which keys were used so leftovers are reported as unknown."""

    def __init__(self, raw: Any, path: str, keys: tuple[str, ...]) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path or 'config'}: expected a mapping, got {type_name(raw)}")
        for key in raw:
            if not isinstance(key, str):
                raise ConfigError(f"{self._join(path, brief(key))}: keys must be strings")
            # Unknown keys first: a misspelt key explains a "required" error that would otherwise follow.
            if key not in keys:
                raise ConfigError(f"{self._join(path, key)}: unknown key")
        self.raw = raw
        self.path = path

    @staticmethod
    def _join(path: str, key: str) -> str:
        return f"{path}.{_key(key)}" if path else _key(key)

    def where(self, key: str) -> str:
        return self._join(self.path, key)

    def has(self, key: str) -> bool:
        return key in self.raw

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def number(self, key: str, default: float, *, positive: bool = False, allow_zero: bool = True) -> float:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not finite(v):
            raise ConfigError(f"{self.where(key)}: expected a number of seconds, got {brief(v)}")
        if v < 0 or (v == 0 and not allow_zero) or (positive and v <= 0):
            raise ConfigError(f"{self.where(key)}: must be {'positive' if positive else 'zero or more'}, got {v}")
        return float(v)

    def string(self, key: str, default: str, *, choices: tuple[str, ...] | None = None) -> str:
        v = self.get(key, default)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and choices is None:
            v = str(v)  # YAML reads `version: 1` as a number; a string was meant
        if not isinstance(v, str):
            raise ConfigError(f"{self.where(key)}: expected a string, got {type_name(v)}")
        if choices is not None and v not in choices:
            raise ConfigError(f"{self.where(key)}: expected one of {', '.join(choices)}, got {brief(v)}")
        return v

    def sub(self, key: str, keys: tuple[str, ...]) -> _Section:
        return _Section(self.get(key), self.where(key), keys)


def _parse_url(raw: str, where: str) -> tuple[str, bool]:
    text = raw.strip()
    ssl = False
    if "://" in text:
        try:
            parts = urlsplit(text)
        except ValueError as e:
            raise ConfigError(f"{where}: expected host:port or http(s)://host:port, got {brief(raw)} ({e})") from None
        if parts.scheme not in ("http", "https"):
            raise ConfigError(f"{where}: scheme must be http or https, got {brief(parts.scheme)}")
        if parts.path not in ("", "/") or parts.query:
            raise ConfigError(f"{where}: expected host:port without a path, got {brief(raw)}")
        ssl = parts.scheme == "https"
        text = parts.netloc
    host, sep, port = text.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: expected host:port or http(s)://host:port, got {brief(raw)}")
    return text, ssl


def _check_name(v: Any, where: str, what: str) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"{where}: expected a string, got {type_name(v)}")
    if not NAME_RE.match(v) or v in (".", ".."):
        raise ConfigError(
            f"{where}: {brief(v)} is not a valid {what} (letters, digits, '_', '-', '.'; not '.' or '..')"
        )
    return v


MAX_RANK = 32
_ELEMENT_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "UINT32": 4, "INT32": 4}
_ELEMENT_BYTES |= {"FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8, "BYTES": 8}  # BYTES: a pointer, or a length


def _shape(raw: Any, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not raw or len(raw) > MAX_RANK:
        raise ConfigError(f"{where}: expected a non-empty list of at most {MAX_RANK} dimensions, got {brief(raw)}")
    dims = []
    for i, d in enumerate(raw):
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ConfigError(f"{where}[{i}]: dimensions must be integers >= 0, got {brief(d)}")
        if d >= 2**63:  # Triton's dimensions are int64
            raise ConfigError(f"{where}[{i}]: dimensions must be below 2^63, got {brief(d)}")
        dims.append(d)
    return tuple(dims)


def _input_bytes(spec: InputSpec) -> int:
    """What the canary input takes in memory (and on the wire): elements x element size; a BYTES element is its
    8-byte length (or pointer) and, for `value`, the value's bytes."""
    per = _ELEMENT_BYTES[spec.datatype]
    if spec.datatype == "BYTES" and spec.fill == "value":
        per += len(str(spec.value).encode("utf-8", "surrogatepass"))
    return math.prod(spec.shape) * per


def _parse_input(raw: Any, where: str, base: Path) -> InputSpec:
    s = _Section(raw, where, ("name", "datatype", "shape", "fill"))
    if not s.has("name"):
        raise ConfigError(f"{where}.name: required")
    name = s.string("name", "")
    if not name:
        raise ConfigError(f"{where}.name: must not be empty")
    if not s.has("datatype"):
        raise ConfigError(f"{where}.datatype: required")
    datatype = s.string("datatype", "")
    if datatype.upper() not in DATATYPES:
        raise ConfigError(
            f"{where}.datatype: expected a Triton datatype ({', '.join(DATATYPES)}), got {brief(datatype)}"
        )
    datatype = datatype.upper()
    if not s.has("shape"):
        raise ConfigError(f"{where}.shape: required")
    shape = _shape(s.get("shape"), s.where("shape"))
    fill_raw = s.get("fill", "zeros")
    fw = s.where("fill")
    spec: InputSpec
    if fill_raw in ("zeros", "ones"):
        spec = InputSpec(name, datatype, shape, fill_raw)
    elif isinstance(fill_raw, Mapping) and len(fill_raw) == 1:
        kind, arg = next(iter(fill_raw.items()))
        if kind == "value":
            if not isinstance(arg, (int, float, str, bool)):
                raise ConfigError(f"{fw}.value: expected a scalar, got {type_name(arg)}")
            spec = InputSpec(name, datatype, shape, "value", value=arg)
        elif kind == "random":
            rs = _Section(arg, f"{fw}.random", ("seed",))
            seed = rs.get("seed", 0)
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise ConfigError(f"{fw}.random.seed: expected an integer >= 0, got {brief(seed)}")
            spec = InputSpec(name, datatype, shape, "random", seed=seed)
        elif kind == "file":
            if not isinstance(arg, str) or not arg:
                raise ConfigError(f"{fw}.file: expected a path to a .npy file, got {brief(arg)}")
            spec = InputSpec(name, datatype, shape, "file", file=(base / arg))
        elif kind == "data":
            if not isinstance(arg, list):
                raise ConfigError(f"{fw}.data: expected a list, got {type_name(arg)}")
            spec = InputSpec(name, datatype, shape, "data", data=arg)
        else:
            name = _key(kind) if isinstance(kind, str) else brief(kind)
            raise ConfigError(f"{fw}.{name}: unknown fill (expected zeros, ones, value, random, file or data)")
    else:
        raise ConfigError(
            f"{fw}: expected zeros, ones, {{value: V}}, {{random: {{seed: S}}}}, {{file: F}} or {{data: [...]}}, "
            f"got {brief(fill_raw)}"
        )
    if datatype == "BYTES" and spec.fill in ("ones",):
        raise ConfigError(f"{fw}: 'ones' has no meaning for BYTES; use {{value: ...}} or {{data: [...]}}")
    size = _input_bytes(spec)
    if size > CANARY_INPUT_MAX_BYTES:
        raise ConfigError(
            f"{s.where('shape')}: {list(shape)} {datatype} is {format_bytes(size)}, over the "
            f"{format_bytes(CANARY_INPUT_MAX_BYTES)} cap on a canary input"
        )
    if spec.fill == "data":
        count = math.prod(shape)
        flat = _flatten(spec.data)
        if len(flat) != count:
            raise ConfigError(f"{fw}.data: shape {list(shape)} needs {count} values, got {len(flat)}")
    return spec


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        out: list[Any] = []
        for d in data:
            out.extend(_flatten(d))
        return out
    return [data]


def _parse_tls(s: _Section, base: Path, https: bool) -> TlsConfig:
    if not s.raw:
        return TlsConfig()
    if not https:
        raise ConfigError(f"{s.path}: set, but triton.url is not https://")
    ca_file: Path | None = None
    if s.has("ca_file") and s.raw["ca_file"] is not None:
        raw = s.get("ca_file")
        if not isinstance(raw, str) or not raw:
            raise ConfigError(f"{s.where('ca_file')}: expected a file path, got {type_name(raw)}")
        ca_file = Path(os.path.normpath(base / raw))
        try:
            ssl.create_default_context(cafile=str(ca_file))
        except FileNotFoundError:
            raise ConfigError(f"{s.where('ca_file')}: no such file: {ca_file}") from None
        except (OSError, ssl.SSLError, ValueError) as e:
            raise ConfigError(f"{s.where('ca_file')}: not a readable PEM CA bundle: {ca_file}: {e}") from None
    verify = s.get("verify", TlsConfig.verify)
    if not isinstance(verify, bool):
        raise ConfigError(f"{s.where('verify')}: expected true or false, got {type_name(verify)}")
    return TlsConfig(ca_file=ca_file, verify=verify)


def _parse_canary(raw: Any, where: str, base: Path, probe: ProbeConfig) -> CanaryConfig:
    s = _Section(
        raw,
        where,
        ("name", "model", "version", "protocol", "request", "inputs", "outputs", "timeout", "compare", "latency"),
    )
    if not s.has("name"):
        raise ConfigError(f"{where}.name: required")
    name = _check_name(s.get("name"), s.where("name"), "canary name")
    if not s.has("model"):
        raise ConfigError(f"{where}.model: required")
    model = _check_name(s.get("model"), s.where("model"), "model name")
    version = s.string("version", "")
    if version and not version.isdigit():
        raise ConfigError(f"{s.where('version')}: expected a version number or empty, got {brief(version)}")
    protocol, request = _parse_protocol(s)
    inputs_raw = s.get("inputs") if protocol == "infer" else []
    if protocol == "infer" and (not isinstance(inputs_raw, list) or not inputs_raw):
        raise ConfigError(f"{s.where('inputs')}: expected a non-empty list of inputs")
    inputs = tuple(_parse_input(r, f"{where}.inputs[{i}]", base) for i, r in enumerate(inputs_raw))
    seen: dict[str, int] = {}
    for i, spec in enumerate(inputs):
        if spec.name in seen:
            raise ConfigError(
                f"{where}.inputs[{i}].name: duplicate input {brief(spec.name)} (also inputs[{seen[spec.name]}])"
            )
        seen[spec.name] = i
    outputs: tuple[str, ...] | None = None
    if s.has("outputs") and s.raw["outputs"] is not None:
        out_raw = s.get("outputs")
        if not isinstance(out_raw, list) or not all(isinstance(o, str) and o for o in out_raw):
            raise ConfigError(f"{s.where('outputs')}: expected a list of output names")
        if len(set(out_raw)) != len(out_raw):
            raise ConfigError(f"{s.where('outputs')}: output names must be unique")
        outputs = tuple(out_raw)
    timeout: float | None = None
    if s.has("timeout") and s.raw["timeout"] is not None:
        timeout = s.number("timeout", 0.0, positive=True)
        if timeout > probe.timeout:
            raise ConfigError(f"{s.where('timeout')}: {timeout:g} exceeds probe.timeout {probe.timeout:g}")
    cs = s.sub("compare", ("mode", "rtol", "atol", "min_similarity"))
    compare = CompareConfig(
        mode=cs.string("mode", CompareConfig.mode, choices=_compare_modes(cs, protocol)),
        rtol=cs.number("rtol", CompareConfig.rtol),
        atol=cs.number("atol", CompareConfig.atol),
        min_similarity=_parse_min_similarity(cs),
    )
    ls = s.sub("latency", ("max_ms", "drift", "window", "first_ms"))
    max_ms = ls.number("max_ms", 0.0, positive=True) if ls.has("max_ms") else None
    drift = ls.number("drift", 0.0, positive=True) if ls.has("drift") else None
    if drift is not None and drift < 1.0:
        raise ConfigError(f"{ls.where('drift')}: must be >= 1.0 (a multiple of the baseline median), got {drift:g}")
    window_raw = ls.get("window", LatencyConfig.window)
    if isinstance(window_raw, bool) or not isinstance(window_raw, int) or not 1 <= window_raw <= 1000:
        raise ConfigError(f"{ls.where('window')}: expected an integer between 1 and 1000, got {brief(window_raw)}")
    return CanaryConfig(
        name=name,
        model=model,
        version=version,
        inputs=inputs,
        outputs=outputs,
        timeout=timeout,
        compare=compare,
        latency=LatencyConfig(max_ms=max_ms, drift=drift, window=window_raw, first_ms=_parse_first_ms(ls, protocol)),
        protocol=protocol,
        request=request,
    )


# ---------------------------------------------------------------------------------------------- generate protocols

PROTOCOLS = ("infer", "generate", "generate_stream")
GENERATE_PROTOCOLS = ("generate", "generate_stream")
MAX_REQUEST_BYTES = 256 * 1024
"""Largest `request` body, as JSON."""
MAX_REQUEST_DEPTH = 32
"""Deepest nesting of mappings and lists in a `request`."""


def _parse_protocol(s: _Section) -> tuple[str, dict[str, Any] | None]:
    """The canary's protocol and, for generate / generate_stream, its validated `request`."""
    protocol = s.string("protocol", "infer", choices=PROTOCOLS)
    if protocol == "infer":
        if s.has("request"):
            raise ConfigError(
                f"{s.where('request')}: only for protocol generate or generate_stream (infer takes inputs)"
            )
        return protocol, None
    if s.has("inputs"):
        raise ConfigError(f"{s.where('inputs')}: not used with protocol {protocol} (its body is request)")
    where = s.where("request")
    raw = s.get("request")
    if raw is None:
        raise ConfigError(f"{where}: required for protocol {protocol}")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping (the JSON body), got {type_name(raw)}")
    if not raw:
        raise ConfigError(f"{where}: must not be empty")
    request = _json_value(raw, where, 0)
    size = len(json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode())
    if size > MAX_REQUEST_BYTES:
        raise ConfigError(f"{where}: {format_bytes(size)} as JSON, over the {format_bytes(MAX_REQUEST_BYTES)} limit")
    return protocol, request


def _json_value(v: Any, where: str, depth: int) -> Any:
    """A plain JSON copy of `v` (dicts, lists, str, finite numbers, booleans, null), or a ConfigError naming the
    key path of the first value that is not."""
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ConfigError(f"{where}: JSON has no {v!r}; expected a finite number")
        return v
    if isinstance(v, (Mapping, list)):
        if depth >= MAX_REQUEST_DEPTH:
            raise ConfigError(f"{where}: nested deeper than {MAX_REQUEST_DEPTH} levels")
        if isinstance(v, list):
            return [_json_value(x, f"{where}[{i}]", depth + 1) for i, x in enumerate(v)]
        out: dict[str, Any] = {}
        for key, x in v.items():
            if not isinstance(key, str):
                raise ConfigError(f"{where}.{_key(str(key))}: keys must be strings")
            out[key] = _json_value(x, f"{where}.{_key(key)}", depth + 1)
        return out
    raise ConfigError(
        f"{where}: expected a JSON value (string, number, boolean, null, list or mapping), got {type_name(v)}"
    )


def _compare_modes(cs: _Section, protocol: str) -> tuple[str, ...]:
    if protocol in GENERATE_PROTOCOLS:
        return ("exact", "tolerance", "text")
    if cs.get("mode") == "text":
        raise ConfigError(f"{cs.where('mode')}: text is for protocol generate or generate_stream")
    return ("exact", "tolerance")


def _parse_min_similarity(cs: _Section) -> float:
    mode = cs.get("mode", "exact")
    if not cs.has("min_similarity"):
        return CompareConfig.min_similarity
    if mode != "text":
        raise ConfigError(f"{cs.where('min_similarity')}: only for mode text")
    v = cs.get("min_similarity")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise ConfigError(f"{cs.where('min_similarity')}: expected a number from 0 to 1, got {v!r}")
    return float(v)


def _parse_first_ms(ls: _Section, protocol: str) -> float | None:
    if not ls.has("first_ms"):
        return None
    if protocol != "generate_stream":
        raise ConfigError(f"{ls.where('first_ms')}: only for protocol generate_stream (time to the first event)")
    return ls.number("first_ms", 0.0, positive=True)


def _parse_devices(raw: Any, where: str) -> tuple[str, ...] | None:
    if raw is None or raw == "auto":
        return None
    if isinstance(raw, str):
        raw = [p.strip() for p in raw.split(",") if p.strip()]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: expected auto or a list of GPU-/MIG- UUIDs or indices, got {brief(raw)}")
    out = []
    for i, d in enumerate(raw):
        if isinstance(d, bool) or not isinstance(d, (int, str)):
            raise ConfigError(f"{where}[{i}]: expected a GPU-/MIG- UUID or an index, got {brief(d)}")
        text = str(d)
        if not (text.isdigit() or text.startswith(("GPU-", "MIG-"))):
            raise ConfigError(f"{where}[{i}]: expected a GPU-/MIG- UUID or an index, got {brief(d)}")
        out.append(text)
    return tuple(out)


def parse_config(raw: Any, path: Path) -> Config:
    """Build a `Config` from decoded YAML; `path` is the file it came from (relative paths resolve next to it)."""
    base = path.parent
    top = _Section(raw, "", ("triton", "listen", "probe", "liveness", "gpu", "golden_dir", "canaries"))

    ts = top.sub("triton", ("url", "metrics_url", "tls", "max_reply"))
    url, ssl = _parse_url(ts.string("url", TritonConfig.url), ts.where("url"))
    metrics_url = ts.string("metrics_url", TritonConfig.metrics_url)
    tls = _parse_tls(ts.sub("tls", ("ca_file", "verify")), base, ssl)
    max_reply = TritonConfig.max_reply
    if ts.has("max_reply"):
        max_reply = parse_size(ts.get("max_reply"), ts.where("max_reply"))
        if max_reply < 1024:
            raise ConfigError(f"{ts.where('max_reply')}: must be at least 1KiB, got {max_reply} bytes")

    ls = top.sub("listen", ("host", "port", "reasons"))
    host = ls.string("host", ListenConfig.host)
    reasons = ls.string("reasons", ListenConfig.reasons, choices=("everyone", "loopback"))
    port = ls.get("port", ListenConfig.port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise ConfigError(f"{ls.where('port')}: expected a port number 0-65535, got {brief(port)}")

    ps = top.sub("probe", ("timeout", "min_interval", "interval", "drain", "hang_backoff", "saturated"))
    probe = ProbeConfig(
        timeout=ps.number("timeout", ProbeConfig.timeout, positive=True),
        min_interval=ps.number("min_interval", ProbeConfig.min_interval),
        interval=ps.number("interval", ProbeConfig.interval),
        drain=ps.number("drain", ProbeConfig.drain),
        hang_backoff=ps.number("hang_backoff", ProbeConfig.hang_backoff),
        saturated=ps.string("saturated", ProbeConfig.saturated, choices=("ready", "not-ready")),
    )

    lv = top.sub("liveness", ("after", "startup"))
    liveness = LivenessConfig(
        after=lv.number("after", LivenessConfig.after),
        startup=lv.number("startup", LivenessConfig.startup),
    )

    gs = top.sub("gpu", ("source", "devices", "min_free", "interval", "stale_after", "metrics_url", "trend_window"))
    min_free = _parse_min_free(gs.get("min_free"), gs.where("min_free")) if gs.has("min_free") else MinFree()
    gpu = GpuConfig(
        source=gs.string("source", GpuConfig.source, choices=("nvml", "triton-metrics", "none")),
        devices=_parse_devices(gs.get("devices"), gs.where("devices")),
        min_free=min_free,
        interval=gs.number("interval", GpuConfig.interval, positive=True),
        stale_after=gs.number("stale_after", GpuConfig.stale_after),
        metrics_url=gs.string("metrics_url", GpuConfig.metrics_url),
        trend_window=gs.number("trend_window", GpuConfig.trend_window, positive=True),
    )

    golden_raw = top.get("golden_dir", str(Config.golden_dir))
    if not isinstance(golden_raw, str) or not golden_raw:
        raise ConfigError(f"golden_dir: expected a directory path, got {brief(golden_raw)}")
    # normpath, not resolve(): a ConfigMap file is a symlink into a timestamped directory the kubelet replaces
    # on every update; resolving it would pin golden_dir to a directory that later disappears.
    golden_dir = Path(os.path.normpath(base / golden_raw))

    canaries_raw = top.get("canaries", [])
    if canaries_raw is None:
        canaries_raw = []
    if not isinstance(canaries_raw, list):
        raise ConfigError(f"canaries: expected a list, got {type_name(canaries_raw)}")
    canaries = []
    names: dict[str, int] = {}
    for i, c in enumerate(canaries_raw):
        canary = _parse_canary(c, f"canaries[{i}]", base, probe)
        if canary.name in names:
            raise ConfigError(
                f"canaries[{i}].name: duplicate canary name {brief(canary.name)} (also canaries[{names[canary.name]}])"
            )
        names[canary.name] = i
        golden = Path(os.path.normpath(golden_dir / f"{canary.name}.json"))
        if golden.parent != golden_dir:  # pragma: no cover - NAME_RE already prevents it; kept as a guard
            raise ConfigError(f"canaries[{i}].name: {brief(canary.name)} would escape golden_dir")
        canaries.append(canary)
    return Config(
        path=path,
        triton=TritonConfig(url=url, ssl=ssl, tls=tls, max_reply=max_reply, metrics_url=metrics_url),
        listen=ListenConfig(host=host, port=port, reasons=reasons),
        probe=probe,
        liveness=liveness,
        gpu=gpu,
        golden_dir=golden_dir,
        canaries=tuple(canaries),
    )


# What a config file may make the probe read and build (see the README, "Configuration reference").
CONFIG_MAX_BYTES = 1024**2
YAML_MAX_DEPTH = 64
YAML_ALIAS_MAX_VALUES = 10_000
"""Aliases are allowed (an anchored input spec reused by several canaries), but all their uses together may add at
most this many values to the document: a nine-level `&a [*a, *a, ...]` bomb adds 387 million."""
_MERGE_TAG = "tag:yaml.org,2002:merge"
_YAML_LOADER: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _trim(path: str) -> str:
    """The key path of an alias use, up to its last key: `fill.data`, not `fill.data[0][3][1]`."""
    cut = path
    while cut.endswith("]") and "[" in cut and not cut.startswith("["):
        cut = cut[: cut.rindex("[")]
    return cut or path or "config"


def check_yaml_nodes(root: yaml.Node) -> None:
    """Checks on the YAML node graph, before anything is built from it: no duplicate key in a mapping, no alias
    that contains itself, at most `YAML_MAX_DEPTH` levels, and aliases adding at most `YAML_ALIAS_MAX_VALUES`
    values. Each node is walked once (an alias is the same node object as its anchor), so a bomb is refused in
    microseconds, not expanded. Raises `ConfigError` naming the key path."""
    walked: dict[int, tuple[int, int]] = {}  # id(node) -> (values it expands to, levels below it)
    active: set[int] = set()
    added = 0

    def walk(node: yaml.Node, path: str, depth: int) -> tuple[int, int]:
        nonlocal added
        ident = id(node)
        if ident in active:
            raise ConfigError(f"{_trim(path)}: recursive YAML alias (a value that contains itself)")
        seen = walked.get(ident)
        if seen is not None:  # a second occurrence of a node is an alias: it expands to the whole value again
            added += seen[0]
            if added > YAML_ALIAS_MAX_VALUES:
                raise ConfigError(f"{_trim(path)}: YAML aliases expand to more than {YAML_ALIAS_MAX_VALUES} values")
            if depth + seen[1] > YAML_MAX_DEPTH:
                raise ConfigError(f"{_trim(path)}: nested more than {YAML_MAX_DEPTH} levels deep")
            return seen
        if depth > YAML_MAX_DEPTH:
            raise ConfigError(f"{_trim(path)}: nested more than {YAML_MAX_DEPTH} levels deep")
        active.add(ident)
        values, height = 1, 0
        children: list[tuple[yaml.Node, str]] = []
        if isinstance(node, yaml.MappingNode):
            keys: set[tuple[str, str]] = set()
            for k, v in node.value:
                if k.tag == _MERGE_TAG:  # `<<: *defaults`: the merged keys land at this level
                    children.append((v, path))
                    continue
                name = str(k.value) if isinstance(k, yaml.ScalarNode) else "?"
                where = f"{path}.{_key(name)}" if path else _key(name)
                if isinstance(k, yaml.ScalarNode):
                    if (k.tag, k.value) in keys:
                        raise ConfigError(f"{where}: duplicate key")
                    keys.add((k.tag, k.value))
                children += [(k, where), (v, where)]
        elif isinstance(node, yaml.SequenceNode):
            children = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        for child, where in children:
            n, h = walk(child, where, depth + 1)
            values += n
            height = max(height, h + 1)
        active.discard(ident)
        walked[ident] = (values, height)
        return values, height

    walk(root, "", 0)


def _read_config(p: Path) -> str:
    try:
        with open(p, "rb") as f:
            # A regular file over the cap is refused by its size, unread; a pipe by what it sends.
            small = os.fstat(f.fileno()).st_size <= CONFIG_MAX_BYTES
            data = f.read(CONFIG_MAX_BYTES + 1) if small else None
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror or e}") from None
    if data is None or len(data) > CONFIG_MAX_BYTES:
        raise ConfigError(f"{p}: config file is over the {format_bytes(CONFIG_MAX_BYTES)} cap; not read")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: cannot read config: not UTF-8 ({e.reason} at byte {e.start})") from None


def load_config(path: str | Path) -> Config:
    """Read and validate a config file. Raises `ConfigError` with a one-line, key-path-first message."""
    p = Path(path)
    text = _read_config(p)
    loader = _YAML_LOADER(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            check_yaml_nodes(node)
        raw = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{p}: invalid YAML{at}: {clip(str(problem))}") from None
    except RecursionError:
        raise ConfigError(f"{p}: invalid YAML: nested too deeply") from None
    except ValueError as e:  # ConfigError from the node checks, or an integer beyond Python's 4300 digits
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{p}: invalid YAML: {clip(str(e))}") from None
    finally:
        loader.dispose()
    if raw is None:
        raw = {}
    cfg = parse_config(raw, Path(os.path.normpath(p.absolute())))
    if cfg.golden_dir.exists() and not cfg.golden_dir.is_dir():
        raise ConfigError(f"golden_dir: {cfg.golden_dir} exists and is not a directory")
    return cfg


def derived_metrics_url(cfg: Config) -> str:
    """Triton's metrics endpoint: explicit gpu.metrics_url / triton.metrics_url, else Triton's host on 8002."""
    if cfg.gpu.metrics_url:
        return cfg.gpu.metrics_url
    if cfg.triton.metrics_url:
        return cfg.triton.metrics_url
    host = cfg.triton.url.rpartition(":")[0]
    return f"http://{host}:8002/metrics"
