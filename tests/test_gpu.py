"""GPU headroom: the NVML sampler, the Triton-metrics sampler and the `gpu` check.

The NVML tests run pynvml's real code path against a fake libnvidia-ml.so.1 (demo/fake_nvml/fake_nvml.c)
compiled once per session and loaded in-process through `library_path`; each test rewrites the fake's state
file to create its scenario. The Triton-metrics tests talk to a real aiohttp server on 127.0.0.1.
Every test is named after the bug it guards; waits poll a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from demo.nvml_fakes import (
    H100,
    H100_TOTAL,
    FakeGpu,
    FakeMig,
    FakeNvmlCounters,
    FakeNvmlState,
    GiB,
    build_fake_nvml,
)
from probe.checks.base import CheckResult
from probe.checks.gpu import GpuCheck
from probe.config import GpuConfig, MinFree
from probe.gpu import GpuMemory, GpuSample, NvmlSampler, nvml_environment
from probe.triton import TritonClient
from probe.triton_metrics import NO_GPU_METRICS, MetricsPage, TritonMetricsSampler
from tests import helpers

T = TypeVar("T")
SAMPLER_THREAD = "probe-nvml-sampler"


def wait_for(predicate: Callable[[], T | None], timeout: float = 5.0, what: str = "condition") -> T:
    """The shared poll-with-deadline (every 20 ms), with this file's default deadline; returns the first
    truthy value."""
    value: T = helpers.wait_for(predicate, timeout, what)
    return value


async def wait_until(predicate: Callable[[], T | None], timeout: float = 5.0, what: str = "condition") -> T:
    """`wait_for` for async tests: polls without blocking the event loop."""

    async def check() -> T | None:
        return predicate()

    value: T = await helpers.async_wait_for(check, timeout, what)
    return value


def current(sampler: NvmlSampler | TritonMetricsSampler) -> GpuSample:
    """The latest sample of a sampler that has already produced one."""
    sample = sampler.latest()
    assert sample is not None
    return sample


def verdict(check: GpuCheck) -> CheckResult:
    """Run the async check from a sync test (it only reads the latest sample, so this is instant)."""
    return check.now()


def gpu_cfg(**kw: Any) -> GpuConfig:
    kw.setdefault("interval", 0.05)
    return GpuConfig(**kw)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def fake_nvml_lib(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One fake library per session (pynvml keeps the loaded library process-wide); its state file's path
    is exported as FAKE_NVML_STATE for the whole session."""
    tmp = tmp_path_factory.mktemp("fake_nvml")
    lib = build_fake_nvml(tmp)
    old = os.environ.get("FAKE_NVML_STATE")
    os.environ["FAKE_NVML_STATE"] = str(tmp / "state")
    FakeNvmlState(tmp / "state").reset()
    yield lib
    if old is None:
        os.environ.pop("FAKE_NVML_STATE", None)
    else:
        os.environ["FAKE_NVML_STATE"] = old


@pytest.fixture
def nvml(fake_nvml_lib: Path) -> Iterator[FakeNvmlState]:
    """The fake's state, reset to one idle H100 (GPU-aaaa) for each test."""
    state = FakeNvmlState(Path(os.environ["FAKE_NVML_STATE"]))
    state.reset()
    yield state
    state.reset()  # ends any hang so the sampler thread can leave


@pytest.fixture
def counters(fake_nvml_lib: Path) -> FakeNvmlCounters:
    return FakeNvmlCounters(fake_nvml_lib)


@pytest.fixture
def sampler_factory(
    fake_nvml_lib: Path, nvml: FakeNvmlState, counters: FakeNvmlCounters
) -> Iterator[Callable[..., NvmlSampler]]:
    """Make started samplers on the fake library; at teardown every one must stop, leave no thread behind
    and leave NVML shut down."""
    made: list[NvmlSampler] = []

    def make(cfg: GpuConfig | None = None, *, start: bool = True, **kw: Any) -> NvmlSampler:
        kw.setdefault("library_path", str(fake_nvml_lib))
        sampler = NvmlSampler(cfg or gpu_cfg(), **kw)
        made.append(sampler)
        if start:
            sampler.start()
        return sampler

    yield make
    nvml.reset()
    for sampler in made:
        assert sampler.stop(timeout=5.0), "sampler thread did not end"
    assert not [t for t in threading.enumerate() if t.name == SAMPLER_THREAD]
    assert counters.initialised() == 0, "NVML left initialised"


def first_sample(sampler: NvmlSampler | TritonMetricsSampler, timeout: float = 5.0) -> GpuSample:
    return wait_for(sampler.latest, timeout, "the first GPU sample")


def ok_sample(sampler: NvmlSampler) -> GpuSample:
    def ok() -> GpuSample | None:
        s = sampler.latest()
        return s if s is not None and s.error is None else None

    return wait_for(ok, what="a GPU sample without error")


