"""Canary inputs for every datatype and fill, and the properties of the canonical digest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

from probe.config import DATATYPES, CanaryConfig, InputSpec
from probe.tensors import (
    NUMPY_DTYPES,
    InputError,
    build_input,
    build_inputs,
    canonical_bytes,
    digest,
    input_digest,
)


def spec(datatype: str, fill: str = "zeros", shape: tuple[int, ...] = (2, 3), **kw: object) -> InputSpec:
    return InputSpec(name="X", datatype=datatype, shape=shape, fill=fill, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("datatype", DATATYPES)
@pytest.mark.parametrize("fill", ["zeros", "value", "random", "data"])
def test_every_datatype_and_fill_builds_the_right_tensor(datatype: str, fill: str) -> None:
    kw: dict[str, object] = {}
    if fill == "value":
        kw["value"] = 1
    if fill == "random":
        kw["seed"] = 5
    if fill == "data":
        kw["data"] = [[1, 0, 1], [0, 1, 1]]
    arr = build_input(spec(datatype, fill, **kw))
    assert arr.shape == (2, 3)
    assert arr.dtype == NUMPY_DTYPES[datatype]
    again = build_input(spec(datatype, fill, **kw))
    assert digest(datatype, arr) == digest(datatype, again), "fills must be deterministic"


def test_ones_and_random_seed_changes_values() -> None:
    assert build_input(spec("INT32", "ones")).sum() == 6
    a = build_input(spec("FP32", "random", seed=1))
    b = build_input(spec("FP32", "random", seed=2))
    assert digest("FP32", a) != digest("FP32", b)


def test_file_fill_reads_npy_and_checks_shape(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.arange(6, dtype=np.float64).reshape(2, 3))
    arr = build_input(spec("FP32", "file", file=tmp_path / "x.npy"))
    assert arr.dtype == np.float32 and arr[1, 2] == 5.0
    with pytest.raises(InputError, match=r"has shape \[2, 3\], config says \[3, 2\]"):
        build_input(spec("FP32", "file", shape=(3, 2), file=tmp_path / "x.npy"))
    with pytest.raises(InputError, match="not found"):
        build_input(spec("FP32", "file", file=tmp_path / "missing.npy"))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match="cannot read"):
        build_input(spec("FP32", "file", file=tmp_path / "junk.npy"))


def test_out_of_range_values_are_refused() -> None:
    with pytest.raises(InputError, match="out of range for UINT8"):
        build_input(spec("UINT8", "value", value=300))
    with pytest.raises(InputError, match="non-integer value for INT32"):
        build_input(spec("INT32", "data", shape=(2,), data=[1.5, 2]))


def test_digest_equal_tensors_equal_digests() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.asfortranarray(a.copy())  # same values, different memory layout
    assert digest("FP32", a) == digest("FP32", b)
    big_endian = a.astype(">f4")
    assert digest("FP32", a) == digest("FP32", big_endian)
    assert digest("FP32", a).startswith("xxh3_128:") and len(digest("FP32", a)) == 9 + 32


def test_digest_changes_with_value_shape_and_datatype() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    base = digest("FP32", a)
    changed = a.copy()
    changed[2, 3] = np.nextafter(changed[2, 3], np.float32(100))
    assert digest("FP32", changed) != base
    assert digest("FP32", a.reshape(4, 3)) != base
    assert digest("FP32", a.reshape(12)) != base
    assert digest("INT32", a.view(np.int32)) != digest("FP32", a), "same bytes, other datatype"


def test_bytes_elements_are_length_prefixed() -> None:
    one = np.array([b"ab", b"c"], dtype=np.object_)
    two = np.array([b"a", b"bc"], dtype=np.object_)
    assert digest("BYTES", one) != digest("BYTES", two)
    assert digest("BYTES", one) == digest("BYTES", np.array(["ab", "c"], dtype=np.object_))


def test_input_digest_covers_names_and_values() -> None:
    c1 = CanaryConfig(name="c", model="m", inputs=(spec("FP32", "zeros"),))
    c2 = CanaryConfig(name="c", model="m", inputs=(spec("FP32", "ones"),))
    d1 = input_digest(c1, build_inputs(c1))
    d2 = input_digest(c2, build_inputs(c2))
    assert d1 != d2
    assert d1 == input_digest(c1, build_inputs(c1))


# Known answers: golden files recorded by any earlier release must keep matching, so the canonical encoding and
# its digest may never change silently (a faster implementation included).
KNOWN_DIGESTS = [
    ("FP32", np.arange(6, dtype=np.float32).reshape(2, 3), "xxh3_128:661326011cbd8b07cc00e0e7bb7343cd"),
    ("BOOL", np.array([True, False, True]), "xxh3_128:348c09d06b61463bd25d500f8d9be567"),
    ("BYTES", np.array([b"ab", b""], dtype=object), "xxh3_128:b554b732602da326370fdb141b16b2be"),
    ("INT64", np.array(7, dtype=np.int64), "xxh3_128:ac8be97fdd4a30713a57fd945dd4b14a"),
    ("FP16", np.zeros((0, 4), np.float16), "xxh3_128:1aeedf20eb655fc17913b4c193674fa1"),
]


@pytest.mark.parametrize(("datatype", "arr", "want"), KNOWN_DIGESTS, ids=[k[0] for k in KNOWN_DIGESTS])
def test_digest_of_known_tensors_never_changes(datatype: str, arr: np.ndarray[Any, Any], want: str) -> None:
    assert digest(datatype, arr) == want
    # The streamed encoding (used for BYTES and by the benchmark) hashes to the same value.
    h = xxhash.xxh3_128()
    for chunk in canonical_bytes(datatype, arr):
        h.update(chunk)
    assert "xxh3_128:" + h.hexdigest() == want
    # A big-endian or strided copy of the same values is the same tensor.
    if datatype not in ("BYTES", "BOOL"):
        assert digest(datatype, arr.astype(arr.dtype.newbyteorder(">"))) == want
        assert digest(datatype, np.array(arr, order="F")) == want
