"""k8s/rayjob.yaml and k8s/rayservice.yaml against KubeRay's CRD schemas (``../shared/kuberay/``, beside the
checkout), checked strictly as its README describes: every object schema that lists properties (and does not
preserve unknown fields) refuses keys it does not list, so a misspelt key fails here, where the API server
would drop it without a word. The RayService must serve the applications of serve/config.yaml."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CRDS = REPO.parent / "shared" / "kuberay"
MANIFESTS = {"rayjob.yaml": "ray.io_rayjobs.yaml", "rayservice.yaml": "ray.io_rayservices.yaml"}

pytestmark = pytest.mark.skipif(not CRDS.is_dir(), reason=f"KubeRay's CRD schemas are not at {CRDS} (CI puts them "
                                                          "beside the checkout)")


def strict(schema: dict) -> dict:
    """The CRD's structural schema made to refuse unknown keys."""
    out = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(out)
    out["properties"]["metadata"] = {"type": "object"}
    return out


def crd_schema(crd_file: str) -> dict:
    crd = yaml.safe_load((CRDS / crd_file).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return strict(version["schema"]["openAPIV3Schema"])


def errors(manifest: dict, crd_file: str) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(crd_schema(crd_file))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


def manifest(name: str) -> dict:
    return yaml.safe_load((REPO / "k8s" / name).read_text())


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_the_manifest_matches_kuberays_schema_strictly(name):
    m = manifest(name)
    assert m["apiVersion"] == "ray.io/v1" and errors(m, MANIFESTS[name]) == []


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_a_misspelt_key_fails_the_check(name):
    m = manifest(name)
    m["spec"]["shutdownAfterJobFinish" if name == "rayjob.yaml" else "serveConfig"] = True
    cluster = m["spec"].get("rayClusterSpec") or m["spec"]["rayClusterConfig"]
    cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    found = errors(m, MANIFESTS[name])
    assert len(found) == 2 and all("Additional properties are not allowed" in e for e in found), found


def test_the_rayservice_serves_the_applications_of_serve_config_yaml():
    from ray.serve.schema import ServeDeploySchema

    service = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    local = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(service)  # what KubeRay hands to Serve must be a valid Serve config
    assert service["applications"] == local["applications"]
    assert service["http_options"]["host"] == "0.0.0.0"  # reached through the Service, not loopback


def test_the_rayjob_runs_stage2_on_gpu_workers_with_shared_storage():
    m = manifest("rayjob.yaml")["spec"]
    assert "jobs/stage2.py" in m["entrypoint"] and "--name stage2" in m["entrypoint"]
    (workers,) = m["rayClusterSpec"]["workerGroupSpecs"]
    container = workers["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    head = m["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for c in (head, container):  # every node writes checkpoints to the same store
        assert {e["name"]: e["value"] for e in c["env"]}["MAVILT_STORAGE"].startswith("s3://")