def error_sample(sampler: NvmlSampler, contains: str, timeout: float = 5.0) -> GpuSample:
    def err() -> GpuSample | None:
        s = sampler.latest()
        return s if s is not None and s.error is not None and contains in s.error else None

    return wait_for(err, timeout, f"a GPU sample error containing {contains!r}")


# ------------------------------------------------------------------------------------------------ headroom


def test_idle_gpu_passes_and_reports_free_of_total(sampler_factory: Callable[..., NvmlSampler]) -> None:
    cfg = gpu_cfg()
    sampler = sampler_factory(cfg)
    sample = ok_sample(sampler)
    assert sample.devices == (GpuMemory("GPU-aaaa", H100, H100_TOTAL, H100_TOTAL, 0),)
    result = verdict(GpuCheck(sampler, cfg))
    assert result.ok
    assert result.reason.startswith("ok: GPU-aaaa free 80.0GiB of 80.0GiB")
    assert result.observed_value == H100_TOTAL
    assert result.observed_unit == "bytes"
    assert result.details["devices"] == [
        {"gpu": "GPU-aaaa", "name": H100, "total": H100_TOTAL, "free": H100_TOTAL, "used": 0}
    ]


def test_free_exactly_at_min_free_passes(nvml: FakeNvmlState, sampler_factory: Callable[..., NvmlSampler]) -> None:
    nvml.set(gpus=(FakeGpu("GPU-aaaa", used=H100_TOTAL - 2 * GiB),))
    cfg = gpu_cfg(min_free=MinFree(bytes=2 * GiB))
    sampler = sampler_factory(cfg)
    ok_sample(sampler)
    result = verdict(GpuCheck(sampler, cfg))
    assert result.ok, result.reason
    assert result.observed_value == 2 * GiB


def test_free_below_min_free_fails_restart_worthy_naming_the_gpu(
    nvml: FakeNvmlState, sampler_factory: Callable[..., NvmlSampler]
) -> None:
    nvml.set(gpus=(FakeGpu("GPU-aaaa", used=H100_TOTAL - 1 * GiB),))
    cfg = gpu_cfg(min_free=MinFree(bytes=2 * GiB))
    sampler = sampler_factory(cfg)
    ok_sample(sampler)
    result = verdict(GpuCheck(sampler, cfg))
    assert not result.ok
    assert result.restart_worthy
    assert result.reason.startswith(f"GPU-aaaa ({H100}) free 1.0GiB < min_free 2.0GiB")
    assert result.observed_value == 1 * GiB


def test_min_free_percentage_is_of_each_gpus_own_total(
    nvml: FakeNvmlState, sampler_factory: Callable[..., NvmlSampler]
) -> None:
    # 10% of 80 GiB is 8 GiB: exactly 8 GiB free passes, 7 GiB free fails and the reason shows both forms.
    cfg = gpu_cfg(min_free=MinFree(bytes=None, percent=10.0))
    nvml.set(gpus=(FakeGpu("GPU-aaaa", used=72 * GiB),))
    sampler = sampler_factory(cfg)
    ok_sample(sampler)
    check = GpuCheck(sampler, cfg)
    assert verdict(check).ok
    nvml.set(gpus=(FakeGpu("GPU-aaaa", used=73 * GiB),))
    wait_for(lambda: current(sampler).devices[0].used == 73 * GiB, what="the new usage")
    result = verdict(check)
    assert not result.ok and result.restart_worthy
    assert result.reason.startswith(f"GPU-aaaa ({H100}) free 7.0GiB < min_free 10% (8.0GiB)")


# ------------------------------------------------------------------------------------------ which devices

THREE_GPUS = (
    FakeGpu("GPU-0000", used=1 * GiB),
    FakeGpu("GPU-1111", used=H100_TOTAL),  # full: only fails the check when it is one of ours
    FakeGpu("GPU-2222", used=3 * GiB),
)


@pytest.mark.parametrize(
    ("visible", "devices", "expected"),
    [
        (None, None, ["GPU-0000", "GPU-1111", "GPU-2222"]),
        ("all", None, ["GPU-0000", "GPU-1111", "GPU-2222"]),
        ("0,2", None, ["GPU-0000", "GPU-2222"]),
        ("GPU-2222,GPU-0000", None, ["GPU-2222", "GPU-0000"]),
        ("1", ("GPU-0000",), ["GPU-0000"]),  # an explicit gpu.devices wins over the environment
        (None, ("2", "GPU-0000"), ["GPU-2222", "GPU-0000"]),
        (None, ("0", "GPU-0000"), ["GPU-0000"]),  # the same GPU named twice is counted once
    ],
)
def test_only_selected_gpus_are_counted(
    nvml: FakeNvmlState,
    sampler_factory: Callable[..., NvmlSampler],
    visible: str | None,
    devices: tuple[str, ...] | None,
    expected: list[str],
) -> None:
    nvml.set(gpus=THREE_GPUS)
    cfg = gpu_cfg(devices=devices)
    sampler = sampler_factory(cfg, visible_devices=visible)
    sample = ok_sample(sampler)
    assert [d.gpu for d in sample.devices] == expected
    assert verdict(GpuCheck(sampler, cfg)).ok == ("GPU-1111" not in expected)


