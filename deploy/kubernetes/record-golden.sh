#!/bin/sh
# Record this environment's golden records on a running pod and store them in the probe-golden ConfigMap,
# next to every record already there. Run it once per environment (GPU model, driver, CUDA, Triton version):
#
#   deploy/kubernetes/record-golden.sh pod/triton-resnet50-7d9c-abcde        # a pod on the node type to record
#   deploy/kubernetes/record-golden.sh deploy/triton-resnet50 -- --force     # replace this environment's record
#
# What it does, in this order:
#   1. reads the ConfigMap as it is now (kubectl get), and copies its files into a directory in the pod's
#      writable /tmp, so recording adds this environment's record to the golden files of the others instead of
#      starting from nothing (a ConfigMap built from a fresh directory would drop every other environment);
#   2. runs `probe record` there against the pod's own Triton, with the pod's probe.yaml pointed at that copy;
#   3. writes the ConfigMap back from the directory (JSON as data, .npz tensors as binaryData) with
#      `kubectl replace`, carrying the resourceVersion read in step 1: if someone recorded in between, the API
#      server refuses with a Conflict and nothing is lost; run the script again. The first recording creates
#      the ConfigMap.
# The pod's mounted /etc/probe is not the source in step 1: the kubelet refreshes a ConfigMap volume only every
# minute or so, and a recording made just after another one would start from the stale copy.
# The sidecars pick up the new golden files by themselves (the projected volume updates, no restart).
#
# Needs kubectl and a POSIX sh here; in the pod, the probe image (python3 and probe on PATH, /tmp writable).
# Settings (environment): NAMESPACE (inference), CONFIGMAP (probe-golden), CONTAINER (probe), KUBECTL (kubectl),
# and, inside the pod, PROBE_CONFIG (/etc/probe/probe.yaml) and WORKDIR (/tmp/probe-record).
set -eu

NAMESPACE=${NAMESPACE:-inference}
CONFIGMAP=${CONFIGMAP:-probe-golden}
CONTAINER=${CONTAINER:-probe}
KUBECTL=${KUBECTL:-kubectl}
PROBE_CONFIG=${PROBE_CONFIG:-/etc/probe/probe.yaml}
WORKDIR=${WORKDIR:-/tmp/probe-record}
TARGET=${1:-deploy/triton-resnet50}
[ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift

# Runs in the pod: the current ConfigMap (JSON, or nothing) on stdin, the new one on stdout; probe record's
# own lines go to stderr. Arguments: probe.yaml, the work directory, the ConfigMap's name and namespace, then
# options for `probe record`.
IN_POD='
import base64, json, os, shutil, subprocess, sys
import yaml
config, workdir, name, namespace, *options = sys.argv[1:]
raw = sys.stdin.read().strip()
current = json.loads(raw) if raw else None
golden = os.path.join(workdir, "golden")
shutil.rmtree(workdir, ignore_errors=True)
os.makedirs(golden)
if current is not None:
    for key, text in (current.get("data") or {}).items():
        with open(os.path.join(golden, key), "wb") as f:
            f.write(text.encode("utf-8"))
    for key, b64 in (current.get("binaryData") or {}).items():
        with open(os.path.join(golden, key), "wb") as f:
            f.write(base64.b64decode(b64))
with open(config, encoding="utf-8") as f:
    cfg = yaml.safe_load(f)
cfg["golden_dir"] = golden
here = os.path.dirname(os.path.abspath(config))
for canary in cfg.get("canaries") or []:
    for item in canary.get("inputs") or []:
        fill = item.get("fill")
        if isinstance(fill, dict) and isinstance(fill.get("file"), str):
            fill["file"] = os.path.join(here, fill["file"])
record_config = os.path.join(workdir, "record.yaml")
with open(record_config, "w", encoding="utf-8") as f:
    yaml.safe_dump(cfg, f, sort_keys=False)
code = subprocess.call(["probe", "record", "-c", record_config, *options], stdout=sys.stderr)
if code:
    sys.exit(code)
meta = {"name": name, "namespace": namespace}
if current is not None:
    meta["resourceVersion"] = current["metadata"]["resourceVersion"]
    for part in ("labels", "annotations"):
        if current["metadata"].get(part):
            meta[part] = dict(current["metadata"][part])
    meta.get("annotations", {}).pop("kubectl.kubernetes.io/last-applied-configuration", None)
out = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {}, "binaryData": {}}
for key in sorted(os.listdir(golden)):
    with open(os.path.join(golden, key), "rb") as f:
        data = f.read()
    try:
        out["data"][key] = data.decode("utf-8")
    except UnicodeDecodeError:
        out["binaryData"][key] = base64.b64encode(data).decode("ascii")
size = sum(len(v) for part in ("data", "binaryData") for v in out[part].values())
if size > 1000000:
    sys.exit(f"record-golden: the golden files take {size} bytes, over what a ConfigMap holds (1 MiB)")
json.dump(out, sys.stdout)
'

current=$($KUBECTL -n "$NAMESPACE" get configmap "$CONFIGMAP" -o json --ignore-not-found)
updated=$(printf '%s' "$current" | $KUBECTL -n "$NAMESPACE" exec -i "$TARGET" -c "$CONTAINER" -- \
    python3 -c "$IN_POD" "$PROBE_CONFIG" "$WORKDIR" "$CONFIGMAP" "$NAMESPACE" "$@")
if [ -n "$current" ]; then
    printf '%s\n' "$updated" | $KUBECTL -n "$NAMESPACE" replace -f -
else
    printf '%s\n' "$updated" | $KUBECTL -n "$NAMESPACE" create -f -
fi
