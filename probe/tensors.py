"""Triton datatypes, the canary's fixed input tensors, and the canonical digest of a tensor.

The digest is `xxh3_128` over a canonical encoding: a magic, the datatype, the rank and each dimension, then
the elements in little-endian C order (BOOL as one byte each; BYTES elements each prefixed by their length as
a little-endian uint64). Equal tensors always give equal digests; a change of any value, the shape or the
datatype changes the encoding and therefore the digest.
"""

from __future__ import annotations

import functools
import math
import os
import stat
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from probe.config import CANARY_INPUT_MAX_BYTES, DATATYPE_DTYPES, CanaryConfig, InputSpec, clip, format_bytes

DIGEST_PREFIX = "xxh3_128:"
_MAGIC = b"probe-tensor-v1\0"

NUMPY_DTYPES: dict[str, np.dtype[Any]] = {name: np.dtype(code) for name, code in DATATYPE_DTYPES.items()}


class InputError(ValueError):
    """A canary input cannot be built (unreadable .npy, wrong shape, value out of range)."""


class NpyHeaderError(ValueError):
    """An .npy header that cannot be read: not npy, an unknown version, or a header beyond `NPY_HEADER_MAX`."""


NPY_HEADER_MAX = 10_000
"""numpy's own default bound on an .npy header (the magic, the length and the dict describing the array)."""
_NPY_FORMAT: Any = np.lib.format  # untyped in numpy's stubs


def read_npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """Shape, Fortran order and dtype from the header of an .npy stream, reading nothing of its data: what it
    declares can then be checked before a byte of it is read (or allocated)."""
    try:
        version = _NPY_FORMAT.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = _NPY_FORMAT.read_array_header_1_0(f, max_header_size=NPY_HEADER_MAX)
        elif version == (2, 0):
            shape, fortran, dtype = _NPY_FORMAT.read_array_header_2_0(f, max_header_size=NPY_HEADER_MAX)
        else:
            raise NpyHeaderError(f"npy format version {version[0]}.{version[1]} is not read")
    except NpyHeaderError:
        raise
    except (ValueError, EOFError, SyntaxError, TypeError) as e:
        raise NpyHeaderError(f"not a readable npy header: {clip(str(e))}") from None
    return tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype)


def _bytes_element(v: Any) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode("utf-8")
    if isinstance(v, np.bytes_):
        return bytes(v)
    return str(v).encode("utf-8")


@functools.lru_cache(maxsize=512)
def _header(datatype: str, shape: tuple[int, ...]) -> bytes:
    """Magic, datatype, rank and dimensions: the same for every run of a canary, so built once."""
    head = _MAGIC + datatype.encode("ascii") + b"\0" + struct.pack("<I", len(shape))
    if shape:
        head += struct.pack(f"<{len(shape)}q", *shape)
    return head


def _elements(datatype: str, arr: np.ndarray[Any, Any]) -> Any:
    """The elements of a non-BYTES tensor as little-endian C-order bytes (BOOL as one byte each)."""
    dt = np.dtype(np.uint8) if datatype == "BOOL" else NUMPY_DTYPES[datatype]
    if arr.dtype == dt and arr.flags.c_contiguous:
        return arr  # already the canonical bytes (what Triton's answers decode to): hashed in place, no copy
    data = np.ascontiguousarray(arr, dtype=dt)
    return data.reshape(-1).view(np.uint8).data


def canonical_bytes(datatype: str, arr: np.ndarray[Any, Any]) -> Iterable[bytes | memoryview]:
    """The canonical encoding of a tensor, as chunks (so large tensors are not copied twice)."""
    yield _header(datatype, tuple(int(d) for d in arr.shape))
    if datatype == "BYTES":
        for v in arr.reshape(-1):
            b = _bytes_element(v)
            yield struct.pack("<Q", len(b))
            yield b
        return
    yield _elements(datatype, arr)


def digest(datatype: str, arr: np.ndarray[Any, Any]) -> str:
    """`xxh3_128:<hex>` of the canonical encoding."""
    if datatype == "BYTES":
        h = xxhash.xxh3_128()
        for chunk in canonical_bytes(datatype, arr):
            h.update(chunk)
    else:  # the common case on every canary run: two updates, no generator
        h = xxhash.xxh3_128(_header(datatype, tuple(int(d) for d in arr.shape)))
        h.update(_elements(datatype, arr))
    return DIGEST_PREFIX + h.hexdigest()


def _cast(values: np.ndarray[Any, Any], spec: InputSpec) -> np.ndarray[Any, Any]:
    dt = NUMPY_DTYPES[spec.datatype]
    if spec.datatype == "BYTES":
        out = np.empty(values.shape, dtype=np.object_)
        flat = values.reshape(-1)
        for i, v in enumerate(flat):
            out.reshape(-1)[i] = _bytes_element(v)
        return out
    if dt.kind in "iu":
        info = np.iinfo(dt)
        num = np.asarray(values)
        if num.dtype.kind == "f" and not np.all(np.isfinite(num)):
            raise InputError(f"input {spec.name}: non-finite value for {spec.datatype}")
        if num.size and (num.min() < info.min or num.max() > info.max):
            raise InputError(f"input {spec.name}: value out of range for {spec.datatype}")
        if num.dtype.kind == "f" and not np.all(num == np.floor(num)):
            raise InputError(f"input {spec.name}: non-integer value for {spec.datatype}")
    try:
        return np.asarray(values).astype(dt)
    except (TypeError, ValueError, OverflowError) as e:
        raise InputError(f"input {spec.name}: cannot convert to {spec.datatype}: {e}") from None