def test_visible_indices_already_applied_by_the_runtime_mean_every_gpu_nvml_sees(
    nvml: FakeNvmlState, sampler_factory: Callable[..., NvmlSampler]
) -> None:
    # NVIDIA_VISIBLE_DEVICES=2,3 on the host: inside the container NVML renumbers those two GPUs 0 and 1.
    nvml.set(gpus=(FakeGpu("GPU-2222"), FakeGpu("GPU-3333")))
    sampler = sampler_factory(visible_devices="2,3")
    assert [d.gpu for d in ok_sample(sampler).devices] == ["GPU-2222", "GPU-3333"]


@pytest.mark.parametrize("value", ["none", "void", ""])
def test_no_visible_gpu_is_an_error_not_an_empty_pass(
    sampler_factory: Callable[..., NvmlSampler], counters: FakeNvmlCounters, value: str
) -> None:
    attempts = counters.init_attempts()
    cfg = gpu_cfg()
    sampler = sampler_factory(cfg, visible_devices=value)
    sample = first_sample(sampler)
    assert sample.error == f"no GPU visible (NVIDIA_VISIBLE_DEVICES={value})"
    result = verdict(GpuCheck(sampler, cfg))
    assert not result.ok and not result.restart_worthy
    assert counters.init_attempts() == attempts  # NVML is not even loaded for that


@pytest.mark.parametrize(
    ("devices", "visible", "message"),
    [
        (("GPU-9999",), None, "gpu.devices: GPU-9999 not found (NVML sees: GPU-0000, GPU-1111, GPU-2222)"),
        (("7",), None, "gpu.devices: GPU index 7 not found (NVML sees 3 GPU(s))"),
        (None, "GPU-0000,MIG-9999", "NVIDIA_VISIBLE_DEVICES: MIG-9999 not found"),
    ],
)
def test_configured_gpu_that_does_not_exist_is_named(
    nvml: FakeNvmlState,
    sampler_factory: Callable[..., NvmlSampler],
    devices: tuple[str, ...] | None,
    visible: str | None,
    message: str,
) -> None:
    nvml.set(gpus=THREE_GPUS)
    cfg = gpu_cfg(devices=devices)
    sampler = sampler_factory(cfg, visible_devices=visible)
    sample = error_sample(sampler, "not found")
    assert sample.error is not None and sample.error.startswith(message)
    assert sample.devices == ()
    assert verdict(GpuCheck(sampler, cfg)).reason == sample.error


MIG_GPU = FakeGpu(
    "GPU-aaaa",
    name="NVIDIA A100-SXM4-80GB",
    used=30 * GiB,
    migs=(
        FakeMig("MIG-1111", total=10 * GiB, used=9 * GiB, name="NVIDIA A100-SXM4-80GB MIG 1g.10gb"),
        FakeMig("MIG-2222", total=20 * GiB, used=1 * GiB),
    ),
)


def test_mig_uuid_reports_the_instances_memory_not_the_parents(
    nvml: FakeNvmlState, sampler_factory: Callable[..., NvmlSampler]
) -> None:
    nvml.set(gpus=(MIG_GPU,))
    cfg = gpu_cfg(min_free=MinFree(bytes=2 * GiB))
    sampler = sampler_factory(cfg, visible_devices="MIG-1111")
    sample = ok_sample(sampler)
    assert sample.devices == (GpuMemory("MIG-1111", "NVIDIA A100-SXM4-80GB MIG 1g.10gb", 10 * GiB, 1 * GiB, 9 * GiB),)
    result = verdict(GpuCheck(sampler, cfg))
    assert not result.ok  # the parent has 50 GiB free; the instance Triton runs in has 1 GiB
    assert result.reason.startswith("MIG-1111 (NVIDIA A100-SXM4-80GB MIG 1g.10gb) free 1.0GiB < min_free 2.0GiB")


def test_mig_enabled_gpu_is_watched_per_instance(
    nvml: FakeNvmlState, sampler_factory: Callable[..., NvmlSampler]
) -> None:
    nvml.set(gpus=(MIG_GPU, FakeGpu("GPU-bbbb")))
    sample = ok_sample(sampler_factory(visible_devices="all"))
    assert [(d.gpu, d.total, d.used) for d in sample.devices] == [
        ("MIG-1111", 10 * GiB, 9 * GiB),
        ("MIG-2222", 20 * GiB, 1 * GiB),
        ("GPU-bbbb", H100_TOTAL, 0),
    ]
    assert sample.devices[1].name == "NVIDIA A100-SXM4-80GB MIG"


