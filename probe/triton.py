"""The probe's only way to talk to Triton: one aiohttp `ClientSession`, every reply read with a bound.

`tritonclient.http.aio` builds each canary's inference body once (`generate_request_body`) and decodes the JSON
header of each answer (`parse_response_body`); aiohttp carries the bytes. tritonclient's own client is not used
for the wire because it reads every reply whole, without a bound, and asks Triton to gzip them.

Every call raises one of two exceptions with a one-line reason, so checks can turn them into results:
`TritonUnreachable` (no connection, reset, malformed or oversized reply: the server process is in trouble) and
`TritonRequestError` (Triton answered, with an error). Deadlines are the caller's: cancelling a call (the runner's
`asyncio.timeout`) aborts its connection, so a timed-out canary is not left queued on a reused one.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import ssl as ssl_module
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import numpy as np
from yarl import URL

from probe import __version__
from probe.config import CanaryConfig, TlsConfig

# Health, metadata, config and statistics replies, and the JSON header of an inference reply.
JSON_CAP = 1024 * 1024
# Triton's Prometheus page: a few KB per model and GPU; a server with hundreds of models stays well under this.
METRICS_CAP = 8 * 1024 * 1024
# A backstop only: the runner's deadline (or the caller's) is what bounds every request.
BACKSTOP_S = 60.0
# Idle pooled connections to Triton are closed after this long (Triton's own keep-alive is longer).
CLIENT_KEEPALIVE_S = 15.0
# BYTES elements decoded between two yields to the event loop. A BYTES output's size is not in the golden, so its
# reply is capped by triton.max_reply only, and millions of tiny strings within it are seconds of pure Python: the
# canary's deadline must still cancel the decode, and /live/ping be answered meanwhile.
BYTES_SLICE = 4096


class TritonUnreachable(Exception):
    """No usable answer from Triton: connection refused or reset, or a reply that is not Triton's."""


class ReplyTooLarge(TritonUnreachable):
    """A reply over its cap: refused without reading on."""


class TritonRequestError(Exception):
    """Triton answered with an error (unknown model, inference failed, bad request)."""


@dataclass(frozen=True)
class TensorMeta:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelInfo:
    """A model's metadata and the parts of its config that identify how it runs."""

    name: str
    versions: tuple[str, ...]
    platform: str
    backend: str
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    decoupled: bool = False
    """`model_transaction_policy.decoupled`: Triton answers such a model only through generate or streaming."""


@dataclass(frozen=True)
class InferOutcome:
    """What one canary inference returned: output name -> (datatype, tensor), and its wall latency.

    The tensors of binary outputs are read-only views on the reply's own buffer: nothing is copied."""

    outputs: dict[str, tuple[str, np.ndarray[Any, Any]]]
    latency_s: float
    details: dict[str, Any] = field(default_factory=dict)


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt): .+")


def one_line(e: BaseException | str) -> str:
    """One line: the first line of the message, with a backend traceback replaced by its exception line."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__ if isinstance(e, BaseException) else "no message"
    first = lines[0]
    if "Traceback" in first:
        head = first.split("Traceback", 1)[0].rstrip(" :")
        causes = [ln for ln in lines[1:] if _EXC_LINE.match(ln) and "Traceback" not in ln]
        if causes:
            return f"{head}: {causes[-1]}"[:500] if head else causes[-1][:500]
        return head[:500]
    return first[:500]


@dataclass(frozen=True)
class _Request:
    inputs: dict[str, np.ndarray[Any, Any]]
    outputs: tuple[str, ...] | None
    url: URL
    """Parsed once: the canary posts to it on every run."""
    body: bytes
    headers: Mapping[str, str]


def tls_context(tls: TlsConfig) -> ssl_module.SSLContext:
    """The client TLS context for `triton.tls`: the system's CAs or `ca_file`; `verify: false` trusts anything."""
    context = ssl_module.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl_module.CERT_NONE
    return context


def _model_path(model: str, version: str) -> str:
    return f"/v2/models/{quote(model, safe='')}" + (f"/versions/{quote(version, safe='')}" if version else "")


