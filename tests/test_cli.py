"""The CLI without Triton: one line per problem, and help that says what each command does and exits with."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import run_cli


def test_check_only_gpu_without_nvml_says_it_once(tmp_path: Path) -> None:
    cfg = tmp_path / "probe.yaml"
    cfg.write_text("triton: {url: '127.0.0.1:1'}\ngpu: {source: nvml}\n")
    done = run_cli("check", "-c", str(cfg), "--only", "gpu", env={"LD_LIBRARY_PATH": str(tmp_path)})
    assert done.returncode == 3
    assert done.stdout.splitlines() == [
        "[-]gpu failed: NVML library not found (libnvidia-ml.so.1): no NVIDIA driver on this node, or it is not "
        "mounted into this container"
    ]
    assert done.stderr.splitlines() == ["probe: check failed: gpu"]


def test_each_command_explains_itself_and_its_exit_codes() -> None:
    for command in ("serve", "check", "record", "validate"):
        done = run_cli(command, "--help")
        assert done.returncode == 0, command
        assert "exit codes:" in done.stdout, command
        description = done.stdout.split("\n\n")[1]
        assert len(description.split()) > 8, (command, description)
