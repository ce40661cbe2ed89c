"""Every object kvmesh would create validates against the official Kubernetes OpenAPI schemas (oldest and
newest supported versions), and ModelService examples — good and bad — against the CRD's own structural
schema with what the API server applies: defaults, enums, bounds, unknown fields (strict field validation)
and the CEL ``x-kubernetes-validations`` rules (evaluated with cel-python)."""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from kvmesh.k8s.api import RULES, ModelService
from kvmesh.k8s.crd import crd
from kvmesh.k8s.install import InstallValues, install_manifests, to_yaml
from kvmesh.k8s.objects import model_service_objects

VERSIONS = ("1.29.0", "1.37.0")  # oldest (CEL rules GA, pod-index label) and newest supported
REPO = pathlib.Path(__file__).resolve().parents[1]


def ms_obj(spec: dict[str, Any], name: str = "llama") -> dict[str, Any]:
    return {"apiVersion": "kvmesh.io/v1alpha1", "kind": "ModelService",
            "metadata": {"name": name, "namespace": "ml", "uid": "uid-1", "generation": 3}, "spec": spec}


BASE = {"model": {"name": "meta-llama/Llama-3-8B", "source": "pvc://models/llama3"}}
VARIANTS = {
    "defaults": BASE,
    "sim": {"model": {"name": "demo", "source": "/models/demo"}, "engine": {"kind": "sim", "gpus": 0},
            "cache": {"enabled": False}},
    "everything": {**BASE, "engine": {"image": "vllm:x", "args": ["--max-num-seqs", "64"],
                                      "env": [{"name": "A", "value": "1"}], "gpus": 2, "tensorParallelSize": 2,
                                      "resources": {"requests": {"cpu": 8, "memory": "64Gi"}},
                                      "nodeSelector": {"gpu": "h100"}, "maxModelLen": 8192,
                                      "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                                      "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                                          "nodeSelectorTerms": [{"matchExpressions": [
                                              {"key": "zone", "operator": "In", "values": ["a"]}]}]}}}},
                   "roles": {"aggregated": {"replicas": 3, "minReplicas": 1, "maxReplicas": 8}},
                   "cache": {"dramMib": 4096, "ssd": {"mib": 100000, "hostPath": "/mnt/nvme"}, "eviction": "ttl",
                             "ttlSeconds": 600, "poolReplicas": 2, "remote": "redis://r:6379"},
                   "routing": {"policy": "kv-aware", "knobs": {"prefillTps": 9000, "sessionSlack": 2}},
                   "gateway": {"replicas": 3, "serviceType": "LoadBalancer", "port": 443},
                   "tenants": {"secretName": "tenants"}, "priorityClassName": "high",
                   "schedulerName": "kvmesh-binpack"},
    "groups": {**BASE, "engine": {"gpus": 8, "tensorParallelSize": 16, "podsPerReplica": 2},
               "roles": {"aggregated": {"replicas": 2}}},
}


def _errors(obj: dict[str, Any], version: str) -> str | None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{obj['kind']}/{obj['metadata']['name']}: {e.message}"
    return None


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_model_service_object_is_valid_kubernetes(variant: str, version: str) -> None:
    objs = model_service_objects(ModelService.from_object(ms_obj(VARIANTS[variant])))
    assert objs
    errors = [e for o in objs if (e := _errors(o, version))]
    assert not errors, errors


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("values", [{}, {"namespace": "ops", "watchNamespace": "ml", "binpackScheduler": False,
                                         "serviceMonitor": False}])
def test_install_bundle_is_valid_kubernetes(values: dict[str, Any], version: str) -> None:
    objs = [o for o in install_manifests(InstallValues.model_validate(values))]
    errors = [e for o in objs if (e := _errors(o, version))]
    assert not errors, errors


def test_validator_rejects_a_broken_object() -> None:
    dep = copy.deepcopy(model_service_objects(ModelService.from_object(ms_obj(BASE)))[-1])
    dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    assert _errors(dep, VERSIONS[0])


def test_checked_in_crd_equals_the_generator() -> None:
    path = REPO / "deploy" / "crds" / "modelservices.kvmesh.io.yaml"
    assert yaml.safe_load(path.read_text()) == crd(), "regenerate: kvmesh k8s manifests | first document"
    assert to_yaml([crd()]).removeprefix("---\n") == path.read_text()


# -- the CRD's structural schema, applied as the API server does ------------------------------------------

