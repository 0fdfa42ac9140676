"""Build the fake `libnvidia-ml.so.1` (demo/fake_nvml/fake_nvml.c) and drive it through its state file.

The fake re-reads the file named by $FAKE_NVML_STATE on every NVML call, so a test changes the "hardware"
(free memory, a lost GPU, a missing driver, a hung call) by rewriting that file; writes are atomic so a call
never reads half a file.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GiB = 1024**3
H100 = "NVIDIA H100 80GB HBM3"
H100_TOTAL = 80 * GiB
SOURCE = Path(__file__).parent / "fake_nvml" / "fake_nvml.c"


def build_fake_nvml(tmp_dir: Path) -> Path:
    """Compile the fake library into `tmp_dir`; returns the path of `libnvidia-ml.so.1`."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("building the fake libnvidia-ml.so.1 needs gcc (or cc) on PATH")
    out = Path(tmp_dir) / "libnvidia-ml.so.1"
    proc = subprocess.run(
        [cc, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(out), str(SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"compiling {SOURCE} failed:\n{proc.stderr}")
    return out


@dataclass(frozen=True)
class FakeMig:
    """A MIG instance: reports its own memory, not its parent's."""

    uuid: str
    total: int
    used: int = 0
    name: str = ""


@dataclass(frozen=True)
class FakeGpu:
    uuid: str
    name: str = H100
    total: int = H100_TOTAL
    used: int = 0
    migs: tuple[FakeMig, ...] = ()


DEFAULTS: dict[str, Any] = {
    "init": "ok",
    "driver": "550.54.15",
    "cuda": 12040,
    "v2": True,
    "hang_ms": 0,
    "lost": False,
    "gpus": (FakeGpu("GPU-aaaa"),),
}


class FakeNvmlState:
    """The fake's state file. `set(**changes)` keeps every other setting and rewrites the file atomically."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.settings: dict[str, Any] = dict(DEFAULTS)

    def reset(self) -> None:
        self.settings = dict(DEFAULTS)
        self._write()

    def set(self, **changes: Any) -> None:
        unknown = set(changes) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unknown fake NVML settings: {sorted(unknown)}")
        self.settings.update(changes)
        self._write()

    def _write(self) -> None:
        s = self.settings
        lines = [
            f"init={s['init']}",
            f"driver={s['driver']}",
            f"cuda={s['cuda']}",
            f"v2={int(bool(s['v2']))}",
            f"hang_ms={int(s['hang_ms'])}",
            f"lost={int(bool(s['lost']))}",
        ]
        for i, gpu in enumerate(s["gpus"]):
            lines.append(f"gpu{i}={gpu.uuid},{gpu.name},{gpu.total},{gpu.used}")
            for m, mig in enumerate(gpu.migs):
                lines.append(f"mig{i}.{m}={mig.uuid},{mig.total},{mig.used}" + (f",{mig.name}" if mig.name else ""))
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, self.path)


class FakeNvmlCounters:
    """Read the fake's own counters (same library handle the probe loaded: dlopen returns it again)."""

    def __init__(self, lib_path: Path) -> None:
        self._lib = ctypes.CDLL(str(lib_path))

    def initialised(self) -> int:
        """nvmlInit calls not yet matched by nvmlShutdown."""
        return int(self._lib.fakeNvmlInitCount())

    def init_attempts(self) -> int:
        return int(self._lib.fakeNvmlInitAttempts())

    def memory_calls(self, version: int) -> int:
        return int(self._lib.fakeNvmlMemoryCalls(version))

    def shutdown_behind_the_probes_back(self) -> None:
        """What a driver reload does to a running process: NVML answers UNINITIALIZED afterwards."""
        for _ in range(self.initialised()):
            self._lib.nvmlShutdown()
