"""How quickly a GPU headroom drop and a hung NVML call turn `/ready` red, and what one NVML sample costs.

`probe serve` runs as a real process with `gpu.source: nvml`, loading the fake `libnvidia-ml.so.1` the tests
build with gcc (through LD_LIBRARY_PATH, so the real pynvml code path runs). With the production defaults
(`gpu.interval: 2`, `stale_after` 6 s, `probe.min_interval: 1`) it measures, several times each:
- headroom drop: the fake's used memory jumps above `total - min_free` -> first 503 on /ready/gpu;
- NVML hang: every memory query blocks -> first 503 (stale sample) on /ready/gpu.
Run: python bench/gpu_reaction.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from demo.launcher import free_port, wait_for  # noqa: E402
from demo.nvml_fakes import FakeGpu, FakeNvmlState, build_fake_nvml  # noqa: E402
from probe.config import GpuConfig  # noqa: E402

GiB = 1024**3
ROUNDS = 3


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def time_until(url: str, code: int, limit: float) -> float:
    start = time.monotonic()
    wait_for(lambda: status(url) == code, limit, f"{url} -> {code}", every=0.005)
    return time.monotonic() - start


def sample_cost(lib_dir: Path) -> float:
    """Mean seconds of one NvmlSampler.sample_once() against the fake (in-process, real pynvml)."""
    from probe.gpu import NvmlSampler

    sampler = NvmlSampler(GpuConfig(), library_path=str(lib_dir / "libnvidia-ml.so.1"))
    sampler.sample_once()
    n = 1000
    start = time.perf_counter()
    for _ in range(n):
        sampler.sample_once()
    cost = (time.perf_counter() - start) / n
    sampler.close()
    return cost


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        lib = build_fake_nvml(tmp)
        state = FakeNvmlState(tmp / "state")
        healthy = (FakeGpu("GPU-aaaa", used=10 * GiB),)
        state.set(gpus=healthy)
        os.environ["FAKE_NVML_STATE"] = str(state.path)
        port = free_port()
        (tmp / "probe.yaml").write_text(
            f"listen: {{host: 127.0.0.1, port: {port}}}\n"
            "triton: {url: '127.0.0.1:9'}\n"
            "probe: {timeout: 0.8, min_interval: 1.0, interval: 10}\n"
            "gpu: {source: nvml, min_free: 2GiB, interval: 2.0}\n"
        )
        env = {
            **os.environ,
            "LD_LIBRARY_PATH": str(lib.parent),
            "PYTHONPATH": str(REPO),
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "probe", "serve", "-c", str(tmp / "probe.yaml")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}/ready/gpu"
        drops: list[float] = []
        hangs: list[float] = []
        try:
            time_until(url, 200, 30)
            for _ in range(ROUNDS):
                state.set(gpus=(FakeGpu("GPU-aaaa", used=79 * GiB),))
                drops.append(time_until(url, 503, 30))
                state.set(gpus=healthy)
                time_until(url, 200, 30)
            for _ in range(ROUNDS):
                state.set(hang_ms=60_000)
                hangs.append(time_until(url, 503, 30))
                state.set(hang_ms=0)
                time_until(url, 200, 90)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        cost = sample_cost(lib.parent)
    print("GPU reaction (probe serve, fake NVML via LD_LIBRARY_PATH, gpu.interval 2 s, stale_after 6 s)")
    print(
        f"  headroom drop -> /ready/gpu 503: median {statistics.median(drops):.2f}s  all {[round(d, 2) for d in drops]}"
    )
    print(
        f"  NVML hang     -> /ready/gpu 503: median {statistics.median(hangs):.2f}s  all {[round(h, 2) for h in hangs]}"
    )
    print(f"  one NVML sample (1 GPU, fake library, real pynvml): {cost * 1e6:.0f} us")
    print("  bounds: a drop shows within gpu.interval + probe.min_interval; a hang within stale_after + min_interval")
    return 0


if __name__ == "__main__":
    sys.exit(main())
