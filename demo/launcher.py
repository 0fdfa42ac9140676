"""Start and stop the local CPU Triton (demo/triton_server.py) for `make demo`, the tests and the benchmarks.

Triton runs in its own process session so that it and pytriton's helper processes can be signalled as one
group, and only that group: we never touch processes we did not start.

A Triton killed with SIGKILL (as the reliability tests do) cleans nothing up, so stop_triton sweeps what it
leaves, and only what is provably this instance's: pytriton's workspace, which start_triton puts under the
caller's directory (PYTRITON_HOME) instead of ~/.cache/pytriton; the /dev/shm segments that a process of the
group had open just before the signal (pytriton's tensor store `psm_*`, its Python backend's `pytrtion<pid>-*`);
and the model folders Triton copies to /tmp/folderXXXXXX, whose config.pbtxt names that workspace.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODELS = ("demo_classifier", "demo_classifier_fp64", "typed", "demo_llm")
# Loaded only when asked for (the benchmarks): the classifier with a fixed 20 ms service time, and a 16 MiB output.
BENCH_MODELS = ("demo_classifier_20ms", "demo_large_output")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str = "condition", every: float = 0.02) -> Any:
    """Poll `predicate` until it returns something truthy; raise AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


@dataclass
class TritonServer:
    """A running Triton with the demo models; faults are set per model through files."""

    http_port: int
    metrics_port: int
    fault_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    # PYTRITON_HOME of this instance (its workspace_* directory), private to it and removed by stop_triton.
    pytriton_home: Path

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def fault(self, model: str, mode: str) -> None:
        tmp = self.fault_dir / f".{model}.tmp"
        tmp.write_text(mode)
        os.replace(tmp, self.fault_dir / model)

    def clear_faults(self) -> None:
        for model in MODELS:
            self.fault(model, "ok")

    def stats(self, model: str) -> dict[str, Any]:
        status, body = _get(f"http://{self.url}/v2/models/{model}/stats")
        assert status == 200, f"stats of {model}: HTTP {status} {body[:200]!r}"
        return dict(json.loads(body)["model_stats"][0])

    def inference_count(self, model: str) -> int:
        s = self.stats(model)["inference_stats"]
        return int(s["success"]["count"]) + int(s["fail"]["count"])

    def model_ready(self, model: str) -> bool:
        return _get(f"http://{self.url}/v2/models/{model}/ready")[0] == 200

    def wait_idle(self, model: str, timeout: float = 30.0) -> None:
        """Wait until a model answers a plain request again (a hung request drained)."""
        wait_for(lambda: self.model_ready(model), timeout, f"{model} ready")


# Unix sockets name their file in at most 107 bytes (sun_path), and pytriton puts its models' sockets in its
# workspace: PYTRITON_HOME/workspace_XXXXXXXX/<model>_0_<n>-server.sock.
SUN_PATH_MAX = 107


def make_pytriton_home(tmp: Path, models: tuple[str, ...]) -> Path:
    """A new, empty PYTRITON_HOME for one start: pytriton's workspace (sockets, model store, 22 MB of Triton's
    binaries) goes there instead of ~/.cache/pytriton, and stop_triton removes it. Under `tmp` (the caller's
    directory) when the sockets' paths fit in a Unix socket address there, else in the system's temporary
    directory (a deep pytest directory does not leave room); one per start, never shared with another instance.
    """
    longest_socket = len("/workspace_XXXXXXXX/") + max(len(m) for m in models) + len("_0_99-server.sock")
    for parent in (tmp, Path(tempfile.gettempdir())):
        parent.mkdir(parents=True, exist_ok=True)
        if len(str(parent.resolve())) + len("/pytriton-XXXXXXXX") + longest_socket <= SUN_PATH_MAX:
            return Path(tempfile.mkdtemp(prefix="pytriton-", dir=parent)).resolve()
    raise RuntimeError(f"no directory short enough for pytriton's sockets (temporary directory {parent})")


