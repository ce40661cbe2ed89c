"""The Helm chart ``deploy/helm/kvmesh``, rendered and linted by Helm's own engine (``helm-python-sdk``: Helm's
Go SDK behind a C ABI, no ``helm`` binary, no cluster), equals what ``kvmesh k8s manifests`` prints for the same
values, and every rendered object is valid Kubernetes (the versions the schema tests use).

Generated files stay equal to their generators: ``values.schema.json`` (from ``InstallValues``), the chart's
CRD (``crd()``), its dashboards and alert rules (``dashboard_files()``, ``rules_file()``).  Regenerate them
with ``python tests/test_helm.py``.
The Dockerfile is parsed, not built (no registry here): it must provide every ``kvmesh`` command the
manifests run, and the connector config it documents must be the one the operator passes.
"""

from __future__ import annotations

import copy
import json
import pathlib
import re
from typing import Any, cast

import helm_python as helm
import pytest
import typer
import yaml
from typer.testing import CliRunner

from kvmesh.k8s.api import ModelService
from kvmesh.k8s.crd import crd
from kvmesh.k8s.install import InstallValues, dashboard_files, install_manifests, rules_file, to_yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
CHART = REPO / "deploy" / "helm" / "kvmesh"
SCHEMA = CHART / "values.schema.json"
CRD_FILE = CHART / "crds" / "modelservices.kvmesh.io.yaml"
DASHBOARDS = CHART / "dashboards"
RULES = CHART / "rules" / "kvmesh-rules.yml"
Obj = dict[str, Any]


def values_schema() -> Obj:
    """``InstallValues``' JSON schema under its wire names (pydantic's titles dropped: noise in a chart)."""
    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "title"}
        return [strip(v) for v in node] if isinstance(node, list) else node
    return strip(InstallValues.model_json_schema(by_alias=True))  # type: ignore[no-any-return]


def regenerate() -> None:
    SCHEMA.write_text(json.dumps(values_schema(), indent=2) + "\n")
    CRD_FILE.write_text(to_yaml([crd()]).removeprefix("---\n"))
    for old in DASHBOARDS.glob("*.json"):
        old.unlink()
    for name, text in dashboard_files().items():
        (DASHBOARDS / name).write_text(text)
    RULES.parent.mkdir(exist_ok=True)
    RULES.write_text(rules_file())


# (release namespace, values): defaults; every key changed (a timeout Helm would print as 1e+06 as a float,
# an image with a registry port and digest, quotes); the release namespace alone.
CASES: dict[str, tuple[str, Obj]] = {
    "defaults": ("kvmesh-system", {}),
    "everything": ("ignored", {
        "namespace": "ops", "image": "registry.local:5000/kvmesh@sha256:" + "ab" * 32,
        "vllmImage": 'vllm "custom":1', "watchNamespace": "ml", "groupTimeoutSeconds": 1000000,
        "binpackScheduler": False, "serviceMonitor": True, "grafanaDashboard": True,
        "prometheusRules": True}),
    "release-namespace": ("llm-platform", {"serviceMonitor": True}),
}


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART) as c:
        yield c


def key(o: Obj) -> tuple[str, str, str]:
    return o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]


def by_key(objects: list[Obj]) -> dict[tuple[str, str, str], Obj]:
    out = {key(o): o for o in objects}
    assert len(out) == len(objects), "two objects share kind/namespace/name"
    return out


def helm_objects(chart: Any, namespace: str, values: Obj) -> list[Obj]:
    """What ``helm install -n NAMESPACE`` would send: the CRDs under crds/, then the rendered templates."""
    rendered = chart.render(copy.deepcopy(values), name="kvmesh", namespace=namespace, is_install=True)
    docs = [d for c in chart.crds for d in yaml.safe_load_all(c["data"])]
    docs += [d for text in rendered.values() for d in yaml.safe_load_all(text)]
    return [d for d in docs if d]


def cli_objects(tmp_path: pathlib.Path, values: Obj) -> list[Obj]:
    """What ``kvmesh k8s manifests --values FILE`` prints."""
    from kvmesh.cli import app

    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = CliRunner().invoke(app, ["k8s", "manifests", "--values", str(path)])
    assert result.exit_code == 0, result.output
    return [d for d in yaml.safe_load_all(result.output) if d]


def expected_values(namespace: str, values: Obj) -> InstallValues:
    return InstallValues.model_validate({"namespace": namespace, **values})


@pytest.mark.parametrize("case", sorted(CASES))
def test_chart_renders_exactly_what_kvmesh_k8s_manifests_prints(case: str, chart: Any,
                                                                 tmp_path: pathlib.Path) -> None:
    namespace, values = CASES[case]
    v = expected_values(namespace, values)
    printed = cli_objects(tmp_path, v.model_dump(by_alias=True))
    assert printed == install_manifests(v)
    rendered = helm_objects(chart, namespace, values)
    expected, got = by_key(printed), by_key(rendered)
    assert sorted(got) == sorted(expected)
    for k, obj in expected.items():
        assert got[k] == obj, k