# -------------------------------------------------------------------------------------- driver trouble


def test_old_driver_without_memory_info_v2_falls_back_to_v1_once(
    nvml: FakeNvmlState, sampler_factory: Callable[..., NvmlSampler], counters: FakeNvmlCounters
) -> None:
    nvml.set(v2=False, gpus=(FakeGpu("GPU-aaaa", used=5 * GiB),))
    v1_before, v2_before = counters.memory_calls(1), counters.memory_calls(2)
    sampler = sampler_factory()
    assert ok_sample(sampler).devices[0].free == H100_TOTAL - 5 * GiB
    wait_for(lambda: counters.memory_calls(1) - v1_before >= 5, what="several v1 samples")
    assert counters.memory_calls(2) - v2_before == 1  # the missing v2 was remembered, not retried


def test_memory_info_v2_is_used_when_the_driver_has_it(
    sampler_factory: Callable[..., NvmlSampler], counters: FakeNvmlCounters
) -> None:
    v1_before, v2_before = counters.memory_calls(1), counters.memory_calls(2)
    sampler = sampler_factory()
    ok_sample(sampler)
    wait_for(lambda: counters.memory_calls(2) - v2_before >= 3, what="several v2 samples")
    assert counters.memory_calls(1) == v1_before


def test_lost_gpu_is_an_error_then_nvml_is_reinitialised_and_recovers(
    nvml: FakeNvmlState, sampler_factory: Callable[..., NvmlSampler], counters: FakeNvmlCounters
) -> None:
    cfg = gpu_cfg()
    sampler = sampler_factory(cfg)
    ok_sample(sampler)
    attempts = counters.init_attempts()
    nvml.set(lost=True)
    sample = error_sample(sampler, "GPU is lost")
    assert sample.error == "GPU-aaaa: GPU is lost (fell off the bus or stopped responding); re-initialising NVML"
    result = verdict(GpuCheck(sampler, cfg))
    assert not result.ok and not result.restart_worthy  # restarting Triton does not bring a GPU back
    nvml.set(lost=False)
    ok_sample(sampler)
    assert counters.init_attempts() > attempts  # recovered through a fresh nvmlInit
    assert verdict(GpuCheck(sampler, cfg)).ok


def test_nvml_shut_down_under_the_sampler_is_reinitialised(
    sampler_factory: Callable[..., NvmlSampler], counters: FakeNvmlCounters
) -> None:
    sampler = sampler_factory()
    ok_sample(sampler)
    attempts = counters.init_attempts()
    counters.shutdown_behind_the_probes_back()  # memory queries now answer NVML_ERROR_UNINITIALIZED
    wait_for(lambda: counters.init_attempts() > attempts, what="a fresh nvmlInit")
    ok_sample(sampler)


def test_driver_not_loaded_keeps_retrying_and_recovers_when_it_loads(
    nvml: FakeNvmlState, sampler_factory: Callable[..., NvmlSampler], counters: FakeNvmlCounters
) -> None:
    nvml.set(init="driver_not_loaded")
    cfg = gpu_cfg(interval=0.05, stale_after=0.3)
    attempts = counters.init_attempts()
    sampler = sampler_factory(cfg)
    sample = error_sample(sampler, "driver not loaded")
    assert sample.error == "NVIDIA driver not loaded (NVML init: Driver Not Loaded)"
    check = GpuCheck(sampler, cfg)

    def retried_through_a_long_pause() -> bool:
        # Backoff 0.05, 0.1, 0.2, 0.4 s: the fifth attempt proves the daemon keeps retrying, and the 0.4 s
        # pause before it outlasts stale_after, yet the check must say "driver", never "sample is old".
        assert verdict(check).reason == sample.error
        return counters.init_attempts() - attempts >= 5

    wait_for(retried_through_a_long_pause, what="five init attempts")
    nvml.set(init="ok")
    ok_sample(sampler)
    assert verdict(check).ok


def test_missing_library_is_reported_as_not_found(tmp_path: Path, sampler_factory: Callable[..., NvmlSampler]) -> None:
    cfg = gpu_cfg()
    sampler = sampler_factory(cfg, library_path=str(tmp_path / "libnvidia-ml.so.1"))
    sample = error_sample(sampler, "NVML library not found")
    assert sample.error is not None and str(tmp_path) in sample.error
    assert sampler.latest() is not None
    result = verdict(GpuCheck(sampler, cfg))
    assert not result.ok and result.reason.startswith("NVML library not found")
    assert [t for t in threading.enumerate() if t.name == SAMPLER_THREAD]  # still alive, retrying


