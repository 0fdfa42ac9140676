"""Config loading: one invalid file per validation rule (tests/testdata/config), each asserting the exact message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from probe.config import CONFIG_MAX_BYTES, ConfigError, format_bytes, load_config, parse_size
from probe.saturation import canary_deadline
from tests.helpers import REPO, run_cli
from tests.hostile import describe, run_measured

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
    assert cfg.probe.saturated == "ready"
    assert cfg.gpu.source == "nvml" and cfg.gpu.devices is None
    assert cfg.gpu.min_free.threshold(80 * 1024**3) == 2 * 1024**3
    assert cfg.golden_dir == sub / "golden"
    assert cfg.golden_path("resnet") == sub / "golden" / "resnet.json"
    spec = cfg.canaries[0].inputs[0]
    assert spec.datatype == "FP32"
    assert spec.file == sub / "inputs" / "x.npy"
    # No timeout of its own: the probe budget less the room to read Triton's statistics after a miss.
    assert canary_deadline(cfg.canaries[0], cfg.probe.timeout) == 0.68


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


# ---------------------------------------------------------------------------------------------- hostile YAML


@pytest.mark.parametrize("name", ["alias_bomb_data", "alias_bomb_shape", "alias_bomb_devices"])
def test_alias_bomb_is_refused_fast_in_one_line_with_little_memory(name: str) -> None:
    """Nine levels of `&aN [*aN-1 x 9]` (441 bytes) in fill.data, shape or gpu.devices: walked once, never
    expanded (it took > 40 s and 2.4-2.8 GB, or died with a bare traceback under a memory limit)."""
    path = TESTDATA / f"{name}.yaml"
    m = run_measured("validate", "-c", str(path), timeout=60)
    assert m.returncode == 1
    assert m.stderr.splitlines() == [f"probe: config error: {expected_message(path)}"]
    assert m.seconds < 10, describe(m)
    assert m.peak_rss < 200 * 2**20, describe(m)


def test_aliases_and_merge_keys_within_the_bound_are_fine(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "gpu: {source: none}\n"
        "canaries:\n"
        "  - &base\n"
        "    name: a\n"
        "    model: m\n"
        "    inputs: [&x {name: X, datatype: FP32, shape: [4], fill: {data: &d [1, 2, 3, 4]}}]\n"
        "  - <<: *base\n"
        "    name: b\n"  # overrides the merged name: not a duplicate key
        "    inputs: [*x, {name: Y, datatype: FP32, shape: [4], fill: {data: *d}}]\n"
    )
    cfg = load_config(tmp_path / "p.yaml")
    assert [c.name for c in cfg.canaries] == ["a", "b"]
    assert [i.data for i in cfg.canaries[1].inputs] == [[1, 2, 3, 4], [1, 2, 3, 4]]


def test_config_over_the_size_cap_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("# " + "x" * CONFIG_MAX_BYTES + "\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: config file is over the 1\.0MiB cap; not read$"):
        load_config(path)


def test_golden_dir_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "golden").write_text("not a directory\n")
    (tmp_path / "p.yaml").write_text("golden_dir: golden\n")
    proc = run_cli("validate", "--config-only", "-c", str(tmp_path / "p.yaml"))
    assert proc.returncode == 1
    assert proc.stderr == f"probe: config error: golden_dir: {tmp_path / 'golden'} exists and is not a directory\n"


# ---------------------------------------------------------------------------------------------- validate --config-only


@pytest.mark.parametrize("config", ["probe.yaml", "demo.yaml"])
def test_validate_config_only_passes_the_shipped_configs_before_anything_is_recorded(config: str) -> None:
    path = REPO / "configs" / config
    proc = run_cli("validate", "--config-only", "-c", str(path))
    assert proc.returncode == 0, proc.stderr
    canaries = {"demo.yaml": "2 canaries", "probe.yaml": "1 canary"}[config]
    assert proc.stdout == f"ok: {path}: {canaries}, config valid (golden files not checked)\n"
    assert proc.stderr == ""


def test_validate_config_only_still_checks_inputs_but_not_goldens(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "canaries:\n  - {name: a, model: m, inputs: [{name: X, datatype: FP32, shape: [2], fill: {file: x.npy}}]}\n"
    )
    proc = run_cli("validate", "--config-only", "-c", str(tmp_path / "p.yaml"))
    assert (proc.returncode, proc.stderr) == (1, f"probe: canary a: input X: file {tmp_path / 'x.npy'} not found\n")
    np.save(tmp_path / "x.npy", np.zeros(2, dtype=np.float32))
    assert run_cli("validate", "--config-only", "-c", str(tmp_path / "p.yaml")).returncode == 0
    full = run_cli("validate", "-c", str(tmp_path / "p.yaml"))
    assert full.returncode == 1 and "golden file missing" in full.stderr


def test_validate_help_describes_config_only_and_the_exit_codes() -> None:
    proc = run_cli("validate", "--help")
    assert proc.returncode == 0
    assert "--config-only" in proc.stdout and "exit codes: 0 config and golden files are valid; 1" in proc.stdout