def _load_npy(spec: InputSpec, path: Path) -> np.ndarray[Any, Any]:
    """The .npy of a `fill: {file: ...}` input, read only once its header declares the config's shape and at most
    twice the canary input cap (a float64 file for an FP32 input); no pickles."""
    try:
        # O_NONBLOCK: a FIFO there must not hang the probe; the regular-file check then refuses it.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise InputError(f"input {spec.name}: {path} is not a regular file")
            try:
                shape, _, dtype = read_npy_header(f)
            except NpyHeaderError as e:
                raise InputError(f"input {spec.name}: cannot read {path}: {e}") from None
            if dtype.hasobject:
                raise InputError(f"input {spec.name}: {path} holds Python objects (dtype {dtype}); pickles are refused")
            if shape != spec.shape:
                raise InputError(f"input {spec.name}: {path} has shape {list(shape)}, config says {list(spec.shape)}")
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes > 2 * CANARY_INPUT_MAX_BYTES:
                raise InputError(
                    f"input {spec.name}: {path} holds {format_bytes(nbytes)} ({dtype}), over twice the "
                    f"{format_bytes(CANARY_INPUT_MAX_BYTES)} cap on a canary input"
                )
            f.seek(0)
            loaded = _NPY_FORMAT.read_array(f, allow_pickle=False)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"input {spec.name}: file {path} not found") from None
    except OSError as e:
        raise InputError(f"input {spec.name}: cannot read {path}: {e.strerror or e}") from None
    except (ValueError, EOFError) as e:
        raise InputError(f"input {spec.name}: cannot read {path}: {clip(str(e))}") from None
    if not isinstance(loaded, np.ndarray) or tuple(loaded.shape) != spec.shape:
        raise InputError(f"input {spec.name}: {path} is not a single .npy array of shape {list(spec.shape)}")
    return loaded


def build_input(spec: InputSpec) -> np.ndarray[Any, Any]:
    """The fixed tensor for one input spec. Raises `InputError` with a one-line reason."""
    shape = spec.shape
    dt = NUMPY_DTYPES[spec.datatype]
    count = math.prod(shape)
    if spec.fill == "zeros":
        if spec.datatype == "BYTES":
            return _cast(np.full(shape, b"", dtype=np.object_), spec)
        return np.zeros(shape, dtype=dt)
    if spec.fill == "ones":
        return np.ones(shape, dtype=dt)
    if spec.fill == "value":
        return _cast(np.full(shape, spec.value, dtype=np.object_ if spec.datatype == "BYTES" else None), spec)
    if spec.fill == "data":
        try:
            values = np.array(spec.data, dtype=np.object_ if spec.datatype == "BYTES" else None)
        except (TypeError, ValueError) as e:
            raise InputError(f"input {spec.name}: data is not a regular array: {e}") from None
        if values.size != count:
            raise InputError(f"input {spec.name}: data has {values.size} values, shape needs {count}")
        return _cast(values.reshape(shape), spec)
    if spec.fill == "random":
        rng = np.random.default_rng(spec.seed)
        if spec.datatype == "BOOL":
            return rng.integers(0, 2, size=shape).astype(np.bool_)
        if spec.datatype == "BYTES":
            ints = rng.integers(0, 1_000_000, size=shape)
            return _cast(ints.astype(str).astype(np.object_), spec)
        if dt.kind == "f":
            return rng.random(size=shape, dtype=np.float64).astype(dt)
        info = np.iinfo(dt)
        hi = min(int(info.max), 127) + 1
        return rng.integers(max(int(info.min), -128), hi, size=shape).astype(dt)
    if spec.fill == "file":
        assert spec.file is not None
        return _cast(_load_npy(spec, spec.file), spec)
    raise InputError(f"input {spec.name}: unknown fill {spec.fill!r}")  # pragma: no cover - config prevents it


def build_inputs(canary: CanaryConfig) -> dict[str, np.ndarray[Any, Any]]:
    """Every input tensor of a canary, in config order."""
    return {spec.name: build_input(spec) for spec in canary.inputs}


def input_digest(canary: CanaryConfig, tensors: Mapping[str, np.ndarray[Any, Any]]) -> str:
    """Digest of what the canary sends: input names, datatypes and the tensors themselves (files included)."""
    h = xxhash.xxh3_128()
    for spec in canary.inputs:
        h.update(spec.name.encode("utf-8") + b"\0")
        h.update(digest(spec.datatype, tensors[spec.name]).encode("ascii"))
    return DIGEST_PREFIX + h.hexdigest()