def test_library_version_mismatch_uses_nvmls_own_words(
    nvml: FakeNvmlState, sampler_factory: Callable[..., NvmlSampler]
) -> None:
    nvml.set(init="lib_error")
    sample = error_sample(sampler_factory(), "versions differ")
    assert sample.error is not None and sample.error.endswith("RM has detected an NVML/RM version mismatch.")


def test_hung_nvml_call_goes_stale_without_piling_up_threads_then_recovers(
    nvml: FakeNvmlState, sampler_factory: Callable[..., NvmlSampler]
) -> None:
    cfg = gpu_cfg(interval=0.2, stale_after=1.0)
    sampler = sampler_factory(cfg)
    ok_sample(sampler)
    check = GpuCheck(sampler, cfg)
    assert verdict(check).ok
    threads = threading.active_count()
    nvml.set(hang_ms=5000)  # the next memory query sleeps inside the "driver"
    hung_at = time.monotonic()

    def stale() -> bool:
        assert threading.active_count() == threads  # a hang must never spawn more threads
        return verdict(check).reason.startswith("GPU sample is")

    wait_for(stale, timeout=cfg.stale_limit + cfg.interval + 0.5, what="the check to go stale")
    assert time.monotonic() - hung_at <= cfg.stale_limit + cfg.interval + 0.5
    result = verdict(check)
    assert not result.ok and not result.restart_worthy
    assert result.reason.endswith("old (limit 1.0s): NVML call hung or sampler stopped")
    nvml.set(hang_ms=0)  # the call returns; the next round samples again
    wait_for(lambda: verdict(check).ok, what="recovery after the hang")
    assert threading.active_count() == threads


def test_stop_is_prompt_even_with_a_long_interval(sampler_factory: Callable[..., NvmlSampler]) -> None:
    sampler = sampler_factory(gpu_cfg(interval=60.0))
    ok_sample(sampler)
    started = time.monotonic()
    assert sampler.stop(timeout=5.0)
    assert time.monotonic() - started < 1.0


def test_memory_leak_shows_as_a_positive_used_trend(
    nvml: FakeNvmlState, sampler_factory: Callable[..., NvmlSampler]
) -> None:
    cfg = gpu_cfg(interval=0.02)
    sampler = sampler_factory(cfg)
    first_sample(sampler)  # `current()` below asserts a sample exists: wait for the first one, not race it
    for step in range(1, 6):
        used = step * 64 * 1024**2
        nvml.set(gpus=(FakeGpu("GPU-aaaa", used=used),))
        wait_for(lambda: current(sampler).devices[0].used == used, what="the new usage")  # noqa: B023
    trend = sampler.trend()
    assert trend["GPU-aaaa"] > 0
    result = verdict(GpuCheck(sampler, cfg))
    assert result.ok
    assert "; used +" in result.reason and result.reason.endswith("/min")
    assert result.details["trend_bytes_per_minute"] == {"GPU-aaaa": pytest.approx(trend["GPU-aaaa"], rel=0.5)}


def test_steady_memory_has_a_flat_trend(sampler_factory: Callable[..., NvmlSampler]) -> None:
    sampler = sampler_factory(gpu_cfg(interval=0.02))
    ok_sample(sampler)
    wait_for(lambda: "GPU-aaaa" in sampler.trend(), what="a trend")
    assert sampler.trend()["GPU-aaaa"] == 0.0


# ------------------------------------------------------------------------------------------- environment


def test_environment_fingerprint_from_nvml(
    nvml: FakeNvmlState, fake_nvml_lib: Path, counters: FakeNvmlCounters
) -> None:
    nvml.set(gpus=(FakeGpu("GPU-bbbb", name="NVIDIA L4"), FakeGpu("GPU-aaaa")), driver="550.54.15", cuda=12040)
    env = nvml_environment(None, None, library_path=str(fake_nvml_lib))
    assert env == {"gpus": [H100, "NVIDIA L4"], "driver": "550.54.15", "cuda_driver": "12.4", "nvml": "ok"}
    assert nvml_environment(("GPU-bbbb",), None, library_path=str(fake_nvml_lib))["gpus"] == ["NVIDIA L4"]
    assert counters.initialised() == 0  # it initialised NVML, so it shut it down again


def test_environment_without_nvml_is_data_not_an_exception(
    tmp_path: Path, nvml: FakeNvmlState, fake_nvml_lib: Path
) -> None:
    env = nvml_environment(None, None, library_path=str(tmp_path / "missing.so"))
    assert env["gpus"] == [] and env["driver"] is None and env["cuda_driver"] is None
    assert env["nvml"].startswith("unavailable: NVML library not found")
    nvml.set(init="driver_not_loaded")
    env = nvml_environment(None, None, library_path=str(fake_nvml_lib))
    assert env == {
        "gpus": [],
        "driver": None,
        "cuda_driver": None,
        "nvml": "unavailable: NVIDIA driver not loaded (NVML init: Driver Not Loaded)",
    }


