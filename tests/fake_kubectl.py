"""A stand-in for kubectl, for tests/test_recording_recipe.py: a cluster made of files under $FAKE_CLUSTER.

    configmaps/<namespace>/<name>.json   the stored ConfigMaps, each with its metadata.resourceVersion
    pods/<target>/env.json               the environment a pod's processes see (`exec` runs them here with it);
                                         <target> is the kubectl target with "/" as "_" (pod_triton-h100)

It knows the verbs deploy/kubernetes/record-golden.sh uses, with the API server's answers that matter to it:
`get configmap NAME -o json --ignore-not-found`, `exec -i TARGET -c CONTAINER -- CMD...`, `replace -f -` (a
Conflict when resourceVersion is not the stored one) and `create -f -` (AlreadyExists). With $FAKE_RACE set,
`exec` also bumps every ConfigMap's resourceVersion, as another recording finishing meanwhile would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

CLUSTER = Path(os.environ["FAKE_CLUSTER"])


def configmap_path(namespace: str, name: str) -> Path:
    return CLUSTER / "configmaps" / namespace / f"{name}.json"


def store(obj: dict[str, Any], version: int) -> None:
    obj["metadata"]["resourceVersion"] = str(version)
    path = configmap_path(obj["metadata"]["namespace"], obj["metadata"]["name"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def main(argv: list[str]) -> int:
    namespace = "default"
    if argv[:1] == ["-n"]:
        namespace, argv = argv[1], argv[2:]
    verb, rest = argv[0], argv[1:]
    if verb == "get" and rest[:1] == ["configmap"] and "-o" in rest and "--ignore-not-found" in rest:
        path = configmap_path(namespace, rest[1])
        if path.exists():
            sys.stdout.write(path.read_text(encoding="utf-8"))
        return 0
    if verb == "exec":
        split = rest.index("--")
        options, command = rest[:split], rest[split + 1 :]
        targets, words = [], iter(options)
        for word in words:
            if word == "-c":
                next(words)  # the container: a fake pod has one
            elif word != "-i":
                targets.append(word)
        assert len(targets) == 1, f"exec: one target expected, got {options}"
        target = targets[0]
        env_file = CLUSTER / "pods" / target.replace("/", "_") / "env.json"
        if not env_file.exists():
            print(f'Error from server (NotFound): pods "{target}" not found', file=sys.stderr)
            return 1
        if os.environ.get("FAKE_RACE"):
            for path in (CLUSTER / "configmaps").glob("*/*.json"):
                obj = json.loads(path.read_text(encoding="utf-8"))
                store(obj, int(obj["metadata"]["resourceVersion"]) + 1)
        env = {**os.environ, **json.loads(env_file.read_text(encoding="utf-8"))}
        if command[0] == "python3":
            command[0] = sys.executable
        return subprocess.run(command, env=env, stdin=sys.stdin, check=False).returncode
    if verb in ("replace", "create") and rest == ["-f", "-"]:
        obj = json.loads(sys.stdin.read())
        meta = obj["metadata"]
        meta.setdefault("namespace", namespace)
        path = configmap_path(meta["namespace"], meta["name"])
        kind = f'configmaps "{meta["name"]}"'
        if verb == "create":
            if path.exists():
                print(f"Error from server (AlreadyExists): {kind} already exists", file=sys.stderr)
                return 1
            store(obj, 1)
        else:
            if not path.exists():
                print(f"Error from server (NotFound): {kind} not found", file=sys.stderr)
                return 1
            stored = json.loads(path.read_text(encoding="utf-8"))["metadata"]["resourceVersion"]
            if meta.get("resourceVersion") != stored:
                print(
                    f"Error from server (Conflict): Operation cannot be fulfilled on {kind}: the object has been "
                    "modified; please apply your changes to the latest version and try again",
                    file=sys.stderr,
                )
                return 1
            store(obj, int(stored) + 1)
        print(f"configmap/{meta['name']} {'created' if verb == 'create' else 'replaced'}")
        return 0
    print(f"fake kubectl: not faked: {' '.join(argv)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