def start_triton(
    tmp: Path,
    models: tuple[str, ...] = MODELS,
    http_port: int | None = None,
    *,
    grpc_port: int | None = None,
    metrics_port: int | None = None,
    restricted_endpoints: tuple[str, ...] = (),
    timeout: float = 180.0,
) -> TritonServer:
    """Start demo/triton_server.py in its own process session; the caller stops it with stop_triton.

    `restricted_endpoints` names Triton endpoint groups that answer 403 without pytriton's access token
    (`statistics`, as pytriton restricts by default); the default restricts none."""
    http_port = http_port or free_port()
    metrics_port = metrics_port or free_port()
    fault_dir = tmp / "faults"
    fault_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # pytriton's Python backend must load this interpreter's libpython, not the system one.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = libdir + os.pathsep + env.get("LD_LIBRARY_PATH", "")
    pytriton_home = make_pytriton_home(tmp, models)
    env["PYTRITON_HOME"] = str(pytriton_home)
    log_path = tmp / f"triton-{http_port}.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "demo" / "triton_server.py"),
            "--http-port",
            str(http_port),
            "--grpc-port",
            str(grpc_port or free_port()),
            "--metrics-port",
            str(metrics_port),
            "--fault-dir",
            str(fault_dir),
            "--models",
            ",".join(models),
            "--restricted-endpoints",
            ",".join(restricted_endpoints),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    log.close()
    server = TritonServer(http_port, metrics_port, fault_dir, proc, log_path, pytriton_home)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"Triton exited early: {log_path.read_text()[-2000:]}")
        return all(server.model_ready(m) for m in models)

    try:
        wait_for(up, timeout, "Triton and its models to be ready", every=0.2)
    except BaseException:
        stop_triton(server)
        raise
    return server


def stop_triton(server: TritonServer, sig: int = signal.SIGTERM) -> None:
    """Signal the server's whole process group (only processes we started), make sure it is gone, then sweep
    the files it leaves behind when killed (see the module docstring)."""
    pgid = server.process.pid
    segments = shm_segments_of(group_pids(pgid))
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    else:
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)  # sweep helpers (proxy backends) left in the group
        except ProcessLookupError:
            pass
    server.process.wait(timeout=10)
    sweep_leftovers(pgid, segments, server.pytriton_home)


SHM = Path("/dev/shm")
MODEL_FOLDERS = Path("/tmp")
_WORKSPACE_PATH = re.compile(r'key:\s*"workspace-path"\s*value\s*\{\s*string_value:\s*"([^"]*)"')


def group_pids(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (ours: start_triton made it with start_new_session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        if len(fields) > 2 and int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def shm_segments_of(pids: list[int]) -> set[Path]:
    """The /dev/shm segments these processes have open or mapped: theirs, whoever else may use /dev/shm."""
    found: set[Path] = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith(f"{SHM}/") and not target.endswith(" (deleted)"):
                    found.add(Path(target))
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    path = line.rstrip("\n").split(maxsplit=5)[-1]
                    if path.startswith(f"{SHM}/") and not path.endswith(" (deleted)"):
                        found.add(Path(path))
        except OSError:
            continue  # the process ended meanwhile, or is not ours to read
    return found


def model_folders_of(pytriton_home: Path) -> list[Path]:
    """Triton's /tmp/folderXXXXXX copies of the models that pytriton loaded from a workspace in `pytriton_home`."""
    home = pytriton_home.resolve()
    found = []
    for folder in MODEL_FOLDERS.glob("folder??????"):
        try:
            with open(folder / "config.pbtxt", encoding="utf-8", errors="replace") as f:
                text = f.read(256 * 1024)
        except OSError:
            continue
        m = _WORKSPACE_PATH.search(text)
        if m and Path(m.group(1)).is_relative_to(home):
            found.append(folder)
    return found


def sweep_leftovers(pgid: int, segments: set[Path], pytriton_home: Path) -> None:
    """Remove what a stopped instance left: its shared memory, its model folders in /tmp, its workspace."""
    # pytriton names its Python backend's segments after its own pid, the group leader's.
    for segment in {*segments, *SHM.glob(f"pytrtion{pgid}-*")}:
        segment.unlink(missing_ok=True)
    for folder in model_folders_of(pytriton_home):
        shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(pytriton_home, ignore_errors=True)