class TritonClient:
    """Owns the sidecar's one `aiohttp.ClientSession` to Triton; open in a startup hook, close in cleanup."""

    def __init__(
        self,
        url: str,
        *,
        ssl: bool = False,
        tls: TlsConfig | None = None,
        conn_limit: int = 32,
    ) -> None:
        self.url = url
        self.ssl = ssl
        self._tls = tls or TlsConfig()
        self._base = f"{'https' if ssl else 'http'}://{url}"
        self._conn_limit = conn_limit
        self._session: aiohttp.ClientSession | None = None
        self._requests: dict[str, _Request] = {}
        self._parse_response: Any = None
        self._np_dtype: Any = None
        self.failures = 0
        """Calls that got no good answer so far, a cancelled canary included (vouching for readiness stops there)."""

    async def open(self) -> None:
        import tritonclient.http.aio as aio  # deferred: importing tritonclient is slow and not needed to validate
        from tritonclient.utils import triton_to_np_dtype

        self._parse_response = aio.InferenceServerClient.parse_response_body
        self._np_dtype = triton_to_np_dtype
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._conn_limit,
                ssl=tls_context(self._tls) if self.ssl else False,
                keepalive_timeout=CLIENT_KEEPALIVE_S,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # Identity: aiohttp asks for gzip by default, and Triton then compresses every reply (a 16 MiB
                # output took 13x longer to its headers). Nothing is decompressed, so nothing unbounded either.
                auto_decompress=False,
                headers={"User-Agent": f"probe/{__version__}", "Accept-Encoding": "identity"},
                # Every call is bounded by its caller (the runner's deadline, the watchers' and the CLI's timeouts);
                # connecting alone has a backstop here, and no per-request timer is armed twice.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=BACKSTOP_S),
            )

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def __aenter__(self) -> TritonClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        """`http(s)://host:port` of Triton's HTTP endpoint."""
        return self._base

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("TritonClient used before open()")
        return self._session

    # ---------------------------------------------------------------------------------------------- the wire

    def _failure(self, what: str, e: BaseException, where: str | None = None) -> TritonUnreachable:
        """One line for a call that got no usable answer; `where` names the endpoint (default: Triton at url)."""
        at = where or f"Triton at {self.url}"
        if isinstance(e, aiohttp.ClientConnectorCertificateError):
            return TritonUnreachable(
                f"{what}: TLS certificate of {at} not trusted ({one_line(e.certificate_error)}); "
                "set triton.tls.ca_file, or triton.tls.verify: false"
            )
        if isinstance(e, aiohttp.ClientConnectorSSLError | aiohttp.ClientSSLError):
            return TritonUnreachable(f"{what}: TLS handshake with {at} failed: {one_line(e)}")
        if isinstance(e, aiohttp.ClientConnectorError):  # its own text says "ssl:default" even for plain HTTP
            cause = e.os_error.strerror or one_line(e.os_error)
            return TritonUnreachable(f"{what}: cannot connect to {at}: {cause}")
        if isinstance(e, TimeoutError):
            return TritonUnreachable(f"{what}: {at} did not answer")
        if isinstance(e, aiohttp.ClientPayloadError):
            return TritonUnreachable(f"{what}: malformed reply from {where or self.url}: reply cut short")
        if isinstance(e, aiohttp.ClientResponseError | ValueError):  # a reply that is not HTTP, or not Triton's
            return TritonUnreachable(f"{what}: malformed reply from {where or self.url}: {one_line(e)}")
        # Server disconnected, connection reset
        return TritonUnreachable(f"{what}: cannot connect to {at}: {one_line(e)}")

    async def _read(self, resp: aiohttp.ClientResponse, cap: int, what: str) -> bytearray:
        """The whole body, refused as soon as it would pass `cap` bytes; never decompressed."""
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise TritonUnreachable(
                f"{what}: malformed reply from {self.url}: Content-Encoding {encoding[:40]!r}, which probe did not "
                "ask for"
            )
        declared = resp.content_length
        if declared is not None and declared > cap:
            raise ReplyTooLarge(f"{what}: reply too large ({declared} bytes > limit {cap})")
        if declared is not None:  # Triton's usual answer: one buffer of the declared size, one copy per byte
            buf = bytearray(declared)
            view = memoryview(buf)
            got = 0
            while got < declared:
                chunk = await resp.content.readany()
                if not chunk:
                    raise TritonUnreachable(f"{what}: malformed reply from {self.url}: reply cut short")
                end = got + len(chunk)
                if end > declared:
                    raise TritonUnreachable(f"{what}: malformed reply from {self.url}: body beyond Content-Length")
                view[got:end] = chunk
                got = end
            return buf
        buf = bytearray()
        while chunk := await resp.content.readany():
            buf += chunk
            if len(buf) > cap:
                raise ReplyTooLarge(f"{what}: reply too large (over limit {cap} bytes)")
        return buf

    async def _exchange(
        self,
        method: str,
        url: str | URL,
        what: str,
        *,
        cap: int,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        where: str | None = None,
    ) -> tuple[int, Mapping[str, str], bytearray]:
        """One request and its bounded reply. A POST whose reused connection was closed before any reply byte is
        sent once more (an inference has no side effects; aiohttp already retries GETs so)."""
        session = self.session
        lost: BaseException | None = None
        for attempt in (1, 2):
            try:
                resp = await session.request(method, url, data=body, headers=headers)
            except aiohttp.ServerDisconnectedError as e:
                if attempt == 1 and method == "POST":
                    lost = e
                    continue
                raise self._failure(what, e, where) from None
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
                if lost is not None:  # the retry could not even connect: the lost request is what went wrong
                    raise self._failure(what, lost, where) from None
                raise self._failure(what, e, where) from None
            try:
                data = await self._read(resp, cap, what)
            except TritonUnreachable:
                resp.close()  # stop reading: the rest of a refused reply is never pulled off the socket
                raise
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                resp.close()
                raise self._failure(what, e, where) from None
            except BaseException:  # cancelled at the deadline: abort, never hand a half-read connection back
                resp.close()
                raise
            resp.release()
            return resp.status, resp.headers, data
        raise AssertionError("unreachable")  # pragma: no cover

    async def _json(self, path: str, what: str) -> Any:
        """GET a JSON endpoint; a non-200 is Triton's error, quoted."""
        try:
            status, _, data = await self._exchange("GET", self._base + path, what, cap=JSON_CAP)
        except TritonUnreachable:
            self.failures += 1
            raise
        if status != 200:
            self.failures += 1
            raise TritonRequestError(f"{what}: {_error_text(status, data)}")
        try:
            return json.loads(data) if data else {}
        except ValueError as e:
            self.failures += 1
            raise TritonUnreachable(f"{what}: malformed reply from {self.url}: {one_line(e)}") from None

    async def _status(self, path: str, what: str) -> bool:
        """GET a health endpoint: 200 is True, any other status False."""
        try:
            status, _, _ = await self._exchange("GET", self._base + path, what, cap=JSON_CAP)
        except TritonUnreachable:
            self.failures += 1
            raise
        return status == 200

    # ---------------------------------------------------------------------------------------------- the calls

    async def live(self) -> bool:
        return await self._status("/v2/health/live", "server live")

    async def ready(self) -> bool:
        return await self._status("/v2/health/ready", "server ready")

    async def server_metadata(self) -> dict[str, Any]:
        meta = await self._json("/v2", "server metadata")
        if not isinstance(meta, dict):
            raise TritonUnreachable(f"server metadata: malformed reply from {self.url}")
        return meta

    async def model_ready(self, model: str, version: str = "") -> bool:
        return await self._status(_model_path(model, version) + "/ready", f"model {model} ready")

    async def model_info(self, model: str, version: str = "") -> ModelInfo:
        path = _model_path(model, version)
        meta = await self._json(path, f"model {model} metadata")
        cfg = await self._json(path + "/config", f"model {model} config")
        try:

            def tensors(items: Any) -> tuple[TensorMeta, ...]:
                return tuple(
                    TensorMeta(str(t["name"]), str(t["datatype"]), tuple(int(d) for d in t["shape"]))
                    for t in items or ()
                )

            policy = cfg.get("model_transaction_policy") or {}
            return ModelInfo(
                name=str(meta.get("name", model)),
                versions=tuple(str(v) for v in meta.get("versions", ())),
                platform=str(cfg.get("platform") or meta.get("platform") or ""),
                backend=str(cfg.get("backend") or ""),
                inputs=tensors(meta.get("inputs")),
                outputs=tensors(meta.get("outputs")),
                decoupled=bool(policy.get("decoupled", False)) if isinstance(policy, dict) else False,
            )
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise TritonUnreachable(f"model {model} metadata: malformed reply: {one_line(e)}") from None

    async def statistics(self, model: str, version: str = "") -> dict[str, Any]:
        stats = await self._json(_model_path(model, version) + "/stats", f"model {model} statistics")
        return stats if isinstance(stats, dict) else {}

    async def metrics_page(self, url: str) -> str:
        """Triton's Prometheus text page (its metrics port), bounded by METRICS_CAP."""
        status, _, data = await self._exchange("GET", url, "Triton metrics", cap=METRICS_CAP, where=url)
        if status != 200:
            raise TritonRequestError(f"HTTP {status}")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TritonUnreachable(f"Triton metrics: malformed reply from {url}: {one_line(e)}") from None

    # ---------------------------------------------------------------------------------------------- canaries

    def _request(
        self, canary: CanaryConfig, inputs: dict[str, np.ndarray[Any, Any]], outputs: tuple[str, ...] | None
    ) -> _Request:
        """The canary's whole inference request, generated once: its inputs never change."""
        import tritonclient.http as http
        import tritonclient.http.aio as aio

        cached = self._requests.get(canary.name)
        if cached is not None and cached.inputs is inputs and cached.outputs == outputs:
            return cached
        req_inputs = []
        for spec in canary.inputs:
            arr = inputs[spec.name]
            inp = http.InferInput(spec.name, list(arr.shape), spec.datatype)
            inp.set_data_from_numpy(arr, binary_data=True)
            req_inputs.append(inp)
        req_outputs = [http.InferRequestedOutput(o, binary_data=True) for o in outputs] if outputs else None
        body, json_size = aio.InferenceServerClient.generate_request_body(req_inputs, outputs=req_outputs)
        headers = {"Content-Type": "application/octet-stream"}
        if json_size is not None:
            headers["Inference-Header-Content-Length"] = str(json_size)
        data = body if isinstance(body, bytes) else body.encode()
        url = URL(self._base + _model_path(canary.model, canary.version) + "/infer", encoded=True)
        request = _Request(inputs, outputs, url, data, headers)
        self._requests[canary.name] = request
        return request

    async def infer(
        self,
        canary: CanaryConfig,
        inputs: dict[str, np.ndarray[Any, Any]],
        outputs: tuple[str, ...] | None,
        *,
        max_reply: int,
    ) -> InferOutcome:
        """One inference of the canary's fixed inputs; outputs=None asks for every output.

        A reply over `max_reply` bytes fails as `reply too large` without being read on."""
        what = f"canary {canary.name} inference"
        req = self._request(canary, inputs, outputs)
        start = time.perf_counter()
        try:
            status, headers, body = await self._exchange(
                "POST", req.url, what, cap=max_reply, body=req.body, headers=req.headers
            )
            latency = time.perf_counter() - start
            if status != 200:
                raise TritonRequestError(f"{what}: {_error_text(status, body)}")
            got = await self._decode(what, headers, body)
        except BaseException:  # cancellation included: readiness is no longer vouched for
            self.failures += 1
            raise
        return InferOutcome(outputs=got, latency_s=latency)

    async def _decode(
        self, what: str, headers: Mapping[str, str], body: bytearray
    ) -> dict[str, tuple[str, np.ndarray[Any, Any]]]:
        """The outputs of an inference reply: the JSON header through tritonclient, binary tensors as views."""
        raw_length = headers.get("Inference-Header-Content-Length")
        try:
            header_length = len(body) if raw_length is None else int(raw_length)
            if not 0 <= header_length <= len(body):
                raise ValueError(f"Inference-Header-Content-Length {raw_length[:20] if raw_length else ''!r}")
            if header_length > JSON_CAP:
                raise ReplyTooLarge(f"{what}: reply too large (JSON header of {header_length} bytes)")
            response = self._parse_response(bytes(body[:header_length])).get_response()
            view = memoryview(body).toreadonly()[header_length:]  # the documented read-only views
            got: dict[str, tuple[str, np.ndarray[Any, Any]]] = {}
            offset = 0
            for out in response.get("outputs", []):
                name, datatype = str(out["name"]), str(out["datatype"])
                shape = [int(d) for d in out["shape"]]
                size = (out.get("parameters") or {}).get("binary_data_size")
                if size is None:
                    arr = np.array(out["data"], dtype=self._np_dtype(datatype))
                else:
                    part = view[offset : offset + int(size)]
                    if len(part) != int(size):
                        raise ValueError(f"output {name}: {size} bytes announced, {len(part)} sent")
                    offset += int(size)
                    if datatype == "BYTES":
                        arr = await _bytes_tensor(name, part, math.prod(shape))
                    else:
                        arr = np.frombuffer(part, dtype=self._np_dtype(datatype))
                got[name] = (datatype, arr.reshape(shape))
            return got
        except ReplyTooLarge:
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            # Not Triton's answer: JSON that does not parse or is not an object, sizes that do not add up.
            raise TritonUnreachable(f"{what}: malformed reply from {self.url}: {one_line(e)}") from None


