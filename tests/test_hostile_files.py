"""Hostile and oversized golden files and canary inputs (issue 14): refused unread, with one-line reasons, off the
event loop, and never leaving a stale golden in place. No Triton here: the golden is loaded before the canary
asks Triton anything; tests/reliability/test_hostile_goldens.py repeats the point against the real one."""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from probe.config import load_config
from probe.golden import (
    GOLDEN_MAX_BYTES,
    Golden,
    GoldenError,
    GoldenStore,
    load_golden,
    tensors_path,
)
from probe.tensors import InputError, build_input
from tests.helpers import ServeProcess, free_port, wait_for, write_config
from tests.hostile import (
    OUTPUT,
    PROBS,
    describe,
    npy_header,
    oversized_json,
    run_measured,
    tolerance_golden,
    write_npz,
    write_zero_bomb_npz,
)

CANARY = {
    "name": "demo",
    "model": "demo_classifier",
    "inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [1, 3, 8, 8], "fill": {"random": {"seed": 7}}}],
    "compare": {"mode": "tolerance"},
}
TWO_GIB = (2**29,)  # float32


@pytest.fixture
def golden(tmp_path: Path) -> tuple[Path, Path, str]:
    """A config whose canary has a valid tolerance golden: (config, golden JSON, its .npz member name)."""
    cfg = write_config(tmp_path, "127.0.0.1:1", [CANARY])
    path, member = tolerance_golden(cfg)
    return cfg, path, member


def _member(shape: tuple[int, ...], descr: str = "<f4", data: bytes = b"") -> bytes:
    return npy_header(shape, descr) + data


# ---------------------------------------------------------------------------------------------- the caps


def test_golden_json_over_the_cap_is_refused_unread(golden: tuple[Path, Path, str]) -> None:
    _, path, _ = golden
    oversized_json(path, GOLDEN_MAX_BYTES + 2**20)
    started = time.monotonic()
    with pytest.raises(GoldenError) as e:
        load_golden(path)
    assert str(e.value) == f"{path}: golden file is 5.0MiB, over the 4.0MiB cap on a golden file; not read"
    assert time.monotonic() - started < 0.5


def test_npz_with_a_2_gib_member_is_refused_by_its_derived_cap_unread(golden: tuple[Path, Path, str]) -> None:
    """The issue's file: 2 MiB on disk, a 2 GiB member. The records reference 40 bytes of tensors, so the .npz may
    be at most 2 x 40 B + 1 MiB."""
    _, path, member = golden
    write_zero_bomb_npz(tensors_path(path), member, TWO_GIB)
    with pytest.raises(GoldenError) as e:
        load_golden(path)
    assert str(e.value) == (
        f"{tensors_path(path)}: golden tensors file is 2.0MiB, over its 1.0MiB cap (2 x the 40B of tensors its "
        "records reference, + 1.0MiB); not read"
    )


def test_validate_rejects_the_2_gib_member_npz_quickly(golden: tuple[Path, Path, str]) -> None:
    """It took 9.4 s and 2.1 GB, and passed."""
    cfg, path, member = golden
    assert run_measured("validate", "-c", str(cfg)).returncode == 0
    write_zero_bomb_npz(tensors_path(path), member, TWO_GIB)
    m = run_measured("validate", "-c", str(cfg))
    assert m.returncode == 1
    assert len(m.stderr.splitlines()) == 1 and "golden tensors file is 2.0MiB, over its 1.0MiB cap" in m.stderr
    assert m.seconds < 10 and m.peak_rss < 200 * 2**20, describe(m)


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        pytest.param(
            _member((10**12,), data=b"\0" * 40),
            r"declares shape \[1000000000000\] dtype float32, but the record says \[1, 10\] FP32 \(float32\); not read",
            id="declares-10**12",
        ),
        pytest.param(
            _member((1, 10), "<f8", b"\0" * 80),
            r"declares shape \[1, 10\] dtype float64, but the record says \[1, 10\] FP32 \(float32\); not read",
            id="other-dtype",
        ),
        pytest.param(
            _member((1, 10), "|O", b"\x80\x04N."),
            r"holds Python objects \(dtype object\); pickles are refused",
            id="pickle",
        ),
        pytest.param(_member((1, 10), data=b"\0" * 12), r"holds 12 bytes of data, 40 declared", id="short"),
        pytest.param(
            _member((1, 10), data=b"\0" * (1 << 16)),
            r"its member is 64\.1KiB uncompressed; the record's shape \[1, 10\] FP32 needs 40B; not read",
            id="long",
        ),
        pytest.param(b"PK\x03\x04 not npy", r"not a readable npy header: .+", id="not-npy"),
    ],
)
def test_npz_member_is_checked_against_its_record_before_its_data_is_read(
    golden: tuple[Path, Path, str], member: bytes, reason: str
) -> None:
    _, path, name = golden
    write_npz(tensors_path(path), {name: member})
    with pytest.raises(GoldenError) as e:
        load_golden(path)
    prefix = f"{tensors_path(path)}: tensor for output {OUTPUT} of the record from 2026-11-01T00:00:00Z: "
    assert str(e.value).startswith(prefix) and "\n" not in str(e.value)
    assert re.fullmatch(reason, str(e.value)[len(prefix) :]), str(e.value)


