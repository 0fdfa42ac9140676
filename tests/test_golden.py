"""Golden files: read/write, atomic writes that fail part-way, corrupt files, comparison reasons."""

from __future__ import annotations

import json
import os
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probe.config import CompareConfig
from probe.golden import (
    ENV_KEYS,
    Comparison,
    Golden,
    GoldenError,
    LatencyBaseline,
    OutputGolden,
    Record,
    check_golden_for,
    compare_outputs,
    explain_mismatch,
    golden_to_json,
    load_golden,
    parse_golden,
    write_golden,
)
from probe.tensors import digest
from tests.helpers import run_cli

ENV_A = {
    "gpus": ["NVIDIA A100-SXM4-80GB"],
    "driver": "535.104.05",
    "cuda_driver": "12.2",
    "triton": "2.51.0",
    "platform": "",
    "backend": "onnxruntime",
}
ENV_B = {**ENV_A, "driver": "550.54.15", "cuda_driver": "12.4"}


def probs(delta: float = 0.0) -> np.ndarray:
    return (np.linspace(0.0, 1.0, 10, dtype=np.float32) + np.float32(delta)).reshape(1, 10)


def record(env: dict, arr: np.ndarray, tensors: bool = False) -> Record:
    return Record(
        environment=env,
        recorded_at="2026-11-01T00:00:00Z",
        tool_version="0.1.0",
        outputs={"y": OutputGolden("FP32", tuple(arr.shape), digest("FP32", arr))},
        latency=LatencyBaseline.from_samples([0.010, 0.012, 0.011]),
        tensors=tensors,
    )


def golden(*records: Record, mode: str = "exact", tensors: dict | None = None) -> Golden:
    return Golden("c", "m", "", "xxh3_128:" + "0" * 32, mode, records, tensors or {})


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    g = golden(record(ENV_A, probs()), record(ENV_B, probs(1.0)))
    write_golden(tmp_path / "c.json", g)
    back = load_golden(tmp_path / "c.json")
    assert back.records == g.records
    raw = json.loads((tmp_path / "c.json").read_text())
    assert raw["format"] == 2 and raw["records"][0]["latency"]["median_ms"] == 11.0
    assert raw["records"][0]["outputs"]["y"]["digest"].startswith("xxh3_128:")


def test_tolerance_tensors_round_trip(tmp_path: Path) -> None:
    rec = record(ENV_A, probs(), tensors=True)
    g = golden(rec, mode="tolerance", tensors={f"{rec.record_id}/y": probs()})
    write_golden(tmp_path / "c.json", g)
    back = load_golden(tmp_path / "c.json")
    np.testing.assert_array_equal(back.tensors[f"{rec.record_id}/y"], probs())
    (tmp_path / "c.npz").write_bytes(b"garbage")
    with pytest.raises(GoldenError, match="corrupt golden tensors"):
        load_golden(tmp_path / "c.json")
    (tmp_path / "c.npz").unlink()
    with pytest.raises(GoldenError, match="golden tensors missing"):
        load_golden(tmp_path / "c.json")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "corrupt golden file"),
        ("[]", "corrupt golden file: expected a JSON object"),
        ('{"format": 99}', "unsupported golden format 99"),
        ('{"format": 1, "records": []}', "holds no records"),
        ('{"format": 1, "records": [{"outputs": {}}], "compare": "exact"}', "records\\[0\\]: no outputs"),
    ],
)
def test_corrupt_golden_is_one_clear_error(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "c.json").write_text(content)
    with pytest.raises(GoldenError, match=message) as err:
        load_golden(tmp_path / "c.json")
    assert "\n" not in str(err.value)


def test_missing_golden_says_how_to_record(tmp_path: Path) -> None:
    with pytest.raises(GoldenError, match="golden file missing; record it with `probe record`"):
        load_golden(tmp_path / "c.json")


def test_changed_input_invalidates_golden(tmp_path: Path) -> None:
    g = golden(record(ENV_A, probs()))
    with pytest.raises(GoldenError, match="recorded for different canary inputs"):
        check_golden_for(g, "c", "xxh3_128:" + "1" * 32, "exact", tmp_path / "c.json")
    with pytest.raises(GoldenError, match="recorded in exact mode without tensors"):
        check_golden_for(g, "c", g.input_digest, "tolerance", tmp_path / "c.json")


def _failing_write(tmp_path: Path, limit: int) -> subprocess.CompletedProcess[str]:
    """Rewrite the golden in a child whose file-size limit is `limit` bytes (a full disk, in effect)."""
    code = (
        "import sys; from pathlib import Path\n"
        "from probe.golden import load_golden, write_golden, Golden\n"
        "g = load_golden(Path(sys.argv[1]))\n"
        "big = Golden(**{**g.__dict__, 'canary': 'x' * 100000})\n"
        "write_golden(Path(sys.argv[1]), big)\n"
    )

    def limit_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "c.json")],
        capture_output=True,
        text=True,
        preexec_fn=limit_size,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        timeout=60,
    )


