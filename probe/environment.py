"""The environment fingerprint a golden record is tied to: GPUs, driver, CUDA driver, Triton, model backend.

NVML's part is read once per process on a daemon thread with a deadline (a hung driver must not hang a probe,
and at most one such thread is ever outstanding); its absence is recorded as data, not raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from probe.triton import TritonClient, TritonRequestError, TritonUnreachable

NvmlReader = Callable[[], dict[str, Any]]
TRITON_TTL_S = 60.0


def _no_nvml() -> dict[str, Any]:
    return {"gpus": [], "driver": None, "cuda_driver": None, "nvml": "unavailable: gpu.source is none"}


class EnvironmentProbe:
    """Builds fingerprints; `nvml_reader` is blocking (probe.gpu.nvml_environment bound to the config)."""

    def __init__(self, client: TritonClient, nvml_reader: NvmlReader | None, *, nvml_timeout: float = 2.0) -> None:
        self._client = client
        self._nvml_reader = nvml_reader
        self._nvml_timeout = nvml_timeout
        self._nvml: dict[str, Any] | None = None
        self._nvml_thread: threading.Thread | None = None
        self._triton_part: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
        self._refreshing: dict[tuple[str, str], asyncio.Future[None]] = {}

    async def nvml(self) -> dict[str, Any]:
        if self._nvml is not None:
            return self._nvml
        if self._nvml_reader is None:
            self._nvml = _no_nvml()
            return self._nvml
        if self._nvml_thread is not None and self._nvml_thread.is_alive():
            return {"gpus": [], "driver": None, "cuda_driver": None, "nvml": "unavailable: NVML call hung"}
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        reader = self._nvml_reader

        def work() -> None:
            try:
                value = reader()
            except Exception as e:  # the reader turns errors into values; this is a last guard
                value = {"gpus": [], "driver": None, "cuda_driver": None, "nvml": f"unavailable: {e}"}

            def deliver() -> None:
                self._nvml = value  # kept even when the caller stopped waiting: the next one needs no new thread
                if not fut.done():
                    fut.set_result(value)

            if not loop.is_closed():
                loop.call_soon_threadsafe(deliver)

        self._nvml_thread = threading.Thread(target=work, name="probe-nvml-env", daemon=True)
        self._nvml_thread.start()
        try:
            value = await asyncio.wait_for(fut, self._nvml_timeout)
        except TimeoutError:
            return {
                "gpus": [],
                "driver": None,
                "cuda_driver": None,
                "nvml": "unavailable: NVML call timed out",
            }
        self._nvml = value
        return value

    async def fingerprint(self, model: str, version: str = "") -> dict[str, Any]:
        """The environment a canary runs in now. Raises TritonUnreachable/TritonRequestError if Triton fails.

        Triton's part is kept for TRITON_TTL_S: a mismatching canary asks for it on every run, and a rollout
        that changes Triton or the model restarts the pod anyway.
        """
        env = dict(await self.nvml())
        key = (model, version)
        now = time.monotonic()
        cached = self._triton_part.get(key)
        if cached is None or now - cached[0] >= TRITON_TTL_S:
            meta = await self._client.server_metadata()
            info = await self._client.model_info(model, version)
            part = {"triton": str(meta.get("version", "")), "platform": info.platform, "backend": info.backend}
            cached = (now, part)
            self._triton_part[key] = cached
        env.update(cached[1])
        return env

    async def server_fingerprint(self) -> dict[str, Any]:
        """The environment without a model's part (no canaries configured): GPUs, driver, CUDA, Triton version."""
        env = dict(await self.nvml())
        meta = await self._client.server_metadata()
        env["triton"] = str(meta.get("version", ""))
        return env

    def known(self, model: str, version: str = "") -> dict[str, Any] | None:
        """The fingerprint as last read, without waiting (None before the first read); a missing or stale one is
        refreshed in the background. For the probe path: a mismatch must not spend its canary's deadline (and turn
        into a restart-worthy timeout) asking Triton and NVML who this node is."""
        key = (model, version)
        cached = self._triton_part.get(key)
        if cached is None or time.monotonic() - cached[0] >= TRITON_TTL_S:
            task = self._refreshing.get(key)
            if task is None or task.done():
                self._refreshing[key] = asyncio.ensure_future(self._refresh(model, version))
        if cached is None or self._nvml is None:
            return None
        return {**self._nvml, **cached[1]}

    async def warm(self, model: str, version: str = "") -> None:
        """Read the fingerprint now, so that `known` has it (a one-shot `probe check` before its run)."""
        await self._refresh(model, version)

    async def _refresh(self, model: str, version: str) -> None:
        try:
            async with asyncio.timeout(TRITON_TTL_S):
                await self.fingerprint(model, version)
        except (TritonUnreachable, TritonRequestError, TimeoutError):
            pass  # asked again at the next mismatch

    async def close(self) -> None:
        """Cancel background refreshes (the sidecar's stop)."""
        tasks = [t for t in self._refreshing.values() if not t.done()]
        self._refreshing.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