def test_environment_names_a_missing_configured_gpu_and_honours_visible_none(
    fake_nvml_lib: Path, nvml: FakeNvmlState
) -> None:
    env = nvml_environment(("GPU-9999",), None, library_path=str(fake_nvml_lib))
    assert env["driver"] == "550.54.15" and env["gpus"] == []
    assert env["nvml"] == "error: gpu.devices: GPU-9999 not found (NVML sees: GPU-aaaa)"
    env = nvml_environment(None, "void", library_path=str(fake_nvml_lib))
    assert env == {"gpus": [], "driver": "550.54.15", "cuda_driver": "12.4", "nvml": "ok"}


def test_environment_does_not_shut_nvml_down_under_a_running_sampler(
    fake_nvml_lib: Path, sampler_factory: Callable[..., NvmlSampler], counters: FakeNvmlCounters
) -> None:
    sampler = sampler_factory()
    ok_sample(sampler)
    assert nvml_environment(None, None, library_path=str(fake_nvml_lib))["nvml"] == "ok"
    assert counters.initialised() == 1
    v2_calls = counters.memory_calls(2)
    wait_for(lambda: counters.memory_calls(2) > v2_calls + 2, what="more samples")
    assert current(sampler).error is None


# -------------------------------------------------------------------------------------------- the check


class NeverSampled:
    """A source whose sampler has not finished its first round."""

    def latest(self) -> GpuSample | None:
        return None

    def trend(self) -> dict[str, float]:
        return {}


class FrozenSample:
    """A source stuck on one sample (its sampler hung or stopped)."""

    def __init__(self, sample: GpuSample) -> None:
        self.sample = sample

    def latest(self) -> GpuSample | None:
        return self.sample

    def trend(self) -> dict[str, float]:
        return {}


async def test_check_before_the_first_sample_fails() -> None:
    result = GpuCheck(NeverSampled(), gpu_cfg()).now()
    assert not result.ok and result.reason == "no GPU sample yet" and not result.restart_worthy


async def test_check_on_an_old_sample_fails_as_stale() -> None:
    sample = GpuSample(100.0, (GpuMemory("GPU-1234", H100, H100_TOTAL, H100_TOTAL, 0),))
    cfg = gpu_cfg(interval=2.0)  # stale limit max(3 x 2, 5) = 6 s
    result = GpuCheck(FrozenSample(sample), cfg, clock=lambda: 107.2).now()
    assert result.reason == "GPU sample is 7.2s old (limit 6.0s): NVML call hung or sampler stopped"
    assert not result.restart_worthy
    assert (GpuCheck(FrozenSample(sample), cfg, clock=lambda: 105.9).now()).ok


async def test_check_names_every_gpu_short_of_headroom() -> None:
    sample = GpuSample(
        0.0,
        (
            GpuMemory("GPU-a", H100, H100_TOTAL, 1 * GiB, H100_TOTAL - 1 * GiB),
            GpuMemory("GPU-b", H100, H100_TOTAL, 40 * GiB, 40 * GiB),
            GpuMemory("GPU-c", "", H100_TOTAL, 512 * 1024**2, H100_TOTAL - 512 * 1024**2),
        ),
    )
    result = GpuCheck(FrozenSample(sample), gpu_cfg(), clock=lambda: 0.0).now()
    assert result.reason == (f"GPU-a ({H100}) free 1.0GiB < min_free 2.0GiB; GPU-c free 512.0MiB < min_free 2.0GiB")
    assert result.observed_value == 512 * 1024**2


async def test_check_pass_with_several_gpus_names_the_tightest() -> None:
    sample = GpuSample(
        0.0,
        (
            GpuMemory("GPU-a", H100, H100_TOTAL, 70 * GiB, 10 * GiB),
            GpuMemory("GPU-b", H100, H100_TOTAL, 60 * GiB, 20 * GiB),
        ),
    )
    result = GpuCheck(FrozenSample(sample), gpu_cfg(), clock=lambda: 0.0).now()
    assert result.reason == "ok: 2 GPUs, least free GPU-b free 60.0GiB of 80.0GiB"


# ----------------------------------------------------------------------------------------- Triton metrics