async def _bytes_tensor(name: str, part: memoryview, count: int) -> np.ndarray[Any, Any]:
    """A BYTES output's `count` length-prefixed elements as a 1-D object array of bytes (what tritonclient's
    `deserialize_bytes_tensor` returns), yielding to the event loop every BYTES_SLICE elements."""
    end = len(part)
    if count * 4 > end:  # every element takes at least its 4-byte length
        raise ValueError(f"output {name}: {count} BYTES elements announced in {end} bytes")
    out = np.empty(count, dtype=np.object_)
    offset = 0
    for i in range(count):
        if i and i % BYTES_SLICE == 0:
            await asyncio.sleep(0)
        if offset + 4 > end:
            raise ValueError(f"output {name}: {count} BYTES elements announced, {i} sent")
        (length,) = struct.unpack_from("<I", part, offset)
        offset += 4
        if offset + length > end:
            raise ValueError(f"output {name}: a BYTES element runs past the output")
        out[i] = bytes(part[offset : offset + length])
        offset += length
    if offset != end:
        raise ValueError(f"output {name}: {end - offset} bytes beyond its {count} BYTES elements")
    return out


def _error_text(status: int, data: bytes | bytearray) -> str:
    """Triton's error message from a non-200 answer, as `[status] message`."""
    text = bytes(data[:4096]).decode("utf-8", errors="replace")
    try:
        message = str(json.loads(text)["error"]) if text else "empty answer"
    except (ValueError, KeyError, TypeError):
        message = text.strip() or "empty answer"
    return f"[{status}] {one_line(message)}"


