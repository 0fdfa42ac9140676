"""Run the probe against the demo Triton: configs, `probe serve` as a process, the CLI. For the tests and bench.

The Triton side is demo/launcher.py; this module is the probe side. Both live outside tests/ so that the
benchmarks and the test suite share one definition of each without importing the test package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from demo.launcher import REPO, wait_for

# The canary of the demo classifier (demo/triton_server.py): one fixed random image, every output.
DEMO_CANARY: dict[str, Any] = {
    "name": "demo",
    "model": "demo_classifier",
    "inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [1, 3, 8, 8], "fill": {"random": {"seed": 7}}}],
}


def write_config(directory: Path, url: str, canaries: list[dict[str, Any]], **sections: Any) -> Path:
    """A probe.yaml in `directory` for the given Triton url; `sections` override top-level keys."""
    cfg: dict[str, Any] = {
        "triton": {"url": url},
        "listen": {"host": "127.0.0.1", "port": 0},
        "probe": {"timeout": 0.8, "min_interval": 1.0, "interval": 0},
        "gpu": {"source": "none"},
        "golden_dir": "golden",
        "canaries": canaries,
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = directory / "probe.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path


def _environment(extra: dict[str, str] | None, source: Path = REPO) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = str(source) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `python -m probe ARGS` as a real process; returns CompletedProcess with text output."""
    return subprocess.run(
        [sys.executable, "-m", "probe", *args],
        cwd=cwd,
        env=_environment(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class ServeProcess:
    """`probe serve` as a real process on a free port; stopped by its own pid. `source` is the tree whose `probe`
    package runs: this one, or another version of the code to compare against."""

    def __init__(self, config: Path, port: int, env: dict[str, str] | None = None, *, source: Path = REPO) -> None:
        self.port = port
        self.log = config.parent / f"serve-{port}.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "probe", "serve", "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_environment(env, source),
                cwd=source,  # `python -m` looks in the working directory first
            )
        self.base = f"http://127.0.0.1:{port}"

    def wait_up(self, timeout: float = 30) -> None:
        def up() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"probe serve exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.base + "/live/ping", timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_for(up, timeout, "probe serve to answer /live/ping", every=0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def logs(self) -> str:
        return self.log.read_text()
