"""Hostile files for the tests: YAML alias bombs, golden files and .npz members that declare more than they hold,
and a way to run the CLI measuring its time and peak memory.

Every builder here is fast and small on disk: a 2 GiB .npz member is ~2 MiB of repeated deflate blocks, never
2 GiB written or compressed.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from probe.config import load_config
from probe.golden import Golden, LatencyBaseline, OutputGolden, Record, write_golden
from probe.tensors import build_inputs, digest, input_digest
from tests.helpers import REPO

OUTPUT = "PROBS"
PROBS = np.linspace(0.0, 1.0, 10, dtype=np.float32).reshape(1, 10)
ENV = {"gpus": [], "driver": None, "cuda_driver": None, "triton": "2.51.0", "platform": "", "backend": "python"}


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """One flow sequence that anchors each level inside itself: level k = [&a(k-1) <level k-1>, *a(k-1) x 8].
    441 bytes for nine levels of nine, which expand to 9^10 = 3.5 billion values."""
    text = "[" + ", ".join(["0"] * width) + "]"
    for k in range(levels):
        text = f"[&a{k} {text}, " + ", ".join([f"*a{k}"] * (width - 1)) + "]"
    return text


# ---------------------------------------------------------------------------------------------- golden files


def tolerance_golden(config: Path, canary: int = 0) -> tuple[Path, str]:
    """Write a valid tolerance-mode golden (JSON + .npz) for a config's canary; returns its path and npz member."""
    cfg = load_config(config)
    c = cfg.canaries[canary]
    out = OutputGolden("FP32", tuple(PROBS.shape), digest("FP32", PROBS))
    rec = Record(ENV, "2026-11-01T00:00:00Z", "0.1.0", {OUTPUT: out}, LatencyBaseline.from_samples([0.01]), True)
    key = f"{rec.record_id}/{OUTPUT}"
    golden = Golden(c.name, c.model, c.version, input_digest(c, build_inputs(c)), "tolerance", (rec,), {key: PROBS})
    path = cfg.golden_path(c.name)
    write_golden(path, golden)
    return path, f"{key}.npy"


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def write_npz(path: Path, members: dict[str, bytes]) -> None:
    """An .npz (a zip of .npy members, stored as `np.savez` does) holding exactly these bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)


def write_zero_bomb_npz(path: Path, member: str, shape: tuple[int, ...], descr: str = "<f4") -> int:
    """An .npz whose one member is an npy of `shape` zeros (2 GiB for (2**29,) float32), deflated.

    The deflate stream is built from one compressed MiB of zeros repeated (each block ends with a full flush, so
    it stands alone), and the zip headers by hand: this takes about a second and writes ~2 MiB. Returns the
    member's uncompressed size."""
    header = npy_header(shape, descr)
    nbytes = int(np.prod(shape)) * np.dtype(descr).itemsize
    chunk = 1 << 20
    assert nbytes % chunk == 0 and len(header) + nbytes < 2**32, "kept simple: whole MiB, no zip64"
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = comp.compress(header) + comp.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(chunk)
    block = comp.compress(zeros) + comp.flush(zlib.Z_FULL_FLUSH)
    tail = comp.flush(zlib.Z_FINISH)
    repeats = nbytes // chunk
    crc = zlib.crc32(header)
    for _ in range(repeats):
        crc = zlib.crc32(zeros, crc)
    size = len(header) + nbytes
    compressed = len(head) + len(block) * repeats + len(tail)
    name = member.encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0x21, crc, compressed, size, len(name), 0))
        f.write(name + head)
        for _ in range(repeats):
            f.write(block)
        f.write(tail)
        cd_offset = f.tell()
        f.write(
            struct.pack(
                "<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 8, 0, 0x21, crc, compressed, size, len(name), 0, 0, 0, 0, 0, 0
            )
            + name
        )
        cd_size = f.tell() - cd_offset
        f.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, cd_size, cd_offset, 0))
    return size


def oversized_json(path: Path, size: int) -> None:
    """A well-formed golden-looking JSON of `size` bytes (its padding a long string)."""
    head = json.dumps({"format": 1, "padding": ""})[:-2]
    path.write_text(head + "x" * (size - len(head) - 2) + '"}')


# ---------------------------------------------------------------------------------------------- measuring


@dataclass
class Measured:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss: int
    """Bytes: the child's own maximum resident set, from wait4 (no other child counts)."""


# A small parent for the measured process. Linux carries a process's peak RSS across fork and exec, so a child
# of the test session starts with the session's own peak (hundreds of MiB); a child of this ~10 MiB parent does not.
_MEASURE = """
import resource, subprocess, sys, time
started = time.monotonic()
code = subprocess.call(sys.argv[2:])
seconds = time.monotonic() - started
with open(sys.argv[1], "w") as f:
    f.write(f"{seconds} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}")
sys.exit(code)
"""


def run_measured(*args: str, timeout: float = 120) -> Measured:
    """`python -m probe ARGS` as a real process: its output, wall time and own peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.NamedTemporaryFile("r", suffix=".measured") as report:
        proc = subprocess.run(
            [sys.executable, "-c", _MEASURE, report.name, sys.executable, "-m", "probe", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        seconds, peak = report.read().split()
    return Measured(proc.returncode, proc.stdout, proc.stderr, float(seconds), int(peak))


def describe(m: Measured) -> str:
    return f"{m.seconds:.2f}s, peak RSS {m.peak_rss / 2**20:.0f} MiB"