def triton_metrics(gpus: dict[str, tuple[int, int]]) -> str:
    """Triton's /metrics text: per-model counters plus nv_gpu_memory_* per GPU (total, used)."""
    lines = [
        "# HELP nv_inference_request_success Number of successful inference requests",
        "# TYPE nv_inference_request_success counter",
        'nv_inference_request_success{model="resnet50",version="1"} 42',
    ]
    if gpus:
        lines += ["# HELP nv_gpu_memory_total_bytes GPU total memory, in bytes"]
        lines += ["# TYPE nv_gpu_memory_total_bytes gauge"]
        lines += [f'nv_gpu_memory_total_bytes{{gpu_uuid="{u}"}} {t}' for u, (t, _) in gpus.items()]
        lines += ["# HELP nv_gpu_memory_used_bytes GPU used memory, in bytes"]
        lines += ["# TYPE nv_gpu_memory_used_bytes gauge"]
        lines += [f'nv_gpu_memory_used_bytes{{gpu_uuid="{u}"}} {used}' for u, (_, used) in gpus.items()]
    return "\n".join(lines) + "\n"


class FakeTritonMetrics:
    """A real HTTP server on 127.0.0.1 answering /metrics like Triton; tests change `text` / `status`."""

    def __init__(self) -> None:
        self.text = triton_metrics({"GPU-aaaa": (H100_TOTAL, 10 * GiB)})
        self.status = 200
        self.hang = False
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        if self.hang:
            await self.release.wait()
        return web.Response(text=self.text, status=self.status, content_type="text/plain")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.handle)
        return app


ServerFactory = Callable[[web.Application], Awaitable[Any]]


class Session:
    """A TritonClient opened for a test (its session carries every fetch of Triton's metrics page)."""

    def __init__(self) -> None:
        self.client = TritonClient("127.0.0.1:1")

    async def __aenter__(self) -> Session:
        await self.client.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()

    async def close(self) -> None:
        await self.client.close()

    def sampler(self, cfg: GpuConfig, url: str, visible: str | None = None) -> TritonMetricsSampler:
        page = MetricsPage(self.client, url, timeout=min(cfg.interval, 2.0))
        return TritonMetricsSampler(cfg, page, visible_devices=visible)


async def run_triton_sampler(
    url: str, cfg: GpuConfig, visible: str | None = None
) -> tuple[TritonMetricsSampler, Session]:
    session = Session()
    await session.client.open()
    sampler = session.sampler(cfg, url, visible)
    await sampler.start_sampling()
    return sampler, session


async def test_triton_metrics_pass_and_below_threshold(aiohttp_server: ServerFactory) -> None:
    fake = FakeTritonMetrics()
    server = await aiohttp_server(fake.app())
    cfg = gpu_cfg(interval=0.05)
    sampler, session = await run_triton_sampler(str(server.make_url("/metrics")), cfg)
    try:
        await wait_until(sampler.latest, what="the first metrics sample")
        sample = sampler.latest()
        assert sample is not None and sample.error is None
        assert sample.devices == (GpuMemory("GPU-aaaa", "", H100_TOTAL, 70 * GiB, 10 * GiB),)
        check = GpuCheck(sampler, cfg)
        result = check.now()
        assert result.ok and result.reason.startswith("ok: GPU-aaaa free 70.0GiB of 80.0GiB")

        fake.text = triton_metrics({"GPU-aaaa": (H100_TOTAL, H100_TOTAL - GiB)})
        await wait_until(lambda: current(sampler).devices[0].free == GiB, what="the new usage")
        result = check.now()
        assert not result.ok and result.restart_worthy
        assert result.reason.startswith("GPU-aaaa free 1.0GiB < min_free 2.0GiB")
    finally:
        await sampler.stop_sampling()
        await session.close()


async def test_triton_metrics_honour_selected_uuids(aiohttp_server: ServerFactory) -> None:
    fake = FakeTritonMetrics()
    fake.text = triton_metrics({"GPU-aaaa": (H100_TOTAL, 0), "GPU-bbbb": (H100_TOTAL, H100_TOTAL)})
    server = await aiohttp_server(fake.app())
    url = str(server.make_url("/metrics"))
    async with Session() as session:
        by_env = session.sampler(gpu_cfg(), url, "GPU-aaaa")
        assert [d.gpu for d in (await by_env.fetch_once()).devices] == ["GPU-aaaa"]
        missing = session.sampler(gpu_cfg(devices=("GPU-cccc",)), url)
        assert (await missing.fetch_once()).error == (
            "gpu.devices: GPU-cccc not in Triton's GPU metrics (Triton reports: GPU-aaaa, GPU-bbbb)"
        )
        by_index = session.sampler(gpu_cfg(devices=("0",)), url)
        error = (await by_index.fetch_once()).error
        assert error is not None and "labels GPUs by UUID only" in error


async def test_cpu_only_triton_says_it_exports_no_gpu_metrics(aiohttp_server: ServerFactory) -> None:
    fake = FakeTritonMetrics()
    fake.text = triton_metrics({})
    server = await aiohttp_server(fake.app())
    cfg = gpu_cfg()
    sampler, session = await run_triton_sampler(str(server.make_url("/metrics")), cfg)
    try:
        await wait_until(sampler.latest, what="the first metrics sample")
        result = GpuCheck(sampler, cfg).now()
        assert not result.ok and result.reason == NO_GPU_METRICS and not result.restart_worthy
    finally:
        await sampler.stop_sampling()
        await session.close()


