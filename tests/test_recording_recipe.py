"""deploy/kubernetes/record-golden.sh, played on two environments.

kubectl is tests/fake_kubectl.py, a cluster made of files: the ConfigMap is a JSON file, and `kubectl exec`
runs the command here with the pod's environment. What runs "in the pod" is the script's own code and the real
`probe record`, against the real Triton; the two environments are two fake NVML drivers (an H100 on 550, an A100
on 535), which is all that tells one node type from another in a golden record's fingerprint.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from demo.nvml_fakes import FakeGpu, FakeNvmlState, build_fake_nvml
from tests.conftest import TritonServer
from tests.helpers import DEMO_CANARY, REPO, run_cli, write_config

pytestmark = pytest.mark.triton

SCRIPT = REPO / "deploy" / "kubernetes" / "record-golden.sh"
FAKE_KUBECTL = REPO / "tests" / "fake_kubectl.py"
NAMESPACE = "inference"
TOLERANCE_CANARY: dict[str, Any] = {
    **DEMO_CANARY,
    "name": "fp64",
    "model": "demo_classifier_fp64",
    "compare": {"mode": "tolerance", "rtol": 1.0e-6, "atol": 1.0e-9},
}
ENVIRONMENTS = {
    "pod/triton-h100": {"driver": "550.54.15", "cuda": 12040, "gpus": (FakeGpu("GPU-aaaa"),)},
    "pod/triton-a100": {
        "driver": "535.104.05",
        "cuda": 12020,
        "gpus": (FakeGpu("GPU-bbbb", name="NVIDIA A100-SXM4-80GB"),),
    },
}


class Cluster:
    """The fake cluster's files, and the script run against it."""

    def __init__(self, root: Path, triton: TritonServer, nvml_library: Path) -> None:
        self.root = root
        self.triton = triton
        bin_dir = root / "bin"
        bin_dir.mkdir(parents=True)
        kubectl = bin_dir / "kubectl"
        kubectl.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_KUBECTL} "$@"\n')
        # `probe` on the pod's PATH: this checkout's probe, run by this interpreter.
        probe = bin_dir / "probe"
        probe.write_text(f'#!/bin/sh\nexec {sys.executable} -m probe "$@"\n')
        for tool in (kubectl, probe):
            tool.chmod(0o755)
        self.path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
        self.nvml_library = nvml_library
        self.pods: dict[str, Path] = {}
        for target, settings in ENVIRONMENTS.items():
            pod = root / "pods" / target.replace("/", "_")
            pod.mkdir(parents=True)
            state = FakeNvmlState(pod / "nvml-state")
            state.set(**settings)
            # The pod's probe.yaml, as configmap.yaml mounts it: golden_dir is the mounted directory (which the
            # script must not record into, nor read from).
            (pod / "etc-probe").mkdir()
            write_config(
                pod / "etc-probe",
                triton.url,
                [DEMO_CANARY, TOLERANCE_CANARY],
                gpu={"source": "nvml"},
                golden_dir=str(pod / "etc-probe"),
            )
            env = {
                "PATH": self.path,
                "PYTHONPATH": str(REPO),
                "LD_LIBRARY_PATH": str(nvml_library.parent),
                "FAKE_NVML_STATE": str(state.path),
                "NVIDIA_VISIBLE_DEVICES": "all",
            }
            (pod / "env.json").write_text(json.dumps(env))
            self.pods[target] = pod

    def record(self, target: str, *options: str, race: bool = False) -> subprocess.CompletedProcess[str]:
        """Play the recipe for one environment: record-golden.sh TARGET [-- OPTIONS]."""
        pod = self.pods[target]
        env = {
            **os.environ,
            "PATH": self.path,
            "FAKE_CLUSTER": str(self.root),
            "NAMESPACE": NAMESPACE,
            "PROBE_CONFIG": str(pod / "etc-probe" / "probe.yaml"),
            "WORKDIR": str(pod / "tmp" / "probe-record"),
        }
        if race:
            env["FAKE_RACE"] = "1"
        args = [target, "--", *options] if options else [target]
        return subprocess.run(
            ["sh", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )

    def configmap(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(
            (self.root / "configmaps" / NAMESPACE / "probe-golden.json").read_text(encoding="utf-8")
        )
        return data

    def records(self, canary: str) -> dict[str, dict[str, Any]]:
        """The golden file's records in the ConfigMap, by the driver of their environment."""
        golden = json.loads(self.configmap()["data"][f"{canary}.json"])
        return {r["environment"]["driver"]: r for r in golden["records"]}

    def mounted(self, target: str) -> Path:
        """What the kubelet would project into this pod's /etc/probe from the ConfigMap now."""
        directory = self.pods[target] / "etc-probe"
        cm = self.configmap()
        for key, text in cm.get("data", {}).items():
            (directory / key).write_bytes(text.encode("utf-8"))
        for key, b64 in cm.get("binaryData", {}).items():
            (directory / key).write_bytes(base64.b64decode(b64))
        return directory / "probe.yaml"

    def check(self, target: str) -> subprocess.CompletedProcess[str]:
        env = json.loads((self.pods[target] / "env.json").read_text())
        return run_cli("check", "-c", str(self.mounted(target)), env=env)


@pytest.fixture
def cluster(tmp_path: Path, healthy_triton: TritonServer) -> Cluster:
    return Cluster(tmp_path, healthy_triton, build_fake_nvml(tmp_path))


def test_recipe_keeps_every_environments_records(cluster: Cluster) -> None:
    first = cluster.record("pod/triton-h100")
    assert first.returncode == 0, first.stderr
    assert "configmap/probe-golden created" in first.stdout
    h100 = cluster.records("demo")["550.54.15"]
    assert h100["environment"]["gpus"] == ["NVIDIA H100 80GB HBM3"]
    assert set(cluster.configmap()["binaryData"]) == {"fp64.npz"}, "tolerance tensors travel as binaryData"

    second = cluster.record("pod/triton-a100")
    assert second.returncode == 0, second.stderr
    assert "configmap/probe-golden replaced" in second.stdout
    for canary in ("demo", "fp64"):
        records = cluster.records(canary)
        assert set(records) == {"550.54.15", "535.104.05"}, f"{canary}: {sorted(records)}"
    assert cluster.records("demo")["550.54.15"] == h100, "the first environment's record must survive unchanged"

    # Both node types pass against the ConfigMap as the kubelet would mount it: each finds its own record.
    for target in ENVIRONMENTS:
        check = cluster.check(target)
        assert check.returncode == 0, f"{target}: {check.stdout}{check.stderr}"


def test_recipe_rerun_on_a_recorded_environment_keeps_the_other(cluster: Cluster) -> None:
    for target in ENVIRONMENTS:
        assert cluster.record(target).returncode == 0
    again = cluster.record("pod/triton-h100", "--force")
    assert again.returncode == 0, again.stderr
    assert set(cluster.records("demo")) == {"550.54.15", "535.104.05"}


def test_recipe_refuses_to_overwrite_a_recording_made_meanwhile(cluster: Cluster) -> None:
    """Two recordings at once: the later replace carries a stale resourceVersion and the API server refuses it."""
    assert cluster.record("pod/triton-h100").returncode == 0
    before = cluster.configmap()
    raced = cluster.record("pod/triton-a100", race=True)
    assert raced.returncode != 0
    assert "Conflict" in raced.stderr, raced.stderr
    after = cluster.configmap()
    assert after["data"] == before["data"], "a refused replace changes nothing"
    retry = cluster.record("pod/triton-a100")
    assert retry.returncode == 0, retry.stderr
    assert set(cluster.records("demo")) == {"550.54.15", "535.104.05"}


def test_recipe_stops_when_recording_is_refused(cluster: Cluster) -> None:
    """`probe record` refusing (here: a canary that does not fit the model) leaves the ConfigMap as it was."""
    assert cluster.record("pod/triton-h100").returncode == 0
    before = cluster.configmap()
    config = cluster.pods["pod/triton-a100"] / "etc-probe" / "probe.yaml"
    config.write_text(config.read_text().replace("IMAGE", "PIXELS"))
    refused = cluster.record("pod/triton-a100")
    assert refused.returncode == 3, refused.stderr
    assert "recording refused" in refused.stderr
    assert cluster.configmap() == before
