"""xxh3_128 (the golden digest, `probe.tensors.digest`) vs sha256 over the same canonical bytes of a 64 MB tensor.

Both hash exactly what a golden file's digest covers: the canonical header (datatype, rank, shape) and the
little-endian C-order element bytes, fed chunk by chunk from `probe.tensors.canonical_bytes` without copies.
Best of several runs each, so the figure is the hash's speed, not the machine's noise.

Run alone: python bench/digest.py   (needs no Triton)
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from common import print_machine, table  # common first: it puts the repo root on sys.path

from probe.tensors import canonical_bytes, digest

SIZE = 64 * 1024 * 1024  # bytes
RUNS = 7


@dataclass
class DigestBench:
    nbytes: int
    xxh3_s: float
    sha256_s: float
    xxh3_digest: str
    sha256_digest: str

    @property
    def xxh3_gbs(self) -> float:
        return self.nbytes / self.xxh3_s / 1e9

    @property
    def sha256_gbs(self) -> float:
        return self.nbytes / self.sha256_s / 1e9

    @property
    def ratio(self) -> float:
        return self.sha256_s / self.xxh3_s

    def report(self) -> str:
        rows = [
            ["xxh3_128 (probe.tensors.digest)", f"{self.xxh3_s * 1000:.1f}", f"{self.xxh3_gbs:.2f}"],
            ["sha256 (hashlib, same bytes)", f"{self.sha256_s * 1000:.1f}", f"{self.sha256_gbs:.2f}"],
            ["ratio", "", f"{self.ratio:.1f}x"],
        ]
        return "\n".join(
            [
                f"== digest of a {self.nbytes / 2**20:.0f} MiB FP32 tensor (best of {RUNS}) ==",
                table(rows, ["", "best ms", "GB/s"]),
                "no target: informational (why golden files use xxh3_128, and what a digest costs per canary run)",
            ]
        )

    def summary(self) -> list[tuple[str, str, str, bool | None]]:
        return [
            (
                "xxh3_128 vs sha256 on 64 MiB",
                f"{self.ratio:.1f}x faster ({self.xxh3_gbs:.1f} vs {self.sha256_gbs:.2f} GB/s)",
                "(info)",
                None,
            )
        ]


def _sha256(datatype: str, arr: np.ndarray[Any, Any]) -> str:
    h = hashlib.sha256()
    for chunk in canonical_bytes(datatype, arr):
        h.update(chunk)
    return "sha256:" + h.hexdigest()


def _best(fn: Callable[[], str]) -> tuple[float, str]:
    best, out = float("inf"), ""
    for _ in range(RUNS):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def measure(_: Any = None) -> DigestBench:
    arr = np.random.default_rng(0).random(SIZE // 4, dtype=np.float32)
    xs, xd = _best(lambda: digest("FP32", arr))
    ss, sd = _best(lambda: _sha256("FP32", arr))
    return DigestBench(nbytes=arr.nbytes, xxh3_s=xs, sha256_s=ss, xxh3_digest=xd, sha256_digest=sd)


if __name__ == "__main__":
    print_machine()
    print(measure().report())