async def test_triton_metrics_http_error_is_reported(aiohttp_server: ServerFactory) -> None:
    fake = FakeTritonMetrics()
    fake.status = 503
    server = await aiohttp_server(fake.app())
    url = str(server.make_url("/metrics"))
    async with Session() as session:
        sample = await session.sampler(gpu_cfg(), url).fetch_once()
    assert sample.error == f"Triton metrics {url}: HTTP 503"


async def test_triton_metrics_server_down_is_an_error_sample(aiohttp_server: ServerFactory) -> None:
    server = await aiohttp_server(FakeTritonMetrics().app())
    url = str(server.make_url("/metrics"))
    await server.close()  # nothing listens on that port any more: connection refused
    cfg = gpu_cfg()
    sampler, session = await run_triton_sampler(url, cfg)
    try:
        await wait_until(sampler.latest, what="the first metrics sample")
        result = GpuCheck(sampler, cfg).now()
        assert not result.ok and result.reason.startswith(f"cannot read Triton metrics: cannot connect to {url}: ")
    finally:
        await sampler.stop_sampling()
        await session.close()


async def test_hung_triton_metrics_fetch_is_bounded(aiohttp_server: ServerFactory) -> None:
    fake = FakeTritonMetrics()
    fake.hang = True
    server = await aiohttp_server(fake.app())
    url = str(server.make_url("/metrics"))
    try:
        async with Session() as session:
            started = time.monotonic()
            sample = await session.sampler(gpu_cfg(interval=0.2), url).fetch_once()
            assert time.monotonic() - started < 1.5
        assert sample.error == f"Triton metrics {url}: no answer within 0.2s"
    finally:
        fake.release.set()


# ------------------------------------------------------------------------------------------- a real GPU


@pytest.mark.gpu
def test_real_nvml_reads_every_visible_gpu() -> None:
    import pynvml

    visible = os.environ.get("NVIDIA_VISIBLE_DEVICES")
    # This also points pynvml back at the system library if a fake one was loaded earlier in the session.
    env = nvml_environment(None, visible)
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pytest.skip("no NVIDIA GPU/driver on this machine")
    pynvml.nvmlShutdown()
    assert env["nvml"] == "ok" and env["driver"] and env["gpus"], env
    cfg = gpu_cfg(interval=0.2)
    sampler = NvmlSampler(cfg, visible_devices=visible)
    sampler.start()
    try:
        sample = first_sample(sampler, timeout=10.0)
        assert sample.error is None, sample.error
        assert sample.devices
        for d in sample.devices:
            assert d.gpu.startswith(("GPU-", "MIG-")) and d.name
            assert 0 < d.total and 0 <= d.free <= d.total and 0 <= d.used <= d.total
        result = verdict(GpuCheck(sampler, cfg))
        assert result.ok or result.restart_worthy, result.reason
    finally:
        assert sampler.stop(timeout=5.0)


# ------------------------------------------------------------------------------------- the CLI, GPU alone


def test_check_only_gpu_reads_the_gpus_while_triton_is_down(
    tmp_path: Path, fake_nvml_lib: Path, nvml: FakeNvmlState
) -> None:
    """`probe check --only gpu` is a node-level GPU check: it must not need (or wait for) Triton."""
    cfg = helpers.write_config(
        tmp_path, f"127.0.0.1:{helpers.free_port()}", [], gpu={"source": "nvml", "min_free": "10GiB"}
    )
    env = {
        "LD_LIBRARY_PATH": os.pathsep.join(
            p for p in (str(fake_nvml_lib.parent), os.environ.get("LD_LIBRARY_PATH")) if p
        ),
        "NVIDIA_VISIBLE_DEVICES": "all",
    }
    ok = helpers.run_cli("check", "-c", str(cfg), "--only", "gpu", env=env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("[+]gpu ok: GPU-aaaa free ") and "triton" not in ok.stdout
    nvml.set(gpus=[FakeGpu(uuid="GPU-aaaa", used=H100_TOTAL - 2 * GiB)])
    short = helpers.run_cli("check", "-c", str(cfg), "--only", "gpu", env=env)
    assert short.returncode == 3, short.stderr
    assert short.stdout.startswith("[-]gpu failed: GPU-aaaa") and "< min_free 10.0GiB" in short.stdout
    # Anything else still needs Triton first, and says so with exit 2.
    down = helpers.run_cli("check", "-c", str(cfg), env=env)
    assert down.returncode == 2 and down.stderr.startswith("probe: triton unreachable: "), down.stderr