def _schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _defaults(node: dict[str, Any], value: Any) -> Any:
    """Fill defaults top-down, as the API server does on create (an object default of {} recurses)."""
    if not isinstance(value, dict) or node.get("type") != "object":
        if isinstance(value, list) and "items" in node:
            return [_defaults(node["items"], v) for v in value]
        return value
    for key, sub in node.get("properties", {}).items():
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        if key in value:
            value[key] = _defaults(sub, value[key])
    return value


def _json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI v3.0 → JSON Schema: boolean exclusiveMinimum, int-or-string, no unknown fields (strict)."""
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes") and k not in ("properties", "items",
                                                                                            "additionalProperties")}
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    if "properties" in node:
        out["properties"] = {k: _json_schema(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _json_schema(node["additionalProperties"])
    if "items" in node:
        out["items"] = _json_schema(node["items"])
    return out


def _cel_errors(node: dict[str, Any], value: Any, env: celpy.Environment) -> list[str]:
    errs: list[str] = []
    for rule in node.get("x-kubernetes-validations", []):
        prog = env.program(env.compile(rule["rule"]))
        if not bool(prog.evaluate({"self": celpy.json_to_cel(value)})):
            errs.append(rule["message"])
    for key, sub in node.get("properties", {}).items():
        if isinstance(value, dict) and key in value:
            errs += _cel_errors(sub, value[key], env)
    return errs


def admit(obj: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the object after defaulting, the API server's error messages)."""
    schema = _schema()
    obj = _defaults(schema, copy.deepcopy(obj))
    v = jsonschema.Draft7Validator(_json_schema(schema))
    errs = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(obj)]
    if not errs:
        errs = _cel_errors(schema["properties"]["spec"], obj["spec"], celpy.Environment())
    return obj, errs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_good_examples_are_admitted_and_defaults_match_the_operator(variant: str) -> None:
    obj, errs = admit(ms_obj(VARIANTS[variant]))
    assert errs == []
    # what the API server stores parses to the same spec the operator builds from the raw object
    assert ModelService.from_object(obj).spec == ModelService.from_object(ms_obj(VARIANTS[variant])).spec


BAD = [
    ({"model": {"name": "m"}}, "'source' is a required property"),
    ({"model": {"name": "m", "source": "ftp://x"}}, "does not match"),
    ({**BASE, "engine": {"kind": "tgi"}}, "'tgi' is not one of"),
    ({**BASE, "engine": {"gpu": 1}}, "Additional properties are not allowed ('gpu' was unexpected)"),
    ({**BASE, "engine": {"gpus": 2}}, "tensorParallelSize must equal gpus × podsPerReplica for vllm engines"),
    ({**BASE, "roles": {"aggregated": {"replicas": 9, "maxReplicas": 4}}},
     "replicas must lie within minReplicas..maxReplicas"),
    ({**BASE, "roles": {"aggregated": {"minReplicas": 5, "maxReplicas": 4, "replicas": 4}}},
     "minReplicas must not exceed maxReplicas"),
    ({**BASE, "cache": {"eviction": "ttl"}}, "eviction ttl needs ttlSeconds"),
    ({**BASE, "routing": {"policy": "random-ish"}}, "'random-ish' is not one of"),
    ({**BASE, "routing": {"knobs": {"prefillTps": 0}}}, "less than or equal to the minimum of 0"),
    ({"model": {"name": "m", "source": "hf://org/m"}, "engine": {"kind": "sim", "gpus": 0}},
     "sim engines read the model's tokenizer from a path or a PVC"),
    ({**BASE, "gateway": {"serviceType": "ExternalName"}}, "'ExternalName' is not one of"),
]


@pytest.mark.parametrize(("spec", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_examples_are_rejected_with_a_clear_message(spec: dict[str, Any], message: str) -> None:
    _, errs = admit(ms_obj(spec))
    assert any(message in e for e in errs), errs
    with pytest.raises(ValueError):  # and the operator refuses the same spec (pydantic's ValidationError)
        ModelService.from_object(ms_obj(spec))


def test_every_rule_is_in_the_crd_once() -> None:
    spec = _schema()["properties"]["spec"]
    found = []
    for rule in RULES:
        node = spec
        for part in filter(None, rule.path.split(".")):
            node = node["properties"][part]
        found += [r for r in node["x-kubernetes-validations"] if r["rule"] == rule.cel]
    assert len(found) == len(RULES)


def test_crd_api_surface() -> None:
    v = crd()["spec"]["versions"][0]
    assert v["subresources"]["scale"]["specReplicasPath"] == ".spec.roles.aggregated.replicas"
    assert "status" in v["subresources"]
    assert [c["name"] for c in v["additionalPrinterColumns"]][:5] == ["Model", "Engine", "Desired", "Ready", "Status"]