def input_mismatches(canary: CanaryConfig, info: ModelInfo) -> list[str]:
    """Where the canary's inputs disagree with the model's metadata (names, datatypes, shapes with -1 dims)."""
    problems: list[str] = []
    model_inputs = {t.name: t for t in info.inputs}
    for spec in canary.inputs:
        meta = model_inputs.get(spec.name)
        if meta is None:
            have = ", ".join(model_inputs) or "none"
            problems.append(f"input {spec.name} is not an input of model {canary.model} (it has {have})")
            continue
        if meta.datatype != spec.datatype:
            problems.append(f"input {spec.name} datatype {spec.datatype} != model's {meta.datatype}")
        if len(meta.shape) != len(spec.shape) or any(
            m != -1 and m != s for m, s in zip(meta.shape, spec.shape, strict=False)
        ):
            problems.append(f"input {spec.name} shape {list(spec.shape)} does not fit model's {list(meta.shape)}")
    given = {s.name for s in canary.inputs}
    for name in model_inputs:
        if name not in given:
            problems.append(f"model {canary.model} input {name} has no canary input")
    if canary.outputs:
        model_outputs = {t.name for t in info.outputs}
        for o in canary.outputs:
            if o not in model_outputs:
                problems.append(f"output {o} is not an output of model {canary.model}")
    return problems
