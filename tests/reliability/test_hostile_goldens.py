"""Hostile golden files under a running sidecar that judges the real (CPU) Triton's answers (issue 14, points 1-2),
and what `record` says when it cannot write (issue 15). Rows in docs/RELIABILITY.md, "Hostile files".

Every answer is timed by the harness against probe.timeout + SLACK, the same rule as the fault matrix.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.conftest import TritonServer
from tests.helpers import DEMO_CANARY, REPO, run_cli, write_config
from tests.hostile import npy_header, write_npz, write_zero_bomb_npz
from tests.reliability.harness import Expect, Sidecar, StartSidecar

pytestmark = pytest.mark.triton

TOLERANCE = {"compare": {"mode": "tolerance", "rtol": 1e-5, "atol": 1e-6}}
ON_TRITON = ("triton", "model/demo")


def _tolerance_sidecar(start_sidecar: StartSidecar, url: str) -> tuple[Sidecar, Path, str]:
    """A sidecar whose demo canary is in tolerance mode, with its golden recorded (JSON + .npz) on this Triton."""
    car = start_sidecar(url, canary=TOLERANCE)
    rec = run_cli("record", "-c", str(car.config), "--force")
    assert rec.returncode == 0, rec.stderr
    npz = car.golden.with_suffix(".npz")
    with zipfile.ZipFile(npz) as z:
        (member,) = [n for n in z.namelist() if n.endswith("/PROBS.npy")]
    car.passes("canary/demo")
    return car, npz, member


def _holds(car: Sidecar, check: str, pattern: str, seconds: float) -> int:
    """`check` keeps failing with `pattern` on every run for `seconds` (several golden rechecks); returns how many
    runs were seen. min_interval is 0, so every probe is a fresh run."""
    runs = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        answer = car.get(f"/ready/{check}")
        assert answer.status == 503 and re.search(pattern, answer.body), answer
        assert car.get("/live/ping").status == 200
        runs += 1
    return runs


def test_broken_golden_tensors_are_reported_on_every_run_until_fixed(
    start_sidecar: StartSidecar, healthy_triton: TritonServer
) -> None:
    """An npz member declaring 10**12 elements gave one `internal error: MemoryError`; every later run then said
    `ok` against the previous golden. Now every run says why, until the file is fixed."""
    car, npz, member = _tolerance_sidecar(start_sidecar, healthy_triton.url)
    good = npz.read_bytes()
    with zipfile.ZipFile(npz) as z:
        others = {n: z.read(n) for n in z.namelist() if n != member}
    write_npz(npz, {**others, member: npy_header((10**12,)) + b"\0" * 40})
    reason = (
        rf"{re.escape(str(npz))}: tensor for output PROBS of the record from \S+: declares shape \[1000000000000\] "
        r"dtype float32, but the record says \[1, 10\] FP32 \(float32\); not read"
    )
    car.expect(Expect(503, 200, "canary/demo", reason, ON_TRITON))
    assert _holds(car, "canary/demo", "declares shape", seconds=3.0) >= 5
    npz.write_bytes(good)
    car.passes("canary/demo")


def test_2_gib_member_npz_swapped_in_keeps_every_answer_prompt(
    start_sidecar: StartSidecar, healthy_triton: TritonServer
) -> None:
    """The 2 MiB .npz with a 2 GiB member stopped /live/ping for 3 s; it is now refused by its size cap, unread."""
    car, npz, member = _tolerance_sidecar(start_sidecar, healthy_triton.url)
    good = npz.read_bytes()
    bomb = npz.with_name("bomb.npz")
    write_zero_bomb_npz(bomb, member, (2**29,))
    bomb.replace(npz)
    reason = (
        rf"{re.escape(str(npz))}: golden tensors file is 2\.0MiB, over its 1\.0MiB cap "
        r"\(2 x the 48B of tensors its records reference, \+ 1\.0MiB\); not read"
    )
    car.expect(Expect(503, 200, "canary/demo", reason, ON_TRITON))
    npz.write_bytes(good)
    car.passes("canary/demo")


def test_golden_json_over_the_cap_is_refused_and_reported(
    start_sidecar: StartSidecar, healthy_triton: TritonServer
) -> None:
    """A 115 MB golden JSON made /ready take 2.9 s."""
    car = start_sidecar(healthy_triton.url)
    car.passes("canary/demo")
    good = car.golden.read_bytes()
    padded = json.loads(good)
    padded["padding"] = "x" * (115 * 2**20)
    big = car.golden.with_name("big.json")
    big.write_text(json.dumps(padded))
    big.replace(car.golden)
    reason = rf"{re.escape(str(car.golden))}: golden file is 115\.0MiB, over the 4\.0MiB cap on a golden file; not read"
    car.expect(Expect(503, 200, "canary/demo", reason, ON_TRITON))
    car.golden.write_bytes(good)
    car.passes("canary/demo")


def test_record_that_cannot_write_a_first_golden_says_none_was_written(
    tmp_path: Path, healthy_triton: TritonServer
) -> None:
    """It said "the previous golden file is unchanged" when there was none."""
    cfg = write_config(tmp_path, healthy_triton.url, [DEMO_CANARY])

    def small_files() -> None:  # Python ignores SIGXFSZ, so the write fails with EFBIG instead of killing it
        resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "probe", "record", "-c", str(cfg)],
        env=env,
        preexec_fn=small_files,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc
    assert proc.stderr == (
        "probe: cannot write golden file for canary demo: [Errno 27] File too large; no golden file was written\n"
    )
    assert not (tmp_path / "golden" / "demo.json").exists()
    assert list((tmp_path / "golden").iterdir()) == [], "a temp file was left behind"