def test_only_the_members_records_reference_are_read(golden: tuple[Path, Path, str]) -> None:
    """Every member used to be loaded: one declaring 10**12 elements, referenced by no record, was a MemoryError."""
    _, path, name = golden
    write_npz(tensors_path(path), {name: _member((1, 10), data=PROBS.tobytes()), "junk.npy": _member((10**12,))})
    loaded = load_golden(path)
    assert list(loaded.tensors) == [name.removesuffix(".npy")]
    np.testing.assert_array_equal(loaded.tensors[name.removesuffix(".npy")], PROBS)


def test_a_fifo_where_the_golden_should_be_is_refused_without_hanging(golden: tuple[Path, Path, str]) -> None:
    _, path, _ = golden
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(GoldenError, match=r"golden file is not a regular file$"):
        load_golden(path)


# ---------------------------------------------------------------------------------------------- the store


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def later(self) -> None:
        self.now += GoldenStore.RECHECK_S


async def test_a_failed_load_is_reported_on_every_run_until_the_file_is_fixed(golden: tuple[Path, Path, str]) -> None:
    """The stamp used to be stored before loading and only GoldenError caught: after one `internal error:
    MemoryError` (a member declaring 10**12 elements) every later run said `ok` against the previous golden."""
    _, path, name = golden
    npz = tensors_path(path)
    good = npz.read_bytes()
    clock = Clock()
    store = GoldenStore(path, clock=clock)
    assert isinstance(await store.current(), Golden) and store.cached() is not None
    write_npz(npz, {name: _member((10**12,), data=b"\0" * 40)})
    clock.later()
    for _ in range(3):  # the same reason on every run, however often it is asked, and no golden behind it
        with pytest.raises(GoldenError, match=r"declares shape \[1000000000000\]"):
            await store.current()
        assert store.cached() is None
        clock.later()
    npz.write_bytes(good)
    clock.later()
    assert isinstance(await store.current(), Golden) and store.cached() is not None


async def test_an_unexpected_error_while_loading_is_a_reason_too(golden: tuple[Path, Path, str]) -> None:
    _, path, _ = golden
    calls: list[Path] = []

    def exhausted(p: Path) -> Golden:
        calls.append(p)
        raise MemoryError("cannot allocate 3.6 TiB")

    clock = Clock()
    store = GoldenStore(path, clock=clock, loader=exhausted)
    for _ in range(3):
        with pytest.raises(GoldenError) as e:
            await store.current()
        assert str(e.value) == f"{path}: cannot load golden file: MemoryError: cannot allocate 3.6 TiB"
        assert store.cached() is None
        clock.later()
    assert len(calls) == 1, "the files did not change: loaded once, reported every time"


async def test_loading_runs_off_the_event_loop_and_one_load_serves_every_caller(
    golden: tuple[Path, Path, str],
) -> None:
    _, path, _ = golden
    release = threading.Event()
    calls: list[Path] = []

    def slow(p: Path) -> Golden:
        calls.append(p)
        assert release.wait(10), "never released"
        return load_golden(p)

    store = GoldenStore(path, loader=slow)
    callers = [asyncio.ensure_future(store.current()) for _ in range(3)]
    ticks = 0
    deadline = time.monotonic() + 10
    while ticks < 20:  # the loop keeps turning while the load is blocked in its thread
        await asyncio.sleep(0.005)
        ticks += 1
        assert time.monotonic() < deadline
    assert not any(c.done() for c in callers) and len(calls) == 1
    release.set()
    goldens = await asyncio.gather(*callers)
    assert all(g is goldens[0] for g in goldens) and len(calls) == 1


async def test_a_caller_cut_by_its_deadline_leaves_the_load_for_the_next(golden: tuple[Path, Path, str]) -> None:
    _, path, _ = golden
    release = threading.Event()
    calls: list[Path] = []

    def slow(p: Path) -> Golden:
        calls.append(p)
        assert release.wait(10)
        return load_golden(p)

    store = GoldenStore(path, loader=slow)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(store.current(), 0.05)
    release.set()
    assert isinstance(await asyncio.wait_for(store.current(), 10), Golden)
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------- probe serve


def _get(url: str) -> tuple[int, str, float]:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode(), time.monotonic() - started
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), time.monotonic() - started


