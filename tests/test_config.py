"""Config loading: one invalid file per validation rule (tests/testdata/config), each asserting the exact message."""

from __future__ import annotations

from pathlib import Path

import pytest

from probe.config import ConfigError, format_bytes, load_config, parse_size
from tests.helpers import run_cli

TESTDATA = Path(__file__).parent / "testdata" / "config"
INVALID = sorted(TESTDATA.glob("*.yaml"))


def expected_message(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: <message>'"
    return first[len("# expect: ") :]


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_config_names_key_path(path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == expected_message(path)


def test_every_rule_has_a_file() -> None:
    assert len(INVALID) >= 25


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    (sub / "probe.yaml").write_text(
        "canaries:\n"
        "  - name: resnet\n"
        "    model: resnet50\n"
        "    inputs:\n"
        "      - {name: INPUT__0, datatype: fp32, shape: [1, 3], fill: {file: inputs/x.npy}}\n"
    )
    cfg = load_config(sub / "probe.yaml")
    assert cfg.triton.url == "127.0.0.1:8000" and cfg.triton.ssl is False
    assert (cfg.listen.host, cfg.listen.port) == ("0.0.0.0", 8080)
    assert (cfg.probe.timeout, cfg.probe.min_interval, cfg.probe.interval) == (0.8, 1.0, 10.0)
    assert cfg.liveness.after == 60.0
    assert cfg.gpu.source == "nvml" and cfg.gpu.devices is None
    assert cfg.gpu.min_free.threshold(80 * 1024**3) == 2 * 1024**3
    assert cfg.golden_dir == sub / "golden"
    assert cfg.golden_path("resnet") == sub / "golden" / "resnet.json"
    spec = cfg.canaries[0].inputs[0]
    assert spec.datatype == "FP32"
    assert spec.file == sub / "inputs" / "x.npy"
    assert cfg.canaries[0].deadline(cfg.probe.timeout) == 0.8


def test_full_contract_example_loads(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        """
triton: {url: "https://triton.local:8443"}
listen: {host: 0.0.0.0, port: 8080}
probe: {timeout: 0.8, min_interval: 1.0, interval: 10.0}
liveness: {after: 60}
gpu: {source: nvml, devices: [GPU-1234, "MIG-abcd", 1], min_free: "10%"}
golden_dir: golden
canaries:
  - name: resnet
    model: resnet50
    version: 2
    inputs:
      - name: INPUT__0
        datatype: FP32
        shape: [1, 3, 224, 224]
        fill: zeros
    outputs: [OUTPUT__0]
    timeout: 0.7
    compare: {mode: tolerance, rtol: 1.0e-5, atol: 1.0e-6}
    latency: {max_ms: 50, drift: 3.0}
"""
    )
    cfg = load_config(tmp_path / "p.yaml")
    assert (cfg.triton.url, cfg.triton.ssl) == ("triton.local:8443", True)
    assert cfg.gpu.devices == ("GPU-1234", "MIG-abcd", "1")
    assert cfg.gpu.min_free.percent == 10.0
    assert cfg.gpu.min_free.threshold(1000) == 100
    c = cfg.canaries[0]
    assert (c.version, c.outputs, c.timeout) == ("2", ("OUTPUT__0",), 0.7)
    assert (c.compare.mode, c.latency.max_ms, c.latency.drift) == ("tolerance", 50.0, 3.0)


@pytest.mark.parametrize(
    ("text", "value"),
    [("2GiB", 2 * 1024**3), ("512MiB", 512 * 1024**2), ("1.5GB", 1_500_000_000), (1048576, 1048576), ("10 KiB", 10240)],
)
def test_sizes_parse(text: object, value: int) -> None:
    assert parse_size(text, "x") == value


def test_format_bytes_reads_like_an_operator_would() -> None:
    assert format_bytes(2 * 1024**3) == "2.0GiB"
    assert format_bytes(512) == "512B"


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("canaries: [\n  - {name: a\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+, column \d+"):
        load_config(tmp_path / "bad.yaml")


def test_validate_cli_prints_one_line_and_exits_1() -> None:
    path = TESTDATA / "unknown_nested_key.yaml"
    proc = run_cli("validate", "-c", str(path))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["probe: config error: canaries[1].inputs[0].dtype: unknown key"]
    assert "Traceback" not in proc.stderr


def test_usage_errors_exit_1_with_one_line(tmp_path: Path) -> None:
    proc = run_cli("check")
    assert proc.returncode == 1
    assert proc.stderr.startswith("probe: usage error: ") and len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("record", "-c", str(tmp_path / "x.yaml"), "--runs", "0")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "probe: usage error: --runs must be at least 1, got 0"


def test_configmap_symlinks_are_not_resolved(tmp_path: Path) -> None:
    """A ConfigMap mounts files as symlinks into a `..<timestamp>` directory the kubelet swaps on update:
    golden_dir must stay relative to the mount point, not to the directory that will be deleted."""
    data = tmp_path / "..2026_11_22_10_00_00.123"
    data.mkdir()
    (data / "probe.yaml").write_text("golden_dir: .\n")
    (tmp_path / "..data").symlink_to(data.name)
    (tmp_path / "probe.yaml").symlink_to("..data/probe.yaml")
    cfg = load_config(tmp_path / "probe.yaml")
    assert cfg.golden_dir == tmp_path
