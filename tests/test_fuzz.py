"""Property fuzzing of everything that reads untrusted input: config, golden files, HTTP requests and replies.

The properties are the contract's "never a bare traceback" and "only 200/404/405/503" promises:
- any decoded YAML (or any file text) gives a `Config` or a one-line `ConfigError`, never another exception;
- any decoded JSON (or any file text) gives a `Golden` or a one-line `GoldenError`;
- any request the HTTP parser lets through is answered 200, 404, 405 or 503 (never 500), and the aggregate
  endpoints answer exactly what the checks say;

The regression tests at the end pin the bugs these fuzzers found (huge integers, non-ASCII digits, line breaks
in keys), each with the smallest input that triggered it.
"""

from __future__ import annotations

import asyncio
import copy
import json
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from probe.checks.base import CheckResult, Kind, failed, passed
from probe.checks.lifecycle import Lifecycle
from probe.config import Config, ConfigError, load_config, parse_config
from probe.golden import Golden, GoldenError, load_golden, parse_golden
from probe.runner import Runner
from probe.server import Health, Serving, serve
from tests.helpers import wired

FUZZ = settings(
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# ---------------------------------------------------------------------------------------------- strategies

CHARS = st.characters(codec="utf-8", exclude_categories=["Cs"])
TEXT = st.text(CHARS, max_size=30)
KEY_TEXT = st.text(CHARS, max_size=20)
INTS = st.integers()


def one_line(message: str) -> bool:
    return bool(message.strip()) and len(message.splitlines()) == 1


def assert_one_line(message: str, raw: Any) -> None:
    assert one_line(message), repr(message)


CONFIG_KEYS = tuple(
    "triton url metrics_url listen host port probe timeout min_interval interval drain hang_backoff liveness after "
    "startup gpu source devices min_free stale_after trend_window golden_dir canaries name model version inputs "
    "datatype shape fill value random seed file data outputs compare mode rtol atol latency max_ms drift window".split()
)

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    INTS,
    st.floats(),
    TEXT,
    st.sampled_from(["zeros", "ones", "auto", "nvml", "none", "exact", "tolerance", "FP32", "BYTES", "2GiB", "10%"]),
    st.sampled_from(["127.0.0.1:8000", "http://h:1", "https://h:2/", "h:0", ":80", "h:", "http://[::1]:8000"]),
)
YAML_KEYS = st.one_of(st.sampled_from(CONFIG_KEYS), KEY_TEXT, INTS, st.none(), st.booleans())


def yamlish(keys: st.SearchStrategy[Any] = YAML_KEYS, scalars: st.SearchStrategy[Any] = SCALARS) -> Any:
    """Anything yaml.safe_load can return (minus dates and bytes, which behave like any other scalar)."""
    return st.recursive(
        scalars,
        lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(keys, kids, max_size=5)),
        max_leaves=25,
    )