def _swap(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    tmp.replace(path)


def test_live_ping_keeps_answering_while_hostile_goldens_are_swapped_in(
    tmp_path: Path, serve_process: Callable[..., ServeProcess]
) -> None:
    """`probe serve` (Triton unreachable: the golden is loaded before Triton is asked) re-reads its golden every
    second. Each hostile file replaces it in turn; /live/ping is asked without pause meanwhile, and every answer
    must come promptly (the 2 GiB member stopped it answering for 3 s)."""
    port = free_port()
    probe = {"timeout": 0.5, "min_interval": 0, "interval": 0.1}
    cfg = write_config(tmp_path, f"127.0.0.1:{free_port()}", [CANARY], listen={"port": port}, probe=probe)
    path, member = tolerance_golden(cfg)
    npz = tensors_path(path)
    good_json, good_npz = path.read_bytes(), npz.read_bytes()
    serve = serve_process(cfg, port)
    check = f"{serve.base}/ready/canary/demo"
    slowest: list[float] = []

    def reason_becomes(pattern: str) -> None:
        def seen() -> bool:
            status, body, took = _get(f"{serve.base}/live/ping")
            slowest.append(took)
            assert status == 200, body
            return re.search(pattern, _get(check)[1]) is not None

        wait_for(seen, 20, f"canary/demo to say {pattern}", every=0.01)

    reason_becomes("cannot connect to Triton")  # the good golden is in; Triton is what fails
    write_zero_bomb_npz(tmp_path / "bomb.npz", member, TWO_GIB)
    hostile: list[tuple[Callable[[], None], str]] = [
        (lambda: _swap(npz, (tmp_path / "bomb.npz").read_bytes()), "golden tensors file is 2.0MiB, over its"),
        (lambda: _swap(npz, good_npz), "cannot connect to Triton"),
        (lambda: write_npz(npz, {member: _member((10**12,), data=b"\0" * 40)}), r"declares shape \[1000000000000\]"),
        (lambda: (_swap(npz, good_npz), oversized_json(path, 115 * 2**20)), "golden file is 115.0MiB, over the"),
        (lambda: _swap(path, good_json), "cannot connect to Triton"),
    ]
    for inject, reason in hostile:
        inject()
        reason_becomes(reason)
    print(f"\n/live/ping: {len(slowest)} probes, slowest {max(slowest) * 1000:.1f} ms")
    assert max(slowest) < 0.5, f"/live/ping took up to {max(slowest):.3f}s over {len(slowest)} probes"
    assert "Traceback" not in serve.logs()


# ---------------------------------------------------------------------------------------------- canary inputs


def _file_spec(tmp_path: Path, shape: list[int]) -> Any:
    cfg = write_config(
        tmp_path,
        "127.0.0.1:1",
        [
            {
                "name": "f",
                "model": "m",
                "inputs": [{"name": "X", "datatype": "FP32", "shape": shape, "fill": {"file": "x.npy"}}],
            }
        ],
    )
    return load_config(cfg).canaries[0].inputs[0]


def test_input_npy_declaring_another_shape_is_refused_before_its_data_is_read(tmp_path: Path) -> None:
    spec = _file_spec(tmp_path, [2, 2])
    (tmp_path / "x.npy").write_bytes(npy_header((10**12,)) + b"\0" * 16)  # np.load allocated 4 TB, then failed
    with pytest.raises(InputError) as e:
        build_input(spec)
    assert str(e.value) == f"input X: {tmp_path / 'x.npy'} has shape [1000000000000], config says [2, 2]"


def test_input_npy_of_objects_is_refused(tmp_path: Path) -> None:
    spec = _file_spec(tmp_path, [2])
    (tmp_path / "x.npy").write_bytes(npy_header((2,), "|O") + b"\x80\x04N.")
    with pytest.raises(InputError, match=r"holds Python objects \(dtype object\); pickles are refused$"):
        build_input(spec)


def test_canary_input_over_the_cap_is_a_config_error_not_a_memory_error(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        "127.0.0.1:1",
        [{"name": "c", "model": "m", "inputs": [{"name": "X", "datatype": "FP32", "shape": [1000, 1000, 1000]}]}],
    )
    m = run_measured("validate", "--config-only", "-c", str(cfg))
    assert m.returncode == 1
    assert m.stderr == (
        "probe: config error: canaries[0].inputs[0].shape: [1000, 1000, 1000] FP32 is 3.7GiB, over the 64.0MiB cap "
        "on a canary input\n"
    )
    assert m.peak_rss < 200 * 2**20, describe(m)


def test_golden_written_for_the_test_is_valid(golden: tuple[Path, Path, str]) -> None:
    cfg, path, _ = golden
    raw = json.loads(path.read_text())
    assert raw["compare"] == "tolerance" and raw["records"][0]["tensors"] is True
    assert run_measured("validate", "-c", str(cfg)).returncode == 0