def test_write_failing_part_way_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    write_golden(tmp_path / "c.json", golden(record(ENV_A, probs())))
    before = (tmp_path / "c.json").read_bytes()
    proc = _failing_write(tmp_path, limit=8192)
    assert proc.returncode != 0 and "File too large" in proc.stderr
    assert (tmp_path / "c.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]


def test_exact_compare_reasons() -> None:
    g = golden(record(ENV_A, probs()))
    ok = compare_outputs(g, {"y": ("FP32", probs())}, CompareConfig())
    assert ok.ok and ok.reason == "ok"
    wrong = compare_outputs(g, {"y": ("FP32", probs(0.5))}, CompareConfig())
    assert (
        not wrong.ok and wrong.reason.startswith("output y digest xxh3_128:") and "!= golden xxh3_128:" in wrong.reason
    )
    assert compare_outputs(g, {"y": ("FP64", probs().astype(np.float64))}, CompareConfig()).reason == (
        "output y datatype FP64 != golden FP32"
    )
    assert compare_outputs(g, {"y": ("FP32", probs().reshape(10))}, CompareConfig()).reason == (
        "output y shape [10] != golden [1, 10]"
    )
    assert compare_outputs(g, {}, CompareConfig()).reason == "output y missing from the response"


def test_any_record_matches_and_mismatch_names_environments() -> None:
    g = golden(record(ENV_A, probs()), record(ENV_B, probs(1.0)))
    assert compare_outputs(g, {"y": ("FP32", probs(1.0))}, CompareConfig()).ok
    here = {**ENV_A, "driver": "560.28.03", "cuda_driver": "12.6"}
    cmp = compare_outputs(g, {"y": ("FP32", probs(2.0))}, CompareConfig())
    assert not cmp.ok
    res = Comparison(cmp.ok, explain_mismatch(g, cmp, here))
    assert "golden recorded on driver 535.104.05 / CUDA 12.2 / GPU NVIDIA A100-SXM4-80GB" in res.reason
    assert "driver 550.54.15 / CUDA 12.4" in res.reason
    assert "this node is driver 560.28.03 / CUDA 12.6 / GPU NVIDIA A100-SXM4-80GB / Triton 2.51.0" in res.reason


def test_tolerance_accepts_small_drift_and_rejects_large() -> None:
    rec = record(ENV_A, probs(), tensors=True)
    g = golden(rec, mode="tolerance", tensors={f"{rec.record_id}/y": probs()})
    cmp = CompareConfig(mode="tolerance", rtol=1e-5, atol=1e-6)
    small = compare_outputs(g, {"y": ("FP32", probs(1e-7))}, cmp)
    assert small.ok and small.max_abs_error is not None and small.max_abs_error < 1e-6
    assert small.reason.startswith("ok (max abs error")
    large = compare_outputs(g, {"y": ("FP32", probs(1e-2))}, cmp)
    assert not large.ok
    assert (
        large.reason.startswith("output y max abs error 0.01")
        and "exceeds tolerance rtol 1e-05 atol 1e-06" in large.reason
    )


# ---------------------------------------------------------------------------------------------- file modes


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can enter (pytest's tmp_path is under a 0700 directory of root's)."""
    d = Path(tempfile.mkdtemp(prefix="probe-golden-mode-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_golden_files_get_0666_less_the_umask_not_mkstemps_0600(shared_dir: Path, umask: int) -> None:
    rec = record(ENV_A, probs(), tensors=True)
    old = os.umask(umask)
    try:
        write_golden(shared_dir / "c.json", golden(rec, mode="tolerance", tensors={f"{rec.record_id}/y": probs()}))
    finally:
        os.umask(old)
    for name in ("c.json", "c.npz"):
        assert stat.S_IMODE((shared_dir / name).stat().st_mode) == 0o666 & ~umask, name


def test_a_sidecar_running_as_another_user_can_read_the_golden(shared_dir: Path) -> None:
    """The image runs as non-root; golden files recorded by root onto a hostPath or PVC must stay readable."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to write as root and read as nobody")
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to run a reader as nobody")
    old = os.umask(0o022)
    try:
        write_golden(shared_dir / "c.json", golden(record(ENV_A, probs())))
    finally:
        os.umask(old)
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
    proc = subprocess.run([*nobody, "cat", str(shared_dir / "c.json")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["canary"] == "c"


def test_golden_dir_that_is_a_file_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "golden").write_text("a file\n")
    with pytest.raises(GoldenError) as e:
        write_golden(tmp_path / "golden" / "c.json", golden(record(ENV_A, probs())))
    assert str(e.value) == f"golden_dir {tmp_path / 'golden'}: exists and is not a directory"
    with pytest.raises(GoldenError) as e:
        load_golden(tmp_path / "golden" / "c.json")
    assert str(e.value) == f"golden_dir {tmp_path / 'golden'}: is not a directory"


# ---------------------------------------------------------------------------------------------- field types


def _raw_golden(tmp_path: Path) -> dict[str, Any]:
    write_golden(tmp_path / "c.json", golden(record(ENV_A, probs())))
    raw: dict[str, Any] = json.loads((tmp_path / "c.json").read_text())
    return raw


MISTYPED: list[tuple[tuple[str, ...], Any, str]] = [
    (("environment", "gpus"), -1, "records[0].environment.gpus: expected a list of GPU names, got integer"),
    (("environment", "gpus"), [1], "records[0].environment.gpus[0]: expected a string, got integer"),
    (("environment", "driver"), 535, "records[0].environment.driver: expected a string, got integer"),
    (("environment", "triton"), ["2.51"], "records[0].environment.triton: expected a string, got list"),
    (("environment",), [], "records[0].environment: expected an object, got list"),
    (("recorded_at",), {"at": 1}, "records[0].recorded_at: expected a string, got mapping"),
    (("tensors",), "yes", "records[0].tensors: expected true or false, got 'yes'"),
    (("latency", "runs"), "3", "records[0].latency.runs: expected an integer >= 0, got '3'"),
    (("latency", "median_ms"), True, "records[0].latency.median_ms: expected a finite number >= 0, got True"),
    (("latency", "samples_ms"), [1, "x"], "records[0].latency.samples_ms[1]: expected a finite number >= 0"),
    (("outputs", "y", "datatype"), 7, "records[0].outputs.y.datatype: expected a Triton datatype, got 7"),
    (("outputs", "y", "shape"), [1, -10], "records[0].outputs.y.shape: dimensions must be integers from 0"),
    (("outputs", "y", "digest"), "xxh3_128:" + "z" * 32, "records[0].outputs.y.digest: expected xxh3_128:"),
]


@pytest.mark.parametrize(
    ("field", "value", "message"), MISTYPED, ids=[f"{'.'.join(f)}={json.dumps(v)}" for f, v, _ in MISTYPED]
)
def test_every_field_the_probe_reads_is_type_checked(
    tmp_path: Path, field: tuple[str, ...], value: Any, message: str
) -> None:
    """`gpus: -1` passed validate, then made the mismatch path raise TypeError (`internal error`)."""
    raw = _raw_golden(tmp_path)
    target = raw["records"][0]
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = value
    (tmp_path / "c.json").write_text(json.dumps(raw))
    with pytest.raises(GoldenError) as e:
        load_golden(tmp_path / "c.json")
    assert str(e.value).startswith(f"{tmp_path / 'c.json'}: {message}"), str(e.value)


def test_validate_names_the_mistyped_environment_field(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "canaries:\n  - {name: c, model: m, inputs: [{name: X, datatype: FP32, shape: [2], fill: zeros}]}\n"
    )
    (tmp_path / "golden").mkdir()
    raw = _raw_golden(tmp_path / "golden")
    raw["records"][0]["environment"]["gpus"] = -1
    (tmp_path / "golden" / "c.json").write_text(json.dumps(raw))
    proc = run_cli("validate", "-c", str(tmp_path / "p.yaml"))
    assert proc.returncode == 1
    assert proc.stderr == (
        f"probe: golden error: {tmp_path / 'golden' / 'c.json'}: records[0].environment.gpus: expected a list of "
        "GPU names, got integer\n"
    )


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(env=st.dictionaries(st.sampled_from([*ENV_KEYS, "nvml"]), JSON_VALUES, max_size=7))
def test_an_environment_that_loads_is_one_the_mismatch_path_can_describe(env: dict[str, Any]) -> None:
    """The mismatch reason names every record's environment: whatever loads must describe without a TypeError."""
    raw = golden_to_json(golden(record(ENV_A, probs())))
    raw["records"][0]["environment"] = env
    try:
        g = parse_golden(json.loads(json.dumps(raw)), Path("/g/c.json"))
    except GoldenError as e:
        assert "\n" not in str(e) and str(e).startswith("/g/c.json: records[0].environment")
        return
    cmp = compare_outputs(g, {"y": ("FP32", probs(0.5))}, CompareConfig())
    assert not cmp.ok and "; this node is driver 550.54.15" in explain_mismatch(g, cmp, ENV_B)


def test_format_1_golden_files_still_load() -> None:
    """Files written before streaming canaries (format 1: no protocol, no fields) keep working."""
    raw = golden_to_json(golden(record(ENV_A, probs())))
    assert raw["format"] == 2 and raw["protocol"] == "infer"
    raw["format"] = 1
    del raw["protocol"]
    g = parse_golden(json.loads(json.dumps(raw)), Path("/g/c.json"))
    assert g.protocol == "infer" and compare_outputs(g, {"y": ("FP32", probs())}, CompareConfig()).ok
    raw["format"] = 3
    with pytest.raises(GoldenError, match=r"unsupported golden format 3 \(this probe reads formats 1, 2\)"):
        parse_golden(raw, Path("/g/c.json"))
