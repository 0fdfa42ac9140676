"""record / check / validate against a real Triton (nvidia-pytriton on the CPU), with faults set at runtime."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TritonServer
from tests.helpers import DEMO_CANARY, TYPED_CANARY, free_port, run_cli, write_config

pytestmark = pytest.mark.triton


def record_and_check(tmp_path: Path, triton: TritonServer, canaries: list[dict[str, Any]], **kw: Any) -> Path:
    cfg = write_config(tmp_path, triton.url, canaries, **kw)
    rec = run_cli("record", "-c", str(cfg))
    assert rec.returncode == 0, rec.stderr
    return cfg


def test_record_then_check_passes_for_several_datatypes(tmp_path: Path, healthy_triton: TritonServer) -> None:
    cfg = record_and_check(tmp_path, healthy_triton, [DEMO_CANARY, TYPED_CANARY])
    golden = json.loads((tmp_path / "golden" / "typed.json").read_text())
    assert golden["format"] == 2
    outs = golden["records"][0]["outputs"]
    assert {o["datatype"] for o in outs.values()} == {"BOOL", "BYTES", "FP16", "UINT64", "INT8"}
    assert golden["records"][0]["environment"]["triton"] == "2.51.0"
    assert golden["records"][0]["environment"]["backend"] == "python"
    assert golden["records"][0]["latency"]["runs"] == 3
    assert run_cli("validate", "-c", str(cfg)).returncode == 0
    proc = run_cli("check", "-c", str(cfg))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "[+]triton ok" in lines and "[+]canary/demo ok" in lines and "[+]canary/typed ok" in lines
    as_json = json.loads(run_cli("check", "-c", str(cfg), "--json").stdout)
    assert as_json["status"] == "pass"
    assert as_json["checks"]["canary/demo"][0]["observedUnit"] == "ms"


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("wrong_value", "[-]canary/demo failed: output PROBS digest xxh3_128:"),
        ("wrong_shape", "[-]canary/demo failed: output PROBS shape [1, 1, 10] != golden [1, 10]"),
        ("missing_output", "[-]canary/demo failed: output PROBS missing from the response"),
        ("fail", "[-]canary/demo failed: canary demo inference: [500]"),
    ],
)
def test_faults_fail_the_canary_with_the_right_reason(
    tmp_path: Path, healthy_triton: TritonServer, fault: str, reason: str
) -> None:
    cfg = record_and_check(tmp_path, healthy_triton, [DEMO_CANARY])
    healthy_triton.fault("demo_classifier", fault)
    proc = run_cli("check", "-c", str(cfg))
    assert proc.returncode == 3
    assert any(line.startswith(reason) for line in proc.stdout.splitlines()), proc.stdout
    assert proc.stderr.strip() == "probe: check failed: canary/demo"


def test_wrong_datatype_after_model_swap(tmp_path: Path, healthy_triton: TritonServer) -> None:
    cfg = record_and_check(tmp_path, healthy_triton, [DEMO_CANARY])
    # The same canary now reaches a model redeployed with FP64 outputs.
    write_config(tmp_path, healthy_triton.url, [{**DEMO_CANARY, "model": "demo_classifier_fp64"}])
    proc = run_cli("check", "-c", str(cfg))
    assert proc.returncode == 3
    assert "[-]canary/demo failed: output PROBS datatype FP64 != golden FP32" in proc.stdout


def test_hang_returns_within_the_deadline(tmp_path: Path, healthy_triton: TritonServer) -> None:
    cfg = record_and_check(tmp_path, healthy_triton, [{**DEMO_CANARY, "timeout": 0.5}])
    healthy_triton.fault("demo_classifier", "hang")
    start = time.monotonic()
    proc = run_cli("check", "-c", str(cfg))
    elapsed = time.monotonic() - start
    assert proc.returncode == 3
    assert "[-]canary/demo failed: timed out after 0.50s" in proc.stdout
    # process start and imports included; the canary itself is cut at 0.5 s
    assert elapsed < 10, elapsed


def test_server_down_exits_2(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, f"127.0.0.1:{free_port()}", [DEMO_CANARY])
    (tmp_path / "golden").mkdir()
    # a golden is needed for check to get as far as probing; record refuses with exit 2 too
    rec = run_cli("record", "-c", str(cfg))
    assert rec.returncode == 2
    assert rec.stderr.startswith("probe: triton unreachable: server live: cannot connect to Triton at 127.0.0.1:")
    assert len(rec.stderr.strip().splitlines()) == 1


def test_check_with_missing_golden_exits_1_before_probing(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, f"127.0.0.1:{free_port()}", [DEMO_CANARY])
    proc = run_cli("check", "-c", str(cfg))
    assert proc.returncode == 1
    assert "golden file missing; record it with `probe record`" in proc.stderr


def test_check_server_down_with_golden_exits_2(tmp_path: Path, healthy_triton: TritonServer) -> None:
    record_and_check(tmp_path, healthy_triton, [DEMO_CANARY])
    cfg = write_config(tmp_path, f"127.0.0.1:{free_port()}", [DEMO_CANARY])
    proc = run_cli("check", "-c", str(cfg))
    assert proc.returncode == 2
    assert proc.stderr.startswith("probe: triton unreachable:")


def test_nondeterministic_model_refused_in_exact_mode_accepted_in_tolerance(
    tmp_path: Path, healthy_triton: TritonServer
) -> None:
    healthy_triton.fault("demo_classifier", "noise:1e-3")
    cfg = write_config(tmp_path, healthy_triton.url, [DEMO_CANARY])
    proc = run_cli("record", "-c", str(cfg))
    assert proc.returncode == 3
    assert "the model is not deterministic on this input" in proc.stderr
    assert "compare.mode: tolerance" in proc.stderr
    assert not (tmp_path / "golden" / "demo.json").exists()
    tol = {**DEMO_CANARY, "compare": {"mode": "tolerance", "rtol": 0.0, "atol": 1e-2}}
    cfg = write_config(tmp_path, healthy_triton.url, [tol])
    proc = run_cli("record", "-c", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "golden" / "demo.npz").exists()


def test_tolerance_accepts_1e7_rejects_1e2(tmp_path: Path, healthy_triton: TritonServer) -> None:
    tol = {**DEMO_CANARY, "compare": {"mode": "tolerance", "rtol": 1e-5, "atol": 1e-6}}
    cfg = record_and_check(tmp_path, healthy_triton, [tol])
    healthy_triton.fault("demo_classifier", "offset:1e-7")
    proc = run_cli("check", "-c", str(cfg))
    assert proc.returncode == 0, proc.stdout
    assert any(ln.startswith("[+]canary/demo ok (max abs error") for ln in proc.stdout.splitlines())
    healthy_triton.fault("demo_classifier", "offset:1e-2")
    proc = run_cli("check", "-c", str(cfg))
    assert proc.returncode == 3
    assert "[-]canary/demo failed: output PROBS max abs error 0.01" in proc.stdout


def test_record_again_same_environment_needs_force(tmp_path: Path, healthy_triton: TritonServer) -> None:
    cfg = record_and_check(tmp_path, healthy_triton, [DEMO_CANARY])
    before = (tmp_path / "golden" / "demo.json").read_bytes()
    same = run_cli("record", "-c", str(cfg))
    assert same.returncode == 0 and "unchanged" in same.stdout
    healthy_triton.fault("demo_classifier", "wrong_value")
    refused = run_cli("record", "-c", str(cfg))
    assert refused.returncode == 3
    assert "a record for this environment" in refused.stderr and "--force replaces it" in refused.stderr
    assert (tmp_path / "golden" / "demo.json").read_bytes() == before
    forced = run_cli("record", "-c", str(cfg), "--force")
    assert forced.returncode == 0 and "replaced record 1" in forced.stdout
    assert len(json.loads((tmp_path / "golden" / "demo.json").read_text())["records"]) == 1


def test_changed_input_invalidates_golden_with_clear_message(tmp_path: Path, healthy_triton: TritonServer) -> None:
    record_and_check(tmp_path, healthy_triton, [DEMO_CANARY])
    changed = {**DEMO_CANARY, "inputs": [{**DEMO_CANARY["inputs"][0], "fill": "ones"}]}
    cfg = write_config(tmp_path, healthy_triton.url, [changed])
    for cmd in ("validate", "check"):
        proc = run_cli(cmd, "-c", str(cfg))
        assert proc.returncode == 1
        assert "recorded for different canary inputs" in proc.stderr
    refused = run_cli("record", "-c", str(cfg))
    assert refused.returncode == 3 and "--force discards them" in refused.stderr


def test_input_that_does_not_fit_the_model_is_explained(tmp_path: Path, healthy_triton: TritonServer) -> None:
    bad = {**DEMO_CANARY, "inputs": [{"name": "IMAGE", "datatype": "FP16", "shape": [1, 3, 8, 9]}]}
    cfg = write_config(tmp_path, healthy_triton.url, [bad])
    proc = run_cli("record", "-c", str(cfg))
    assert proc.returncode == 3
    assert "input IMAGE datatype FP16 != model's FP32" in proc.stderr
    assert "input IMAGE shape [1, 3, 8, 9] does not fit model's [-1, 3, 8, 8]" in proc.stderr


def test_full_disk_while_recording_keeps_old_golden(tmp_path: Path, healthy_triton: TritonServer) -> None:
    import resource
    import subprocess
    import sys

    cfg = record_and_check(tmp_path, healthy_triton, [DEMO_CANARY])
    before = (tmp_path / "golden" / "demo.json").read_bytes()
    healthy_triton.fault("demo_classifier", "wrong_value")
    size = len(before) - 10

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    proc = subprocess.run(
        [sys.executable, "-m", "probe", "record", "-c", str(cfg), "--force"],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=60,
        env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert proc.returncode == 1
    assert "cannot write golden file for canary demo" in proc.stderr
    assert "the previous golden file is unchanged" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (tmp_path / "golden" / "demo.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "golden").iterdir()) == ["demo.json"]