def _validate(o: Obj, version: str) -> str | None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(o, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{o['kind']}/{o['metadata']['name']}: {e.message}"
    return None


def test_rendered_objects_are_valid_kubernetes(chart: Any) -> None:
    from tests.test_k8s_schema import VERSIONS

    checked = set()
    for namespace, values in CASES.values():
        # kubernetes-validate ships the built-in kinds only; the ServiceMonitor (a Prometheus Operator CRD)
        # is checked field by field against kvmesh's own generator in the equality test above.
        objs = [o for o in helm_objects(chart, namespace, values) if o["kind"] not in ("ServiceMonitor",
                                                                                     "PrometheusRule")]
        checked |= {o["kind"] for o in objs}
        errors = [e for version in VERSIONS for o in objs if (e := _validate(o, version))]
        assert not errors, errors
    assert checked == {"CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                       "Deployment", "ConfigMap"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_chart_lints_clean(case: str) -> None:
    from tests.test_k8s_schema import VERSIONS

    namespace, values = CASES[case]
    for version in VERSIONS:
        report = helm.lint(CHART, values, strict=True, namespace=namespace, kube_version=f"v{version}")
        assert report["errors"] == [], report
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report  # no warnings, no errors


def test_generated_files_equal_their_generators(chart: Any) -> None:
    hint = "regenerate: python tests/test_helm.py"
    assert json.loads(SCHEMA.read_text()) == values_schema(), hint
    assert chart.schema == values_schema()
    assert CRD_FILE.read_text() == (REPO / "deploy" / "crds" / CRD_FILE.name).read_text(), hint
    assert [yaml.safe_load(c["data"]) for c in chart.crds] == [crd()], hint
    assert {p.name: p.read_text() for p in DASHBOARDS.glob("*.json")} == dashboard_files(), hint
    assert RULES.read_text() == rules_file(), hint


def test_values_yaml_holds_the_install_defaults(chart: Any) -> None:
    fields = {f.alias or n for n, f in InstallValues.model_fields.items()}
    assert set(chart.values) == fields - {"namespace"}  # unset: the release's namespace
    assert InstallValues.model_validate({"namespace": "kvmesh-system", **chart.values}) == InstallValues()


@pytest.mark.parametrize("values", [{"groupTimeoutSeconds": 2.5}, {"groupTimeoutSeconds": 0},
                                    {"replicas": 2}, {"serviceMonitor": "yes"}, {"groupTimeoutSeconds": "300"},
                                    {"namespace": ""}, {"image": 3}])
def test_helm_and_kvmesh_reject_the_same_bad_values(values: Obj, chart: Any) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmError):
        chart.render(values, name="kvmesh", namespace="kvmesh-system")
    with pytest.raises(ValueError):
        InstallValues.model_validate(values)


# -- the image --------------------------------------------------------------------------------------------

def _containers(objects: list[Obj]) -> list[Obj]:
    return [c for o in objects if o["kind"] in ("Deployment", "DaemonSet", "StatefulSet")
            for c in o["spec"]["template"]["spec"]["containers"]]


def test_the_image_runs_every_kvmesh_command_the_manifests_use() -> None:
    from kvmesh.cli import app
    from kvmesh.engines.vllm import connector_config
    from kvmesh.k8s import naming
    from kvmesh.k8s.objects import DEFAULT_IMAGE, model_service_objects
    from tests.test_k8s_schema import VARIANTS, ms_obj

    dockerfile = (REPO / "Dockerfile").read_text()
    objs = install_manifests(InstallValues())
    for spec in VARIANTS.values():
        objs += model_service_objects(ModelService.from_object(ms_obj(cast(Obj, spec))))
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    ours = [c for c in _containers(objs) if c["image"] == DEFAULT_IMAGE]
    assert {c["args"][0] for c in ours} >= {"operator", "gateway", "cache-node", "engine"}
    for c in ours:
        assert c["command"] == ["kvmesh"] and c["args"][0] in commands, c["name"]
    assert 'ENTRYPOINT ["kvmesh"]' in dockerfile and re.search(r'pip wheel .*"\.\[k8s[,\]]', dockerfile)
    # the operator's pod sets runAsNonRoot: the kubelet can only check a numeric, non-zero image user
    user = re.findall(r"^USER (\d+)", dockerfile, re.M)
    assert user and int(user[-1]) > 0
    documented = json.dumps(connector_config(naming.CACHE_SOCKET), separators=(",", ":"))
    assert f"--kv-transfer-config '{documented}'" in dockerfile


if __name__ == "__main__":
    regenerate()
