"""The probe's only way to talk to Triton: a thin async wrapper over `tritonclient.http.aio`.

Every call raises one of two exceptions with a one-line reason, so checks can turn them into results:
`TritonUnreachable` (no connection, reset, malformed reply: the server process is in trouble) and
`TritonRequestError` (Triton answered, with an error). Deadlines are the caller's: cancelling a call (the
runner's `asyncio.wait_for`) closes its HTTP request, so a timed-out canary is not left queued in the client.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl as ssl_module
import time
import zlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import numpy as np

from probe import __version__
from probe.config import CanaryConfig
from probe.http1 import ConnectionPool, MalformedReply


class _NeverRaised(Exception):
    """Stands in for tritonclient's InferenceServerException until open() imports it."""


class TritonUnreachable(Exception):
    """No usable answer from Triton: connection refused or reset, or a reply that is not Triton's."""


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


@dataclass(frozen=True)
class InferOutcome:
    """What one canary inference returned: output name -> (datatype, tensor), and its wall latency."""

    outputs: dict[str, tuple[str, np.ndarray[Any, Any]]]
    latency_s: float
    details: dict[str, Any] = field(default_factory=dict)


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt): .+")


def _reason(e: BaseException) -> str:
    """One line: the first line of the message, with a backend traceback replaced by its exception line."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    first = lines[0]
    if "Traceback" in first:
        head = first.split("Traceback", 1)[0].rstrip(" :")
        causes = [ln for ln in lines[1:] if _EXC_LINE.match(ln) and "Traceback" not in ln]
        if causes:
            return f"{head}: {causes[-1]}"[:500]
        return head[:500]
    return first[:500]


@dataclass
class _Request:
    inputs: dict[str, np.ndarray[Any, Any]]
    outputs: tuple[str, ...] | None
    message: bytes  # the whole HTTP/1.1 request, head and body


# A backstop only: the runner's deadline (or the caller's wait_for) is what bounds every request.
BACKSTOP_S = 60.0


class TritonClient:
    """Owns one `tritonclient.http.aio.InferenceServerClient`; open in a startup hook, close in cleanup.

    Canary inferences skip re-encoding their fixed inputs on every run: the request body is generated once
    with `tritonclient.http.aio`'s `generate_request_body`, posted on this client's own keep-alive connections
    (`probe.http1`: a fresh probe's budget cannot afford aiohttp's client session per run), and the answer
    decoded with its `parse_response_body`, exactly as `infer()` would, errors included.
    """

    def __init__(self, url: str, *, ssl: bool = False, conn_limit: int = 16) -> None:
        self.url = url
        self.ssl = ssl
        self._conn_limit = conn_limit
        self._client: Any = None
        self._pool: ConnectionPool | None = None
        self._host_header = url
        self._requests: dict[str, _Request] = {}
        # tritonclient's parts used on every canary, bound by open() (importing tritonclient is slow: not at
        # import time, and not once per call either).
        self._server_error: Any = _NeverRaised
        self._parse_response: Any = None

    async def open(self) -> None:
        import tritonclient.http.aio as aio  # deferred: importing tritonclient is slow and not needed to validate
        from tritonclient.utils import InferenceServerException

        self._server_error = InferenceServerException
        self._parse_response = aio.InferenceServerClient.parse_response_body
        if self._client is None:
            self._client = aio.InferenceServerClient(
                self.url, conn_limit=self._conn_limit, conn_timeout=BACKSTOP_S, ssl=self.ssl
            )
        if self._pool is None:
            host, _, port = self.url.rpartition(":")
            if not host.isascii():  # an internationalised name goes on the wire as its ASCII (IDNA) form
                try:
                    self._host_header = f"{host.encode('idna').decode('ascii')}:{port}"
                except UnicodeError:
                    self._host_header = f"{quote(host)}:{port}"
            context = ssl_module.create_default_context() if self.ssl else None
            self._pool = ConnectionPool(host.strip("[]"), int(port), ssl=context, idle_limit=self._conn_limit)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def __aenter__(self) -> TritonClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def _c(self) -> Any:
        if self._client is None:
            raise RuntimeError("TritonClient used before open()")
        return self._client

    async def _call(self, what: str, coro: Any) -> Any:
        try:
            return await coro
        except self._server_error as e:
            raise TritonRequestError(f"{what}: {_reason(e)}") from None
        except TimeoutError:  # before OSError, its base class
            raise TritonUnreachable(f"{what}: Triton at {self.url} did not answer") from None
        except MalformedReply as e:
            raise TritonUnreachable(f"{what}: malformed reply from {self.url}: {_reason(e)}") from None
        except (aiohttp.ClientConnectionError, OSError) as e:  # refused, reset, unresolvable, TLS
            raise TritonUnreachable(f"{what}: cannot connect to Triton at {self.url}: {_reason(e)}") from None
        except (aiohttp.ClientError, ValueError, KeyError, TypeError) as e:
            # A reply that is not Triton's (a proxy error page, malformed JSON): treat as unreachable. ValueError
            # covers every JSON decoder's error (tritonclient parses with rapidjson) and UnicodeDecodeError.
            raise TritonUnreachable(f"{what}: malformed reply from {self.url}: {_reason(e)}") from None

    async def live(self) -> bool:
        return bool(await self._call("server live", self._c.is_server_live()))

    async def ready(self) -> bool:
        return bool(await self._call("server ready", self._c.is_server_ready()))

    async def server_metadata(self) -> dict[str, Any]:
        meta = await self._call("server metadata", self._c.get_server_metadata())
        if not isinstance(meta, dict):
            raise TritonUnreachable(f"server metadata: malformed reply from {self.url}")
        return meta

    async def model_ready(self, model: str, version: str = "") -> bool:
        return bool(await self._call(f"model {model} ready", self._c.is_model_ready(model, version)))

    async def model_info(self, model: str, version: str = "") -> ModelInfo:
        meta = await self._call(f"model {model} metadata", self._c.get_model_metadata(model, version))
        cfg = await self._call(f"model {model} config", self._c.get_model_config(model, version))
        try:

            def tensors(items: Any) -> tuple[TensorMeta, ...]:
                return tuple(
                    TensorMeta(str(t["name"]), str(t["datatype"]), tuple(int(d) for d in t["shape"]))
                    for t in items or ()
                )

            return ModelInfo(
                name=str(meta.get("name", model)),
                versions=tuple(str(v) for v in meta.get("versions", ())),
                platform=str(cfg.get("platform") or meta.get("platform") or ""),
                backend=str(cfg.get("backend") or ""),
                inputs=tensors(meta.get("inputs")),
                outputs=tensors(meta.get("outputs")),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise TritonUnreachable(f"model {model} metadata: malformed reply: {_reason(e)}") from None

    async def statistics(self, model: str, version: str = "") -> dict[str, Any]:
        stats = await self._call(f"model {model} statistics", self._c.get_inference_statistics(model, version))
        return stats if isinstance(stats, dict) else {}

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
        data = body if isinstance(body, bytes) else body.encode()
        path = f"/v2/models/{quote(canary.model)}" + (f"/versions/{quote(canary.version)}" if canary.version else "")
        head = [
            f"POST {path}/infer HTTP/1.1",
            f"Host: {self._host_header}",
            f"User-Agent: probe/{__version__}",
            # A few KB of output: asking Triton to compress it would cost both sides CPU for nothing.
            "Accept-Encoding: identity",
            "Content-Type: application/octet-stream",
            f"Content-Length: {len(data)}",
        ]
        if json_size is not None:
            head.append(f"Inference-Header-Content-Length: {json_size}")
        message = ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + data
        request = _Request(inputs, outputs, message)
        self._requests[canary.name] = request
        return request

    async def _post_infer(self, req: _Request) -> Any:
        """POST a generated request; decode the answer, or raise what `InferenceServerClient.infer` raises."""
        if self._pool is None:
            raise RuntimeError("TritonClient used before open()")
        async with asyncio.timeout(BACKSTOP_S):
            reply = await self._pool.request(req.message)
        data = reply.body
        if reply.status != 200:
            text = data.decode("utf-8", errors="replace")
            try:
                message = str(json.loads(text)["error"]) if text else "client received an empty response"
            except (ValueError, KeyError, TypeError) as e:
                message = f"an exception occurred in the client while decoding the response: {e}"
            raise self._server_error(msg=message, status=str(reply.status))
        try:
            return self._parse_response(
                data,
                header_length=reply.headers.get("inference-header-content-length"),
                content_encoding=reply.headers.get("content-encoding"),
            )
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, EOFError, OSError, zlib.error) as e:
            # Not Triton's answer: JSON that does not parse or is not an object, a body that does not decompress
            # (gzip raises EOFError and OSError, deflate zlib.error). Reasons read as tritonclient's own errors.
            raise MalformedReply(str(e) or type(e).__name__) from None

    async def infer(
        self, canary: CanaryConfig, inputs: dict[str, np.ndarray[Any, Any]], outputs: tuple[str, ...] | None
    ) -> InferOutcome:
        """One inference of the canary's fixed inputs; outputs=None asks for every output."""
        req = self._request(canary, inputs, outputs)
        start = time.perf_counter()
        result = await self._call(f"canary {canary.name} inference", self._post_infer(req))
        latency = time.perf_counter() - start
        got: dict[str, tuple[str, np.ndarray[Any, Any]]] = {}
        try:
            for out in result.get_response().get("outputs", []):
                arr = result.as_numpy(out["name"])
                if arr is None:
                    continue
                got[str(out["name"])] = (str(out["datatype"]), np.asarray(arr))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise TritonUnreachable(f"canary {canary.name} inference: malformed reply: {_reason(e)}") from None
        return InferOutcome(outputs=got, latency_s=latency)


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