def _paths(value: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every location in a nested dict/list document, the document itself first."""
    out = [here]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*here, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*here, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, value: Any, leaf: st.SearchStrategy[Any], keys: st.SearchStrategy[Any]) -> Any:
    """`value` with one to four edits at random locations (any depth): a key or item dropped, a value retyped,
    a key added, a list item duplicated. Picking locations uniformly reaches deep fields as often as top ones."""
    doc = copy.deepcopy(value)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(_paths(doc)))
        if not where:
            continue
        parent = doc
        for step in where[:-1]:
            parent = parent[step]
        last = where[-1]
        op = draw(st.sampled_from(["drop", "retype", "retype", "add", "dup"]))
        if op == "drop":
            del parent[last]
        elif op == "retype":
            parent[last] = draw(leaf)
        elif op == "add" and isinstance(parent[last], dict):
            parent[last][draw(keys)] = draw(leaf)
        elif op == "dup" and isinstance(parent[last], list) and parent[last]:
            parent[last].append(copy.deepcopy(parent[last][0]))
        else:
            parent[last] = draw(leaf)
    return doc


VALID_CONFIG: dict[str, Any] = {
    "triton": {"url": "http://127.0.0.1:8000", "metrics_url": "http://127.0.0.1:8002/metrics"},
    "listen": {"host": "0.0.0.0", "port": 8080},
    "probe": {"timeout": 0.8, "min_interval": 1.0, "interval": 10.0, "drain": 5.0, "hang_backoff": 10.0},
    "liveness": {"after": 60, "startup": 600},
    "gpu": {"source": "nvml", "devices": ["0", "GPU-abc"], "min_free": "2GiB", "interval": 2.0, "stale_after": 0},
    "golden_dir": "golden",
    "canaries": [
        {
            "name": "resnet",
            "model": "resnet50",
            "version": "1",
            "inputs": [
                {"name": "INPUT__0", "datatype": "FP32", "shape": [1, 3, 4, 4], "fill": {"random": {"seed": 7}}},
                {"name": "T", "datatype": "BYTES", "shape": [2], "fill": {"data": ["a", "b"]}},
                {"name": "V", "datatype": "INT8", "shape": [2], "fill": {"value": 3}},
                {"name": "F", "datatype": "FP16", "shape": [1], "fill": {"file": "x.npy"}},
                {"name": "Z", "datatype": "BOOL", "shape": [1], "fill": "zeros"},
            ],
            "outputs": ["OUTPUT__0"],
            "timeout": 0.7,
            "compare": {"mode": "tolerance", "rtol": 1e-5, "atol": 1e-6},
            "latency": {"max_ms": 50, "drift": 3.0, "window": 5},
        },
        {"name": "typed", "model": "typed", "inputs": [{"name": "B", "datatype": "BOOL", "shape": [3]}]},
    ],
}

CONFIG_INPUTS = st.one_of(yamlish(), mutated(VALID_CONFIG, SCALARS | yamlish(), YAML_KEYS))


def _decoded(decode: Any, text: str | bytes) -> Any:
    """The document a file held, for judging an error message; None when it does not decode."""
    try:
        return decode(text)
    except Exception:
        return None


def _write(path: Path, text: str | bytes) -> Path:
    """The fuzzed file as given: bytes as they are, text as UTF-8."""
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ---------------------------------------------------------------------------------------------- config


def test_the_valid_config_the_mutations_start_from_is_valid() -> None:
    cfg = parse_config(copy.deepcopy(VALID_CONFIG), Path("/etc/probe/probe.yaml"))
    assert [c.name for c in cfg.canaries] == ["resnet", "typed"]
    assert cfg.gpu.min_free.bytes == 2 * 1024**3


@FUZZ
@given(raw=CONFIG_INPUTS)
def test_any_decoded_yaml_is_a_config_or_a_one_line_config_error(raw: Any) -> None:
    try:
        cfg = parse_config(raw, Path("/etc/probe/probe.yaml"))
    except ConfigError as e:
        event("ConfigError at " + str(e).split(":")[0][:40])
        assert_one_line(str(e), raw)
        assert ": " in str(e), f"no key path in {str(e)!r}"
    else:
        event("Config")
        assert isinstance(cfg, Config)
        assert 0 < cfg.probe.timeout and all((c.timeout or 0) <= cfg.probe.timeout for c in cfg.canaries)


YAML_TEXT = st.one_of(
    st.text(CHARS, max_size=200),
    st.builds(lambda raw: yaml.safe_dump(raw, allow_unicode=True), CONFIG_INPUTS),
    # a valid-looking document with a splice of random text at a random place
    st.builds(
        lambda doc, at, junk: doc[:at] + junk + doc[at:],
        st.just(yaml.safe_dump(VALID_CONFIG)),
        st.integers(0, len(yaml.safe_dump(VALID_CONFIG))),
        st.text(CHARS, min_size=1, max_size=8)
        | st.sampled_from([":", "- ", "\t", "{", "[", "&a", "*a", "!!binary", "'"]),
    ),
)


@FUZZ
@given(text=YAML_TEXT | st.binary(max_size=200))
def test_any_config_file_loads_or_gives_a_one_line_config_error(fuzz_dir: Path, text: str | bytes) -> None:
    path = _write(fuzz_dir / "probe.yaml", text)
    try:
        cfg = load_config(path)
    except ConfigError as e:
        assert_one_line(str(e), _decoded(yaml.safe_load, text))
    else:
        assert isinstance(cfg, Config) and cfg.path.resolve() == path.resolve()


# ---------------------------------------------------------------------------------------------- golden

DIGEST = "xxh3_128:" + "0123456789abcdef" * 2
VALID_GOLDEN: dict[str, Any] = {
    "format": 1,
    "canary": "demo",
    "model": "demo_classifier",
    "version": "",
    "input_digest": "xxh3_128:" + "f" * 32,
    "compare": "exact",
    "records": [
        {
            "environment": {"gpus": ["NVIDIA A100"], "driver": "550.54", "cuda_driver": "12.4", "triton": "2.51.0"},
            "environment_id": "abc",
            "recorded_at": "2024-05-01T00:00:00Z",
            "tool_version": "0.1.0",
            "outputs": {"PROBS": {"datatype": "FP32", "shape": [1, 10], "digest": DIGEST}},
            "latency": {"runs": 3, "median_ms": 1.5, "min_ms": 1.0, "max_ms": 2.0, "samples_ms": [1.0, 1.5, 2.0]},
            "tensors": False,
        }
    ],
}
GOLDEN_KEYS = st.one_of(
    st.sampled_from(
        "format canary model version input_digest compare records environment outputs datatype shape digest "
        "latency runs median_ms min_ms max_ms samples_ms tensors".split()
    ),
    KEY_TEXT,
)
# What json.loads can return (it reads NaN and Infinity too).
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    INTS,
    st.floats(),
    TEXT,
    st.sampled_from([DIGEST, "xxh3_128:", "exact", "tolerance", "FP32", "BYTES", 1, 0, -1]),
)
GOLDEN_INPUTS = st.one_of(
    yamlish(GOLDEN_KEYS, JSON_SCALARS),
    mutated(VALID_GOLDEN, JSON_SCALARS | yamlish(GOLDEN_KEYS, JSON_SCALARS), GOLDEN_KEYS),
)


def test_the_valid_golden_the_mutations_start_from_is_valid() -> None:
    g = parse_golden(copy.deepcopy(VALID_GOLDEN), Path("/g/demo.json"))
    assert g.canary == "demo" and g.records[0].outputs["PROBS"].shape == (1, 10)


@FUZZ
@given(raw=GOLDEN_INPUTS)
def test_any_decoded_json_is_a_golden_or_a_one_line_golden_error(raw: Any) -> None:
    try:
        golden = parse_golden(raw, Path("/g/demo.json"))
    except GoldenError as e:
        event("GoldenError: " + str(e).removeprefix("/g/demo.json: ")[:40])
        assert_one_line(str(e), raw)
        assert str(e).startswith("/g/demo.json"), str(e)
    else:
        event("Golden")
        assert isinstance(golden, Golden) and golden.records


@FUZZ
@given(
    text=st.one_of(
        st.text(CHARS, max_size=200),
        st.builds(lambda raw: json.dumps(raw), GOLDEN_INPUTS),
        st.builds(
            lambda doc, at, junk: doc[:at] + junk + doc[at:],
            st.just(json.dumps(VALID_GOLDEN)),
            st.integers(0, len(json.dumps(VALID_GOLDEN))),
            st.text(CHARS, min_size=1, max_size=6)
            | st.sampled_from(["{", "]", ",", '"', "NaN", "1e999", '"tensors": true, ']),
        ),
        st.binary(max_size=100),
    )
)
def test_any_golden_file_loads_or_gives_a_one_line_golden_error(fuzz_dir: Path, text: str | bytes) -> None:
    path = _write(fuzz_dir / "demo.json", text)
    try:
        golden = load_golden(path)
    except GoldenError as e:
        assert_one_line(str(e), _decoded(json.loads, text))
    else:
        assert isinstance(golden, Golden)


# ---------------------------------------------------------------------------------------------- known bugs


def _canary(**fill: Any) -> dict[str, Any]:
    return {"name": "c", "model": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], **fill}]}


def test_huge_integer_duration_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^probe\.timeout: "):
        parse_config({"probe": {"timeout": 10**400}}, Path("/p.yaml"))


def test_huge_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^gpu\.min_free: "):
        parse_config({"gpu": {"min_free": "9" * 400 + "GiB"}}, Path("/p.yaml"))


@pytest.mark.parametrize("url", ["host:²", "host:٨٠"])
def test_non_ascii_digit_port_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^triton\.url: "):
        parse_config({"triton": {"url": url}}, Path("/p.yaml"))


@pytest.mark.parametrize("url", ["http://[::1:8000", "http://h\uff03x:8000"])
def test_unparseable_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^triton\.url: "):
        parse_config({"triton": {"url": url}}, Path("/p.yaml"))


@pytest.mark.parametrize(
    "raw",
    [{"tri\nton": {}}, {"canaries": [_canary(fill={"va\nlue": 1})]}],
    ids=["unknown-key", "unknown-fill"],
)
def test_key_with_a_line_break_is_reported_on_one_line(raw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(raw, Path("/p.yaml"))
    assert one_line(str(e.value)), repr(str(e.value))


def test_config_with_a_5000_digit_number_is_a_config_error(fuzz_dir: Path) -> None:
    path = fuzz_dir / "long-number.yaml"
    path.write_text("probe:\n  timeout: " + "1" * 5000 + "\n")
    with pytest.raises(ConfigError):
        load_config(path)


@pytest.mark.parametrize(
    "latency",
    [
        {"runs": float("inf"), "median_ms": 1.0},
        {"runs": 3, "median_ms": 10**400},
        {"runs": 3, "median_ms": 1, "samples_ms": [10**400]},
    ],
    ids=["runs-inf", "median-huge", "sample-huge"],
)
def test_non_finite_latency_baseline_is_a_golden_error(latency: dict[str, Any]) -> None:
    raw = copy.deepcopy(VALID_GOLDEN)
    raw["records"][0]["latency"] = latency
    with pytest.raises(GoldenError, match=r"latency"):
        parse_golden(raw, Path("/g/demo.json"))


def test_output_name_with_a_line_break_is_reported_on_one_line() -> None:
    raw = copy.deepcopy(VALID_GOLDEN)
    raw["records"][0]["outputs"] = {"PRO\nBS": {"datatype": "FP32", "shape": [-1], "digest": DIGEST}}
    with pytest.raises(GoldenError) as e:
        parse_golden(raw, Path("/g/demo.json"))
    assert one_line(str(e.value)), repr(str(e.value))


def test_golden_with_a_5000_digit_number_is_a_golden_error(fuzz_dir: Path) -> None:
    path = fuzz_dir / "long-number.json"
    path.write_text('{"format": ' + "1" * 5000 + "}")
    with pytest.raises(GoldenError, match="corrupt golden file"):
        load_golden(path)


# ---------------------------------------------------------------------------------------------- HTTP


KINDS = {
    "triton": Kind.SERVER,
    "model/demo": Kind.MODEL,
    "canary/demo": Kind.CANARY,
    "latency/demo": Kind.LATENCY,
    "gpu": Kind.GPU,
}


class ScenarioCheck:
    """A check whose verdict the fuzzer sets before each request."""

    timeout: float | None = None

    def __init__(self, name: str) -> None:
        self.name = name
        self.names = (name,)
        self.result: CheckResult = passed(name, KINDS[name])

    async def run(self) -> Sequence[CheckResult]:
        return [self.result]

    def timed_out(self, after: float) -> Sequence[CheckResult]:
        return [failed(self.name, KINDS[self.name], "timed out", restart_worthy=True)]

    async def explain_timeout(self, after: float) -> Sequence[CheckResult]:
        return self.timed_out(after)


CHECKS = tuple(KINDS)
ALL_NAMES = (*CHECKS, "shutdown", "ping")
# What aiohttp's own parser answers to a request it refuses before any handler runs.
PARSER_REJECTS = {400, 413, 414, 431}


@dataclass
class App:
    loop: asyncio.AbstractEventLoop
    server: Serving
    checks: dict[str, ScenarioCheck]
    lifecycle: Lifecycle
    runner: Runner


@pytest.fixture(scope="module")
def http_app() -> Iterator[App]:
    """One app on its own event loop for all examples; each example drives the loop to send one request.

    Hypothesis cannot re-enter an async fixture per example, so the loop is run by hand here.
    """
    checks = {n: ScenarioCheck(n) for n in CHECKS}
    w = wired(list(checks.values()))
    health = Health(w.runner, w.liveness, timeout=0.5)
    loop = asyncio.new_event_loop()
    # The same listener `probe serve` uses.
    serving = loop.run_until_complete(serve(health, "127.0.0.1", 0, metrics=w.metrics.expose, max_connections=64))
    try:
        yield App(loop, serving, checks, w.lifecycle, w.runner)
    finally:
        loop.run_until_complete(serving.close())
        loop.close()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


async def send_raw(port: int, request: bytes) -> Response:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(-1), 5)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), f"not an HTTP answer: {raw[:200]!r}"
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return Response(status, headers, body)


def quote(text: str, safe: str = "") -> str:
    return urllib.parse.quote(text, safe=safe)


@dataclass
class Scenario:
    failing: frozenset[str]
    restart_worthy: bool
    shutting_down: bool


@dataclass
class Request:
    method: str
    route: str
    """ready | live | ready/<check> | live/<check> | metrics | other"""
    check: str
    target: str
    excluded: list[str]
    verbose: bool
    wants_json: bool
    clean: bool
    """True when the target was built from known parts, so the exact answer can be predicted."""
    raw: bytes


METHODS = st.sampled_from(["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"])
WEIRD_METHODS = st.sampled_from(["FOO", "get", "G-E_T", "PROPFIND", "M-SEARCH", "CONNECT", "QUERY", "BREW", "X" * 40])
ACCEPTS = st.one_of(
    st.sampled_from(
        [
            "",
            "application/json",
            "application/health+json",
            "text/plain",
            "*/*",
            "application/json;q=0.9, text/plain;q=1",
            "text/html,application/xhtml+xml",
            "APPLICATION/JSON",
            "application/jsonx",
        ]
    ),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60),
    st.integers(100, 7000).map(lambda n: "text/plain;" + "q" * n),
)
HEADER_NAMES = st.from_regex(r"\AX-[A-Za-z0-9-]{1,20}\Z")
HEADER_VALUES = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
    st.integers(1000, 8000).map(lambda n: "v" * n),
)
CHECK_NAMES = st.one_of(st.sampled_from([*ALL_NAMES, "nope", "canary", "canary/", "model/other"]), TEXT)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    kind = draw(st.integers(0, 9))
    method = "GET" if kind < 6 else "HEAD" if kind < 7 else draw(METHODS) if kind < 9 else draw(WEIRD_METHODS)
    route = draw(st.sampled_from(["ready", "live", "ready/", "live/", "metrics", "other"]))
    check = ""
    clean = True
    if route in ("ready", "live", "metrics"):
        path = "/" + route
    elif route.endswith("/"):
        check = draw(CHECK_NAMES)
        route += "<check>"
        path = "/" + route.split("/")[0] + "/" + quote(check, safe=draw(st.sampled_from(["", "/"])))
    else:
        path = draw(
            st.one_of(
                st.sampled_from(
                    ["/", "/healthz", "/readyz", "/ready/", "//ready", "/ready//", "/READY", "/ready.json"]
                ),
                st.sampled_from(["/ready/../live", "/%2e%2e/ready", "/ready%2Fgpu", "*", "http://127.0.0.1/ready"]),
                st.sampled_from(["/ready/%zz", "/ready/%ff%fe", "/live/%00", "/ready/a%20b", "/metrics/x"]),
                TEXT.map(lambda t: "/" + quote(t, safe="/")),
            )
        )
        clean = False
    params: list[tuple[str, str]] = draw(
        st.lists(
            st.one_of(
                st.tuples(st.just("exclude"), st.one_of(st.sampled_from(ALL_NAMES), TEXT)),
                st.tuples(st.just("verbose"), st.sampled_from(["", "1", "0", "false"])),
                st.tuples(TEXT.filter(lambda k: k not in ("exclude", "verbose")), TEXT),
            ),
            max_size=5,
        )
    )
    parts = []
    for k, v in params:
        parts.append(quote(k) if (k == "verbose" and not v) else f"{quote(k)}={quote(v)}")
    query = "&".join(parts)
    if draw(st.integers(0, 9)) == 0:  # junk the query parser must survive
        query += draw(st.sampled_from(["&&=", "=", "%", "%zz", "exclude=%ff", "a=b=c", ";", "+&+"]))
        clean = False
    target = path + ("?" + query if query or draw(st.booleans()) else "")
    accept = draw(ACCEPTS)
    extra = draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=3))
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    if accept:
        lines.append(f"Accept: {accept}")
    lines += [f"{k}: {v}" for k, v in extra]
    body = b""
    if draw(st.integers(0, 4)) == 0:
        body = draw(st.binary(max_size=64))
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body
    return Request(
        method=method,
        route=route,
        check=check,
        target=target,
        excluded=[v for k, v in params if k == "exclude"],
        # `?verbose` asks for the verbose view; `?verbose=0` or `=false` (the last one given) does not.
        verbose=[v for k, v in params if k == "verbose"][-1:] not in ([], ["0"], ["false"]),
        wants_json="application/json" in accept or "application/health+json" in accept,
        clean=clean and method in ("GET", "HEAD"),
        raw=raw,
    )


SCENARIOS = st.builds(
    Scenario,
    failing=st.one_of(st.just(frozenset[str]()), st.frozensets(st.sampled_from(CHECKS), max_size=2)),
    restart_worthy=st.booleans(),
    shutting_down=st.integers(0, 9).map(lambda n: n == 0),
)


def _arrange(app: App, scenario: Scenario) -> dict[str, bool]:
    """Set each check's verdict; return which checks /ready should see passing."""
    for name, check in app.checks.items():
        if name in scenario.failing:
            reason = f"{name} broken\nsecond line"
            check.result = failed(name, KINDS[name], reason, restart_worthy=scenario.restart_worthy)
        else:
            check.result = passed(name, KINDS[name])
    app.lifecycle.shutting_down = scenario.shutting_down
    app.lifecycle.signal_name = "SIGTERM" if scenario.shutting_down else ""
    ok = {n: n not in scenario.failing for n in CHECKS}
    ok["shutdown"] = not scenario.shutting_down
    ok["ping"] = True
    return ok


@settings(FUZZ, max_examples=300)
@given(scenario=SCENARIOS, req=requests())
def test_any_request_is_answered_200_404_405_or_503(http_app: App, scenario: Scenario, req: Request) -> None:
    ok = _arrange(http_app, scenario)
    port = http_app.server.port
    assert port is not None
    resp = http_app.loop.run_until_complete(send_raw(port, req.raw))
    status = resp.status
    event(f"{req.route if req.clean else 'unpredictable'} -> {status}")
    assert status != 500, f"{req.raw[:300]!r} -> 500 {resp.body[:300]!r}"
    assert status in {200, 404, 405, 503} | PARSER_REJECTS, (status, req.raw[:300])
    if not req.clean:
        return
    if req.method == "HEAD":
        assert resp.body == b""
    if req.route == "ready":
        want = 200 if all(v for n, v in ok.items() if n not in req.excluded) else 503
        assert status == want, (status, scenario, req.target)
    elif req.route == "live":
        assert status in (200, 503)
    elif req.route == "metrics":
        assert status == 200
        if req.method == "GET":
            assert b"probe_runs_total" in resp.body
        return
    elif req.route == "live/<check>" and req.check == "ping":
        assert status == 200
        return
    elif req.route == "ready/<check>":
        want = (200 if ok[req.check] else 503) if req.check in ok else 404
        assert status == want, (status, scenario, req.target)
        return
    else:  # live/<check>: the liveness view of the check, or 404 (shutdown never fails liveness: not listed)
        assert status in ((200, 503) if req.check in ok and req.check != "shutdown" else (404,))
        return
    # Aggregates: the body says the same thing as the status, in the format asked for.
    if req.method != "GET":
        return
    kind = req.route
    passing = status == 200
    if req.wants_json:
        assert resp.headers["content-type"].startswith("application/health+json")
        body = json.loads(resp.body)
        assert body["status"] == ("pass" if passing else "fail")
        assert not set(body["checks"]) & set(req.excluded)
    elif req.verbose:
        lines = resp.body.decode().splitlines()
        assert lines[-1] == f"{kind} check {'passed' if passing else 'failed'}"
        assert not any("broken" in ln for ln in lines), "the aggregate must withhold reasons"
    else:
        assert resp.body.decode() == ("ok" if passing else f"{kind} check failed")


@settings(FUZZ, max_examples=40)
@given(
    method=METHODS | WEIRD_METHODS, size=st.sampled_from([9000, 20000, 70000]), where=st.sampled_from(["url", "header"])
)
def test_oversized_requests_are_refused_by_the_parser_not_the_handler(
    http_app: App, method: str, size: int, where: str
) -> None:
    """Beyond aiohttp's line and field limits the parser answers 4xx; nothing reaches a handler as a 500."""
    target = "/ready?exclude=" + "x" * size if where == "url" else "/ready"
    header = f"X-Big: {'y' * size}\r\n" if where == "header" else ""
    raw = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{header}Connection: close\r\n\r\n".encode()
    port = http_app.server.port
    assert port is not None
    resp = http_app.loop.run_until_complete(send_raw(port, raw))
    assert resp.status in PARSER_REJECTS, resp.status
