"""GPU memory headroom, sampled off the event loop; the only module that imports `pynvml`.

Two samplers feed the `gpu` check through one interface (`GpuSampler`: start, stop, latest sample, trend):

- `NvmlSampler` (here) asks NVML directly from ONE dedicated daemon thread. NVML calls block and can hang inside
  the driver (a wedged GPU, a driver reset), so they never run on the event loop and are never retried from
  fresh threads: a hung call just leaves `latest()` growing stale, which the check reports.
- `probe.triton_metrics.TritonMetricsSampler` reads Triton's own Prometheus metrics over HTTP, for sidecars that
  are given no GPU (or no driver) of their own.

Every failure becomes data: a `GpuSample` with a one-line `error` (library not found, driver not loaded, GPU
lost, a configured device not found, Triton unreachable). Nothing here runs at import time; `pynvml` is
imported inside the functions that need it.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from probe.config import GpuConfig

log = logging.getLogger(__name__)

Clock = Callable[[], float]

# Longest pause between NVML init attempts while the library or driver is missing: long enough not to spin
# on a node without GPUs, short enough to notice a driver that finished loading.
MAX_BACKOFF = 60.0
# Samples kept for the leak trend, whatever the window and interval (bounds memory for tiny intervals).
_MAX_HISTORY = 10_000


@dataclass(frozen=True)
class GpuMemory:
    """Memory of one device at one moment. `gpu` is its UUID (`GPU-...`, `MIG-...`), or `index:N`."""

    gpu: str
    name: str
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class GpuSample:
    """One sampling round.

    `taken_at` is the sampler clock (monotonic) when the sampler last confirmed this state. `error` is a
    one-line reason when the round failed (then `devices` is empty); None when every device was read.
    """

    taken_at: float
    devices: tuple[GpuMemory, ...]
    error: str | None = None


class GpuSampler(Protocol):
    """A GPU memory sampler: started and stopped by the sidecar; the `gpu` check reads the latest sample and the
    used-memory trend, and neither read may block."""

    async def start_sampling(self) -> None: ...

    async def stop_sampling(self) -> None: ...

    def latest(self) -> GpuSample | None: ...

    def trend(self) -> dict[str, float]: ...


# ------------------------------------------------------------------------------------------------ history


class History:
    """Latest sample plus recent used-memory points, shared by both samplers; safe across threads."""

    def __init__(self, window: float, source: str) -> None:
        self._window = window
        self._source = source
        self._lock = threading.Lock()  # held only for list operations, never around I/O
        self._latest: GpuSample | None = None
        self._points: deque[tuple[float, dict[str, int]]] = deque(maxlen=_MAX_HISTORY)

    def publish(self, sample: GpuSample) -> None:
        previous = self._latest
        if previous is None or previous.error != sample.error:
            # Log changes only: a driver missing for hours must not write a line every interval.
            if sample.error is not None:
                log.warning("GPU sampling (%s) failed: %s", self._source, sample.error)
            elif previous is not None:
                log.info("GPU sampling (%s) recovered: %d device(s)", self._source, len(sample.devices))
        with self._lock:
            self._latest = sample
            if sample.error is None and sample.devices:
                self._points.append((sample.taken_at, {d.gpu: d.used for d in sample.devices}))
                horizon = sample.taken_at - self._window
                while self._points and self._points[0][0] < horizon:
                    self._points.popleft()

    def latest(self) -> GpuSample | None:
        return self._latest  # a single attribute read: atomic, never waits on the sampler

    def trend(self) -> dict[str, float]:
        with self._lock:
            points = list(self._points)
        if len(points) < 2:
            return {}
        horizon = points[-1][0] - self._window
        series: dict[str, list[tuple[float, float]]] = {}
        for t, used in points:
            if t >= horizon:
                for gpu, u in used.items():
                    series.setdefault(gpu, []).append((t, float(u)))
        out: dict[str, float] = {}
        for gpu, pts in series.items():
            slope = _slope(pts)
            if slope is not None:
                out[gpu] = slope * 60.0
        return out


def _slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope (units per second); None when the points do not span any time."""
    if len(points) < 2:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_u = sum(u for _, u in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var <= 1e-12:
        return None
    return sum((t - mean_t) * (u - mean_u) for t, u in points) / var


# -------------------------------------------------------------------------------------- device selection


@dataclass(frozen=True)
class _Selection:
    """Which devices to watch: every one (`entries` None), none (`none_reason`), or the listed ones."""

    source: str  # "gpu.devices" or "NVIDIA_VISIBLE_DEVICES": named in not-found messages
    entries: tuple[str, ...] | None = None
    none_reason: str | None = None


def _selection(devices: tuple[str, ...] | None, visible_devices: str | None) -> _Selection:
    if devices is not None:
        return _Selection("gpu.devices", tuple(devices))
    if visible_devices is None:
        return _Selection("NVIDIA_VISIBLE_DEVICES")
    value = visible_devices.strip()
    if value.lower() == "all":
        return _Selection("NVIDIA_VISIBLE_DEVICES")
    if value.lower() in ("", "none", "void"):
        return _Selection("NVIDIA_VISIBLE_DEVICES", none_reason=f"no GPU visible (NVIDIA_VISIBLE_DEVICES={value})")
    return _Selection("NVIDIA_VISIBLE_DEVICES", tuple(p.strip() for p in value.split(",") if p.strip()))


class _NotFound(Exception):
    """A configured device NVML does not have; the message names it."""


@dataclass(frozen=True)
class _Device:
    handle: Any
    gpu: str
    name: str


def _nvml_code(e: BaseException) -> int | None:
    value = getattr(e, "value", None)
    return value if isinstance(value, int) else None


def _uuid(nv: Any, handle: Any, fallback: str) -> str:
    try:
        return str(nv.nvmlDeviceGetUUID(handle))
    except nv.NVMLError:
        return fallback  # some vGPU/old devices have no UUID: still watch them, by index


def _describe(nv: Any, handle: Any, fallback: str, uuid: str | None = None) -> _Device:
    try:
        name = str(nv.nvmlDeviceGetName(handle))
    except nv.NVMLError:
        name = ""
    return _Device(handle, uuid or _uuid(nv, handle, fallback), name)


def _mig_instances(nv: Any, parent: Any, index: int) -> list[_Device]:
    """MIG instances of a GPU whose MIG mode is on; empty when it is off or not MIG-capable."""
    try:
        current, _pending = nv.nvmlDeviceGetMigMode(parent)
    except nv.NVMLError:
        return []  # NOT_SUPPORTED on GPUs without MIG
    if current != nv.NVML_DEVICE_MIG_ENABLE:
        return []
    out = []
    for m in range(nv.nvmlDeviceGetMaxMigDeviceCount(parent)):
        try:
            handle = nv.nvmlDeviceGetMigDeviceHandleByIndex(parent, m)
        except nv.NVMLError as e:
            if _nvml_code(e) == nv.NVML_ERROR_NOT_FOUND:
                continue  # slots without an instance
            raise
        out.append(_describe(nv, handle, f"index:{index}:{m}"))
    return out


def _expand(nv: Any, index: int) -> list[_Device]:
    """Physical GPU `index`, or its MIG instances when MIG is on: processes run in instances, so an
    instance's memory is the headroom that matters, not the parent's."""
    handle = nv.nvmlDeviceGetHandleByIndex(index)
    return _mig_instances(nv, handle, index) or [_describe(nv, handle, f"index:{index}")]


def _resolve(nv: Any, sel: _Selection) -> list[_Device]:
    """Handles for the selected devices. Raises `_NotFound` naming a configured device NVML lacks."""
    count = int(nv.nvmlDeviceGetCount())
    entries = sel.entries
    if entries is not None and sel.source == "NVIDIA_VISIBLE_DEVICES" and all(e.isdigit() for e in entries):
        # NVIDIA_VISIBLE_DEVICES holds host indices. When the container runtime applied it, NVML inside
        # sees exactly those GPUs renumbered from 0, so "2,3" means "both devices I see", not indices 2, 3.
        if count == len(set(entries)):
            entries = None
    devices: list[_Device] = []
    if entries is None:
        for i in range(count):
            devices.extend(_expand(nv, i))
    else:
        for entry in entries:
            devices.extend(_resolve_entry(nv, sel.source, entry, count))
    unique: dict[str, _Device] = {}
    for d in devices:
        unique.setdefault(d.gpu, d)  # "0,GPU-<uuid of 0>" lists one device twice
    return list(unique.values())


def _resolve_entry(nv: Any, source: str, entry: str, count: int) -> list[_Device]:
    if entry.isdigit():
        index = int(entry)
        if index >= count:
            raise _NotFound(f"{source}: GPU index {index} not found (NVML sees {count} GPU(s))")
        return _expand(nv, index)
    parent, sep, mig = entry.partition(":")
    if sep and parent.isdigit() and mig.isdigit():
        # NVIDIA_VISIBLE_DEVICES' "<gpu>:<mig>" form names a MIG instance by position.
        if int(parent) >= count:
            raise _NotFound(f"{source}: GPU index {parent} not found (NVML sees {count} GPU(s))")
        try:
            handle = nv.nvmlDeviceGetMigDeviceHandleByIndex(nv.nvmlDeviceGetHandleByIndex(int(parent)), int(mig))
        except nv.NVMLError as e:
            if _nvml_code(e) in (nv.NVML_ERROR_NOT_FOUND, nv.NVML_ERROR_INVALID_ARGUMENT):
                raise _NotFound(f"{source}: MIG device {entry} not found") from None
            raise
        return [_describe(nv, handle, f"index:{entry}")]
    if entry.startswith(("GPU-", "MIG-")):
        try:
            handle = nv.nvmlDeviceGetHandleByUUID(entry)
        except nv.NVMLError as e:
            if _nvml_code(e) in (nv.NVML_ERROR_NOT_FOUND, nv.NVML_ERROR_INVALID_ARGUMENT):
                seen = ", ".join(d.gpu for i in range(count) for d in _expand(nv, i)) or "none"
                raise _NotFound(f"{source}: {entry} not found (NVML sees: {seen})") from None
            raise
        return [_describe(nv, handle, entry, uuid=entry)]
    raise _NotFound(f"{source}: cannot read device {entry!r} (expected an index or a GPU-/MIG- UUID)")


# ------------------------------------------------------------------------------------- NVML init sharing

# NVML is process-global: the sampler thread and nvml_environment() share one initialisation, and only the
# last user shuts it down, so a golden recording never pulls NVML from under a running sampler.
_nvml_lock = threading.Lock()
_nvml_users = 0
_loaded_path: str | None = None  # the library_path we put into pynvml.nvmlLib, if any


class _NvmlUnavailable(Exception):
    """NVML could not be initialised; the message is the operator's one-line reason."""


def _import_pynvml() -> Any:
    try:
        import pynvml
    except ImportError as e:  # pragma: no cover - nvidia-ml-py is a declared dependency
        raise _NvmlUnavailable(f"the pynvml module (nvidia-ml-py) is not installed: {e}") from None
    return pynvml


def _use_library(nv: Any, library_path: str | None) -> None:
    """Point pynvml at `library_path` (tests), or back at the system library when None."""
    global _loaded_path
    if library_path == _loaded_path:
        return
    if library_path is not None:
        try:
            lib = ctypes.CDLL(library_path)
        except OSError as e:
            raise _NvmlUnavailable(f"NVML library not found at {library_path}: {e}") from None
    else:
        lib = None  # pynvml loads libnvidia-ml.so.1 itself on the next nvmlInit
    with nv.libLoadLock:
        nv.nvmlLib = lib
        # pynvml caches function pointers by name; they belong to the library just replaced.
        cache = getattr(nv, "_nvmlGetFunctionPointer_cache", None)
        if isinstance(cache, dict):
            cache.clear()
    _loaded_path = library_path


def _acquire_nvml(library_path: str | None) -> Any:
    """Initialise NVML if no one has, count this user, and return the pynvml module.

    Raises `_NvmlUnavailable` with the reason (library missing, driver not loaded, ...)."""
    global _nvml_users
    nv = _import_pynvml()
    with _nvml_lock:
        if _nvml_users == 0:
            _use_library(nv, library_path)
            try:
                nv.nvmlInit()
            except nv.NVMLError as e:
                raise _NvmlUnavailable(_init_error(nv, e)) from None
        _nvml_users += 1
    return nv


def _release_nvml(nv: Any) -> None:
    global _nvml_users
    with _nvml_lock:
        if _nvml_users <= 0:
            return
        _nvml_users -= 1
        if _nvml_users == 0:
            try:
                nv.nvmlShutdown()
            except nv.NVMLError as e:
                # A lost GPU can fail the shutdown too; the next init starts over either way.
                log.debug("nvmlShutdown failed: %s", e)


def _init_error(nv: Any, e: BaseException) -> str:
    code = _nvml_code(e)
    if code == nv.NVML_ERROR_LIBRARY_NOT_FOUND:
        return (
            "NVML library not found (libnvidia-ml.so.1): no NVIDIA driver on this node, "
            "or it is not mounted into this container"
        )
    if code == nv.NVML_ERROR_DRIVER_NOT_LOADED:
        return "NVIDIA driver not loaded (NVML init: Driver Not Loaded)"
    if code == nv.NVML_ERROR_NO_PERMISSION:
        return "no permission to open the NVIDIA devices (NVML init: Insufficient Permissions)"
    if code == nv.NVML_ERROR_LIB_RM_VERSION_MISMATCH:
        return f"NVML library and kernel driver versions differ (driver upgraded without reboot?): {e}"
    return f"NVML init failed: {e}"


def _sample_error(nv: Any, gpu: str, e: BaseException) -> str:
    code = _nvml_code(e)
    if code == nv.NVML_ERROR_GPU_IS_LOST:
        return f"{gpu}: GPU is lost (fell off the bus or stopped responding); re-initialising NVML"
    if code == nv.NVML_ERROR_UNINITIALIZED:
        return f"{gpu}: NVML is not initialised (driver reloaded?); re-initialising NVML"
    return f"{gpu}: NVML error: {e}"


def _cuda_version(nv: Any) -> str | None:
    try:
        v = int(nv.nvmlSystemGetCudaDriverVersion_v2())
    except nv.NVMLError:
        try:
            v = int(nv.nvmlSystemGetCudaDriverVersion())
        except nv.NVMLError:
            return None
    return f"{v // 1000}.{(v % 1000) // 10}"  # 12040 -> "12.4"


def nvml_environment(
    devices: tuple[str, ...] | None, visible_devices: str | None, library_path: str | None = None
) -> dict[str, Any]:
    """The GPU part of a golden file's environment fingerprint. Blocking: run it off the event loop.

    Returns `{"gpus": [sorted names of the selected devices], "driver": "550.54.15", "cuda_driver": "12.4",
    "nvml": "ok"}`; `gpus` is empty when NVIDIA_VISIBLE_DEVICES says none. Absence is data, never an
    exception: without NVML it returns `{"gpus": [], "driver": None, "cuda_driver": None,
    "nvml": "unavailable: <reason>"}`; when NVML works but a configured device is missing, the versions are
    filled in and `nvml` is `"error: <reason>"`.
    NVML is shut down again only if this call initialised it and no sampler is using it.
    """
    try:
        nv = _acquire_nvml(library_path)
    except _NvmlUnavailable as e:
        return {"gpus": [], "driver": None, "cuda_driver": None, "nvml": f"unavailable: {e}"}
    try:
        driver: str | None = None
        cuda: str | None = None
        try:
            driver = str(nv.nvmlSystemGetDriverVersion())
            cuda = _cuda_version(nv)
            sel = _selection(devices, visible_devices)
            names = [] if sel.none_reason else [d.name for d in _resolve(nv, sel)]
        except _NotFound as e:
            return {"gpus": [], "driver": driver, "cuda_driver": cuda, "nvml": f"error: {e}"}
        except nv.NVMLError as e:
            return {"gpus": [], "driver": None, "cuda_driver": None, "nvml": f"unavailable: NVML error: {e}"}
        return {"gpus": sorted(names), "driver": driver, "cuda_driver": cuda, "nvml": "ok"}
    finally:
        _release_nvml(nv)


# ------------------------------------------------------------------------------------------ NVML sampler


class NvmlSampler:
    """Samples GPU memory through NVML on one dedicated daemon thread, every `cfg.interval` seconds.

    A round fails (a sample with `error`) when the library is missing, the driver is not loaded, a GPU is
    lost, a configured device is not found, or NVML reports anything else. Init failures are retried with
    exponential backoff (interval doubling up to 60 s) and the error sample is re-confirmed every interval
    meanwhile, so its age keeps meaning "the sampler is alive". A lost GPU or an uninitialised NVML shuts
    NVML down and re-initialises it on the next round. A call that hangs inside the driver holds the one
    thread: no more threads are made, and `latest()` just grows stale, which the check reports.
    """

    def __init__(
        self,
        cfg: GpuConfig,
        *,
        clock: Clock = time.monotonic,
        visible_devices: str | None = None,
        library_path: str | None = None,
    ) -> None:
        self._cfg = cfg
        self._clock = clock
        self._library_path = library_path
        self._selection = _selection(cfg.devices, visible_devices)
        self._history = History(cfg.trend_window, "nvml")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._round_lock = threading.Lock()  # one round at a time: the thread, or sample_once() before start
        # NVML state below is touched only under _round_lock.
        self._nv: Any = None  # pynvml while this sampler holds an NVML reference
        self._devices: list[_Device] | None = None
        self._memory_v1 = False  # remembered once v2 is missing: no failing v2 call every round
        self._backoff = cfg.interval

    # -- read side

    def latest(self) -> GpuSample | None:
        """The newest sample, or None before the first round ends. Never blocks."""
        return self._history.latest()

    def trend(self) -> dict[str, float]:
        """Used-memory slope per GPU in bytes per minute over `cfg.trend_window`; a GPU is absent until it
        has two samples spanning some time."""
        return self._history.trend()

    # -- lifecycle

    def start(self) -> None:
        """Start the sampler thread (idempotent while it runs)."""
        if self._thread is not None and self._thread.is_alive():
            if self._stop.is_set():
                # Stopped but still stuck in an NVML call: a second thread would break "exactly one".
                raise RuntimeError("NVML sampler thread is still stuck in an NVML call; cannot restart yet")
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="probe-nvml-sampler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> bool:
        """Ask the thread to end and wait up to `timeout` seconds; True if it ended. A thread stuck in a
        hung NVML call is left behind (it is a daemon) and releases NVML whenever the call returns."""
        self._stop.set()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    async def start_sampling(self) -> None:
        self.start()

    async def stop_sampling(self) -> None:
        await asyncio.to_thread(self.stop)

    def sample_once(self) -> GpuSample:
        """Take one sample on the calling thread, publish it and return it. Blocking; for one-shot use
        (`probe check`) and benchmarks. Call `close()` afterwards if the thread was never started."""
        with self._round_lock:
            sample, _delay = self._round()
        self._publish(sample)
        return sample

    def close(self) -> None:
        """Release NVML held by `sample_once()` calls (the thread releases its own when it ends)."""
        with self._round_lock:
            self._release()

    # -- the thread

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._round_lock:
                    started = time.monotonic()  # real time for pacing; the injected clock only stamps samples
                    try:
                        sample, delay = self._round()
                    except Exception as e:  # a bug must not kill the only sampler thread
                        log.exception("GPU sampler round failed")
                        self._release()
                        sample, delay = (
                            GpuSample(self._clock(), (), f"GPU sampler error: {e!r}"),
                            self._cfg.interval,
                        )
                self._publish(sample)
                self._pause(sample, max(0.0, delay - (time.monotonic() - started)))
        finally:
            with self._round_lock:
                self._release()

    def _pause(self, sample: GpuSample, delay: float) -> None:
        """Wait `delay` (prompt on stop); while backing off after an error, re-confirm it every interval."""
        deadline = time.monotonic() + delay
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.wait(min(left, self._cfg.interval)):
                return
            if sample.error is not None and deadline - time.monotonic() > 0:
                self._history.publish(replace(sample, taken_at=self._clock()))

    def _publish(self, sample: GpuSample) -> None:
        self._history.publish(sample)

    def _release(self) -> None:
        if self._nv is not None:
            nv, self._nv, self._devices = self._nv, None, None
            _release_nvml(nv)

    def _fail(self, error: str, delay: float) -> tuple[GpuSample, float]:
        return GpuSample(self._clock(), (), error), delay

    def _round(self) -> tuple[GpuSample, float]:
        """One sampling round: the sample and the seconds until the next round."""
        interval = self._cfg.interval
        if self._selection.none_reason is not None:
            return self._fail(self._selection.none_reason, interval)  # NVML need not even be loaded
        if self._nv is None:
            try:
                self._nv = _acquire_nvml(self._library_path)
            except _NvmlUnavailable as e:
                delay, self._backoff = self._backoff, min(self._backoff * 2, max(MAX_BACKOFF, interval))
                return self._fail(str(e), delay)
            self._backoff = interval
        nv = self._nv
        if self._devices is None:
            try:
                self._devices = _resolve(nv, self._selection)
            except _NotFound as e:
                return self._fail(str(e), interval)
            except nv.NVMLError as e:
                return self._nvml_failure(nv, "NVML", e)
        readings = []
        for dev in self._devices:
            try:
                total, free, used = self._memory(nv, dev.handle)
            except nv.NVMLError as e:
                return self._nvml_failure(nv, dev.gpu, e)
            readings.append(GpuMemory(dev.gpu, dev.name, total, free, used))
        if not readings:
            return self._fail("NVML sees no GPU", interval)
        return GpuSample(self._clock(), tuple(readings)), interval

    def _nvml_failure(self, nv: Any, gpu: str, e: BaseException) -> tuple[GpuSample, float]:
        self._devices = None  # handles may be stale after any error; resolve afresh next round
        if _nvml_code(e) in (nv.NVML_ERROR_GPU_IS_LOST, nv.NVML_ERROR_UNINITIALIZED):
            self._release()  # start NVML over on the next round
        return self._fail(_sample_error(nv, gpu, e), self._cfg.interval)

    def _memory(self, nv: Any, handle: Any) -> tuple[int, int, int]:
        if not self._memory_v1:
            version = getattr(nv, "nvmlMemory_v2", None)
            if version is not None:
                try:
                    m = nv.nvmlDeviceGetMemoryInfo(handle, version=version)
                    return int(m.total), int(m.free), int(m.used)
                except nv.NVMLError as e:
                    if _nvml_code(e) not in (
                        nv.NVML_ERROR_FUNCTION_NOT_FOUND,
                        getattr(nv, "NVML_ERROR_ARGUMENT_VERSION_MISMATCH", -1),
                    ):
                        raise
            # Drivers before r510 lack the v2 call; v1 is as good for headroom. Remember it.
            log.info("NVML has no nvmlDeviceGetMemoryInfo_v2; using v1")
            self._memory_v1 = True
        m = nv.nvmlDeviceGetMemoryInfo(handle)
        return int(m.total), int(m.free), int(m.used)
