"""A Triton killed with SIGKILL leaves nothing behind (demo/launcher.py's sweep), and only its own files go.

Found with strace on the fault matrix's `killed` scenario: a /dev/shm/psm_* segment (pytriton's tensor store),
a 22 MB ~/.cache/pytriton/workspace_* and a /tmp/folderXXXXXX model copy survived every SIGKILL of Triton.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from demo.launcher import (
    SUN_PATH_MAX,
    group_pids,
    make_pytriton_home,
    model_folders_of,
    shm_segments_of,
    start_triton,
    stop_triton,
)
from tests.helpers import DEMO_CANARY, run_cli, write_config

MODEL = "demo_classifier"
MODELS = ("demo_classifier", "demo_classifier_fp64", "typed")


def test_pytriton_home_is_under_the_callers_directory_when_its_sockets_fit(tmp_path: Path) -> None:
    short = Path(tempfile.mkdtemp(prefix="s", dir="/tmp"))
    try:
        home = make_pytriton_home(short, MODELS)
        assert home.parent == short.resolve() and home.is_dir() and not list(home.iterdir())
        assert make_pytriton_home(short, MODELS) != home, "one home per start"
    finally:
        shutil.rmtree(short)


def test_pytriton_home_moves_to_the_temporary_directory_when_sockets_would_not_fit(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60)
    home = make_pytriton_home(deep, MODELS)
    try:
        assert home.parent == Path(tempfile.gettempdir()).resolve()
        socket = home / "workspace_abcdefgh" / "demo_classifier_fp64_0_99-server.sock"
        assert len(str(socket)) <= SUN_PATH_MAX
    finally:
        home.rmdir()


@pytest.mark.triton
def test_sigkilled_triton_leaves_no_shared_memory_workspace_or_model_folder(tmp_path: Path) -> None:
    server = start_triton(tmp_path, (MODEL,))
    try:
        # One canary through the tensor store, which is what creates the psm_* segment.
        (tmp_path / "probe").mkdir()
        cfg = write_config(tmp_path / "probe", server.url, [DEMO_CANARY])
        rec = run_cli("record", "-c", str(cfg))
        assert rec.returncode == 0, rec.stderr
        home = server.pytriton_home
        assert not home.is_relative_to(Path.home() / ".cache"), f"pytriton's workspace in the user's cache: {home}"
        assert list(home.glob("workspace_*")), f"no workspace in {home}: {sorted(home.iterdir())}"
        segments = shm_segments_of(group_pids(server.process.pid))
        assert any(s.name.startswith("psm_") for s in segments), segments
        assert any(s.name.startswith("pytrtion") for s in segments), segments
        folders = model_folders_of(home)
        assert folders, "Triton copies a pytriton model into /tmp/folderXXXXXX"
        other = Path("/dev/shm") / f"psm_not_ours_{os.getpid()}"
        other.write_bytes(b"")  # a segment of someone else's, that the sweep must leave alone
    except BaseException:
        stop_triton(server, signal.SIGKILL)
        raise
    try:
        stop_triton(server, signal.SIGKILL)
        assert not [s for s in segments if s.exists()], "shared memory of the killed Triton left in /dev/shm"
        assert not [f for f in folders if f.exists()], "model folders of the killed Triton left in /tmp"
        assert not home.exists(), "pytriton's workspace left behind"
        assert other.exists(), "the sweep removed a segment that was not the killed Triton's"
    finally:
        other.unlink(missing_ok=True)


@pytest.mark.triton
def test_a_gracefully_stopped_triton_leaves_nothing_either(tmp_path: Path) -> None:
    server = start_triton(tmp_path, (MODEL,))
    home = server.pytriton_home
    segments = shm_segments_of(group_pids(server.process.pid))
    folders = model_folders_of(home)
    stop_triton(server)
    assert not [s for s in segments if s.exists()]
    assert not [f for f in folders if f.exists()]
    assert not home.exists()
